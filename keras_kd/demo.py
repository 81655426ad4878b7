"""`python -m keras_kd demo`: end-to-end distillation on scikit-learn's digits.

Trains a teacher, then students of one architecture with the same budget and
seeds, on all labels and in the low-data regime of Hinton et al. 2015
(section 5: the student sees a small fraction of the labels, the teacher saw
all), and prints test accuracy (mean +- std over seeds, last epoch), epoch
time and model size for each row. Data ships inside scikit-learn: nothing is
downloaded. Library logic lives in the library; this module only wires it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from typing import Callable, Dict, List

import numpy as np


@dataclasses.dataclass
class Settings:
    seeds: List[int]
    epochs: int
    teacher_epochs: int
    batch: int
    rows: List[str]
    student_width: int
    label_fraction: float
    low_data_epochs: int
    output: str


@dataclasses.dataclass
class Row:
    accuracy: List[float] = dataclasses.field(default_factory=list)
    epoch_seconds: List[float] = dataclasses.field(default_factory=list)
    size_bytes: int = 0

    def describe(self):
        acc = np.asarray(self.accuracy) * 100
        std = acc.std(ddof=1) if len(acc) > 1 else 0.0
        return f"{acc.mean():6.2f} +- {std:4.2f}", statistics.median(self.epoch_seconds), self.size_bytes


def load_digits_split(seed: int = 0):
    """Digits as float32 in [0, 1]: a fixed stratified 70/30 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    return train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)


def _mlp(keras, widths, name):
    inp = keras.Input((64,))
    h = inp
    for w in widths:
        h = keras.layers.Dense(w, activation="relu")(h)
    return keras.Model(inp, keras.layers.Dense(10)(h), name=name)


def _size_bytes(model) -> int:
    return int(sum(np.prod(w.shape) * 4 for w in model.weights))


class _EpochTimer:
    """Collects epoch times through a callback that runs in either flavour."""

    def __init__(self):
        from keras_kd import _compat

        timer = self

        class Callback(_compat.callback_base()):
            def on_epoch_begin(self, epoch, logs=None):
                timer._start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                timer.times.append(time.perf_counter() - timer._start)

        self.times: List[float] = []
        self.callback = Callback()


# Student rows: name -> (loss, dataset) built from (keras_kd, train dataset, teacher).
def _scratch(keras, keras_kd, ds, teacher):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True), ds


def _distilled(keras, keras_kd, ds, teacher):
    return keras_kd.DistillationLoss(temperature=4.0, alpha=0.1), keras_kd.with_teacher(ds, teacher)


STUDENTS: Dict[str, Callable] = {"scratch": _scratch, "distilled": _distilled}
LOW_DATA = " (low-data)"
ROWS = ("teacher", *STUDENTS, *(name + LOW_DATA for name in STUDENTS))


def run(settings: Settings) -> Dict[str, Row]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf

    import keras_kd

    tf.get_logger().setLevel("ERROR")  # predict's retracing notices across models
    x_train, x_test, y_train, y_test = load_digits_split()
    results: Dict[str, Row] = {name: Row() for name in ROWS if name in settings.rows}
    # Low-data regime (Hinton et al. 2015, section 5): students see a fixed
    # fraction of the training labels; the teacher was trained on all of them.
    few = np.random.default_rng(0).permutation(len(x_train))[: max(10, int(len(x_train) * settings.label_fraction))]
    regimes = {
        "": (x_train, y_train, settings.batch, settings.epochs),
        LOW_DATA: (x_train[few], y_train[few], 32, settings.low_data_epochs),
    }

    def evaluate(model):
        logits = model.predict(x_test, verbose=0, batch_size=512)
        return float((logits.argmax(-1) == y_test).mean())

    def fit(model, ds, row, epochs):
        timer = _EpochTimer()
        model.fit(ds, epochs=epochs, verbose=0, callbacks=[timer.callback])
        row.epoch_seconds.extend(timer.times[1:] or timer.times)
        row.accuracy.append(evaluate(model))
        row.size_bytes = _size_bytes(model)

    for seed in settings.seeds:
        keras.utils.set_random_seed(seed)
        teacher = _mlp(keras, [512, 256], "teacher")
        teacher.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        teacher_ds = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(len(x_train), seed=seed)
        fit(teacher, teacher_ds.batch(settings.batch), results.get("teacher", Row()), settings.teacher_epochs)

        for suffix, (x, y, batch, epochs) in regimes.items():
            for name, make in STUDENTS.items():
                if name + suffix not in results:
                    continue
                keras.utils.set_random_seed(seed)
                student = _mlp(keras, [settings.student_width], name.replace(" ", "_"))
                ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed).batch(batch)
                loss, ds = make(keras, keras_kd, ds, teacher)
                student.compile(keras.optimizers.Adam(3e-3), loss=loss, metrics=["accuracy"])
                fit(student, ds, results[name + suffix], epochs)
    return results


def format_table(results: Dict[str, Row], settings: Settings) -> str:
    lines = [
        f"digits (scikit-learn, 1257 train / 540 test), seeds {settings.seeds}, student Dense({settings.student_width}),"
        f" {settings.epochs} epochs; low-data: {settings.label_fraction:.0%} of the labels,"
        f" {settings.low_data_epochs} epochs; accuracy at the last epoch",
        f"{'row':<22} {'test accuracy %':>17} {'epoch s':>9} {'size KiB':>9}",
    ]
    for name, row in results.items():
        acc, seconds, size = row.describe()
        lines.append(f"{name:<22} {acc:>17} {seconds:>9.3f} {size / 1024:>9.1f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras_kd demo",
        description="Distillation on scikit-learn's digits: teacher, scratch student, distilled student.",
    )
    parser.add_argument("--quick", action="store_true", help="one seed, few epochs (under a minute)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random seeds")
    parser.add_argument("--epochs", type=int, default=40, help="student epochs")
    parser.add_argument("--low-data-epochs", type=int, default=150, help="student epochs in the low-data regime")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--student-width", type=int, default=32)
    parser.add_argument("--label-fraction", type=float, default=0.1, help="share of training labels in the low-data regime")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS, help="rows to run")
    parser.add_argument("--output", default="results", help="folder for results")
    args = parser.parse_args(argv)
    if not 0.0 < args.label_fraction <= 1.0:
        parser.error(f"--label-fraction must be in (0, 1]. Received: {args.label_fraction}")
    if min(args.epochs, args.teacher_epochs, args.low_data_epochs) < 1:
        parser.error("--epochs, --teacher-epochs and --low-data-epochs must be >= 1")
    if args.quick:
        args.seeds, args.epochs, args.teacher_epochs, args.low_data_epochs = args.seeds[:1], 4, 8, 15
    settings = Settings(
        seeds=args.seeds,
        epochs=args.epochs,
        teacher_epochs=args.teacher_epochs,
        batch=args.batch,
        rows=args.rows,
        student_width=args.student_width,
        label_fraction=args.label_fraction,
        low_data_epochs=args.low_data_epochs,
        output=args.output,
    )
    results = run(settings)
    table = format_table(results, settings)
    print(table)
    os.makedirs(settings.output, exist_ok=True)
    with open(os.path.join(settings.output, "demo_table.txt"), "w") as f:
        f.write(table + "\n")
    return results
