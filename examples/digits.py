"""The digits part of the demo (`make demo`, ``python examples/demo.py``):
every keras_kd piece, side by side, on scikit-learn's digits.

Trains a teacher and builds its logit cache, then trains, with one student
architecture, budget and seeds:

* ``scratch``: the student alone, cross-entropy;
* ``keras Distiller``: Keras 3's ``keras.distillation.Distiller``, correctly
  configured (``LogitsDistillation(loss=keras.losses.KLDivergence())``);
* ``keras_kd (cache)``: `DistillationLoss` in the student's own ``fit``, teacher
  logits from `cache_teacher_logits`;
* ``keras_kd + reweighting``: plus `HardSampleReweighting`;
* ``keras_kd + alignment``: plus hidden-feature alignment (`align`);
* ``keras_kd QAT int8 TFLite``: the cached-teacher student brought to tf_keras,
  quantization-aware trained with distillation, converted to int8 TFLite and
  evaluated with LiteRT;

and the low-data regime of Hinton et al. 2015 (section 5): students see a
small fraction of the labels, the teacher saw all of them.

Prints one table (test accuracy mean +- std over seeds at the last epoch,
median epoch time, model size) and writes PNG plots to the output folder:
learning curves, per-class accuracy, the reweighting histogram and
teacher-student agreement over epochs. Nothing is downloaded. This module only
wires the library's public API together; it needs the demo extra
(``pip install keras-kd[demo]``: scikit-learn and matplotlib).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import tempfile
import time
import warnings
from typing import Dict, List, Optional

import numpy as np

TEACHER = "teacher"
SCRATCH = "scratch"
DISTILLER = "keras Distiller"
CACHE = "keras_kd (cache)"
REWEIGHT = "keras_kd + reweighting"
ALIGN = "keras_kd + alignment"
QAT = "keras_kd QAT int8 TFLite"
LOW = " (low-data)"
ROWS = (TEACHER, SCRATCH, DISTILLER, CACHE, REWEIGHT, ALIGN, QAT, SCRATCH + LOW, CACHE + LOW)
STEPS = 32  # steps_per_execution: one call per epoch of digits' 20 batches


@dataclasses.dataclass
class Settings:
    seeds: List[int]
    epochs: int
    teacher_epochs: int
    qat_epochs: int
    low_data_epochs: int
    label_fraction: float
    batch: int
    student_width: int
    temperature: float
    alpha: float
    rows: List[str]
    output: str


@dataclasses.dataclass
class Row:
    accuracy: List[float] = dataclasses.field(default_factory=list)
    epoch_seconds: List[float] = dataclasses.field(default_factory=list)
    size_bytes: int = 0
    curve: List[float] = dataclasses.field(default_factory=list)  # test accuracy per epoch, first seed
    agreement: List[float] = dataclasses.field(default_factory=list)  # teacher agreement per epoch, first seed
    per_class: Optional[np.ndarray] = None  # first seed

    def describe(self):
        acc = np.asarray(self.accuracy) * 100
        std = acc.std(ddof=1) if len(acc) > 1 else 0.0
        seconds = statistics.median(self.epoch_seconds) if self.epoch_seconds else float("nan")
        return f"{acc.mean():6.2f} +- {std:4.2f}", seconds, self.size_bytes


def load_digits_split(seed: int = 0):
    """Digits as float32 in [0, 1]: a fixed stratified 70/30 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    return train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)


def _mlp(K, widths, prefix):
    inp = K.Input((64,))
    h = inp
    for i, w in enumerate(widths):
        h = K.layers.Dense(w, activation="relu", name=f"{prefix}_hidden{i + 1}")(h)
    return K.Model(inp, K.layers.Dense(10, name=f"{prefix}_logits")(h), name=prefix)


def _size_bytes(model) -> int:
    return int(sum(int(np.prod(w.shape)) * 4 for w in model.weights))


def _recorder(student, teacher_test_logits, x_test, y_test, measure=True):
    """A callback (runs in both flavours) timing epochs and, with ``measure``
    (the first seed: the plots read only its curves), measuring the student
    on the test split after every epoch."""
    import keras_kd

    class Recorder(keras_kd.Callback):
        def __init__(self):
            super().__init__()
            self.times, self.curve, self.agreement = [], [], []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.times.append(time.perf_counter() - self._start)
            if not measure:
                return
            logits = np.asarray(student(x_test, training=False))
            self.curve.append(float((logits.argmax(-1) == y_test).mean()))
            self.agreement.append(float((logits.argmax(-1) == teacher_test_logits.argmax(-1)).mean()))

    return Recorder()


def _record(row: Row, recorder, accuracy, predictions, y_test, size, first_seed):
    row.accuracy.append(accuracy)
    row.epoch_seconds.extend(recorder.times[1:] or recorder.times)
    row.size_bytes = size
    if first_seed:
        row.curve, row.agreement = recorder.curve, recorder.agreement
        row.per_class = np.array([(predictions[y_test == c] == c).mean() for c in range(10)])


def run(settings: Settings):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf
    import tf_keras  # the quantization-aware student is a tf_keras model (tfmot wraps only those)

    import keras_kd
    from keras_kd import optimize

    tf.get_logger().setLevel("ERROR")
    # Keras 3 notes on every fit of a tf.data set that `shuffle=True` is ignored.
    warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
    x_train, x_test, y_train, y_test = load_digits_split()
    few = np.random.default_rng(0).permutation(len(x_train))[: max(10, int(len(x_train) * settings.label_fraction))]
    results: Dict[str, Row] = {name: Row() for name in ROWS if name in settings.rows}
    extras = {}
    workdir = tempfile.mkdtemp(prefix="keras_kd_demo_")
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def kd_loss():
        return keras_kd.DistillationLoss(temperature=settings.temperature, alpha=settings.alpha)

    def raw(x, y):
        return tf.data.Dataset.from_tensor_slices((x, y))

    try:
        for seed in settings.seeds:
            first = seed == settings.seeds[0]
            keras.utils.set_random_seed(seed)
            teacher = _mlp(keras, [512, 256], "teacher")
            teacher.compile(keras.optimizers.Adam(1e-3), ce, steps_per_execution=STEPS)
            start = time.perf_counter()
            teacher.fit(raw(x_train, y_train).shuffle(len(x_train), seed=seed).batch(settings.batch),
                        epochs=settings.teacher_epochs, verbose=0)
            t_test = teacher.predict(x_test, verbose=0)
            if TEACHER in results:
                row = results[TEACHER]
                row.accuracy.append(float((t_test.argmax(-1) == y_test).mean()))
                row.epoch_seconds.append((time.perf_counter() - start) / settings.teacher_epochs)
                row.size_bytes = _size_bytes(teacher)
                if first:
                    row.per_class = np.array([(t_test.argmax(-1)[y_test == c] == c).mean() for c in range(10)])

            # The teacher runs once over the training data; every keras_kd row reads the cache.
            cache = keras_kd.cache_teacher_logits(teacher, os.path.join(workdir, f"cache-{seed}"),
                                                  verbose=1 if first else 0)
            cached = raw(x_train, y_train).apply(cache)
            cache_few = keras_kd.cache_teacher_logits(teacher, os.path.join(workdir, f"cache-few-{seed}"), verbose=0)
            cached_few = raw(x_train[few], y_train[few]).apply(cache_few)

            def student_fit(name, loss, train, epochs, callbacks=(), model=None, fit_model=None):
                if name not in results:
                    return None
                keras.utils.set_random_seed(seed)
                student = model or _mlp(keras, [settings.student_width], "student")
                trainer = fit_model or student
                if loss:
                    trainer.compile(keras.optimizers.Adam(3e-3), loss=loss, steps_per_execution=STEPS)
                recorder = _recorder(student, t_test, x_test, y_test, measure=first)
                trainer.fit(train, epochs=epochs, verbose=0, callbacks=[*callbacks, recorder])
                predictions = student.predict(x_test, verbose=0).argmax(-1)
                _record(results[name], recorder, float((predictions == y_test).mean()), predictions, y_test,
                        _size_bytes(student), first)
                return student

            def batches(ds, n=None):
                return ds.shuffle(n or len(x_train), seed=seed).batch(settings.batch)

            student_fit(SCRATCH, ce, batches(raw(x_train, y_train)), settings.epochs)
            student_fit(SCRATCH + LOW, ce, raw(x_train[few], y_train[few]).shuffle(len(few), seed=seed).batch(32),
                        settings.low_data_epochs)
            student_fit(CACHE + LOW, kd_loss(), cached_few.shuffle(len(few), seed=seed).batch(32),
                        settings.low_data_epochs)
            distilled = student_fit(CACHE, kd_loss(), batches(cached), settings.epochs)

            if DISTILLER in results:
                keras.utils.set_random_seed(seed)
                student = _mlp(keras, [settings.student_width], "student")
                distiller = keras.distillation.Distiller(
                    teacher=teacher,
                    student=student,
                    distillation_losses=keras.distillation.LogitsDistillation(
                        temperature=settings.temperature, loss=keras.losses.KLDivergence()
                    ),
                    student_loss_weight=settings.alpha,
                )
                distiller.compile(keras.optimizers.Adam(3e-3), loss=ce, steps_per_execution=STEPS)
                student_fit(DISTILLER, None, batches(raw(x_train, y_train)), settings.epochs,
                            model=student, fit_model=distiller)

            if REWEIGHT in results:
                rew = keras_kd.HardSampleReweighting(signal="kl", strength=1.0, warmup_epochs=2,
                                                     num_examples=len(x_train))
                student_fit(REWEIGHT, kd_loss(), rew.attach(batches(cached)), settings.epochs, callbacks=[rew])
                if first:
                    extras["reweighting_weights"] = rew.table.weights.numpy()

            if ALIGN in results:
                keras.utils.set_random_seed(seed)
                student = _mlp(keras, [settings.student_width], "student")
                aligned = keras_kd.align(student, teacher, pairs=[("student_hidden1", "teacher_hidden2")],
                                         feature_loss="mse", weight=0.5)
                train = raw(x_train, y_train).apply(aligned.cache_features(os.path.join(workdir, f"feat-{seed}")))
                aligned.model.compile(keras.optimizers.Adam(3e-3), loss=aligned.loss(kd_loss()),
                                      steps_per_execution=STEPS)
                student_fit(ALIGN, None, batches(train), settings.epochs, model=student, fit_model=aligned.model)

            if QAT in results and distilled is not None:
                # Keras 3 student -> tf_keras -> quantization-aware, fine-tuned with distillation -> int8.
                qat = optimize.quantize_for_distillation(optimize.to_tf_keras(distilled))
                qat.compile(tf_keras.optimizers.Adam(1e-3), loss=kd_loss(), steps_per_execution=STEPS)
                recorder = _recorder(qat, t_test, x_test, y_test, measure=first)
                qat.fit(batches(cached), epochs=settings.qat_epochs, verbose=0, callbacks=[recorder])
                tflite = optimize.to_tflite(qat, representative_data=raw(x_train, y_train).batch(64), int8=True)
                accuracy, logits = optimize.evaluate_tflite(tflite, raw(x_test, y_test).batch(256), return_logits=True)
                _record(results[QAT], recorder, float(accuracy), np.asarray(logits).argmax(-1), y_test, len(tflite),
                        first)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results, extras


def format_table(results: Dict[str, Row], settings: Settings) -> str:
    lines = [
        f"digits (scikit-learn: 1257 train / 540 test), seeds {settings.seeds}, student Dense({settings.student_width}),"
        f" T={settings.temperature} alpha={settings.alpha}, {settings.epochs} epochs (QAT +{settings.qat_epochs});"
        f" low-data: {settings.label_fraction:.0%} of the labels, {settings.low_data_epochs} epochs;"
        " test accuracy at the last epoch",
        f"{'row':<34} {'test accuracy %':>17} {'epoch s':>9} {'size KiB':>9}",
    ]
    for name, row in results.items():
        acc, seconds, size = row.describe()
        lines.append(f"{name:<34} {acc:>17} {seconds:>9.3f} {size / 1024:>9.1f}")
    return "\n".join(lines)


def plot(results: Dict[str, Row], extras: dict, output: str) -> List[str]:
    """Writes the PNG plots; returns their paths."""
    from examples import _plots

    plt = _plots.pyplot()
    paths = []
    save = _plots.png_saver(output, paths)

    curves = {n: r for n, r in results.items() if r.curve}

    def per_epoch(attribute, ylabel, title, name):
        fig, ax = plt.subplots(figsize=(7, 4))
        for row_name, row in curves.items():
            values = getattr(row, attribute)
            ax.plot(np.arange(1, len(values) + 1), np.asarray(values) * 100, label=row_name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)
        save(fig, name)

    per_epoch("curve", "test accuracy %", "Learning curves (first seed)", "learning_curves.png")
    per_epoch("agreement", "agreement with the teacher % (test)", "Teacher-student agreement over epochs",
              "agreement.png")

    per_class = {n: r.per_class for n, r in results.items() if r.per_class is not None}
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.8 / max(len(per_class), 1)
    for i, (name, acc) in enumerate(per_class.items()):
        ax.bar(np.arange(10) + i * width, acc * 100, width=width, label=name)
    ax.set_xticks(np.arange(10) + 0.4 - width / 2, [str(c) for c in range(10)])
    ax.set_xlabel("class")
    ax.set_ylabel("test accuracy %")
    lowest = min(float(np.min(acc)) for acc in per_class.values()) * 100 if per_class else 50.0
    ax.set_ylim(max(0.0, min(50.0, lowest - 5.0)), 101)
    ax.set_title("Per-class accuracy (first seed)")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    save(fig, "per_class_accuracy.png")

    if "reweighting_weights" in extras:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(extras["reweighting_weights"], bins=40)
        ax.set_xlabel("example weight after the last epoch")
        ax.set_ylabel("examples")
        ax.set_title("Hard-sample reweighting (signal 'kl', first seed)")
        save(fig, "reweighting_histogram.png")
    return paths
