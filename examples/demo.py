"""`make demo`: keras_kd side by side with Keras's own Distiller, on bundled data.

Run from the repository root, after ``pip install -e .[demo]`` (or
``pip install keras-kd[demo]``: scikit-learn, matplotlib, mnist1d)::

    python examples/demo.py [--quick] [--output results] [--rows ROW ...] [--no-plots] [--jobs N]

Two parts, each printing its table and writing it (and its PNG plots) to
``--output``; with ``--jobs 2`` (the default on 2 cores or more) they run
side by side, in two processes, and so do MNIST-1D's two student columns:

* digits (`examples/digits.py`): every keras_kd piece on scikit-learn's
  digits (cache, reweighting, alignment, QAT int8 TFLite, low-data regime);
* MNIST-1D (`examples/mnist1d.py`): the recipes where distillation wins.

Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):
    # Run as a script: import `examples.*` from the repository root, and never
    # let this folder shadow installed packages (examples/mnist1d.py vs mnist1d).
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    sys.path.insert(0, os.path.dirname(_HERE))

DATASETS = ("digits", "mnist1d")


def _check_extra():
    missing = []
    for module in ("sklearn", "matplotlib", "mnist1d"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SystemExit(
            f"The demo needs {', '.join(missing)} (not installed). Install the demo extra: "
            "`pip install -e .[demo]` in a clone, or `pip install keras-kd[demo]`."
        )


def parse_args(argv=None):
    from examples import digits

    parser = argparse.ArgumentParser(
        prog="python examples/demo.py",
        description="keras_kd side by side with Keras's own Distiller, on scikit-learn's digits and MNIST-1D.",
    )
    parser.add_argument("--quick", action="store_true", help="one seed, few epochs (about a minute)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS,
                        help="which parts to run (default: both)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random seeds (digits)")
    parser.add_argument("--epochs", type=int, default=40, help="student epochs (digits)")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--qat-epochs", type=int, default=5, help="quantization-aware fine-tuning epochs")
    parser.add_argument("--low-data-epochs", type=int, default=150, help="student epochs in the low-data regime")
    parser.add_argument("--label-fraction", type=float, default=0.1, help="share of labels in the low-data regime")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--student-width", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--rows", nargs="+", default=list(digits.ROWS), choices=digits.ROWS, metavar="ROW",
                        help=f"digits rows to run, among: {', '.join(repr(r) for r in digits.ROWS)}")
    parser.add_argument("--output", default="results", help="folder for the tables and the plots")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes (default: 2 on a machine with 2 cores or more): the digits part runs next "
                             "to the MNIST-1D part, whose two student columns run side by side")
    args = parser.parse_args(argv)
    if not 0.0 < args.label_fraction <= 1.0:
        parser.error(f"--label-fraction must be in (0, 1]. Received: {args.label_fraction}")
    if min(args.epochs, args.teacher_epochs, args.low_data_epochs, args.qat_epochs, args.batch,
           args.student_width) < 1:
        parser.error("epochs, batch and width must be >= 1")
    if args.temperature <= 0 or not 0.0 <= args.alpha <= 1.0:
        parser.error("--temperature must be > 0 and --alpha in [0, 1]")
    if args.jobs is None:
        from examples import mnist1d

        args.jobs = mnist1d.default_jobs()
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1. Received: {args.jobs}")
    if args.quick:
        args.seeds = args.seeds[:1]
        args.epochs, args.teacher_epochs, args.qat_epochs, args.low_data_epochs = 3, 5, 1, 10
    return args


def run_digits(args) -> dict:
    from examples import digits

    settings = digits.Settings(
        seeds=args.seeds, epochs=args.epochs, teacher_epochs=args.teacher_epochs, qat_epochs=args.qat_epochs,
        low_data_epochs=args.low_data_epochs, label_fraction=args.label_fraction, batch=args.batch,
        student_width=args.student_width, temperature=args.temperature, alpha=args.alpha,
        rows=[r for r in digits.ROWS if r in args.rows], output=args.output,
    )
    results, extras = digits.run(settings)
    table = digits.format_table(results, settings)
    print(table, flush=True)
    with open(os.path.join(args.output, "demo_table.txt"), "w") as f:
        f.write(table + "\n")
    if not args.no_plots:
        for path in digits.plot(results, extras, args.output):
            print(f"wrote {path}", flush=True)
    return results


def run_mnist1d(args) -> dict:
    from examples import mnist1d

    return mnist1d.run(quick=args.quick, output=args.output, plots=not args.no_plots, jobs=args.jobs)


PARTS = {"digits": run_digits, "mnist1d": run_mnist1d}


def run_part(name: str, args):
    """Runs one part and prints its time."""
    start = time.perf_counter()
    result = PARTS[name](args)
    print(f"[{name}: {time.perf_counter() - start:.0f} s]", flush=True)
    return result


def main(argv=None) -> dict:
    """Runs the demo; returns ``{"digits": {row: Row}, "mnist1d": {...}}`` for the parts run.

    With ``--jobs`` above 1 and both parts, the digits part runs in a spawned
    process next to the MNIST-1D part (each part sets its own seeds, so the
    numbers do not depend on it)."""
    args = parse_args(argv)
    _check_extra()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.makedirs(args.output, exist_ok=True)
    start = time.perf_counter()
    names = [name for name in DATASETS if name in args.datasets]
    if args.jobs > 1 and len(names) > 1:
        import concurrent.futures
        import multiprocessing

        spawn = multiprocessing.get_context("spawn")  # TensorFlow must not be forked
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            digits_part = pool.submit(run_part, "digits", args)
            mnist1d_results = run_part("mnist1d", args)
            results = {"digits": digits_part.result(), "mnist1d": mnist1d_results}
    else:
        results = {name: run_part(name, args) for name in names}
    print(f"[demo: {time.perf_counter() - start:.0f} s]", flush=True)
    return results


if __name__ == "__main__":
    main()
