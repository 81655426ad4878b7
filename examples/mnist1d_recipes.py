"""The MNIST-1D recipes: one function per row of the results table.

Every row trains one student (``"mlp"`` or ``"cnn"``) for one seed and returns
it with its learning curve; `examples.mnist1d` runs the rows over students and
seeds and prints the table. Only the public keras_kd API is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Callable, Dict, List, Optional

import keras
import numpy as np
import tensorflow as tf

import keras_kd

from examples import mnist1d_data
from examples import mnist1d_models

CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@dataclasses.dataclass
class Settings:
    """Every number the table depends on (chosen on the validation split)."""

    seeds: List[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    epochs: int = 50  # every row unless the row is about the budget
    patient_epochs: int = 100  # the consistent-mixup row (Beyer et al.'s "patient") and its scratch twin
    teacher_epochs: int = 50
    batch: int = 128
    # Choices made on the validation split (seed 0, see the README):
    learning_rate: float = 1e-2  # Adam; 1e-2 beat 3e-3 for the teacher and both students
    temperature: float = 1.0  # KD rows: T=1, alpha=0.5 had the best summed validation accuracy of
    alpha: float = 0.5  # T in {1, 2, 4} x alpha in {0.1, 0.5} (MLP 62.0 vs 58.0 scratch; CNN 87.8 vs 86.8)
    mixup_alpha: float = 0.2  # consistent mixup: Beta(0.2, 0.2) mixing, with KD at T=1, alpha=0.1
    mixup_temperature: float = 1.0
    mixup_kd_alpha: float = 0.1
    transfer_count: int = 5000  # extra unlabelled inputs from the generator with another seed
    noise: float = 0.2
    reweighting_strength: float = 3.0  # teacher_wrong: weight exp(-3 d), d: share of epochs teacher was wrong
    tuner_epochs: int = 10  # per trial (a short budget: the best is then retrained for `epochs`)
    tuner_temperatures: List[float] = dataclasses.field(default_factory=lambda: [1.0, 4.0])
    tuner_alphas: List[float] = dataclasses.field(default_factory=lambda: [0.1, 0.5, 1.0])
    tuner_divergences: List[str] = dataclasses.field(default_factory=lambda: ["kl", "dkd"])
    train_limit: Optional[int] = None  # quick mode: train on the first N training examples only
    # Training steps per `fit` call: 32 covers an epoch of 3,600 examples in one call. Quick mode's 4 steps an
    # epoch take 1: the multi-step loop costs more to trace than it saves there (same training either way).
    steps_per_execution: int = 32

    def key(self, *parts) -> str:
        """A short digest of the settings and ``parts``, for work-folder names."""
        text = json.dumps([dataclasses.asdict(self), parts], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


@dataclasses.dataclass
class Trained:
    model: keras.Model
    curve: List[float]  # test accuracy per epoch (recorded for the first seed only)
    epochs: int
    note: str = ""  # e.g. the tuned search's choice


class Context:
    """Data, teachers and caches shared by the rows (built once, kept on disk;
    ``caches``: the caches' folder in ``work``, one per process)."""

    def __init__(self, work: str, settings: Settings, caches: str = "caches"):
        self.work, self.settings, self.caches = work, settings, caches
        os.makedirs(work, exist_ok=True)
        self.data = mnist1d_data.load(work)
        if settings.train_limit is not None:
            self.data.x_train = self.data.x_train[: settings.train_limit]
            self.data.y_train = self.data.y_train[: settings.train_limit]
        self._teachers: Dict[str, keras.Model] = {}
        self._caches: Dict[str, keras_kd.TeacherLogitCache] = {}
        self.tuned: Dict[str, dict] = {}  # student kind -> the search's best choice
        self.trainers: Dict[tuple, tuple] = {}  # see `fit(reuse=...)`

    # -- teachers -------------------------------------------------------------

    def teacher(self, seed: int = 0, labels: Optional[np.ndarray] = None, tag: str = "clean",
                val_labels: Optional[np.ndarray] = None) -> keras.Model:
        """A teacher trained on the training split (``labels`` if given), its
        weights saved under the work folder and reloaded on later runs. The
        weights kept are those of the epoch with the best validation accuracy
        (against ``val_labels``: the noisy teacher only ever sees noisy labels)."""
        s, d = self.settings, self.data
        name = f"teacher_{tag}_{seed}_{s.key('teacher', s.teacher_epochs, s.batch, s.learning_rate)}"
        if name in self._teachers:
            return self._teachers[name]
        path = os.path.join(self.work, "teachers", name + ".weights.h5")
        keras.utils.set_random_seed(1000 + seed)
        model = mnist1d_models.teacher(name=f"teacher_{tag}_{seed}")
        if os.path.exists(path):
            model.load_weights(path)
        else:
            model.compile(keras.optimizers.Adam(s.learning_rate), CE, metrics=["accuracy"],
                          steps_per_execution=s.steps_per_execution)
            y = d.y_train if labels is None else labels
            y_val = d.y_val if val_labels is None else val_labels
            best = keras.callbacks.EarlyStopping("val_accuracy", patience=s.teacher_epochs,
                                                 restore_best_weights=True)
            model.fit(batches(d.x_train, y, s.batch, seed), validation_data=(d.x_val, y_val),
                      epochs=s.teacher_epochs, verbose=0, callbacks=[best])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            model.save_weights(path)
        self._teachers[name] = model
        return model

    def ensemble(self) -> List[keras.Model]:
        return [self.teacher(seed) for seed in range(3)]

    def noisy(self):
        """20% noisy training and validation labels and the teacher trained on them."""
        s, d = self.settings, self.data
        y = mnist1d_data.noisy_labels(d.y_train, s.noise, seed=0)
        y_val = mnist1d_data.noisy_labels(d.y_val, s.noise, seed=1)
        return y, self.teacher(0, labels=y, tag=f"noisy{int(s.noise * 100)}", val_labels=y_val)

    # -- caches ---------------------------------------------------------------

    def cached(self, name: str, teacher, dataset: tf.data.Dataset, **options) -> tf.data.Dataset:
        """``dataset`` (unbatched) through a teacher-logit cache in the work folder."""
        if name not in self._caches:
            self._caches[name] = keras_kd.cache_teacher_logits(
                teacher, os.path.join(self.work, self.caches, name), verbose=0, on_mismatch="rebuild",
                in_memory=True, **options)
        return dataset.apply(self._caches[name])


def shuffle_batch(dataset: tf.data.Dataset, seed: int, batch: int) -> tf.data.Dataset:
    """Shuffled (a new order every epoch) and batched, in an order that depends
    on ``seed`` alone: tf.data combines the op's seed with the global seed set
    when the op is made, so that is set here too."""
    tf.random.set_seed(seed)
    size = int(dataset.cardinality())
    return dataset.shuffle(size if size > 0 else 10_000, seed=seed).batch(batch)


def batches(x, y, batch: int, seed: int) -> tf.data.Dataset:
    return shuffle_batch(tf.data.Dataset.from_tensor_slices((x, y)), seed, batch)


def accuracy(model, x, y) -> float:
    return float((np.asarray(model(x, training=False)).argmax(-1) == y).mean())


class _Curve(keras.callbacks.Callback):
    """Test accuracy after every epoch (the learning curve)."""

    def __init__(self, student, x_test, y_test):
        super().__init__()
        self.student, self.x_test, self.y_test, self.values = student, x_test, y_test, []

    def on_epoch_end(self, epoch, logs=None):
        self.values.append(accuracy(self.student, self.x_test, self.y_test))


def fit(ctx: Context, kind: str, seed: int, loss, train, *, epochs=None, length=40, callbacks=(), x_test=None,
        curve=False, distiller_teacher=None, reuse=True) -> Trained:
    """Builds the ``kind`` student with ``seed``, compiles it with Adam and
    ``loss`` (or wraps it in Keras's Distiller) and fits ``train``.

    ``reuse``: calls with the same student (``kind``, ``length``) and the same
    loss configuration (its class and ``get_config()``, and the Distiller's
    teacher) train the compiled model of the first such call again (the other
    seeds, other rows with the same loss), its weights set to the new seed's
    fresh initial weights and its optimizer variables to their values before
    any step: the same training as a new model, without tracing the training
    step again (about a second each). ``False``: a new model (rows whose
    callbacks hook into the loss)."""
    s = ctx.settings
    epochs = epochs or s.epochs
    keras.utils.set_random_seed(seed)
    fresh = mnist1d_models.student(kind, length)
    if reuse:
        reuse = (kind, length, type(loss).__name__, json.dumps(loss.get_config(), sort_keys=True, default=str),
                 None if distiller_teacher is None else distiller_teacher.name)
    entry = ctx.trainers.get(reuse) if reuse else None
    if entry is None:
        student = trainer = fresh
        if distiller_teacher is not None:
            trainer = keras.distillation.Distiller(
                teacher=distiller_teacher,
                student=student,
                distillation_losses=keras.distillation.LogitsDistillation(
                    temperature=s.temperature, loss=keras.losses.KLDivergence()),
                student_loss_weight=s.alpha,
            )
        trainer.compile(keras.optimizers.Adam(s.learning_rate), loss=loss,
                        steps_per_execution=s.steps_per_execution)
        trainer.optimizer.build(trainer.trainable_variables)
        initial = [v.numpy() for v in trainer.optimizer.variables]
        if reuse:
            ctx.trainers[reuse] = (student, trainer, initial)
    else:
        student, trainer, initial = entry
        student.set_weights(fresh.get_weights())
        for variable, value in zip(trainer.optimizer.variables, initial):
            variable.assign(value)
    x_test = ctx.data.x_test if x_test is None else x_test
    recorder = [_Curve(student, x_test, ctx.data.y_test)] if curve else []
    trainer.fit(train, epochs=epochs, verbose=0, callbacks=[*callbacks, *recorder])
    return Trained(student, recorder[0].values if recorder else [], epochs)


def kd_loss(settings: Settings, divergence="kl", temperature=None, alpha=None):
    return keras_kd.DistillationLoss(
        temperature=settings.temperature if temperature is None else temperature,
        alpha=settings.alpha if alpha is None else alpha, divergence=divergence)


def every_second_sample(x):
    """The student's input in the different-inputs row: half the resolution."""
    return x[..., ::2, :]


# -- rows: fn(ctx, kind, seed, curve) -> Trained ---------------------------------

def scratch(ctx, kind, seed, curve):
    d, s = ctx.data, ctx.settings
    return fit(ctx, kind, seed, CE, batches(d.x_train, d.y_train, s.batch, seed), curve=curve)


def distiller(ctx, kind, seed, curve):
    d, s = ctx.data, ctx.settings
    return fit(ctx, kind, seed, CE, batches(d.x_train, d.y_train, s.batch, seed), curve=curve,
               distiller_teacher=ctx.teacher(0))


def _raw(ctx):
    d = ctx.data
    return tf.data.Dataset.from_tensor_slices((d.x_train, d.y_train))


def kd_cache(ctx, kind, seed, curve, divergence="kl"):
    s = ctx.settings
    train = shuffle_batch(ctx.cached("teacher0", ctx.teacher(0), _raw(ctx)), seed, s.batch)
    return fit(ctx, kind, seed, kd_loss(s, divergence), train, curve=curve)


def dkd(ctx, kind, seed, curve):
    return kd_cache(ctx, kind, seed, curve, divergence="dkd")


def ensemble(ctx, kind, seed, curve):
    s = ctx.settings
    train = ctx.cached("ensemble3", ctx.ensemble(), _raw(ctx), ensemble="mean_probs")
    return fit(ctx, kind, seed, kd_loss(s), shuffle_batch(train, seed, s.batch),
               curve=curve)


def mixup_patient(ctx, kind, seed, curve):
    """Consistent teaching: mixup on each batch BEFORE the online teacher, so
    teacher and student see the same mixed view; a long schedule."""
    d, s = ctx.data, ctx.settings
    # A sequential map: the seeded draws then come in the same order on every run (see `keras_kd.mixup`).
    mixed = batches(d.x_train, d.y_train, s.batch, seed).map(
        keras_kd.mixup(alpha=s.mixup_alpha, num_classes=10, seed=seed))
    train = keras_kd.with_teacher(mixed, ctx.teacher(0))
    loss = kd_loss(s, temperature=s.mixup_temperature, alpha=s.mixup_kd_alpha)
    return fit(ctx, kind, seed, loss, train, epochs=s.patient_epochs, curve=curve)


def scratch_patient(ctx, kind, seed, curve):
    d, s = ctx.data, ctx.settings
    return fit(ctx, kind, seed, CE, batches(d.x_train, d.y_train, s.batch, seed), epochs=s.patient_epochs,
               curve=curve)


def transfer(ctx, kind, seed, curve):
    """The labelled training set plus extra unlabelled inputs (a transfer set):
    the hard term skips the unlabelled examples (NO_LABEL)."""
    s = ctx.settings
    extra = mnist1d_data.transfer_inputs(ctx.work, s.transfer_count)
    unlabelled = keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices(extra))
    labelled = _raw(ctx).map(lambda x, y: (x, tf.cast(y, unlabelled.element_spec[1].dtype)))
    train = ctx.cached(f"transfer{s.transfer_count}", ctx.teacher(0), labelled.concatenate(unlabelled))
    return fit(ctx, kind, seed, kd_loss(s), shuffle_batch(train, seed, s.batch), curve=curve)


def half_scratch(ctx, kind, seed, curve):
    d, s = ctx.data, ctx.settings
    train = batches(every_second_sample(d.x_train), d.y_train, s.batch, seed)
    return fit(ctx, kind, seed, CE, train, length=20,
               x_test=every_second_sample(d.x_test), curve=curve)


def half_kd(ctx, kind, seed, curve):
    """Teacher on the 40-sample signal, student on every second sample
    (online: the teacher runs in the student's step on the full batch)."""
    d, s = ctx.data, ctx.settings
    train = keras_kd.with_teacher(batches(d.x_train, d.y_train, s.batch, seed), ctx.teacher(0),
                                  student_inputs=every_second_sample)
    return fit(ctx, kind, seed, kd_loss(s), train, length=20, x_test=every_second_sample(d.x_test),
               curve=curve)


def noisy_scratch(ctx, kind, seed, curve):
    d, s = ctx.data, ctx.settings
    y, _ = ctx.noisy()
    return fit(ctx, kind, seed, CE, batches(d.x_train, y, s.batch, seed), curve=curve)


def _noisy_cached(ctx):
    d = ctx.data
    y, teacher = ctx.noisy()
    return ctx.cached("teacher_noisy", teacher, tf.data.Dataset.from_tensor_slices((d.x_train, y)))


def noisy_kd(ctx, kind, seed, curve):
    s = ctx.settings
    train = shuffle_batch(_noisy_cached(ctx), seed, s.batch)
    return fit(ctx, kind, seed, kd_loss(s), train, curve=curve)


def noisy_kd_teacher_wrong(ctx, kind, seed, curve):
    """Plus HardSampleReweighting's ``teacher_wrong`` signal: examples whose
    (noisy) label the teacher disagrees with are down-weighted."""
    s = ctx.settings
    rew = keras_kd.HardSampleReweighting(signal="teacher_wrong", strength=s.reweighting_strength,
                                         warmup_epochs=1)
    train = shuffle_batch(rew.attach(_noisy_cached(ctx)), seed, s.batch)
    return fit(ctx, kind, seed, kd_loss(s), train, callbacks=[rew], curve=curve, reuse=False)


def tuned_choice(ctx: Context, kind: str) -> dict:
    """keras-tuner's grid over T, alpha (1.0 = plain training) and divergence,
    scored on the validation split; the search folder is in the work folder,
    so a later run reuses finished trials."""
    import keras_tuner

    d, s = ctx.data, ctx.settings

    def build(hp):
        return mnist1d_models.student(kind)

    hypermodel = keras_kd.DistillationHyperModel(
        build, metrics=["accuracy"], temperature=list(s.tuner_temperatures), alpha=list(s.tuner_alphas),
        divergence=list(s.tuner_divergences), learning_rate=s.learning_rate)
    tuner = keras_tuner.GridSearch(
        hypermodel, objective="val_accuracy", seed=0, directory=os.path.join(ctx.work, "tuner"),
        project_name=f"{kind}_{s.key('tuner', kind)}")
    train = shuffle_batch(ctx.cached("teacher0", ctx.teacher(0), _raw(ctx)), 0, s.batch)
    keras.utils.set_random_seed(0)
    tuner.search(train, validation_data=(d.x_val, d.y_val), epochs=s.tuner_epochs, verbose=0)
    best = tuner.get_best_hyperparameters(1)[0].values
    # With alpha = 1 (plain training) the search declares no temperature or divergence.
    return {"temperature": float(best.get("kd_temperature", 1.0)), "alpha": float(best["kd_alpha"]),
            "divergence": best.get("kd_divergence", "kl")}


def tuned(ctx, kind, seed, curve):
    s = ctx.settings
    if kind not in ctx.tuned:
        ctx.tuned[kind] = tuned_choice(ctx, kind)
    c = ctx.tuned[kind]
    train = shuffle_batch(ctx.cached("teacher0", ctx.teacher(0), _raw(ctx)), seed, s.batch)
    loss = kd_loss(s, c["divergence"], c["temperature"], c["alpha"])
    trained = fit(ctx, kind, seed, loss, train, curve=curve)
    trained.note = ("alpha=1 (plain training)" if c["alpha"] == 1.0
                    else f"T={c['temperature']:g}, alpha={c['alpha']:g}, {c['divergence']}")
    return trained


def teacher_row(ctx, kind, seed, curve):
    return Trained(ctx.teacher(0), [], ctx.settings.teacher_epochs)


Row = Callable[[Context, str, int, bool], Trained]
