"""Transfer sets (NO_LABEL) and dense mixed labels (mixup) in DistillationLoss's hard term."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import keras_kd
from keras_kd import TeacherTargets
from tests import reference as ref
from tests.conftest import mlp

JIT = pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
PLACEMENT = pytest.mark.parametrize("placement", ["pipeline", "step"])


def _logits(seed, shape, scale=3.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype("float32")


def _jax_step(K):
    """A Keras 3 student on JAX: nothing raises in its step (jit on or off), a bad value gives NaN."""
    return K is keras and keras.backend.backend() == "jax"


def _kl(t, s, T):
    return T * T * ref.kl(ref.log_softmax(np.asarray(t, np.float64) / T), ref.log_softmax(np.asarray(s, np.float64) / T))


# --- NO_LABEL ---------------------------------------------------------------------------


def test_no_label_is_minus_one():
    assert keras_kd.NO_LABEL == -1 and keras_kd.losses.NO_LABEL == -1


@pytest.mark.parametrize("shape", ["flat", "column", "sequence"])
def test_unlabelled_examples_have_no_hard_term_and_count_in_the_mean(shape):
    # per example: alpha * CE * [labelled] + (1 - alpha) * T^2 KL; the mean divides by every example.
    y = np.array([2, -1, 0, -1, 1, 3])
    s, t = _logits(1, (6, 4)), _logits(2, (6, 4))
    labelled = (y >= 0).astype(float)
    values = 0.3 * ref.sparse_ce(np.maximum(y, 0), s) * labelled + 0.7 * _kl(t, s, 2.0)
    labels = {"flat": y, "column": y[:, None], "sequence": y.reshape(2, 3)}[shape]
    if shape == "sequence":  # (batch, time, classes): the general (autodiff) path
        s, t = s.reshape(2, 3, 4), t.reshape(2, 3, 4)
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3)
    got = float(loss(TeacherTargets(labels=labels, logits=t), s))
    np.testing.assert_allclose(got, values.mean(), rtol=1e-6)
    hard = np.asarray(loss.components(TeacherTargets(labels=labels, logits=t), s)[0]).reshape(-1)
    np.testing.assert_array_equal(hard[y < 0], 0.0)


@pytest.mark.parametrize("dtype", ["int32", "int64", "float32"])
def test_label_range_allows_exactly_minus_one(dtype):
    loss = keras_kd.DistillationLoss()
    t = _logits(3, (3, 4))
    ok = TeacherTargets(labels=np.array([0, -1, 3], dtype), logits=t)
    assert np.isfinite(float(loss(ok, _logits(4, (3, 4)))))
    for bad in ([0, -2, 3], [0, 4, 1], [-5, 0, 1]):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"labels out of range.*NO_LABEL"):
            loss(TeacherTargets(labels=np.array(bad, dtype), logits=t), _logits(4, (3, 4)))


def test_fractional_float_labels_are_out_of_range():
    loss = keras_kd.DistillationLoss()
    with pytest.raises(tf.errors.InvalidArgumentError, match="labels out of range"):
        loss(TeacherTargets(labels=np.array([0.0, 1.5], "float32"), logits=_logits(5, (2, 3))), _logits(6, (2, 3)))


@JIT
def test_other_negative_labels_give_nan_under_xla(K, jit, toy_data):
    x, y, _ = toy_data
    y = y.copy()
    y[3] = -2
    teacher, student = mlp(K), mlp(K)
    student.compile("sgd", loss=keras_kd.DistillationLoss(), jit_compile=jit)
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), teacher, placement="pipeline")
    if jit or _jax_step(K):  # XLA drops the assertion, JAX cannot raise in its step: the loss is NaN
        assert np.isnan(student.fit(ds, epochs=1, verbose=0).history["loss"][0])
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="labels out of range"):
            student.fit(ds, epochs=1, verbose=0)


def test_binary_student_unlabelled_examples():
    s = np.array([[0.5], [-1.0], [2.0]], "float32")
    t = np.array([[1.0], [0.0], [-1.0]], "float32")
    y = np.array([1, -1, 0])
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.5)
    hard = ref.binary_ce(np.maximum(y, 0), s[:, 0]) * (y >= 0)
    want = (0.5 * hard + 0.5 * 4.0 * ref.bernoulli_kl(t[:, 0] / 2.0, s[:, 0] / 2.0)).mean()
    np.testing.assert_allclose(float(loss(TeacherTargets(labels=y, logits=t), s)), want, rtol=1e-6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="binary labels out of range"):
        loss(TeacherTargets(labels=np.array([1, -2, 0]), logits=t), s)


@JIT
@PLACEMENT
def test_transfer_set_in_fit_matches_reference(K, jit, placement, toy_data):
    x, y, _ = toy_data
    extra = np.random.default_rng(9).normal(size=(32, 8)).astype("float32")
    labelled = tf.data.Dataset.from_tensor_slices((x, y.astype("int64")))
    transfer = keras_kd.unlabelled(tf.data.Dataset.from_tensor_slices(extra))
    ds = keras_kd.with_teacher(labelled.concatenate(transfer).batch(128), mlp(K, hidden=32), placement=placement)
    student = mlp(K)
    kd = keras_kd.DistillationLoss(temperature=3.0, alpha=0.4)
    student.compile("sgd", loss=kd, jit_compile=jit)
    got = student.evaluate(ds, verbose=0)
    xs = np.concatenate([x, extra])
    ys = np.concatenate([y, np.full(32, -1)])
    s = student.predict(xs, verbose=0)
    t = _teacher_logits(ds)  # not shuffled: the labelled examples, then the transfer set
    hard = ref.sparse_ce(np.maximum(ys, 0), s) * (ys >= 0)
    want = (0.4 * hard + 0.6 * _kl(t, s, 3.0)).mean()
    assert got == pytest.approx(want, rel=1e-5)
    assert np.isfinite(student.fit(ds, epochs=2, verbose=0).history["loss"]).all()


def _teacher_logits(ds):
    """The dense teacher logits the dataset's targets carry (in-step teachers run here)."""
    out = []
    for _, targets in ds:
        out.append(keras_kd.targets.materialize(targets).logits.numpy())
    return np.concatenate(out)


# --- dense (one-hot / mixup) labels --------------------------------------------------------


@pytest.mark.parametrize("flavour", [keras, tf_keras])
def test_dense_labels_equal_keras_categorical_crossentropy(flavour):
    s = _logits(10, (6, 5))
    mixed = np.random.default_rng(11).dirichlet(np.ones(5), size=6).astype("float32")
    one_hot = np.eye(5, dtype="float32")[[0, 1, 2, 3, 4, 0]]
    cce = flavour.losses.CategoricalCrossentropy(from_logits=True, reduction="none")
    loss = keras_kd.DistillationLoss(alpha=1.0)
    for labels in (mixed, one_hot):
        hard = np.asarray(loss.hard_term(labels, s))
        np.testing.assert_allclose(hard, np.asarray(cce(labels, s)), rtol=1e-6)
        # alpha=1 with a teacher: the whole loss is the batch mean of that cross-entropy
        got = float(loss(TeacherTargets(labels=labels, logits=_logits(12, (6, 5))), s))
        np.testing.assert_allclose(got, np.asarray(cce(labels, s)).mean(), rtol=1e-6)


def test_dense_label_with_another_class_count_is_an_error():
    loss = keras_kd.DistillationLoss()
    with pytest.raises(ValueError, match=r"\(6, 3\).*dense \(one-hot or mixup\) labels with 5 columns"):
        loss(TeacherTargets(labels=np.full((6, 3), 1 / 3, "float32"), logits=_logits(13, (6, 5))), _logits(14, (6, 5)))
    with pytest.raises(ValueError, match="5 columns"):
        loss(np.full((6, 3), 1 / 3, "float32"), _logits(14, (6, 5)))


@JIT
def test_mixup_labels_in_fit_match_reference(K, jit, toy_data):
    x, y, _ = toy_data
    teacher, student = mlp(K, hidden=32), mlp(K)
    mixed = tf.data.Dataset.from_tensor_slices((x, y)).batch(96).map(keras_kd.mixup(0.4, num_classes=4, seed=0))
    x_mixed, y_mixed = next(iter(mixed))
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensors((x_mixed, y_mixed)), teacher, placement="pipeline")
    kd = keras_kd.DistillationLoss(temperature=2.0, alpha=0.5)
    student.compile("sgd", loss=kd, jit_compile=jit)
    got = student.evaluate(ds, verbose=0)
    s = student.predict(x_mixed.numpy(), verbose=0)
    t = teacher.predict(x_mixed.numpy(), verbose=0)
    want = (0.5 * ref.categorical_ce(y_mixed.numpy(), s) + 0.5 * _kl(t, s, 2.0)).mean()
    assert got == pytest.approx(want, rel=1e-5)


_NOT_DISTRIBUTIONS = {
    "negative": [[1.5, -0.5, 0.0, 0.0]],
    "all_zero": [[0.0, 0.0, 0.0, 0.0]],
    "half": [[0.25, 0.25, 0.0, 0.0]],
}


@pytest.mark.parametrize("row", list(_NOT_DISTRIBUTIONS), ids=list(_NOT_DISTRIBUTIONS))
def test_dense_labels_that_are_not_distributions_are_refused(row):
    labels = np.eye(4, dtype="float32")[[0, 1, 2]]
    labels = np.concatenate([labels, np.asarray(_NOT_DISTRIBUTIONS[row], "float32")])
    s, t = _logits(20, (4, 4)), _logits(21, (4, 4))
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.5)
    if keras.backend.backend() == "jax":  # NumPy arrays take the JAX math: no raise, the bad row's term is NaN
        hard = np.asarray(loss.hard_term(labels, s))
        assert np.isnan(hard[3]) and np.isfinite(hard[:3]).all(), hard
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="dense labels must be distributions"):
            loss.hard_term(labels, s)
    with pytest.raises(tf.errors.InvalidArgumentError, match="dense labels must be distributions"):
        loss(TeacherTargets(labels=labels, logits=t), s)
    # Within 1e-3 of a sum of 1 (float rounding of mixed labels) is accepted, as Keras computes it.
    near = np.array([[0.3, 0.7004, 0.0, 0.0]] * 4, "float32")
    cce = keras.losses.CategoricalCrossentropy(from_logits=True, reduction="none")
    np.testing.assert_allclose(np.asarray(loss.hard_term(near, s)), np.asarray(cce(near, s)), rtol=1e-6)


@JIT
def test_dense_labels_not_distributions_in_fit(K, jit, toy_data):
    x, y, _ = toy_data
    dense = np.eye(4, dtype="float32")[y]
    dense[5] = [0.5, 0.0, 0.0, 0.0]  # sums to 0.5: would halve its hard term
    teacher, student = mlp(K), mlp(K)
    student.compile("sgd", loss=keras_kd.DistillationLoss(temperature=2.0, alpha=0.5), jit_compile=jit)
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, dense)).batch(32), teacher, placement="pipeline")
    if jit or _jax_step(K):  # XLA drops the assertion, JAX cannot raise in its step: the loss is NaN
        assert np.isnan(student.fit(ds, epochs=1, verbose=0).history["loss"][0])
        assert np.isnan(student.evaluate(ds, verbose=0))
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="dense labels must be distributions"):
            student.fit(ds, epochs=1, verbose=0)
        with pytest.raises(tf.errors.InvalidArgumentError, match="dense labels must be distributions"):
            student.evaluate(ds, verbose=0)
