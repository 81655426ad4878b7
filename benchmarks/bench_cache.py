"""Benchmark of the teacher-logit cache's build and storage (issue 3). A script, not a test.

Prints, measured in one run on this machine:

1. cache build throughput / ``teacher.predict`` throughput (target >= 0.9),
   side-by-side pairs, alternating which goes first;
2. bytes per example of top-k (k=10 of 1000 classes) / dense float32
   (target <= 1/20);
3. with ``--reader``: the reader's own cost on issue 15's three workloads
   (``bench_workloads.WORKLOADS``): epochs of a student trained from the
   cache, from the same ``TeacherTargets`` held in memory, from a cache
   forced to stream, and plain, interleaved in rotating order; each ratio
   is the median (and quartiles) of per-round paired ratios of **process
   CPU time** (all threads), which a loaded shared machine disturbs far less
   than wall time. cache / memory ~ 1 means the reader adds nothing to the
   step; what cache / plain adds beyond it is the loss's cost.

Epoch-time ratios (cache / plain student, speed-up over Keras's ``Distiller``,
the wide-student case) and the streaming check (peak memory with a 10x larger
cache) moved to ``benchmarks/bench_workloads.py``, which runs them on the
three workloads of issue 15.

Data: scikit-learn's bundled digits, tiled with a little noise to get enough
rows for stable timings. Run: ``.venv/bin/python benchmarks/bench_cache.py``
(``--quick`` for a faster, noisier run, ``--rounds N``, ``--reader`` for
the reader's cost only, ``--workloads small,medium``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import keras_kd  # noqa: E402
from _timing import common_parser  # noqa: E402
from _timing import machine_info  # noqa: E402
from keras_kd.cache import cache_teacher_logits  # noqa: E402
from keras_kd.cache import read_manifest  # noqa: E402

# Teacher of the build-vs-predict measure: deep enough that the teacher's
# compute, not the pipeline, sets the pace, as it does for a real teacher.
BUILD_TEACHER = (1024,) * 12


def digits(rows, seed=0):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), rows)
    x = (x[idx] / 16.0 + rng.normal(0, 0.05, (rows, 64))).astype("float32")
    return x, y[idx].astype("int32")


def mlp(widths, classes, seed):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((64,))]
    layers += [keras.layers.Dense(w, activation="relu") for w in widths]
    layers += [keras.layers.Dense(classes)]
    return keras.Sequential(layers)


def build_vs_predict(rounds, rows, workdir):
    x, y = digits(rows, seed=1)
    raw = tf.data.Dataset.from_tensor_slices((x, y))
    teacher = mlp(BUILD_TEACHER, 10, 1)
    xs = raw.map(lambda a, b: a).batch(256)
    # Both warm: predict keeps its traced predict_function, the cache its traced
    # teacher step; each build still pays its fingerprint, checks and fsyncs.
    teacher.predict(xs.take(1), verbose=0)
    raw.take(256).apply(cache_teacher_logits(teacher, os.path.join(workdir, "warm"), batch_size=256, verbose=0))
    predict_t, build_t = [], []
    def predict():
        t = time.perf_counter()
        teacher.predict(xs, verbose=0)
        predict_t.append(time.perf_counter() - t)

    def build(r):
        directory = os.path.join(workdir, f"build{r}")
        t = time.perf_counter()
        raw.apply(cache_teacher_logits(teacher, directory, batch_size=256, verbose=0))
        build_t.append(time.perf_counter() - t)
        shutil.rmtree(directory)

    for r in range(rounds):  # side by side, alternating which goes first
        if r % 2:
            build(r)
            predict()
        else:
            predict()
            build(r)
    paired = statistics.median(p / b for p, b in zip(predict_t, build_t))
    return statistics.median(predict_t), statistics.median(build_t), paired


def topk_bytes(workdir, rows=4096):
    x, y = digits(rows, seed=2)
    raw = tf.data.Dataset.from_tensor_slices((x, y))
    teacher = mlp((), 1000, 3)
    sizes = {}
    for name, kwargs in (("dense32", dict(dtype="float32")), ("topk10", dict(top_k=10, dtype="float16"))):
        directory = os.path.join(workdir, name)
        raw.apply(cache_teacher_logits(teacher, directory, verbose=0, **kwargs))
        manifest = read_manifest(directory)
        sizes[name] = sum(f["bytes"] for f in manifest["files"]) / manifest["num_examples"]
    return sizes


def reader_cost(w, rounds, workdir):
    """Paired CPU-time ratios of epochs: cache, in-memory targets, streamed cache, plain (see 3.)."""
    from bench_workloads import data
    from bench_workloads import mlp as workload_mlp

    x, y = data(w)
    teacher = workload_mlp(w.teacher, w.features, seed=1)
    raw = tf.data.Dataset.from_tensor_slices((x, y))

    def pipeline(ds):
        return ds.shuffle(w.rows, seed=0).batch(w.batch).prefetch(tf.data.AUTOTUNE)

    def student(loss):
        model = workload_mlp(w.student, w.features, seed=2)
        model.compile("adam", loss=loss)
        return model

    logits = teacher.predict(x, batch_size=1024, verbose=0).astype("float16")
    memory = keras_kd.TeacherTargets(labels=y, logits=logits, example_id=np.arange(w.rows, dtype="int64"))
    kd = lambda: keras_kd.DistillationLoss(temperature=4.0, alpha=0.1)  # noqa: E731
    sources = {
        "plain": (keras.losses.SparseCategoricalCrossentropy(from_logits=True), raw),
        "memory": (kd(), tf.data.Dataset.from_tensor_slices((x, memory))),
        "cache": (kd(), raw.apply(cache_teacher_logits(teacher, os.path.join(workdir, w.name), verbose=0))),
        "stream": (kd(), raw.apply(cache_teacher_logits(
            teacher, os.path.join(workdir, w.name + "-s"), in_memory=False, verbose=0))),
    }
    configs = {name: (student(loss), pipeline(ds)) for name, (loss, ds) in sources.items()}
    for model, ds in configs.values():
        model.fit(ds, epochs=1, verbose=0)  # tracing, first reads
    times = {name: [] for name in configs}
    names = list(configs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            model, ds = configs[name]
            t = time.process_time()
            model.fit(ds, epochs=w.epochs_per_turn, verbose=0)
            times[name].append((time.process_time() - t) / w.epochs_per_turn)

    def ratio(a, b):
        paired = sorted(p / q for p, q in zip(times[a], times[b]))
        quartile = lambda f: paired[min(len(paired) - 1, int(f * len(paired)))]  # noqa: E731
        return statistics.median(paired), quartile(0.25), quartile(0.75)

    return {f"{a} / {b}": ratio(a, b) for a, b in
            (("cache", "memory"), ("cache", "plain"), ("memory", "plain"), ("stream", "plain"))}


def main_reader(args, rounds):
    from bench_workloads import WORKLOADS

    workdir = tempfile.mkdtemp(prefix="bench_cache_reader_")
    print("# bench_cache --reader: per-epoch process CPU time, paired ratios: median [quartiles]")
    for line in machine_info(os.path.dirname(os.path.abspath(keras_kd.__file__))):
        print(f"# {line}")
    try:
        for name in args.workloads.split(","):
            w = WORKLOADS[name]
            figures = reader_cost(w, rounds, workdir)
            print(f"{w.describe()} ({rounds} rounds)")
            for label, (median, low, high) in figures.items():
                print(f"  {label:16s} {median:5.2f}  [{low:.2f}-{high:.2f}]", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main():
    parser = common_parser(__doc__.split("\n")[0], rounds=5)
    parser.add_argument("--reader", action="store_true", help="measure the reader's cost on the three workloads")
    parser.add_argument("--workloads", default="small,medium,bar", help="with --reader: comma-separated")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else args.default_rounds)
    if args.reader:
        return main_reader(args, rounds)
    workdir = tempfile.mkdtemp(prefix="bench_cache_")
    try:
        t0 = time.perf_counter()
        predict_s, build_s, build_ratio = build_vs_predict(rounds, 10_000 if args.quick else 20_000, workdir)
        sizes = topk_bytes(workdir)
        elapsed = time.perf_counter() - t0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rows = [
        ("build throughput / teacher.predict throughput", build_ratio, ">= 0.90",
         f"median of {rounds} side-by-side pairs; medians predict {predict_s:.2f}s, build {build_s:.2f}s"),
        ("top-k (k=10, 1000 classes) bytes / dense f32", sizes["topk10"] / sizes["dense32"], "<= 0.05",
         f"{sizes['topk10']:.0f} B vs {sizes['dense32']:.0f} B per example"),
    ]
    print()
    print("# bench_cache: build and storage of the teacher-logit cache")
    for line in machine_info(os.path.dirname(os.path.abspath(keras_kd.__file__))):
        print(f"# {line}")
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'ratio':>7}  {'target':>8}  ok    detail")
    print("-" * (width + 60))
    for name, ratio, target, detail in rows:
        op, bound = target.split()
        ok = ratio <= float(bound) if op == "<=" else ratio >= float(bound)
        print(f"{name.ljust(width)}  {ratio:7.3f}  {target:>8}  {'PASS' if ok else 'FAIL'}  {detail}")
    print(f"(total {elapsed:.0f}s)")


if __name__ == "__main__":
    main()
