"""HardSampleReweighting's difficulty signals for one-logit (Bernoulli) models,
against NumPy references written from the formulas (tests/reference.py)."""

import numpy as np
import pytest
import tensorflow as tf

from keras_kd import callbacks
from tests import reference as ref

# Hand-picked logits: confident right, confident wrong, unsure, exactly 0.
TEACHER = np.array([[3.0], [-2.0], [0.3], [0.0]], np.float32)
STUDENT = np.array([[1.0], [2.5], [-0.4], [0.0]], np.float32)
LABELS = np.array([1, 1, 0, 1])


def _labels(form):
    if form == "ids":
        return LABELS.astype("uint8")
    if form == "column":
        return LABELS[:, None].astype("float32")
    return LABELS.astype("int64")


@pytest.mark.parametrize("form", ["ids", "column", "int64"])
def test_cross_entropy_signals_are_binary_cross_entropy(form):
    labels = _labels(form)
    ce_s = ref.binary_ce(LABELS, STUDENT[:, 0])
    ce_t = ref.binary_ce(LABELS, TEACHER[:, 0])
    soft = tf.zeros([4])
    got_s = np.asarray(callbacks.signal_student_ce(labels, TEACHER, STUDENT, soft))
    got_t = np.asarray(callbacks.signal_teacher_ce(labels, TEACHER, STUDENT, soft))
    got_w = np.asarray(callbacks.signal_wsld(labels, TEACHER, STUDENT, soft))
    np.testing.assert_allclose(got_s, ce_s, rtol=1e-5)
    np.testing.assert_allclose(got_t, ce_t, rtol=1e-5)
    np.testing.assert_allclose(got_w, 1.0 - np.exp(-ce_s / (ce_t + 1e-7)), rtol=1e-5)
    # Hand check: CE of logit 3 on label 1 is log(1 + e^-3) = 0.04859.
    assert got_t[0] == pytest.approx(0.048587, abs=1e-5)


@pytest.mark.parametrize("form", ["ids", "column", "int64"])
def test_teacher_wrong_uses_the_sign_of_the_logit(form):
    got = np.asarray(callbacks.signal_teacher_wrong(_labels(form), TEACHER, STUDENT, tf.zeros([4])))
    # Teacher predicts logit > 0: [1, 0, 1, 0] against labels [1, 1, 0, 1].
    np.testing.assert_array_equal(got, [0.0, 1.0, 1.0, 1.0])


def test_teacher_entropy_is_the_bernoulli_entropy():
    got = np.asarray(callbacks.signal_teacher_entropy(LABELS, TEACHER, STUDENT, tf.zeros([4])))
    np.testing.assert_allclose(got, ref.bernoulli_entropy(TEACHER[:, 0]), rtol=1e-5)
    assert got[3] == pytest.approx(np.log(2.0), rel=1e-6)  # logit 0: a fair coin


def test_sequence_binary_signals_average_time_steps():
    teacher = np.stack([TEACHER, -TEACHER], axis=1)  # (4, 2, 1)
    student = np.stack([STUDENT, STUDENT], axis=1)
    labels = np.stack([LABELS, 1 - LABELS], axis=1)  # (4, 2)
    got = np.asarray(callbacks.signal_student_ce(labels, teacher, student, tf.zeros([4, 2])))
    expected = ref.binary_ce(labels, student[..., 0]).mean(-1)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    got_e = np.asarray(callbacks.signal_teacher_entropy(labels, teacher, student, tf.zeros([4, 2])))
    np.testing.assert_allclose(got_e, ref.bernoulli_entropy(teacher[..., 0]).mean(-1), rtol=1e-5)


def test_reweighting_a_binary_student_records_the_teachers_sign_errors(K):
    """End to end: a one-logit student and teacher in ``fit``. The teacher is fixed, so the
    smoothed teacher-wrong share of every example is exactly NumPy's
    ``(teacher logit > 0) != label`` (with argmax over one logit it was always 0)."""
    import keras_kd
    from tests.conftest import mlp

    rng = np.random.default_rng(11)
    x = rng.normal(size=(48, 8)).astype("float32")
    y = (rng.uniform(size=48) > 0.5).astype("uint8")
    teacher, student = mlp(K, classes=1), mlp(K, classes=1)
    rew = keras_kd.HardSampleReweighting(signal="teacher_wrong", num_examples=48, warmup_epochs=0)
    student.compile(K.optimizers.SGD(0.01), loss=keras_kd.DistillationLoss(temperature=2.0, alpha=0.3))
    ds = keras_kd.add_example_ids(tf.data.Dataset.from_tensor_slices((x, y))).batch(16)
    student.fit(keras_kd.with_teacher(ds, teacher, placement="pipeline"), epochs=2, verbose=0, callbacks=[rew])
    wrong = (teacher.predict(x, verbose=0)[:, 0] > 0).astype("int64") != y
    assert rew.table.seen.all()
    np.testing.assert_allclose(rew.table.teacher_wrong, wrong.astype("float64"), atol=1e-6)
    assert 0 < wrong.sum() < 48  # both kinds present, so the check is not vacuous
