"""Callbacks on Keras 3 + JAX: hyperparameters changed mid-fit, HardSampleReweighting, schedules.

On JAX, Keras jit-compiles the step as a pure function of the model's state, so
anything else read in the step is a constant (`keras_kd._step_state`). These
tests train with a zero learning rate, so the student's logits stay fixed and
every epoch's loss is a closed NumPy formula (`tests/reference.py`) of that
epoch's temperature, alpha and example weights.

`test_alpha_changed_between_epochs_changes_the_loss` and the schedule test are
unmarked: they run in the TensorFlow job too (the same assertions on both
backends). The rest is JAX only.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd.callbacks import SIGNALS
from tests import reference as ref

N, BATCH, FEATURES, CLASSES = 24, 8, 5, 3
jax_only = pytest.mark.backend("jax")


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, N).astype("int64")
    t = (2.0 * rng.normal(size=(N, CLASSES))).astype("float32")
    return x, y, t


def _dataset(x, y, t, ids=False):
    example_id = np.arange(N, dtype="int64") if ids else None
    targets = keras_kd.TeacherTargets(labels=y, logits=t, example_id=example_id)
    return tf.data.Dataset.from_tensor_slices((x, targets))


def _student(loss):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(CLASSES)])
    model.compile(keras.optimizers.SGD(0.0), loss=loss)  # lr 0: fixed logits, closed-form losses
    return model


class _SetAlphaKd(keras_kd.Callback):
    def __init__(self, alphas, batch=None):
        super().__init__()
        self.alphas, self.batch = alphas, batch

    def on_epoch_begin(self, epoch, logs=None):
        if self.batch is None:
            self.model.loss.alpha = self.alphas[epoch]

    def on_train_batch_begin(self, batch, logs=None):
        if self.batch is not None and batch == self.batch:
            self.model.loss.alpha = self.alphas[1]


class _SetAlphaKeras(keras.callbacks.Callback):
    """A plain Keras 3 callback: keras_kd never sees it."""

    def __init__(self, loss, alphas, batch=None):
        super().__init__()
        self.loss, self.alphas, self.batch = loss, alphas, batch

    def on_epoch_begin(self, epoch, logs=None):
        if self.batch is None:
            self.loss.alpha = self.alphas[epoch]

    def on_train_batch_begin(self, batch, logs=None):
        if self.batch is not None and batch == self.batch:
            self.loss.alpha = self.alphas[1]


ALPHAS = [0.0, 1.0, 0.25]


@pytest.mark.parametrize("how", ["scheduler", "keras_kd_callback", "keras_callback"])
def test_alpha_changed_between_epochs_changes_the_loss(how):
    x, y, t = _data()
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.5)
    student = _student(loss)
    callback = {
        "scheduler": lambda: keras_kd.DistillationScheduler(alpha=lambda epoch: ALPHAS[epoch]),
        "keras_kd_callback": lambda: _SetAlphaKd(ALPHAS),
        "keras_callback": lambda: _SetAlphaKeras(loss, ALPHAS),
    }[how]()
    history = student.fit(_dataset(x, y, t).batch(BATCH), epochs=3, verbose=0, callbacks=[callback])
    s = student.predict(x, verbose=0)
    want = [ref.distillation_loss(y, s, t, 2.0, a) for a in ALPHAS]
    np.testing.assert_allclose(history.history["loss"], want, rtol=1e-5)
    assert loss.alpha == ALPHAS[-1]


@pytest.mark.parametrize("how", ["keras_kd_callback", "keras_callback"])
def test_alpha_changed_within_an_epoch_changes_the_next_steps(how):
    x, y, t = _data()
    loss = keras_kd.DistillationLoss(temperature=3.0, alpha=0.5)
    student = _student(loss)
    alphas = (0.5, 0.0)  # batches 0 | 1, 2
    if how == "keras_kd_callback":
        callback = _SetAlphaKd(alphas, batch=1)
    else:
        callback = _SetAlphaKeras(loss, alphas, batch=1)
    history = student.fit(_dataset(x, y, t).batch(BATCH), epochs=1, verbose=0, callbacks=[callback])
    s = student.predict(x, verbose=0)
    per_batch = [
        ref.distillation_loss(y[i : i + BATCH], s[i : i + BATCH], t[i : i + BATCH], 3.0, alphas[min(i, 1)])
        for i in range(0, N, BATCH)
    ]
    np.testing.assert_allclose(history.history["loss"], [np.mean(per_batch)], rtol=1e-5)


def test_schedules_set_temperature_and_alpha_per_epoch():
    x, y, t = _data()
    loss = keras_kd.DistillationLoss(temperature=4.0, alpha=0.1)
    student = _student(loss)
    sched = keras_kd.DistillationScheduler(
        temperature=keras_kd.linear(8.0, 2.0, epochs=3), alpha=keras_kd.step([2], [0.0, 0.5])
    )
    history = student.fit(_dataset(x, y, t).batch(BATCH), epochs=3, verbose=0, callbacks=[sched])
    s = student.predict(x, verbose=0)
    temperatures, alphas = [8.0, 5.0, 2.0], [0.0, 0.0, 0.5]
    want = [ref.distillation_loss(y, s, t, T, a) for T, a in zip(temperatures, alphas)]
    np.testing.assert_allclose(history.history["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(history.history["kd_temperature"], temperatures)
    np.testing.assert_allclose(history.history["kd_alpha"], alphas)


# -- HardSampleReweighting ------------------------------------------------------------------------


def _kl_signal(s, t, T):
    return T * T * ref.kl(ref.log_softmax(t / T), ref.log_softmax(s / T))


def _weights(d, strength, clip):
    """The difficulty-to-weight map written out: (d / mean d + 1e-6) ** strength, mean 1, clipped."""
    w = (d / d.mean() + 1e-6) ** strength
    return np.clip(w / w.mean(), *clip)


@jax_only
@pytest.mark.parametrize("path", ["attach", "num_examples"])
@pytest.mark.parametrize("signal", ["kl", "student_ce"])
def test_reweighting_records_in_the_jitted_step_and_weighs_the_next_epoch(path, signal):
    x, y, t = _data()
    T, alpha, clip = 2.0, 0.3, (0.5, 1.6)
    rew = keras_kd.HardSampleReweighting(
        signal=signal, warmup_epochs=1, clip=clip, num_examples=N if path == "num_examples" else None
    )
    train = _dataset(x, y, t, ids=True)
    train = (rew.attach(train) if path == "attach" else train).batch(BATCH)
    # Validation: other teacher logits, same ids. It is never weighted and never recorded.
    val = _dataset(x, y, -t, ids=True).batch(BATCH)
    student = _student(keras_kd.DistillationLoss(temperature=T, alpha=alpha))
    history = student.fit(train, validation_data=val, epochs=2, verbose=0, callbacks=[rew])
    s = student.predict(x, verbose=0).astype("float64")

    d = _kl_signal(s, t, T) if signal == "kl" else ref.sparse_ce(y, s)
    np.testing.assert_allclose(rew.table.difficulty, d, rtol=1e-5)  # first value, then EMA of equal values
    w = _weights(d, 1.0, clip)
    np.testing.assert_allclose(rew.table.weights.numpy(), w, rtol=1e-5)
    np.testing.assert_allclose(rew.get_state()["weights"], w, rtol=1e-5)
    loss = history.history["loss"]
    np.testing.assert_allclose(loss[0], ref.distillation_loss(y, s, t, T, alpha), rtol=1e-5)
    np.testing.assert_allclose(loss[1], ref.distillation_loss(y, s, t, T, alpha, weights=w), rtol=1e-5)
    unweighted_val = ref.distillation_loss(y, s, -t, T, alpha)
    np.testing.assert_allclose(history.history["val_loss"], [unweighted_val] * 2, rtol=1e-5)
    assert history.history["kd_weight_max"][-1] == pytest.approx(w.max(), rel=1e-5)


@jax_only
def test_reweighting_table_is_state_of_the_model_during_fit_only():
    from keras_kd import _step_state

    x, y, t = _data()
    rew = keras_kd.HardSampleReweighting(warmup_epochs=0, num_examples=N)
    student = _student(keras_kd.DistillationLoss())
    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            # mid-epoch: the table is read through Keras's current JAX state
            seen.setdefault("mid_epoch_seen", int(rew.table.seen.sum()))

    student.fit(_dataset(x, y, t, ids=True).batch(BATCH), epochs=1, verbose=0, callbacks=[rew, Probe()])
    assert seen["mid_epoch_seen"] == BATCH  # the first batch's rows, written by the jitted step
    assert rew.table.seen.all()
    assert _step_state.bound_model(rew.table.step_state) is None  # released at the end of fit
    assert "keras_kd_step_state" not in student.evaluate(
        _dataset(x, y, t, ids=True).batch(BATCH), verbose=0, return_dict=True
    )


@jax_only
def test_scoring_pass_on_jax():
    x, y, t = _data()
    scoring = _dataset(x, y, t, ids=True).batch(BATCH)
    rew = keras_kd.HardSampleReweighting(
        signal="teacher_entropy", warmup_epochs=0, num_examples=N, scoring_data=scoring
    )
    student = _student(keras_kd.DistillationLoss())
    student.fit(_dataset(x, y, -t, ids=True).batch(BATCH), epochs=1, verbose=0, callbacks=[rew])
    p = np.exp(ref.log_softmax(t))  # the scoring data's teacher, not the training data's
    np.testing.assert_allclose(rew.table.difficulty, -(p * np.log(p)).sum(-1), rtol=1e-5)


@jax_only
def test_reweighting_refuses_a_built_subclassed_student():
    class Student(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(CLASSES)

        def call(self, x):
            return self.dense(x)

    x, y, t = _data()
    student = Student()
    student.compile(keras.optimizers.SGD(0.0), loss=keras_kd.DistillationLoss())
    student.fit(_dataset(x, y, t).batch(BATCH), epochs=1, verbose=0)  # built: Keras locks its state
    rew = keras_kd.HardSampleReweighting(num_examples=N)
    with pytest.raises(ValueError, match="JAX backend.*subclassed.*Functional or Sequential"):
        student.fit(_dataset(x, y, t, ids=True).batch(BATCH), epochs=1, verbose=0, callbacks=[rew])


@jax_only
def test_training_ids_outside_the_table_give_a_nan_loss_then_an_error_naming_the_cause():
    # No assertion can raise inside jax.jit: the affected loss is NaN (never another example's
    # weight), and the epoch's end raises, naming the table size and the fix.
    x, y, t = _data()
    rew = keras_kd.HardSampleReweighting(num_examples=N - 4)
    student = _student(keras_kd.DistillationLoss())
    losses = []
    spy = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: losses.append(logs["loss"]))
    with pytest.raises(ValueError, match=f"outside the HardSampleReweighting table of {N - 4} examples"):
        student.fit(_dataset(x, y, t, ids=True).batch(BATCH), epochs=2, verbose=0, callbacks=[spy, rew])
    assert len(losses) == 1 and np.isnan(losses[0])
    assert np.isfinite(rew.table.weights.numpy()).all() and rew.table.weights.numpy().shape == (N - 4,)


@jax_only
@pytest.mark.parametrize("signal", ["teacher_entropy", "teacher_wrong", "teacher_ce", "wsld"])
def test_signals_on_jax_arrays_equal_the_formulas(signal):
    import jax.numpy as jnp

    x, y, t = _data()
    rng = np.random.default_rng(3)
    s = rng.normal(size=(N, CLASSES)).astype("float32")
    y = np.where(np.arange(N) % 5 == 0, keras_kd.NO_LABEL, y)  # unlabelled rows: NaN for label signals
    got = np.asarray(SIGNALS[signal](jnp.asarray(y), jnp.asarray(t), jnp.asarray(s), None))
    labelled = y != keras_kd.NO_LABEL
    safe = np.where(labelled, y, 0)
    p = np.exp(ref.log_softmax(t))
    want = {
        "teacher_entropy": -(p * np.log(p)).sum(-1),
        "teacher_wrong": (t.argmax(-1) != safe).astype("float64"),
        "teacher_ce": ref.sparse_ce(safe, t),
        "wsld": 1.0 - np.exp(-ref.sparse_ce(safe, s) / (ref.sparse_ce(safe, t) + 1e-7)),
    }[signal]
    if signal != "teacher_entropy":
        want = np.where(labelled, want, np.nan)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
