"""Where `HardSampleReweighting`'s cost goes inside ``fit``: the step hooks or the epoch end.

Fits of the cached student (issue 15's workloads, `bench_workloads.py`'s data,
models and loss) in rotating order, one model and one callback per
configuration, reused across rounds (as the benchmark's ``reweight`` row
does); the first epoch of every fit is dropped. Each step is timed from
``on_train_batch_begin`` to ``on_train_batch_end`` by a callback placed after
the others, each epoch from ``on_epoch_begin`` to ``on_epoch_end``:

==============  ================================================================
cache           no callback (the baseline)
reweight        ``HardSampleReweighting(signal="kl", num_examples=N)``
hooks_only      the same callback with an ``on_epoch_end`` that does nothing (the
                step hooks alone: the table is never flushed, the weights stay 1)
flush_only      its ``on_epoch_end`` only flushes the table (read, smooth, clear)
assign_only     its ``on_epoch_end`` only assigns new weights
==============  ================================================================

Printed: the median step time and epoch time of each, their differences to
``cache``, and the median time of the full callback's own ``on_epoch_end``.

Run: ``.venv/bin/python benchmarks/profile_reweighting.py [--workload small] [--rounds 16]``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import keras_kd  # noqa: E402
import bench_workloads as bw  # noqa: E402
from _timing import common_parser  # noqa: E402
from _timing import machine_info  # noqa: E402
from _timing import rotated  # noqa: E402
from keras_kd.callbacks import table as table_lib  # noqa: E402


class Clock(keras.callbacks.Callback):
    """Step and epoch durations of one fit."""

    def __init__(self):
        super().__init__()
        self.steps, self.epochs = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = time.perf_counter()

    def on_train_batch_begin(self, batch, logs=None):
        self._step = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append(time.perf_counter() - self._step)

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(time.perf_counter() - self._epoch)


class Timed(keras_kd.HardSampleReweighting):
    """The full callback, its ``on_epoch_end`` timed."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.ends = []

    def on_epoch_end(self, epoch, logs=None):
        start = time.perf_counter()
        super().on_epoch_end(epoch, logs)
        self.ends.append(time.perf_counter() - start)


class HooksOnly(keras_kd.HardSampleReweighting):
    def on_epoch_end(self, epoch, logs=None):
        pass


class FlushOnly(keras_kd.HardSampleReweighting):
    def on_epoch_end(self, epoch, logs=None):
        self.table.flush()


class AssignOnly(keras_kd.HardSampleReweighting):
    def on_epoch_end(self, epoch, logs=None):
        weights = np.random.default_rng(epoch).uniform(0.5, 2.0, self.table.num_examples).astype("float32")
        table_lib.assign(self.table.weights, weights)


def main(argv=None):
    parser = common_parser(__doc__.split("\n")[0], rounds=16)
    parser.add_argument("--workload", default="small", choices=list(bw.WORKLOADS))
    parser.add_argument("--max-rows", type=int, default=None, help="cap the workload's rows (smoke tests)")
    args = parser.parse_args(argv)
    w = bw.WORKLOADS[args.workload]
    if args.max_rows:
        import dataclasses

        w = dataclasses.replace(w, rows=min(w.rows, args.max_rows))
    rounds = args.rounds or (1 if args.quick else args.default_rounds)
    epochs = 2 if args.quick else w.epochs_per_turn + 1
    for line in machine_info(os.path.dirname(os.path.abspath(keras_kd.__file__))):
        print(f"# {line}")
    print(f"# {w.describe()}; {rounds} rounds x {epochs} epochs per fit (first dropped), medians")

    x, y = bw.data(w)
    teacher = bw.mlp(w.teacher, w.features, seed=1)
    workdir = tempfile.mkdtemp(prefix="profile_reweighting_")
    cache = keras_kd.cache_teacher_logits(teacher, workdir, verbose=0)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).apply(cache)
    ds = ds.shuffle(w.rows, seed=0).batch(w.batch).prefetch(tf.data.AUTOTUNE)

    full = Timed(signal="kl", num_examples=w.rows, warmup_epochs=0)
    callbacks = {
        "cache": [],
        "reweight": [full],
        "hooks_only": [HooksOnly(signal="kl", num_examples=w.rows, warmup_epochs=0)],
        "flush_only": [FlushOnly(signal="kl", num_examples=w.rows, warmup_epochs=0)],
        "assign_only": [AssignOnly(signal="kl", num_examples=w.rows, warmup_epochs=0)],
    }
    models = {}
    for name in callbacks:
        models[name] = bw.mlp(w.student, w.features, seed=2)
        models[name].compile("adam", loss=bw.kd_loss())
    steps = {name: [] for name in callbacks}
    epoch_times = {name: [] for name in callbacks}
    for r in range(rounds + 1):  # round 0: warm-up (tracing, the cache's first read)
        for name in rotated(list(callbacks), r):
            clock = Clock()
            models[name].fit(ds, epochs=epochs, verbose=0, callbacks=[*callbacks[name], clock])
            if r:
                per_epoch = len(clock.steps) // epochs
                steps[name] += clock.steps[per_epoch:]
                epoch_times[name] += clock.epochs[1:]
    base_step = statistics.median(steps["cache"])
    base_epoch = statistics.median(epoch_times["cache"])
    print(f"{'configuration':<14} {'step us':>9} {'vs cache':>9} {'epoch ms':>9} {'ratio':>7}")
    for name in callbacks:
        step, epoch = statistics.median(steps[name]), statistics.median(epoch_times[name])
        print(f"{name:<14} {step * 1e6:>9.1f} {(step - base_step) * 1e6:>+9.1f} {epoch * 1e3:>9.2f} "
              f"{epoch / base_epoch:>7.3f}")
    ends = full.ends[epochs:]  # the warm-up round's dropped
    if ends:
        print(f"reweight's own on_epoch_end: median {statistics.median(ends) * 1e3:.3f} ms over {len(ends)} epochs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
