"""Where distillation wins: the recipes of issue 17 side by side on MNIST-1D.

MNIST-1D (Greydanus 2020) is built with the `mnist1d` package's procedural
generator (never its downloading loader) and cached under the work folder:
3,600 training examples, a 400-example validation split carved from the
generator's 4,000 training examples (every choice is made on it), and the
generator's 1,000 test examples, used only for the table.

Two students (an MLP with Dense(64) and a ~2.5k-parameter CNN with two
Conv1D(16)), a three-layer Conv1D teacher, Adam, the same epochs for every
row unless the row is about the budget, several seeds; the table gives mean
+- std of the test accuracy at the last epoch. Rows: scratch, Keras's own
``Distiller`` correctly configured, keras_kd KD (cache), decoupled KD, a
3-teacher ensemble, consistent mixup with a patient schedule (and scratch
with the same schedule), a transfer set of extra unlabelled inputs, teacher
and student on different inputs (the student sees every second sample, next
to the same student from scratch on those inputs), a keras-tuner search's
best, and 20% label noise with and without ``teacher_wrong`` reweighting.

Run from the repository root::

    python -m examples.mnist1d [--quick] [--output results]   # or: python examples/mnist1d.py

`run` is the hook `make demo` calls after the digits part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np

if __package__ in (None, ""):
    # Run as a script: import `examples.*` from the repository root, and never let this
    # folder shadow the installed generator package (this file is also called mnist1d.py).
    _HERE = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    sys.path.insert(0, os.path.dirname(_HERE))

STUDENT_KINDS = ("mlp", "cnn")
QUICK_STUDENTS = ("cnn",)

# (row name, recipe function in mnist1d_recipes, the row it is compared with in the table)
ROWS = (
    ("teacher (3x Conv1D)", "teacher_row", None),
    ("scratch", "scratch", None),
    ("keras Distiller", "distiller", "scratch"),
    ("keras_kd KD (cache)", "kd_cache", "scratch"),
    ("keras_kd DKD", "dkd", "scratch"),
    ("keras_kd 3-teacher ensemble", "ensemble", "scratch"),
    ("keras_kd consistent mixup, patient", "mixup_patient", "scratch, patient"),
    ("scratch, patient", "scratch_patient", None),
    ("keras_kd transfer set (+unlabelled)", "transfer", "scratch"),
    ("scratch, every 2nd sample", "half_scratch", None),
    ("keras_kd, teacher 40 / student 20 samples", "half_kd", "scratch, every 2nd sample"),
    ("keras_kd tuned (grid on validation)", "tuned", "scratch"),
    ("scratch, 20% noisy labels", "noisy_scratch", None),
    ("keras_kd KD, 20% noisy labels", "noisy_kd", "scratch, 20% noisy labels"),
    ("keras_kd KD + teacher_wrong, 20% noisy", "noisy_kd_teacher_wrong", "scratch, 20% noisy labels"),
)
BASELINES = {name: baseline for name, _, baseline in ROWS}
ROW_NAMES = tuple(name for name, _, _ in ROWS)


@dataclasses.dataclass
class Result:
    accuracies: List[float] = dataclasses.field(default_factory=list)
    curve: List[float] = dataclasses.field(default_factory=list)  # first seed
    epochs: int = 0
    seconds: float = 0.0
    note: str = ""

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies) * 100)

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies, ddof=1) * 100) if len(self.accuracies) > 1 else 0.0

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "accuracies": list(self.accuracies),
                "epochs": self.epochs,
                "seconds": self.seconds, "note": self.note, "curve": list(self.curve)}


def quick_settings():
    from examples import mnist1d_recipes as recipes

    return recipes.Settings(seeds=[0], epochs=2, patient_epochs=3, teacher_epochs=2, transfer_count=256,
                            tuner_epochs=1, tuner_temperatures=[4.0], tuner_alphas=[0.5, 1.0],
                            tuner_divergences=["dkd"], train_limit=512,
                            steps_per_execution=1)


def default_jobs() -> int:
    """Processes for the student columns: 2 where the machine has 2 cores or more."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(2, cores)


def train_rows(settings, work: str, rows: Sequence[str] = ROW_NAMES, students: Sequence[str] = STUDENT_KINDS,
               verbose: bool = True, jobs: int = 1) -> Dict[str, Dict[str, Result]]:
    """Runs ``rows`` for every student and seed: ``{student: {row: Result}}``.

    ``jobs > 1`` (and several students): the teachers are trained first, in
    this process, and saved in ``work``; then each student's column runs in
    its own process (this one and ``jobs - 1`` spawned ones), each with its
    own caches. Every row sets its own seeds, so the numbers are those of a
    run in one process."""
    unknown = sorted(set(rows) - set(ROW_NAMES))
    if unknown:
        raise ValueError(f"Unknown rows {unknown}. Expected some of {list(ROW_NAMES)}.")
    students = list(students)
    if jobs <= 1 or len(students) == 1:
        return _columns(settings, work, rows, students, verbose)
    import concurrent.futures
    import multiprocessing

    _prepare(settings, work, rows)
    groups = [students[i::jobs] for i in range(min(jobs, len(students)))]
    spawn = multiprocessing.get_context("spawn")  # TensorFlow must not be forked
    with concurrent.futures.ProcessPoolExecutor(len(groups) - 1, mp_context=spawn) as pool:
        futures = [pool.submit(_columns, settings, work, rows, group, verbose, "_".join(group))
                   for group in groups[1:]]
        results = _columns(settings, work, rows, groups[0], verbose, "_".join(groups[0]))
        for future in futures:
            results.update(future.result())
    return {kind: results[kind] for kind in students}


def _prepare(settings, work: str, rows: Sequence[str]) -> None:
    """Trains (or reloads) the teachers the rows need and generates the transfer set, in ``work``."""
    from examples import mnist1d_data
    from examples import mnist1d_recipes as recipes

    functions = {function for name, function, _ in ROWS if name in rows}
    ctx = recipes.Context(work, settings)
    ctx.teacher(0)
    if "ensemble" in functions:
        ctx.ensemble()
    if any(f.startswith("noisy") for f in functions):
        ctx.noisy()
    if "transfer" in functions:
        mnist1d_data.transfer_inputs(work, settings.transfer_count)


def _columns(settings, work: str, rows: Sequence[str], students: Sequence[str], verbose: bool,
             caches: str = "caches") -> Dict[str, Dict[str, Result]]:
    """The rows of ``students``, in this process (``caches``: the cache folder's name in ``work``)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    from examples import mnist1d_recipes as recipes

    tf.get_logger().setLevel("ERROR")
    warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
    ctx = recipes.Context(work, settings, caches=caches)
    results: Dict[str, Dict[str, Result]] = {}
    for kind in students:
        results[kind] = {}
        for name, function, _ in ROWS:
            if name not in rows:
                continue
            result = results[kind][name] = Result()
            start = time.perf_counter()
            for seed in settings.seeds:
                trained = getattr(recipes, function)(ctx, kind, seed, seed == settings.seeds[0])
                x_test = recipes.every_second_sample(ctx.data.x_test) if function.startswith("half") \
                    else ctx.data.x_test
                result.accuracies.append(recipes.accuracy(trained.model, x_test, ctx.data.y_test))
                result.curve = result.curve or trained.curve
                result.epochs, result.note = trained.epochs, trained.note
                if function == "teacher_row":
                    break  # one teacher, whatever the seed
            result.seconds = time.perf_counter() - start
            if verbose:
                print(f"  {kind:<4} {name:<42} {result.mean:6.2f} +- {result.std:4.2f}"
                      f"  ({result.seconds:5.1f} s) {result.note}", flush=True)
    return results


def format_table(results: Dict[str, Dict[str, Result]], settings) -> str:
    from examples import mnist1d_models

    kinds = list(results)
    names = [name for name in ROW_NAMES if any(name in results[k] for k in kinds)]
    lines = [
        f"MNIST-1D (3,600 train / 400 validation / 1,000 test), Adam lr {settings.learning_rate:g}, batch "
        f"{settings.batch}, seeds {settings.seeds}; "
        f"KD rows T={settings.temperature:g} alpha={settings.alpha:g} "
        f"(mixup row: Beta({settings.mixup_alpha:g}) mixup, T={settings.mixup_temperature:g} "
        f"alpha={settings.mixup_kd_alpha:g}); "
        "test accuracy % at the last epoch, mean +- std",
        "| row | epochs | " + " | ".join(mnist1d_models.STUDENT_NAMES[k] for k in kinds) + " |",
        "|---|---|" + "---|" * len(kinds),
    ]
    for name in names:
        cells, epochs, notes = [], "", []
        for kind in kinds:
            r = results[kind].get(name)
            if r is None:
                cells.append("")
                continue
            baseline = results[kind].get(BASELINES[name] or "")
            delta = "" if baseline is None else f" ({r.mean - baseline.mean:+.1f})"
            cells.append(f"{r.mean:.1f} +- {r.std:.1f}{delta}")
            epochs = str(r.epochs)
            if r.note:
                notes.append(f"{kind}: {r.note}")
        label = name + (f" [{'; '.join(notes)}]" if notes else "")
        lines.append(f"| {label} | {epochs} | " + " | ".join(cells) + " |")
    lines.append("(+x.x): points above the same student's scratch row with the same budget and inputs "
                 "(scratch; scratch, patient; scratch, every 2nd sample; scratch, 20% noisy labels).")
    return "\n".join(lines)


def run(quick: bool = False, output: str = "results", plots: bool = True, *, work: Optional[str] = None,
        rows: Sequence[str] = ROW_NAMES, settings=None, students: Optional[Sequence[str]] = None,
        jobs: Optional[int] = None) -> dict:
    """The MNIST-1D part of the demo: trains every row, prints the table and
    writes ``mnist1d_table.txt``, ``mnist1d_results.json`` (what this returns)
    and, when ``plots``, the PNG plots into ``output``. Data, teachers, caches and the tuner's folder are kept in
    ``work`` (default ``<output>/mnist1d_work``) and reused by later runs.
    ``quick``: every row for the CNN student only (unless ``students`` says
    otherwise), one seed, 512 training examples, a few epochs: a smoke test
    whose numbers mean nothing. ``jobs``: processes for the student columns
    (default `default_jobs`; see `train_rows`).

    Returns:
        ``{"<student> | <row>": {"mean", "std", "accuracies", "epochs",
        "seconds", "note", "curve"}}``, accuracies in [0, 1], mean/std in %.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    from examples import mnist1d_recipes as recipes

    tf.get_logger().setLevel("ERROR")
    warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
    settings = settings or (quick_settings() if quick else recipes.Settings())
    students = list(students or (QUICK_STUDENTS if quick else STUDENT_KINDS))
    work = work or os.path.join(output, "mnist1d_work" + ("_quick" if quick else ""))
    os.makedirs(output, exist_ok=True)
    start = time.perf_counter()
    results = train_rows(settings, work, rows, students, jobs=default_jobs() if jobs is None else jobs)
    table = format_table(results, settings)
    table += f"\n({time.perf_counter() - start:.0f} s)"
    print(table, flush=True)
    with open(os.path.join(output, "mnist1d_table.txt"), "w") as f:
        f.write(table + "\n")
    summary = {f"{kind} | {name}": r.as_dict() for kind, rows_ in results.items() for name, r in rows_.items()}
    with open(os.path.join(output, "mnist1d_results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if plots:
        from examples import mnist1d_plots

        for path in mnist1d_plots.plot(results, output):
            print(f"wrote {path}", flush=True)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m examples.mnist1d", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, a few epochs: every row, in seconds")
    parser.add_argument("--output", default="results", help="folder for the table and the plots")
    parser.add_argument("--work", default=None,
                        help="folder for data, teachers, caches (default: in --output)")
    parser.add_argument("--rows", nargs="+", default=list(ROW_NAMES), choices=ROW_NAMES, metavar="ROW")
    parser.add_argument("--students", nargs="+", default=None, choices=STUDENT_KINDS,
                        help="default: both (--quick: the CNN only)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes for the student columns (default: 2 on a machine with 2 cores or more)")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1. Received: {args.jobs}")
    return run(args.quick, args.output, not args.no_plots, work=args.work, rows=args.rows,
               students=args.students, jobs=args.jobs)


if __name__ == "__main__":
    main()
