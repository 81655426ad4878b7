"""Command line: ``python -m keras_kd [--help]``.

The end-to-end demo is an example, not library code: ``examples/demo.py`` in
the repository (``make demo``), with its own dependencies
(``pip install keras-kd[demo]``).
"""

import sys

USAGE = """usage: python -m keras_kd [--help]

keras_kd is a library: import it in your own training code.

The end-to-end demo (keras_kd side by side with Keras's Distiller, on
scikit-learn's digits and MNIST-1D) lives in the repository's examples/ folder:
    pip install -e .[demo]      # in a clone (or: pip install keras-kd[demo])
    make demo                   # or: python examples/demo.py [--quick] [--output DIR]
"""

DEMO_MOVED = (
    "`python -m keras_kd demo` is gone: the demo is an example now, not library code. "
    "In a clone of the repository: `pip install -e .[demo]` (scikit-learn, matplotlib, mnist1d; "
    "or `pip install keras-kd[demo]`), then `make demo` or `python examples/demo.py [--quick]`."
)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] == "demo":
        print(DEMO_MOVED, file=sys.stderr)
        return 2
    print(f"unknown command {argv[0]!r}; try `python -m keras_kd --help`", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
