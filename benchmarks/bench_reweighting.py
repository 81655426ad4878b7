"""Epoch time with HardSampleReweighting / without it, same distillation pipeline.

Teacher logits are precomputed (as the cache provides them), so the epoch is
the student's step plus the pipeline: the worst case for any per-example
overhead. Configurations are interleaved round by round in rotating order;
medians of epoch times (first epoch of each fit dropped), the callback's own
epoch-end work included. Target (issue 15): <= 1.05 with the weights in the
step, on the small and medium workloads (``--workload``).

Run: .venv/bin/python benchmarks/bench_reweighting.py [--workload small] [--rounds 3]
"""

import os
import platform
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import keras_kd  # noqa: E402
from _timing import interleaved_epoch_medians  # noqa: E402
from _timing import synthetic_parser  # noqa: E402
from keras_kd import TeacherTargets  # noqa: E402


# name: (rows, features, student widths, batch), as in issue 15.
WORKLOADS = {"small": (1257, 64, [32], 64), "medium": (4000, 40, [64], 128), "bar": (20000, 64, [256, 256], 256)}


def main():
    parser = synthetic_parser(__doc__.split("\n")[0], epochs=4)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default=None,
                        help="issue 15's workloads (overrides --rows, --features, --batch)")
    args = parser.parse_args()
    widths = [256]
    if args.workload:
        args.rows, args.features, widths, args.batch = WORKLOADS[args.workload]

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.rows, args.features)).astype("float32")
    y = rng.integers(0, args.classes, size=args.rows)
    logits = rng.normal(size=(args.rows, args.classes)).astype("float32")
    ids = np.arange(args.rows)

    def base():
        return tf.data.Dataset.from_tensor_slices((x, TeacherTargets(labels=y, logits=logits, example_id=ids)))

    def student():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((args.features,)),
                                  *[keras.layers.Dense(w, activation="relu") for w in widths],
                                  keras.layers.Dense(args.classes)])
        model.compile("adam", keras_kd.DistillationLoss())
        return model

    def without():
        return student(), base().shuffle(args.rows, seed=0).batch(args.batch).prefetch(tf.data.AUTOTUNE), []

    def with_elementwise():
        rew = keras_kd.HardSampleReweighting(signal="kl", warmup_epochs=0)
        ds = rew.attach(base()).shuffle(args.rows, seed=0).batch(args.batch).prefetch(tf.data.AUTOTUNE)
        return student(), ds, [rew]

    def with_batched():
        rew = keras_kd.HardSampleReweighting(signal="kl", warmup_epochs=0, num_examples=args.rows)
        ds = rew.attach(base().shuffle(args.rows, seed=0).batch(args.batch)).prefetch(tf.data.AUTOTUNE)
        return student(), ds, [rew]

    def with_step():
        rew = keras_kd.HardSampleReweighting(signal="kl", warmup_epochs=0, num_examples=args.rows)
        return student(), base().shuffle(args.rows, seed=0).batch(args.batch).prefetch(tf.data.AUTOTUNE), [rew]

    configs = {
        "distillation, no reweighting": without,
        "reweighting, attach before batch": with_elementwise,
        "reweighting, attach after batch": with_batched,
        "reweighting, weights in the step": with_step,
    }
    median = interleaved_epoch_medians(configs, args.rounds, args.epochs)
    base_time = median["distillation, no reweighting"]
    print(f"# bench_reweighting: {platform.node()} {os.cpu_count()} CPUs, TF {tf.__version__}, Keras {keras.__version__}")
    print(f"# {args.rows} rows x {args.features} features, batch {args.batch}, student {widths}, signal 'kl'")
    print(f"{'configuration':<36} {'epoch s (median)':>17} {'ratio':>7}")
    for name, value in median.items():
        print(f"{name:<36} {value:>17.3f} {value / base_time:>7.2f}")
    print(f"with callback / without = {median['reweighting, weights in the step'] / base_time:.2f} (weights in the step),"
          f" {median['reweighting, attach after batch'] / base_time:.2f} (attach after batch),"
          f" {median['reweighting, attach before batch'] / base_time:.2f} (before batch); target <= 1.05")


if __name__ == "__main__":
    main()
