"""Command line: ``python -m keras_kd demo [--help]``."""

import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m keras_kd demo [--help]\n\ncommands:\n  demo    end-to-end distillation on scikit-learn's digits")
        return 0
    if argv[0] == "demo":
        from keras_kd import demo

        demo.main(argv[1:])
        return 0
    print(f"unknown command {argv[0]!r}; try `python -m keras_kd --help`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
