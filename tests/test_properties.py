"""Property-based tests of DistillationLoss (hypothesis) against the NumPy reference.

Over shapes ((batch, classes) and (batch, time, classes)), dtypes, temperatures,
extreme logits (+-1e4), masks and sample weights: the loss is always finite,
never negative (every built-in divergence and the hard cross-entropy are
non-negative), zero for the KL family when the student equals the teacher,
and equal to the float64 NumPy reference.
"""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import keras_kd
from keras_kd import TeacherTargets
from tests import reference as ref

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DIVERGENCES = ["kl", "reverse_kl", "js", "soft_cross_entropy", "mse", "huber"]
DTYPES = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}  # relative tolerance of each input dtype


@st.composite
def problems(draw):
    batch = draw(st.integers(1, 6))
    classes = draw(st.integers(2, 9))
    time = draw(st.one_of(st.none(), st.integers(1, 4)))
    shape = (batch, classes) if time is None else (batch, time, classes)
    scale = draw(st.sampled_from([0.1, 3.0, 30.0, 1e4]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    student = rng.normal(size=shape) * scale
    teacher = rng.normal(size=shape) * scale
    if draw(st.booleans()):  # extreme saturated logits
        student[..., 0] = scale
        teacher[..., -1] = -scale
    labels = rng.integers(0, classes, size=shape[:-1])
    weights = rng.uniform(0.0, 3.0, size=(batch,)) if draw(st.booleans()) else None
    mask = None
    if time is not None and draw(st.booleans()):
        mask = rng.random(shape[:-1]) < 0.7
        mask[:, 0] = True  # at least one step per sequence
    return dict(
        student=student,
        teacher=teacher,
        labels=labels,
        weights=weights,
        mask=mask,
        temperature=draw(st.sampled_from([0.5, 1.0, 2.0, 4.0, 10.0])),
        alpha=draw(st.sampled_from([0.0, 0.3, 1.0])),
        divergence=draw(st.sampled_from(DIVERGENCES)),
        dtype=draw(st.sampled_from(list(DTYPES))),
    )


def _compute(p, student=None):
    dtype = tf.as_dtype(p["dtype"])
    s = tf.cast(tf.constant(p["student"] if student is None else student, tf.float32), dtype)
    t = tf.cast(tf.constant(p["teacher"], tf.float32), dtype)
    if p["mask"] is not None:
        s._keras_mask = tf.constant(p["mask"])
    loss = keras_kd.DistillationLoss(temperature=p["temperature"], alpha=p["alpha"], divergence=p["divergence"])
    value = loss(TeacherTargets(labels=p["labels"], logits=t), s, sample_weight=p["weights"])
    # The reference sees the same (rounded) inputs, in float64.
    return float(value), tf.cast(s, tf.float64).numpy(), tf.cast(t, tf.float64).numpy()


@SETTINGS
@given(problems())
def test_finite_nonnegative_and_equal_to_reference(p):
    value, s, t = _compute(p)
    assert np.isfinite(value)
    assert value >= -1e-5 * max(1.0, abs(value))
    weights = None if p["weights"] is None else (p["weights"] if s.ndim == 2 else p["weights"][:, None])
    mask = None if p["mask"] is None else p["mask"].astype(float)
    want = ref.distillation_loss(p["labels"], s, t, p["temperature"], p["alpha"], p["divergence"], weights=weights,
                                 mask=mask)
    np.testing.assert_allclose(value, want, rtol=1e-4, atol=1e-4 * max(1.0, abs(want)) + 1e-5)


@SETTINGS
@given(problems())
def test_kl_family_zero_when_student_equals_teacher(p):
    if p["divergence"] not in ("kl", "reverse_kl", "js", "mse", "huber"):
        return
    p = dict(p, alpha=0.0)
    value, _, _ = _compute(p, student=p["teacher"])
    assert abs(value) <= 1e-5


@SETTINGS
@given(problems())
def test_gradients_finite(p):
    dtype = tf.as_dtype(p["dtype"])
    s = tf.Variable(tf.cast(tf.constant(p["student"], tf.float32), dtype))
    t = tf.cast(tf.constant(p["teacher"], tf.float32), dtype)
    loss = keras_kd.DistillationLoss(temperature=p["temperature"], alpha=p["alpha"], divergence=p["divergence"])
    with tf.GradientTape() as tape:
        value = loss(TeacherTargets(labels=p["labels"], logits=t), s, sample_weight=p["weights"])
    grad = tape.gradient(value, s)
    assert np.all(np.isfinite(tf.cast(grad, tf.float32).numpy()))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_result_is_float32(dtype):
    s = tf.cast(tf.constant([[1.0, 2.0, 3.0]]), dtype)
    value = keras_kd.DistillationLoss()(TeacherTargets(labels=[0], logits=s), s)
    assert value.dtype == tf.float32
