"""What carrying TeacherTargets as one tf.data tensor buys (issue 15).

`keras_kd.TeacherTargets` travels through tf.data with all its tensor fields
(labels, logits, example ids, ...) bitcast into one tensor
(``targets._TargetsBatchEncoder``). This times, on the workloads of
`bench_workloads`, side by side in one process (turns in rotating order,
round 0 warm-up, medians of paired ratios):

* ``iter_*``: one epoch of ``for _ in ds`` over ``shuffle(n).batch(b).prefetch``
  of the raw ``(x, y)``, and of ``(x, TeacherTargets(labels, float16 logits,
  example_id))`` (the cache's in-memory output) in three encodings:
  ``packed``, every field in one tensor (2 tensors per element, as raw);
  ``previous``, only labels and ids packed in one int64 tensor (3 tensors);
  ``default``, TensorFlow's encoding, one tensor per field (4 tensors);
* ``fit_*``: one ``fit`` epoch of the student on the same four pipelines
  (plain cross-entropy on raw data; DistillationLoss on the others).

Wall time and the process CPU time (all tf.data threads) are both reported.

Run: ``.venv/bin/python benchmarks/bench_targets_encoding.py [--workloads bar,small,medium] [--rounds 8]``.
"""

from __future__ import annotations

import collections
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import bench_workloads as bw  # noqa: E402
import keras_kd  # noqa: E402
from _timing import common_parser  # noqa: E402
from _timing import rotated  # noqa: E402
from keras_kd import targets as targets_lib  # noqa: E402


def _variant(name, pack):
    """A `TeacherTargets` subclass whose tf.data encoding packs ``pack`` (the fast decoder kept)."""
    cls = type(name, (keras_kd.TeacherTargets,), {"__name__": f"keras_kd_bench.{name}",
                                                   "__batch_encoder__": targets_lib._TargetsBatchEncoder(pack)})
    cls.Spec._from_compatible_tensor_list = targets_lib._spec_from_compatible_tensor_list
    cls.Spec._flat_tensor_specs = property(targets_lib._spec_flat_tensor_specs)
    return cls


# The layout before every field was packed (labels with example ids in one int64 tensor), and TensorFlow's.
PreviousTargets = _variant("PreviousTargets", ("labels", "example_id"))
DefaultTargets = _variant("DefaultTargets", False)


def pipelines(w):
    x, y = bw.data(w)
    teacher = bw.mlp(w.teacher, w.features, seed=1)
    logits = teacher.predict(x, batch_size=1024, verbose=0).astype("float16")
    ids = np.arange(w.rows, dtype="int64")

    def pipe(*arrays):
        return tf.data.Dataset.from_tensor_slices(arrays).shuffle(w.rows, seed=0).batch(w.batch).prefetch(
            tf.data.AUTOTUNE)

    return {"raw": pipe(x, y)} | {name: pipe(x, cls(labels=y, logits=logits, example_id=ids)) for name, cls in (
        ("packed", keras_kd.TeacherTargets), ("previous", PreviousTargets), ("default", DefaultTargets))}


def components(ds):
    return sum(len(spec._flat_tensor_specs) for spec in tf.nest.flatten(ds.element_spec))


def measure(w, rounds):
    ds = pipelines(w)
    models = {}
    for name in ds:
        loss = bw.ce_loss() if name == "raw" else bw.kd_loss()
        models[name] = bw.mlp(w.student, w.features, seed=2)
        models[name].compile("adam", loss=loss)

    def iterate(name):
        for _ in ds[name]:
            pass

    def fit(name):
        models[name].fit(ds[name], epochs=1, verbose=0)

    turns = {f"{kind}_{name}": (fn, name) for kind, fn in (("iter", iterate), ("fit", fit)) for name in ds}
    wall, cpu = collections.defaultdict(list), collections.defaultdict(list)
    for r in range(rounds + 1):
        for turn in rotated(list(turns), r):
            fn, name = turns[turn]
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(w.epochs_per_turn):
                fn(name)
            if r:
                wall[turn].append(time.perf_counter() - t0)
                cpu[turn].append(time.process_time() - c0)
        print(f"  {w.name}: round {r}/{rounds}", file=sys.stderr, flush=True)
    return ds, wall, cpu


def ratio(times, num, den):
    paired = sorted(a / b for a, b in zip(times[num], times[den]))
    q = statistics.quantiles(paired, n=4) if len(paired) >= 4 else [paired[0], 0, paired[-1]]
    return f"{statistics.median(paired):5.2f} (q {q[0]:.2f}-{q[-1]:.2f})"


def main(argv=None):
    parser = common_parser(__doc__.split("\n")[0], rounds=8)
    parser.add_argument("--workloads", default="bar,small,medium")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 8)
    print(f"# bench_targets_encoding: {' '.join(argv or sys.argv[1:])}; {rounds} rounds, medians of paired ratios")
    rows = [("iterating packed / raw  (goal <= 1.5)", "iter_packed", "iter_raw"),
            ("iterating previous / raw", "iter_previous", "iter_raw"),
            ("iterating default / raw", "iter_default", "iter_raw"),
            ("iterating packed / previous", "iter_packed", "iter_previous"),
            ("fit packed / plain  (goal <= 1.05)", "fit_packed", "fit_raw"),
            ("fit previous / plain", "fit_previous", "fit_raw"),
            ("fit default / plain", "fit_default", "fit_raw"),
            ("fit packed / previous", "fit_packed", "fit_previous")]
    for name in args.workloads.split(","):
        w = bw.WORKLOADS[name.strip()]
        ds, wall, cpu = measure(w, rounds)
        print(f"== {w.describe()}; tf.data tensors per element: "
              + ", ".join(f"{n} {components(d)}" for n, d in ds.items()))
        print(f"   {'ratio':42s} {'wall':>22s} {'process CPU':>22s}")
        for label, num, den in rows:
            print(f"   {label:42s} {ratio(wall, num, den):>22s} {ratio(cpu, num, den):>22s}")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
