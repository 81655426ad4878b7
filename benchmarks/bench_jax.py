"""The speed benchmark of issue 15 on Keras 3's JAX backend (issue 18).

The three workloads of ``bench_workloads.py`` (same data, students, teachers,
batch sizes, T and alpha), every pipeline a tf.data pipeline shuffled each
epoch, every model a Keras 3 model on JAX (``fit`` jit-compiles its step):

==================  ==================================================================
plain               the student alone, sparse cross-entropy from logits
cache               DistillationLoss, targets from ``cache_teacher_logits``
distiller           ``keras.distillation.Distiller`` on JAX (same T, alpha, KL)
online              ``with_teacher`` with its default placement
online_pipeline     ``with_teacher(placement="pipeline")``, a reference row
==================  ==================================================================

Each configuration is fitted once per round in a rotating order
(``_timing.interleaved_epoch_medians``: a fresh model per fit, its first
epoch, tracing, dropped); a warm-up fit of each first builds the cache and
finds configurations that fail (reported as ERROR, the others still run).
Figures are ratios of median epoch times measured in the same process.

Run: ``.venv/bin/python benchmarks/bench_jax.py`` (``make bench``; it sets
``KERAS_BACKEND=jax`` itself); ``--quick`` for a smoke run,
``--workloads small,medium``, ``--rounds 5``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import time
import warnings

if "keras" in sys.modules and sys.modules["keras"].backend.backend() != "jax":
    raise RuntimeError("bench_jax.py measures Keras 3 on JAX: run it in its own process "
                       "(keras is already imported here with another backend)")
os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed")

import jax  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import keras_kd  # noqa: E402
from _timing import interleaved_epoch_medians  # noqa: E402
from _timing import machine_info  # noqa: E402
from bench_workloads import ALPHA  # noqa: E402
from bench_workloads import TEMPERATURE  # noqa: E402
from bench_workloads import WORKLOADS  # noqa: E402
from bench_workloads import ce_loss  # noqa: E402
from bench_workloads import data  # noqa: E402
from bench_workloads import kd_loss  # noqa: E402
from bench_workloads import mlp  # noqa: E402
from bench_workloads import verdict  # noqa: E402
import bench_workloads  # noqa: E402

# (label, numerator, denominator, goal per workload: (op, bound) or None); the
# goals are issue 15's, as in bench_workloads.py.
RATIOS = [
    ("cache epoch / plain JAX student epoch", "cache", "plain", lambda w: ("<=", 1.10)),
    ("with_teacher (default placement) / Distiller on JAX", "online", "distiller", lambda w: ("<=", 1.0)),
    ("Distiller on JAX / cache", "distiller", "cache", lambda w: (">=", 3.0) if w == "bar" else (">=", 1.0)),
    ("REFERENCE, no goal: with_teacher placement='pipeline' / Distiller", "online_pipeline", "distiller",
     lambda w: None),
]


def configurations(w, x, y, teacher, workdir):
    """name -> ``make() -> (model, dataset, callbacks)``, a fresh model per call."""
    raw = tf.data.Dataset.from_tensor_slices((x, y))

    def batched(ds):
        return ds.shuffle(w.rows, seed=0).batch(w.batch)

    def pipeline(ds):
        return batched(ds).prefetch(tf.data.AUTOTUNE)

    cached_holder = {}

    def cached():
        if "ds" not in cached_holder:  # built once, read by every fit
            cache = keras_kd.cache_teacher_logits(teacher, os.path.join(workdir, w.name), verbose=0)
            cached_holder["ds"] = pipeline(raw.apply(cache))
        return cached_holder["ds"]

    def student(loss):
        model = mlp(w.student, w.features, seed=2)
        model.compile("adam", loss=loss)
        return model

    def distiller():
        model = keras.distillation.Distiller(
            teacher=teacher,
            student=mlp(w.student, w.features, seed=2),
            distillation_losses=keras.distillation.LogitsDistillation(
                temperature=TEMPERATURE, loss=keras.losses.KLDivergence()
            ),
            student_loss_weight=ALPHA,
        )
        model.compile("adam", loss=ce_loss())
        return model, pipeline(raw), []

    def online(**kwargs):
        return student(kd_loss()), keras_kd.with_teacher(batched(raw), teacher, **kwargs).prefetch(
            tf.data.AUTOTUNE), []

    return {
        "plain": lambda: (student(ce_loss()), pipeline(raw), []),
        "cache": lambda: (student(kd_loss()), cached(), []),
        "distiller": distiller,
        "online": online,
        "online_pipeline": lambda: online(placement="pipeline"),
    }


def _error(e):
    """One line: the message's first line, or its last one after TensorFlow's "in user code:"."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    line = (lines[-1] if lines[0].startswith("in user code") else lines[0]) if lines else ""
    return f"{type(e).__name__}: {line}"[:200]


def warm_up(configs, log):
    """Fits each configuration for one epoch (builds the cache, compiles);
    returns the ones that ran and {name: error} for the others."""
    working, errors = {}, {}
    for name, make in configs.items():
        try:
            model, ds, callbacks = make()
            model.fit(ds, epochs=1, verbose=0, callbacks=callbacks)
            working[name] = make
        except Exception as e:  # one broken piece must not hide the other figures
            errors[name] = _error(e)
        log(f"  warm-up {name}: {'ERROR ' + errors[name] if name in errors else 'ok'}")
    return working, errors


def measure(w, rounds, epochs, workdir, log):
    x, y = data(w)
    teacher = mlp(w.teacher, w.features, seed=1)
    working, errors = warm_up(configurations(w, x, y, teacher, workdir), log)
    medians = interleaved_epoch_medians(working, rounds, epochs) if working else {}
    results = []
    for label, num, den, goal in RATIOS:
        op, bound = goal(w.name) or ("", None)
        broken = [errors[n] for n in (num, den) if n in errors]
        if broken:
            results.append((label, None, op, bound, f"ERROR {broken[0]}"))
            continue
        ratio = medians[num] / medians[den]
        results.append((label, ratio, op, bound, f"{medians[num] * 1e3:.1f} ms / {medians[den] * 1e3:.1f} ms"))
    return medians, results, errors


def print_workload(w, medians, results, errors, rounds, epochs):
    bench_workloads.print_workload(w, medians, results, errors, rounds, epochs,
                                   per="round(s) x {epochs} epochs per fit (first dropped)")


def print_summary(all_results):
    names = list(all_results)
    width = max(len(label) for label, *_ in RATIOS)
    print()
    print("== summary: ratios of median epoch times (goal), PASS/FAIL")
    print(f"   {'ratio'.ljust(width)}  " + "  ".join(f"{n:>22}" for n in names))
    failures = 0
    for label, *_ in RATIOS:
        cells = []
        for n in names:
            _, ratio, op, bound, _ = next(r for r in all_results[n] if r[0] == label)
            v = verdict(ratio, op, bound)
            failures += v == "FAIL" and not label.startswith("REFERENCE")
            value = "ERROR" if ratio is None else f"{ratio:.3f}"
            goal = " " if bound is None else f" ({op}{bound:g}) "
            cells.append(f"{value + goal + v:>22}")
        print(f"   {label.ljust(width)}  " + "  ".join(cells))
    return failures


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="bar,small,medium",
                        help=f"comma-separated, from {', '.join(WORKLOADS)}")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: 1 round of 2-epoch fits")
    parser.add_argument("--max-rows", type=int, default=None, help="cap every workload's rows (smoke tests)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; expected some of {list(WORKLOADS)}")
    rounds = args.rounds or (1 if args.quick else 3)

    print("# bench_jax (issue 18): " + " ".join(["bench_jax.py", *(argv if argv is not None else sys.argv[1:])]))
    for line in machine_info(os.path.dirname(os.path.abspath(keras_kd.__file__))):
        print(f"# {line}")
    print(f"# Keras backend: {keras.backend.backend()}, JAX {jax.__version__} on {jax.default_backend()}; "
          f"T={TEMPERATURE}, alpha={ALPHA}; ratios of median epoch times, fits in rotating order")
    sys.stdout.flush()

    def log(message):
        print(message, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="bench_jax_")
    all_results = {}
    try:
        for name in names:
            w = WORKLOADS[name]
            if args.max_rows:
                w = dataclasses.replace(w, rows=min(w.rows, args.max_rows))
            epochs = 2 if args.quick else w.epochs_per_turn + 1
            medians, results, errors = measure(w, rounds, epochs, workdir, log)
            print_workload(w, medians, results, errors, rounds, epochs)
            sys.stdout.flush()
            all_results[name] = results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    failures = print_summary(all_results)
    print()
    print(f"# {failures} ratio(s) miss their goal; total {time.perf_counter() - t0:.0f} s, "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
