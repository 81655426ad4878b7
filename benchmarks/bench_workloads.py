"""The speed benchmark of issue 15: distillation at the student's own cost.

Three workloads (synthetic data of the stated sizes, fixed seeds, every
pipeline shuffled each epoch over the whole data set):

* ``bar``: 20,000 x 64, student 256-256, teacher 2048-2048, batch 256;
* ``small``: 1,257 x 64 (digits-sized), student Dense(32), teacher 256-256, batch 64;
* ``medium``: 4,000 x 40 (MNIST-1D-sized), student Dense(64), teacher 512-512, batch 128.

On each workload these run side by side, one turn of a few epochs each per
round, in a rotating order (round 0 is warm-up: tracing, first reads); every
figure is the median over rounds of the ratio of two turns of the same round
(paired ratios), so load changes on a shared machine hit both alike:

==================  ==================================================================
plain               the student alone, sparse cross-entropy from logits
memory              DistillationLoss, the same TeacherTargets held in memory
cache               DistillationLoss, targets from ``cache_teacher_logits``
distiller           ``keras.distillation.Distiller`` (same T, alpha, KL divergence)
online              ``with_teacher`` with its default placement (``"auto"``: the step, or
                    on a CPU-only machine the pipeline for a teacher of at least 1e8
                    multiply-adds per batch, here bar's)
online_step/        ``with_teacher(placement="step")`` and ``placement="pipeline"``,
online_pipeline     reference rows
reweight            cache + ``HardSampleReweighting(num_examples=...)`` (weights in the
                    step; the first epoch of each fit, a retrace, is dropped)
cache_fit1          the cache timed like ``reweight`` (its own model, the first epoch of
                    each fit dropped too): the denominator of the reweighting ratio, so
                    both sides skip the first epoch of a fit (iterator start-up)
plain_jit/cache_jit plain and cache with ``jit_compile=True``
online_jit/         ``with_teacher`` (default placement) and ``Distiller`` with
distiller_jit       ``jit_compile=True`` (the in-step teacher under XLA)
iter_raw/iter_cache ``for _ in ds`` over the raw and the cached pipelines (and, as a
                    reference without a goal, over the in-memory targets)
cache_stream        the cache with ``in_memory=False`` (where the option exists): the
                    streaming reader, an extra row
==================  ==================================================================

and the streaming check: peak RSS of training from a 10x larger cache / from
the base cache, each in its own subprocess. ``--wide`` adds the wide-student
case (2048-2048 student on the medium data), an extra row that is not the
quoted figure: its compute hides the overheads.

Run: ``.venv/bin/python benchmarks/bench_workloads.py`` (``make bench``);
``--quick`` for a smoke run, ``--workloads small,medium``, ``--rounds 10``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Children get the environment as it was before TensorFlow added its variables.
CLEAN_ENV = dict(os.environ)
# Keras notes on every fit that a tf.data dataset is not reshuffled by `fit`.
warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import keras_kd  # noqa: E402
from _timing import EpochClock  # noqa: E402
from _timing import common_parser  # noqa: E402
from _timing import machine_info  # noqa: E402
from _timing import rotated  # noqa: E402

TEMPERATURE = 4.0
ALPHA = 0.1
CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    rows: int
    features: int
    student: tuple
    teacher: tuple
    batch: int
    epochs_per_turn: int  # small epochs are short: several per turn
    rounds: int  # default timed rounds: more where epochs are cheap

    def describe(self):
        def widths(w):
            return "-".join(map(str, w))

        return (f"{self.name}: {self.rows:,} x {self.features}, student {widths(self.student)}, "
                f"teacher {widths(self.teacher)}, batch {self.batch}, {CLASSES} classes")


WORKLOADS = {
    "bar": Workload("bar", 20_000, 64, (256, 256), (2048, 2048), 256, 1, 16),
    "small": Workload("small", 1_257, 64, (32,), (256, 256), 64, 8, 40),
    "medium": Workload("medium", 4_000, 40, (64,), (512, 512), 128, 6, 24),
}
WIDE_STUDENT = (2048, 2048)


def data(w, seed=0):
    """Learnable synthetic data: labels from a fixed random linear map plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(w.rows, w.features)).astype("float32")
    projection = rng.normal(size=(w.features, CLASSES))
    y = np.argmax(x @ projection + rng.normal(scale=2.0, size=(w.rows, CLASSES)), axis=1).astype("int32")
    return x, y


def mlp(widths, features, seed):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((features,))]
    layers += [keras.layers.Dense(n, activation="relu") for n in widths]
    layers += [keras.layers.Dense(CLASSES)]
    return keras.Sequential(layers)


def kd_loss():
    return keras_kd.DistillationLoss(temperature=TEMPERATURE, alpha=ALPHA)


def ce_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# -- the configurations --------------------------------------------------------


@dataclasses.dataclass
class Config:
    """One thing timed: a persistent model fitted one turn per round, or a
    dataset iterated (``model is None``)."""

    model: object
    dataset: tf.data.Dataset
    callbacks: tuple = ()
    warm_epochs: int = 0  # epochs dropped at the start of every fit (retraces)


def configurations(w, x, y, teacher, workdir, wide):
    """name -> ``() -> Config``; built lazily so that one failure stays one."""
    raw = tf.data.Dataset.from_tensor_slices((x, y))

    def batched(ds):
        return ds.shuffle(w.rows, seed=0).batch(w.batch)

    def pipeline(ds):
        return batched(ds).prefetch(tf.data.AUTOTUNE)

    cached_holder = {}

    def cached():
        if "ds" not in cached_holder:
            cache = keras_kd.cache_teacher_logits(teacher, os.path.join(workdir, w.name), verbose=0)
            cached_holder["ds"] = raw.apply(cache)
        return cached_holder["ds"]

    def student(loss, widths=w.student, **compile_kwargs):
        model = mlp(widths, w.features, seed=2)
        model.compile("adam", loss=loss, **compile_kwargs)
        return model

    def memory():
        logits = teacher.predict(x, batch_size=1024, verbose=0).astype("float16")
        ids = np.arange(w.rows, dtype="int64")
        targets = keras_kd.TeacherTargets(labels=y, logits=logits, example_id=ids)
        return Config(student(kd_loss()), pipeline(tf.data.Dataset.from_tensor_slices((x, targets))))

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
        return Config(model, pipeline(raw))

    def distiller_jit():
        config = distiller()
        config.model.compile("adam", loss=ce_loss(), jit_compile=True)
        return config

    def reweight():
        rew = keras_kd.HardSampleReweighting(signal="kl", warmup_epochs=0, num_examples=w.rows)
        return Config(student(kd_loss()), pipeline(cached()), (rew,), warm_epochs=1)

    configs = {
        "plain": lambda: Config(student(ce_loss()), pipeline(raw)),
        "memory": memory,
        "cache": lambda: Config(student(kd_loss()), pipeline(cached())),
        "distiller": distiller,
        "online": lambda: Config(student(kd_loss()),
                                 keras_kd.with_teacher(batched(raw), teacher).prefetch(tf.data.AUTOTUNE)),
        "reweight": reweight,
        "cache_fit1": lambda: Config(student(kd_loss()), pipeline(cached()), warm_epochs=1),
        "online_step": lambda: Config(student(kd_loss()), keras_kd.with_teacher(
            batched(raw), teacher, placement="step").prefetch(tf.data.AUTOTUNE)),
        "online_pipeline": lambda: Config(student(kd_loss()), keras_kd.with_teacher(
            batched(raw), teacher, placement="pipeline").prefetch(tf.data.AUTOTUNE)),
        "plain_jit": lambda: Config(student(ce_loss(), jit_compile=True), pipeline(raw)),
        "online_jit": lambda: Config(student(kd_loss(), jit_compile=True),
                                     keras_kd.with_teacher(batched(raw), teacher).prefetch(tf.data.AUTOTUNE)),
        "distiller_jit": distiller_jit,
        "cache_jit": lambda: Config(student(kd_loss(), jit_compile=True), pipeline(cached())),
        "iter_raw": lambda: Config(None, pipeline(raw)),
        "iter_cache": lambda: Config(None, pipeline(cached())),
        "iter_memory": lambda: Config(None, memory().dataset),
    }
    if streaming_kwargs():  # the cache can hold itself in memory: also time the streaming reader

        def streamed():
            cache = keras_kd.cache_teacher_logits(teacher, os.path.join(workdir, w.name + "-stream"), verbose=0,
                                                  **streaming_kwargs())
            return Config(student(kd_loss()), pipeline(raw.apply(cache)))

        configs["cache_stream"] = streamed
    if wide:
        configs["plain_wide"] = lambda: Config(student(ce_loss(), widths=WIDE_STUDENT), pipeline(raw))
        configs["cache_wide"] = lambda: Config(student(kd_loss(), widths=WIDE_STUDENT), pipeline(cached()))
    return configs


# (label, numerator, denominator, goal per workload: (op, bound) or None)
RATIOS = [
    ("cache epoch / plain student epoch", "cache", "plain", lambda w: ("<=", 1.10)),
    ("same targets in memory / plain", "memory", "plain", lambda w: ("<=", 1.05)),
    ("Distiller epoch / cache epoch", "distiller", "cache",
     lambda w: (">=", 3.0) if w == "bar" else (">=", 1.0)),
    ("with_teacher (default placement) / Distiller", "online", "distiller", lambda w: ("<=", 1.0)),
    ("REFERENCE, no goal: with_teacher placement='step' / Distiller", "online_step", "distiller",
     lambda w: None),
    ("REFERENCE, no goal: with_teacher placement='pipeline' / Distiller", "online_pipeline", "distiller",
     lambda w: None),
    ("iterating the cache / iterating the raw data", "iter_cache", "iter_raw", lambda w: ("<=", 1.5)),
    ("REFERENCE, no goal: iterating in-memory targets / raw", "iter_memory", "iter_raw", lambda w: None),
    ("with HardSampleReweighting / without (cache)", "reweight", "cache_fit1", lambda w: ("<=", 1.05)),
    ("jit_compile=True on CPU: cache / plain", "cache_jit", "plain_jit", lambda w: ("<=", 1.10)),
    ("jit_compile=True on CPU: with_teacher (default) / Distiller", "online_jit", "distiller_jit",
     lambda w: ("<=", 1.0)),
    ("EXTRA, not quoted: cache forced to stream / plain", "cache_stream", "plain", lambda w: ("<=", 1.10)),
    ("EXTRA, not quoted: 2048-2048 student, cache / plain", "cache_wide", "plain_wide", lambda w: ("<=", 1.10)),
]


def run_turn(config, epochs):
    """Epoch times of one turn."""
    if config.model is None:
        times = []
        for _ in range(epochs):
            t = time.perf_counter()
            for _ in config.dataset:
                pass
            times.append(time.perf_counter() - t)
        return times
    clock = EpochClock()
    config.model.fit(config.dataset, epochs=epochs + config.warm_epochs, verbose=0,
                     callbacks=[clock.start, *config.callbacks, clock.end])
    return clock.times[config.warm_epochs:]


def measure(w, rounds, epochs, workdir, wide, log):
    x, y = data(w)
    teacher = mlp(w.teacher, w.features, seed=1)
    makers = configurations(w, x, y, teacher, workdir, wide)
    configs, errors = {}, {}
    for name, make in makers.items():
        try:
            configs[name] = make()
        except Exception as e:  # one broken piece must not hide the other figures
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
    turns = {name: [] for name in configs}  # per round: median epoch time of the turn
    epochs_all = {name: [] for name in configs}
    for r in range(rounds + 1):
        for name in rotated(list(configs), r):
            if name in errors:
                continue
            try:
                times = run_turn(configs[name], epochs)
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
                continue
            if r > 0:  # round 0: warm-up
                turns[name].append(statistics.median(times))
                epochs_all[name].extend(times)
        log(f"  {w.name}: round {r}/{rounds} done")
    medians = {n: statistics.median(t) for n, t in epochs_all.items() if t and n not in errors}
    results = []
    for label, num, den, goal in RATIOS:
        if num not in makers or den not in makers:
            continue
        op, bound = goal(w.name) or ("", None)
        broken = [errors[n] for n in (num, den) if n in errors]
        if broken:
            results.append((label, None, op, bound, f"ERROR {broken[0]}"))
            continue
        paired = sorted(a / b for a, b in zip(turns[num], turns[den]))
        ratio = statistics.median(paired)
        low, high = median_interval(paired)
        detail = f"{medians[num] * 1e3:.1f} ms / {medians[den] * 1e3:.1f} ms; 95% CI of the median {low:.2f}-{high:.2f}"
        results.append((label, ratio, op, bound, detail))
    return medians, results, errors


def median_interval(values):
    """A distribution-free ~95% confidence interval of the median of ``values``
    (sorted): the order statistics of 1-based ranks floor(n/2 - 0.98 sqrt(n))
    and ceil(1 + n/2 + 0.98 sqrt(n)), the normal approximation of the binomial
    (the whole range for fewer than 6 values)."""
    n = len(values)
    half_width = 0.98 * n ** 0.5
    low = math.floor(n / 2 - half_width) - 1
    high = math.ceil(1 + n / 2 + half_width) - 1
    return values[max(0, low)], values[min(n - 1, high)]


# -- streaming: peak RSS in subprocesses ---------------------------------------


def generated(rows):
    """A dataset made on the fly, so the raw data itself takes no memory."""

    def make(i):
        x = tf.random.stateless_uniform([64], seed=tf.stack([i, tf.constant(7, tf.int64)]))
        return x, tf.cast(i % 1000, tf.int32)

    return tf.data.Dataset.range(rows).map(make)


def rss_mlp(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(1000)])


def child_build(rows, directory):
    generated(rows).apply(keras_kd.cache_teacher_logits(rss_mlp(4), directory, batch_size=1024, verbose=0))


def streaming_kwargs():
    """Forces the streaming reader where the cache can also hold itself in
    memory (``in_memory=``), so both runs of the check stream."""
    import inspect

    return {"in_memory": False} if "in_memory" in inspect.signature(keras_kd.cache_teacher_logits).parameters else {}


def child_train(rows, directory):
    cache = keras_kd.cache_teacher_logits(rss_mlp(4), directory, verbose=0, **streaming_kwargs())
    ds = generated(rows).apply(cache)
    ds = ds.shuffle(10_000, seed=0).batch(256).prefetch(tf.data.AUTOTUNE)
    student = rss_mlp(5)
    student.compile("adam", loss=kd_loss())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    student.fit(ds, epochs=1, verbose=0)
    print(f"RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} {before}")


def peak_rss(workdir, rows):
    """{examples: (peak MiB, MiB before fit, cache MiB)} for rows and 10 x rows."""
    out = {}
    for n in (rows, 10 * rows):
        directory = os.path.join(workdir, f"rss{n}")
        subprocess.run([sys.executable, __file__, "--child-build", str(n), directory], check=True, env=CLEAN_ENV)
        res = subprocess.run(
            # Through a shell that forks: on Linux, a process's ru_maxrss keeps
            # the peak of the process it was exec'ed from (here ~1 GB of this
            # one); a child forked by the small shell starts from the shell's.
            ["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, __file__, "--child-train", str(n), directory],
            check=True, capture_output=True, text=True, env=CLEAN_ENV,
        )
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RSS_KB")][-1]
        manifest = keras_kd.cache.read_manifest(directory)
        peak, before = (int(v) / 1024.0 for v in line.split()[1:])
        out[n] = (peak, before, sum(f["bytes"] for f in manifest["files"]) / 2**20)
        shutil.rmtree(directory)
    return out


# -- output ----------------------------------------------------------------------


def verdict(ratio, op, bound):
    if bound is None:
        return "--"
    if ratio is None:
        return "FAIL"
    return "PASS" if (ratio <= bound if op == "<=" else ratio >= bound) else "FAIL"


def print_workload(w, medians, results, errors, rounds, epochs, per="timed rounds x {epochs} epoch(s) per turn"):
    print()
    print(f"== {w.describe()}")
    print(f"   {rounds} {per.format(epochs=epochs)}; median epoch times: "
          + ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in medians.items()))
    for name, message in errors.items():
        print(f"   ERROR in {name}: {message}")
    width = max(len(r[0]) for r in results)
    for label, ratio, op, bound, detail in results:
        shown = "   ----" if ratio is None else f"{ratio:7.3f}"
        goal = "no goal     " if bound is None else f"goal {op} {bound:<4}"
        print(f"   {label.ljust(width)}  {shown}  {goal}  {verdict(ratio, op, bound):4}  {detail}")


def print_summary(all_results):
    names = list(all_results)
    labels = [label for label, *_ in RATIOS if any(label == r[0] for rows in all_results.values() for r in rows)]
    width = max(len(label) for label in labels)
    print()
    print("== summary: paired-median ratios (goal), PASS/FAIL")
    print(f"   {'ratio'.ljust(width)}  " + "  ".join(f"{n:>22}" for n in names))
    failures = 0
    for label in labels:
        cells = []
        for n in names:
            row = [r for r in all_results[n] if r[0] == label]
            if not row:
                cells.append(f"{'':>22}")
                continue
            _, ratio, op, bound, _ = row[0]
            v = verdict(ratio, op, bound)
            failures += v == "FAIL" and not label.startswith(("EXTRA", "REFERENCE"))
            value = "ERROR" if ratio is None else f"{ratio:.3f}"
            goal = " " if bound is None else f" ({op}{bound:g}) "
            cells.append(f"{value + goal + v:>22}")
        print(f"   {label.ljust(width)}  " + "  ".join(cells))
    return failures


def main(argv=None):
    parser = common_parser(__doc__.split("\n")[0], rounds="16 bar, 20 small, 14 medium")
    parser.add_argument("--workloads", default="bar,small,medium",
                        help=f"comma-separated, from {', '.join(WORKLOADS)}")
    parser.add_argument("--max-rows", type=int, default=None, help="cap every workload's rows (smoke tests)")
    parser.add_argument("--wide", action="store_true", help="add the wide-student extra row (medium data)")
    parser.add_argument("--streaming-rows", type=int, default=None,
                        help="rows of the base cache of the streaming check (default 10,000; 2,000 with --quick)")
    parser.add_argument("--no-streaming", action="store_true", help="skip the streaming (peak memory) check")
    parser.add_argument("--child-build", nargs=2, help=argparse_hidden())
    parser.add_argument("--child-train", nargs=2, help=argparse_hidden())
    args = parser.parse_args(argv)
    if args.child_build:
        return child_build(int(args.child_build[0]), args.child_build[1])
    if args.child_train:
        return child_train(int(args.child_train[0]), args.child_train[1])

    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; expected some of {list(WORKLOADS)}")
    print("# bench_workloads (issue 15): " + " ".join(["bench_workloads.py", *(argv or sys.argv[1:])]))
    for line in machine_info(os.path.dirname(os.path.abspath(keras_kd.__file__))):
        print(f"# {line}")
    print(f"# T={TEMPERATURE}, alpha={ALPHA}; ratios: median over rounds of paired turns, epochs in rotating order")
    sys.stdout.flush()

    def log(message):
        print(message, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix="bench_workloads_")
    all_results = {}
    try:
        for name in names:
            w = WORKLOADS[name]
            if args.max_rows:
                w = dataclasses.replace(w, rows=min(w.rows, args.max_rows))
            epochs = 1 if args.quick else w.epochs_per_turn
            rounds = args.rounds or (2 if args.quick else w.rounds)
            medians, results, errors = measure(w, rounds, epochs, workdir, args.wide and name == "medium", log)
            print_workload(w, medians, results, errors, rounds, epochs)
            sys.stdout.flush()
            all_results[name] = results
        rss_line = None
        if not args.no_streaming:
            rows = args.streaming_rows or (2_000 if args.quick else 10_000)
            rss = peak_rss(workdir, rows)
            (small, (rss_small, pre_small, mb_small)), (large, (rss_large, pre_large, mb_large)) = sorted(rss.items())
            ratio = rss_large / rss_small
            rss_line = (f"   peak RSS, 10x larger cache / base cache  {ratio:6.2f}  goal <= 1.10  "
                        f"{verdict(ratio, '<=', 1.10)}  {rss_large:.0f} MiB ({mb_large:.0f} MiB cache, {large:,} ex.) "
                        f"vs {rss_small:.0f} MiB ({mb_small:.0f} MiB, {small:,} ex.); before fit "
                        f"{pre_large:.0f} / {pre_small:.0f} MiB")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    failures = print_summary(all_results)
    if rss_line:
        print()
        forced = ", in_memory=False" if streaming_kwargs() else ""
        print(f"== streaming (each in its own subprocess; 1000-class float16 cache{forced}, student Dense(1000))")
        print(rss_line)
        failures += "FAIL" in rss_line
    print()
    print(f"# {failures} ratio(s) miss their goal; total {time.perf_counter() - t0:.0f} s, "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
