"""Benchmark of the teacher-logit cache (issue 3). A script, not a test.

Prints ratios measured in one run on this machine (absolute times on a shared
machine are noisy; the ratios compare runs interleaved in the same process):

1. epoch time training from the cache / training the same student without
   distillation on the same pipeline (target <= 1.10);
2. speed-up over ``keras.distillation.Distiller`` (online teacher of ~10x the
   student's FLOPs, ``LogitsDistillation(temperature=T, loss=KLDivergence())``)
   (target >= 3);
3. cache build throughput / ``teacher.predict`` throughput (target >= 0.9);
4. bytes per example of top-k (k=10 of 1000 classes) / dense float32
   (target <= 1/20);
5. peak RSS training from a 10x larger cache / from the base cache, each in
   its own subprocess (target <= 1.10).

Data: scikit-learn's bundled digits, tiled with a little noise to get enough
rows for stable timings. Run: ``.venv/bin/python benchmarks/bench_cache.py``
(``--quick`` for a faster, noisier run).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Children get the environment as it was before TensorFlow added its variables.
CLEAN_ENV = dict(os.environ)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_kd.cache import cache_teacher_logits  # noqa: E402
from keras_kd.cache import read_manifest  # noqa: E402
from keras_kd.losses import DistillationLoss  # noqa: E402
from keras_kd.targets import TeacherTargets  # noqa: E402

TEMPERATURE = 4.0
ALPHA = 0.1
BATCH = 256
SHUFFLE = 10_000
# MLPs on 64 features, layers of the same width; the deeper teacher has ~10x
# the student's multiply-adds. Wide layers keep per-step overheads small next to
# the compute, as on an accelerator; with narrower ones Keras's fixed cost per
# step weighs on all three runs alike and shrinks every ratio towards 1.
STUDENT = (2048, 2048)
TEACHER = (2048,) * 12
# Teacher of the build-vs-predict measure (a smaller one keeps the run short).
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


def macs(model):
    return sum(int(np.prod(layer.kernel.shape)) for layer in model.layers if hasattr(layer, "kernel"))


class EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.times.append(time.perf_counter() - self._t)


def epoch_ratios(rounds, rows, workdir):
    x, y = digits(rows)
    raw = tf.data.Dataset.from_tensor_slices((x, y))
    student_widths, teacher_widths = STUDENT, TEACHER
    teacher = mlp(teacher_widths, 10, 1)
    flops_ratio = macs(teacher) / macs(mlp(student_widths, 10, 2))

    cached = raw.apply(cache_teacher_logits(teacher, os.path.join(workdir, "epoch"), verbose=0))

    def pipeline(ds):
        return ds.shuffle(SHUFFLE, seed=0).batch(BATCH).prefetch(tf.data.AUTOTUNE)

    plain_model = mlp(student_widths, 10, 2)
    plain_model.compile("adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cache_model = mlp(student_widths, 10, 2)
    cache_model.compile("adam", loss=DistillationLoss(temperature=TEMPERATURE, alpha=ALPHA))
    distiller = keras.distillation.Distiller(
        teacher=teacher,
        student=mlp(student_widths, 10, 2),
        distillation_losses=keras.distillation.LogitsDistillation(
            temperature=TEMPERATURE, loss=keras.losses.KLDivergence()
        ),
        student_loss_weight=ALPHA,
    )
    distiller.compile("adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    # Reference for the loss's own cost: the same targets held in memory.
    logits = teacher.predict(x, batch_size=1024, verbose=0).astype("float16")
    in_memory = tf.data.Dataset.from_tensor_slices(
        (x, TeacherTargets(labels=y, logits=logits, example_id=np.arange(len(x), dtype="int64")))
    )
    memory_model = mlp(student_widths, 10, 2)
    memory_model.compile("adam", loss=DistillationLoss(temperature=TEMPERATURE, alpha=ALPHA))
    runs = {
        "plain": (plain_model, pipeline(raw), EpochTimer()),
        "memory": (memory_model, pipeline(in_memory), EpochTimer()),
        "cache": (cache_model, pipeline(cached), EpochTimer()),
        "distiller": (distiller, pipeline(raw), EpochTimer()),
    }
    # Interleave single epochs (in a rotating order) so that load changes on
    # the shared machine hit all alike; round 0 is warm-up (tracing).
    names = list(runs)
    for r in range(rounds + 1):
        for name in names[r % len(names):] + names[: r % len(names)]:
            model, ds, timer = runs[name]
            model.fit(ds, epochs=1, verbose=0, callbacks=[timer])
    times = {k: t.times[1:] for k, (_, _, t) in runs.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    # Ratios of epochs run side by side in the same round, then their median.
    paired = {
        k: statistics.median(a / b for a, b in zip(times[num], times[den]))
        for k, (num, den) in {
            "cache/plain": ("cache", "plain"),
            "memory/plain": ("memory", "plain"),
            "distiller/cache": ("distiller", "cache"),
        }.items()
    }
    return med, paired, flops_ratio


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


# -- peak RSS, in subprocesses ----------------------------------------------


def generated(rows):
    """A dataset made on the fly, so the raw data itself takes no memory."""

    def make(i):
        x = tf.random.stateless_uniform([64], seed=tf.stack([i, tf.constant(7, tf.int64)]))
        return x, tf.cast(i % 1000, tf.int32)

    return tf.data.Dataset.range(rows).map(make)


def child_build(rows, directory):
    teacher = mlp((), 1000, 4)
    generated(rows).apply(cache_teacher_logits(teacher, directory, batch_size=1024, verbose=0))


def child_train(rows, directory):
    teacher = mlp((), 1000, 4)
    ds = generated(rows).apply(cache_teacher_logits(teacher, directory, verbose=0))
    ds = ds.shuffle(SHUFFLE, seed=0).batch(256).prefetch(tf.data.AUTOTUNE)
    student = mlp((), 1000, 5)
    student.compile("adam", loss=DistillationLoss(temperature=TEMPERATURE, alpha=ALPHA))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    student.fit(ds, epochs=1, verbose=0)
    print(f"RSS_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} {before}")


def peak_rss(workdir, rows):
    out = {}
    for n in (rows, 10 * rows):
        directory = os.path.join(workdir, f"rss{n}")
        subprocess.run([sys.executable, __file__, "--child-build", str(n), directory], check=True, env=CLEAN_ENV)
        res = subprocess.run(
            # Through a shell that forks: on Linux, a process's ru_maxrss keeps
            # the peak of the process it was exec'ed from (here ~1 GB of this
            # one); a child forked by the small shell starts from the shell's.
            ["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, __file__, "--child-train", str(n), directory],
            check=True,
            capture_output=True,
            text=True,
            env=CLEAN_ENV,
        )
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RSS_KB")][-1]
        manifest = read_manifest(directory)
        peak, before = (int(v) / 1024.0 for v in line.split()[1:])
        out[n] = (peak, before, sum(f["bytes"] for f in manifest["files"]) / 2**20)
        shutil.rmtree(directory)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child-build", nargs=2)
    parser.add_argument("--child-train", nargs=2)
    args = parser.parse_args()
    if args.child_build:
        return child_build(int(args.child_build[0]), args.child_build[1])
    if args.child_train:
        return child_train(int(args.child_train[0]), args.child_train[1])

    rounds = 3 if args.quick else 7
    workdir = tempfile.mkdtemp(prefix="bench_cache_")
    try:
        t0 = time.perf_counter()
        med, paired, flops_ratio = epoch_ratios(rounds, 4_000 if args.quick else 6_000, workdir)
        predict_s, build_s, build_ratio = build_vs_predict(3 if args.quick else 5, 10_000 if args.quick else 20_000, workdir)
        sizes = topk_bytes(workdir)
        rss = peak_rss(workdir, 10_000 if args.quick else 20_000)
        elapsed = time.perf_counter() - t0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    (small, (rss_small, pre_small, mb_small)), (large, (rss_large, pre_large, mb_large)) = sorted(rss.items())
    rows = [
        ("epoch: cache+DistillationLoss / plain student", paired["cache/plain"], "<= 1.10",
         f"{med['cache']:.3f}s / {med['plain']:.3f}s"),
        ("  (reference: same targets in memory / plain)", paired["memory/plain"], "--",
         f"{med['memory']:.3f}s: the cost of DistillationLoss itself"),
        ("speed-up over keras Distiller (online teacher)", paired["distiller/cache"], ">= 3.00",
         f"{med['distiller']:.3f}s / {med['cache']:.3f}s, teacher {flops_ratio:.1f}x student FLOPs"),
        ("build throughput / teacher.predict throughput", build_ratio, ">= 0.90",
         f"median of side-by-side pairs; medians predict {predict_s:.2f}s, build {build_s:.2f}s"),
        ("top-k (k=10, 1000 classes) bytes / dense f32", sizes["topk10"] / sizes["dense32"], "<= 0.05",
         f"{sizes['topk10']:.0f} B vs {sizes['dense32']:.0f} B per example"),
        ("peak RSS, 10x larger cache / base cache", rss_large / rss_small, "<= 1.10",
         f"{rss_large:.0f} MiB ({mb_large:.0f} MiB cache, {large} ex.) vs {rss_small:.0f} MiB "
         f"({mb_small:.0f} MiB, {small} ex.); before fit {pre_large:.0f} / {pre_small:.0f} MiB"),
    ]
    print()
    print(f"keras_kd teacher-logit cache benchmark (TF {tf.__version__}, Keras {keras.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; epoch ratios are medians of "
          f"{rounds} rounds of side-by-side epochs, batch {BATCH})")
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'ratio':>7}  {'target':>8}  ok   detail")
    print("-" * (width + 60))
    for name, ratio, target, detail in rows:
        if target == "--":
            print(f"{name.ljust(width)}  {ratio:7.3f}  {'':>8}  {'':3}  {detail}")
            continue
        op, bound = target.split()
        ok = ratio <= float(bound) if op == "<=" else ratio >= float(bound)
        print(f"{name.ljust(width)}  {ratio:7.3f}  {target:>8}  {'yes' if ok else 'NO ':3}  {detail}")
    print(f"(total {elapsed:.0f}s)")


if __name__ == "__main__":
    main()
