"""Epoch time of online distillation: keras_kd.with_teacher vs keras.distillation.Distiller.

Prints, for one teacher/student/data set measured in one run (configurations
interleaved round by round, median epoch time over rounds, first epoch of each
fit dropped as tracing):

* plain student (cross-entropy, no teacher),
* keras_kd.with_teacher with its default placement ("auto", the step),
* keras_kd.with_teacher, teacher in the tf.data pipeline (placement="pipeline"),
* keras_kd.with_teacher, teacher in the training step (placement="step"),
* keras.distillation.Distiller, correctly configured
  (LogitsDistillation(loss=keras.losses.KLDivergence())),

and the ratios. Target (issue 15): with_teacher (default) / Distiller <= 1.0
on the small, medium and bar workloads (``--workload``; the students and
teachers of `bench_workloads.py`, shuffled each epoch).

Run: .venv/bin/python benchmarks/bench_online.py [--workload small] [--rounds 3]
"""

import os
import platform
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import keras_kd  # noqa: E402
from _timing import interleaved_epoch_medians  # noqa: E402
from _timing import synthetic_parser  # noqa: E402


def mlp(widths, classes, features, seed):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((features,))
    h = inp
    for w in widths:
        h = keras.layers.Dense(w, activation="relu")(h)
    return keras.Model(inp, keras.layers.Dense(classes)(h))


def macs(widths, classes, features):
    dims = [features, *widths, classes]
    return sum(a * b for a, b in zip(dims, dims[1:]))


# name: (rows, features, student widths, teacher widths, batch), as in issue 15.
WORKLOADS = {
    "small": (1257, 64, [32], [256, 256], 64),
    "medium": (4000, 40, [64], [512, 512], 128),
    "bar": (20000, 64, [256, 256], [2048, 2048], 256),
}


def main():
    parser = synthetic_parser(__doc__.split("\n")[0], epochs=3)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default=None,
                        help="issue 15's workloads (overrides --rows, --features, --batch)")
    args = parser.parse_args()
    student_w, teacher_w = [256], [512, 256]
    if args.workload:
        args.rows, args.features, student_w, teacher_w, args.batch = WORKLOADS[args.workload]

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.rows, args.features)).astype("float32")
    y = rng.integers(0, args.classes, size=args.rows)
    s_macs = macs(student_w, args.classes, args.features)
    t_macs = macs(teacher_w, args.classes, args.features)
    teacher = mlp(teacher_w, args.classes, args.features, seed=1)

    def dataset():
        return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(args.rows, seed=0).batch(args.batch)

    def run_plain():
        student = mlp(student_w, args.classes, args.features, seed=2)
        student.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return student, dataset().prefetch(tf.data.AUTOTUNE), []

    def run_with_teacher(placement):
        def make():
            student = mlp(student_w, args.classes, args.features, seed=2)
            student.compile("adam", keras_kd.DistillationLoss(temperature=4.0, alpha=0.1))
            ds = keras_kd.with_teacher(dataset(), teacher, placement=placement)
            return student, ds.prefetch(tf.data.AUTOTUNE), []

        return make

    def run_distiller():
        student = mlp(student_w, args.classes, args.features, seed=2)
        distiller = keras.distillation.Distiller(
            teacher=teacher,
            student=student,
            distillation_losses=keras.distillation.LogitsDistillation(
                temperature=4.0, loss=keras.losses.KLDivergence()
            ),
            student_loss_weight=0.1,
        )
        distiller.compile("adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return distiller, dataset().prefetch(tf.data.AUTOTUNE), []

    configs = {
        "plain student": run_plain,
        "with_teacher (default)": run_with_teacher("auto"),
        "with_teacher (pipeline)": run_with_teacher("pipeline"),
        "with_teacher (step)": run_with_teacher("step"),
        "keras Distiller": run_distiller,
    }
    median = interleaved_epoch_medians(configs, args.rounds, args.epochs)

    print(f"# bench_online: {platform.node()} {os.cpu_count()} CPUs, TF {tf.__version__}, Keras {keras.__version__}")
    print(f"# {args.rows} rows x {args.features} features, batch {args.batch}, {args.classes} classes;"
          f" teacher {t_macs} MACs/example = {t_macs / s_macs:.1f}x the student's {s_macs}")
    print(f"{'configuration':<26} {'epoch s (median)':>17} {'/ plain':>8} {'/ Distiller':>12}")
    for name, value in median.items():
        print(f"{name:<26} {value:>17.3f} {value / median['plain student']:>8.2f} {value / median['keras Distiller']:>12.2f}")
    best = min(median["with_teacher (pipeline)"], median["with_teacher (step)"])
    print(f"with_teacher (default) / Distiller = {median['with_teacher (default)'] / median['keras Distiller']:.2f}"
          f" (target <= 1.0)")
    print(f"with_teacher (pipeline) / Distiller = {median['with_teacher (pipeline)'] / median['keras Distiller']:.2f}")
    print(f"with_teacher (step) / Distiller = {median['with_teacher (step)'] / median['keras Distiller']:.2f}")
    print(f"best with_teacher / Distiller = {best / median['keras Distiller']:.2f}")


if __name__ == "__main__":
    main()
