"""DistillationLoss and divergences against independent references."""

import functools
import json
import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd import TeacherTargets
from keras_kd.targets import dense_teacher_logits
from tests import backend_inputs as B  # the JAX job feeds JAX arrays: the loss's JAX math
from tests import reference as ref

DIVS = ["kl", "reverse_kl", "js", "soft_cross_entropy", "mse", "huber"]


def _logits(seed, shape, scale=3.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype("float32")


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 10.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_matches_numpy_reference(divergence, T, alpha):
    s, t = _logits(1, (6, 5)), _logits(2, (6, 5))
    y = np.array([0, 1, 2, 3, 4, 0])
    loss = keras_kd.DistillationLoss(temperature=T, alpha=alpha, divergence=divergence)
    got = float(loss(B.targets(labels=y, logits=t), s))
    want = ref.distillation_loss(y, s, t, T, alpha, divergence)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("divergence", DIVS)
def test_sample_weight_and_mask_match_reference(divergence):
    # Sequences (batch=3, time=4, classes=5) with a padding mask and weights.
    s, t = _logits(3, (3, 4, 5)), _logits(4, (3, 4, 5))
    y = np.random.default_rng(5).integers(0, 5, size=(3, 4))
    w = np.array([1.0, 0.5, 2.0], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3, divergence=divergence)
    got = float(loss(B.targets(labels=y, logits=t), B.with_mask(B.array(s), mask), sample_weight=B.array(w)))
    want = ref.distillation_loss(y, s, t, 2.0, 0.3, divergence, weights=w[:, None], mask=mask)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # Masked equals sliced: the padded steps contribute nothing.
    flat_s = s[mask]
    flat_t = t[mask]
    flat_y = y[mask]
    flat_w = np.broadcast_to(w[:, None], mask.shape)[mask]
    sliced = keras_kd.DistillationLoss(
        temperature=2.0, alpha=0.3, divergence=divergence, reduction="sum"
    )(B.targets(labels=flat_y, logits=flat_t), flat_s, sample_weight=flat_w)
    np.testing.assert_allclose(got, float(sliced) / mask.sum(), rtol=1e-5)


def test_sample_weight_per_example():
    s, t = _logits(6, (4, 3)), _logits(7, (4, 3))
    y = np.array([0, 1, 2, 1])
    w = np.array([0.0, 1.0, 3.0, 0.5], np.float32)
    loss = keras_kd.DistillationLoss(temperature=3.0, alpha=0.5)
    got = float(loss(B.targets(labels=y, logits=t), s, sample_weight=w))
    np.testing.assert_allclose(got, ref.distillation_loss(y, s, t, 3.0, 0.5, weights=w), rtol=1e-5)


def test_hand_computed_value():
    # Two classes, T=1, alpha=0: the loss is KL(p_t || p_s).
    # p_t = softmax([0, 0]) = [.5, .5]; p_s = softmax([0, ln 3]) = [.25, .75]
    # KL = .5 ln(.5/.25) + .5 ln(.5/.75) = .5 ln 2 + .5 ln(2/3) = .5 ln(4/3)
    loss = keras_kd.DistillationLoss(temperature=1.0, alpha=0.0)
    got = float(loss(B.targets(labels=[0], logits=[[0.0, 0.0]]), np.array([[0.0, math.log(3.0)]], "float32")))
    assert got == pytest.approx(0.5 * math.log(4.0 / 3.0), rel=1e-6)


def test_temperature_squared_switch():
    s, t = _logits(8, (5, 4)), _logits(9, (5, 4))
    y = np.zeros(5, int)
    on = keras_kd.DistillationLoss(temperature=4.0, alpha=0.0)
    off = keras_kd.DistillationLoss(temperature=4.0, alpha=0.0, scale_by_temperature_squared=False)
    targets = B.targets(labels=y, logits=t)
    np.testing.assert_allclose(float(on(targets, s)), 16.0 * float(off(targets, s)), rtol=1e-6)


def test_equals_keras_logits_distillation_as_distiller_combines_it():
    """Keras's own LogitsDistillation, correctly configured (KLDivergence), combined as
    `Distiller.compute_loss` does: w * mean(student CE) + (1 - w) * distillation."""
    s, t = _logits(10, (16, 7)), _logits(11, (16, 7))
    y = np.random.default_rng(12).integers(0, 7, size=16)
    for T, w in [(1.0, 0.5), (4.0, 0.1), (10.0, 0.0)]:
        keras_term = keras.distillation.LogitsDistillation(temperature=T, loss=keras.losses.KLDivergence())
        student_ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, s)
        want = w * float(student_ce) + (1 - w) * float(keras_term.compute_loss(t, s))
        got = float(keras_kd.DistillationLoss(temperature=T, alpha=w)(B.targets(labels=y, logits=t), s))
        # Keras's KLDivergence clips probabilities at 1e-7: agreement to 1e-5.
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_one_hot_labels_equal_sparse():
    s, t = _logits(13, (5, 4)), _logits(14, (5, 4))
    y = np.array([0, 3, 1, 2, 3])
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.4)
    sparse = float(loss(B.targets(labels=y, logits=t), s))
    onehot = float(loss(B.targets(labels=np.eye(4, dtype="float32")[y], logits=t), s))
    np.testing.assert_allclose(sparse, onehot, rtol=1e-6)


def test_custom_hard_loss_and_divergence():
    s, t = _logits(15, (5, 4)), _logits(16, (5, 4))
    y = np.array([0, 3, 1, 2, 3])

    def l1(teacher_logits, student_logits):
        return keras.ops.sum(keras.ops.abs(teacher_logits - student_logits), -1)

    loss = keras_kd.DistillationLoss(
        temperature=2.0,
        alpha=0.5,
        divergence=l1,
        hard_loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    want = 0.5 * ref.sparse_ce(y, s) + 0.5 * 4.0 * np.abs(t / 2.0 - s / 2.0).sum(-1)
    np.testing.assert_allclose(float(loss(B.targets(labels=y, logits=t), s)), want.mean(), rtol=1e-5)


def test_plain_labels_give_hard_loss():
    s = _logits(17, (5, 4))
    y = np.array([0, 3, 1, 2, 3])
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.2)
    np.testing.assert_allclose(float(loss(y, s)), ref.sparse_ce(y, s).mean(), rtol=1e-5)


@pytest.mark.parametrize("divergence", DIVS)
def test_extreme_logits_finite(divergence):
    s = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], "float32")
    t = np.array([[-1e4, 1e4, 0.0], [-1e4, 1e4, -1e4]], "float32")
    loss = keras_kd.DistillationLoss(temperature=1.0, alpha=0.5, divergence=divergence)
    targets = B.targets(labels=[0, 1], logits=t)
    value, grad = B.value_and_grad(lambda s: loss(targets, s), s, jit=None)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "js", "soft_cross_entropy"])
def test_kl_family_zero_when_equal_and_nonnegative(divergence):
    z = _logits(18, (8, 6))
    loss = keras_kd.DistillationLoss(temperature=3.0, alpha=0.0, divergence=divergence)
    value = float(loss(B.targets(labels=np.zeros(8, int), logits=z), z))
    if divergence == "soft_cross_entropy":  # equals the teacher's entropy * T^2
        lp = ref.log_softmax(z / 3.0)
        assert value == pytest.approx(9.0 * -(np.exp(lp) * lp).sum(-1).mean(), rel=1e-5)
    else:
        assert abs(value) < 1e-6
    other = _logits(19, (8, 6))
    assert float(loss(B.targets(labels=np.zeros(8, int), logits=other), z)) >= 0.0


def test_float16_logits_computed_in_float32():
    s, t = _logits(20, (4, 5)), _logits(21, (4, 5))
    y = np.array([0, 1, 2, 3])
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3)
    got = np.asarray(loss(B.targets(labels=y, logits=t.astype("float16")), B.array(s, "float16")))
    assert got.dtype == np.float32
    want = ref.distillation_loss(y, s.astype("float16"), t.astype("float16"), 2.0, 0.3)
    np.testing.assert_allclose(float(got), want, rtol=1e-4)


# --- top-k targets ------------------------------------------------------------


def _topk(t, k):
    idx = np.argsort(-t, -1)[:, :k].astype("int32")
    vals = np.take_along_axis(t, idx, -1)
    lse = np.log(np.exp(t.astype(np.float64)).sum(-1)).astype("float32")
    return idx, vals, lse


def test_topk_uniform_exact_at_temperature_one():
    t = _logits(22, (5, 10))
    idx, vals, lse = _topk(t, 3)
    dense = np.asarray(dense_teacher_logits(
        B.targets(labels=np.zeros(5), topk_indices=idx, topk_values=vals, topk_logsumexp=lse), 10
    ))
    p_dense, p_true = np.exp(ref.log_softmax(dense)), np.exp(ref.log_softmax(t))
    # Top-k probabilities exact, the tail mass spread evenly over the 7 others.
    np.testing.assert_allclose(np.take_along_axis(p_dense, idx, -1), np.take_along_axis(p_true, idx, -1), rtol=1e-5)
    tail = 1.0 - np.take_along_axis(p_true, idx, -1).sum(-1)
    others = p_dense.copy()
    np.put_along_axis(others, idx, np.nan, -1)
    np.testing.assert_allclose(np.nanmean(others, -1), tail / 7, rtol=1e-4)


def test_topk_full_k_equals_dense_loss():
    s, t = _logits(23, (6, 5)), _logits(24, (6, 5))
    y = np.arange(6) % 5
    idx, vals, lse = _topk(t, 5)
    loss = keras_kd.DistillationLoss(temperature=4.0, alpha=0.2)
    dense = float(loss(B.targets(labels=y, logits=t), s))
    topk = float(loss(B.targets(labels=y, topk_indices=idx, topk_values=vals, topk_logsumexp=lse), s))
    np.testing.assert_allclose(topk, dense, rtol=1e-5)


def test_topk_renormalize_matches_reference():
    s, t = _logits(25, (4, 6)), _logits(26, (4, 6))
    idx, vals, _ = _topk(t, 2)
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.0, topk_fill="renormalize")
    got = float(loss(B.targets(labels=np.zeros(4, int), topk_indices=idx, topk_values=vals), s))
    # Reference: teacher distribution renormalised over its top 2.
    t_masked = np.full_like(t, -np.inf, dtype=np.float64)
    np.put_along_axis(t_masked, idx, vals, -1)
    want = 4.0 * ref.kl(ref.log_softmax(t_masked / 2.0), ref.log_softmax(s / 2.0)).mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_topk_uniform_without_logsumexp_is_an_error():
    idx, vals, _ = _topk(_logits(27, (2, 6)), 2)
    loss = keras_kd.DistillationLoss()
    with pytest.raises(ValueError, match="topk_logsumexp"):
        loss(B.targets(labels=[0, 1], topk_indices=idx, topk_values=vals), _logits(28, (2, 6)))


# --- configuration ------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"divergence": "kld"}, "divergence"),
        ({"topk_fill": "zero"}, "topk_fill"),
        ({"topk_fill": "renormalize", "divergence": "reverse_kl"}, "renormalize"),
        ({"reduction": "avg"}, "reduction"),
        ({"hard_loss": 3}, "hard_loss"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_kd.DistillationLoss(**kwargs)


def test_setters_validate():
    loss = keras_kd.DistillationLoss()
    with pytest.raises(ValueError, match="temperature"):
        loss.temperature = 0
    with pytest.raises(ValueError, match="alpha"):
        loss.alpha = 2


def test_string_crossentropy_hard_loss_warns():
    with pytest.warns(UserWarning, match="logits"):
        keras_kd.DistillationLoss(hard_loss="sparse_categorical_crossentropy")


def test_config_round_trip():
    loss = keras_kd.DistillationLoss(
        temperature=3.0,
        alpha=0.25,
        divergence="js",
        hard_loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
        scale_by_temperature_squared=False,
        topk_fill="renormalize",
        reduction="sum",
        name="kd",
    )
    config = loss.get_config()
    clone = keras_kd.DistillationLoss.from_config(config)
    assert clone.get_config() == config
    assert isinstance(clone.hard_loss, keras.losses.CategoricalCrossentropy)
    assert clone.hard_loss.get_config()["label_smoothing"] == 0.1
    # Through Keras's own serialization registry too.
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, keras_kd.DistillationLoss)
    assert restored.get_config() == config


@pytest.mark.backend("tensorflow")  # a tf.function's retracing (JAX: tests/test_hyperparameter_changes.py)
def test_temperature_changes_without_recompiling():
    s, t = _logits(29, (4, 5)), _logits(30, (4, 5))
    y = np.array([0, 1, 2, 3])
    loss = keras_kd.DistillationLoss(temperature=1.0, alpha=0.0)
    fn = tf.function(lambda: loss(TeacherTargets(labels=y, logits=t), s))
    first = float(fn())
    loss.temperature = 5.0
    loss.alpha = 0.5
    np.testing.assert_allclose(float(fn()), ref.distillation_loss(y, s, t, 5.0, 0.5), rtol=1e-5)
    assert first != float(fn())


def test_user_variable_as_temperature():
    var = tf.Variable(2.0)
    loss = keras_kd.DistillationLoss(temperature=var, alpha=0.0)
    s, t = _logits(31, (3, 4)), _logits(32, (3, 4))
    targets = B.targets(labels=[0, 1, 2], logits=t)
    var.assign(6.0)
    np.testing.assert_allclose(float(loss(targets, s)), ref.distillation_loss([0, 1, 2], s, t, 6.0, 0.0), rtol=1e-5)


# --- one-logit (binary) students ------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 2.0, 5.0])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("label_shape", ["flat", "column"])
def test_binary_matches_bernoulli_formula(T, alpha, label_shape):
    s, t = _logits(40, (7, 1)), _logits(41, (7, 1))
    y = np.array([0, 1, 1, 0, 1, 0, 0])
    labels = y if label_shape == "flat" else y[:, None].astype("float32")
    loss = keras_kd.DistillationLoss(temperature=T, alpha=alpha)
    got = float(loss(B.targets(labels=labels, logits=t), s))
    np.testing.assert_allclose(got, ref.binary_distillation_loss(y, s, t, T, alpha), rtol=1e-5, atol=1e-6)


def test_binary_hand_computed_value():
    # T=1, alpha=0: p = sigmoid(0) = 1/2, q = sigmoid(ln 3) = 3/4.
    # KL = .5 ln(.5/.75) + .5 ln(.5/.25) = .5 ln(4/3), as for the two-class softmax case.
    loss = keras_kd.DistillationLoss(temperature=1.0, alpha=0.0)
    got = float(loss(B.targets(labels=[1], logits=[[0.0]]), np.array([[math.log(3.0)]], "float32")))
    assert got == pytest.approx(0.5 * math.log(4.0 / 3.0), rel=1e-6)
    # Hard term alone: BCE(y=1, z=ln 3) = -ln(3/4).
    hard = keras_kd.DistillationLoss(alpha=1.0)(B.targets(labels=[1], logits=[[0.0]]),
                                                np.array([[math.log(3.0)]], "float32"))
    assert float(hard) == pytest.approx(-math.log(0.75), rel=1e-6)


@pytest.mark.parametrize("divergence", DIVS)
def test_binary_every_divergence_is_the_bernoulli_one(divergence):
    """Softmax divergences of Bernoulli(sigmoid(z)) = softmax([0, z]); mse/huber on the single logit."""
    s, t = _logits(42, (6, 1)), _logits(43, (6, 1))
    y = np.array([0, 1, 0, 1, 1, 0])
    T = 2.0
    loss = keras_kd.DistillationLoss(temperature=T, alpha=0.0, divergence=divergence)
    got = float(loss(B.targets(labels=y, logits=t), s))
    if divergence in ("mse", "huber"):
        want = T * T * ref.divergence(divergence, t / T, s / T).mean()
    else:
        two = lambda z: np.concatenate([np.zeros_like(z), z], -1)  # noqa: E731 - Bernoulli as 2 classes
        want = T * T * ref.divergence(divergence, two(t / T), two(s / T)).mean()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if divergence == "kl":
        np.testing.assert_allclose(got, T * T * ref.bernoulli_kl(t[:, 0] / T, s[:, 0] / T).mean(), rtol=1e-5)


def test_binary_soft_labels_and_time_axis():
    s, t = _logits(44, (3, 4, 1)), _logits(45, (3, 4, 1))
    y = np.random.default_rng(46).uniform(size=(3, 4))  # soft labels in [0, 1]
    loss = keras_kd.DistillationLoss(temperature=3.0, alpha=0.5)
    got = float(loss(B.targets(labels=y, logits=t), s))
    want = (0.5 * ref.binary_ce(y, s[..., 0]) + 0.5 * 9.0 * ref.bernoulli_kl(t[..., 0] / 3.0, s[..., 0] / 3.0)).mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_binary_gradient_moves_student_towards_teacher():
    t = np.array([[2.0], [-1.0]], "float32")
    loss, targets = keras_kd.DistillationLoss(temperature=2.0, alpha=0.0), B.targets(labels=[1, 0], logits=t)
    _, grad = B.value_and_grad(lambda s: loss(targets, s), np.zeros((2, 1), "float32"), jit=None)
    # d/ds T^2 KL = T (sigmoid(s/T) - sigmoid(t/T)) / 1 * ... : the sign points away from the teacher.
    assert grad[0, 0] < 0 < grad[1, 0]
    want = 2.0 * (0.5 - 1.0 / (1.0 + np.exp(-t[:, 0] / 2.0))) / 2  # T * (q - p), mean over 2 examples
    np.testing.assert_allclose(grad[:, 0], want, rtol=1e-5)


# --- labels of any integer dtype ------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int32", "int64", "float64"])
def test_label_dtypes_like_plain_keras(dtype):
    s, t = _logits(47, (6, 5)), _logits(48, (6, 5))
    y = np.array([0, 1, 2, 3, 4, 0])
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.5)
    got = float(loss(B.targets(labels=y.astype(dtype), logits=t), s))
    np.testing.assert_allclose(got, ref.distillation_loss(y, s, t, 2.0, 0.5), rtol=1e-5)
    plain = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y.astype(dtype), s)
    np.testing.assert_allclose(float(keras_kd.DistillationLoss()(y.astype(dtype), s)), float(plain), rtol=1e-5)


# --- NaN propagates through the math (what XLA relies on) ------------------------------


@pytest.mark.parametrize("divergence", DIVS)
def test_nan_teacher_propagates_without_assertions(divergence):
    """The divergences themselves (no checks) never drop a NaN teacher value."""
    t = _logits(49, (3, 4))
    t[1, 2] = np.nan
    fn = keras_kd.losses.get_divergence(divergence)
    values = np.asarray(fn(B.array(t), B.array(_logits(50, (3, 4)))))
    assert np.isnan(values[1]) and np.all(np.isfinite(values[[0, 2]]))


@pytest.mark.backend("tensorflow")  # a TF XLA function (JAX: tests/test_jax_losses.py)
def test_bad_rows_are_nan_inside_a_compiled_step():
    # Under XLA the assertions are dropped; only the bad rows' values are NaN.
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.5, reduction="none")
    t = _logits(51, (4, 3))
    t[0, 1] = -np.inf
    y = np.array([0, 1, 9, 2])
    fn = tf.function(lambda: loss(TeacherTargets(labels=y, logits=t), _logits(52, (4, 3))), jit_compile=True)
    values = fn().numpy()
    assert np.isnan(values[0]) and np.isnan(values[2]) and np.all(np.isfinite(values[[1, 3]]))


# --- variables and setters are checked like numbers -----------------------------------


@pytest.mark.parametrize("make", [tf.Variable, keras.Variable], ids=["tf.Variable", "keras.Variable"])
@pytest.mark.parametrize(
    "argument, value, match",
    [
        ("temperature", -3.0, r"Expected `temperature` > 0.0 and finite. Received: temperature=-3.0"),
        ("temperature", 0.0, r"Received: temperature=0.0"),
        ("temperature", float("nan"), r"Received: temperature=nan"),
        ("alpha", 1.5, r"Expected `alpha` in \[0.0, 1.0\] and finite. Received: alpha=1.5"),
        ("alpha", -0.1, r"Received: alpha=-0.1"),
    ],
)
def test_variables_are_range_checked(make, argument, value, match):
    with pytest.raises(ValueError, match=match):
        keras_kd.DistillationLoss(**{argument: make(value)})


def test_valid_variables_are_kept():
    temperature, alpha = keras.Variable(3.0), tf.Variable(0.2)
    loss = keras_kd.DistillationLoss(temperature=temperature, alpha=alpha)
    assert loss.temperature_variable is temperature and loss.alpha_variable is alpha
    assert loss.temperature == pytest.approx(3.0) and loss.alpha == pytest.approx(0.2)


@pytest.mark.parametrize("value", ["x", "4", None, [1.0], np.ones(2), True, tf.Variable(2)])
def test_non_numbers_get_a_clear_message(value):
    with pytest.raises(ValueError, match=r"Expected `temperature` to be a number or a (scalar )?float"):
        keras_kd.DistillationLoss(temperature=value)
    with pytest.raises(ValueError, match=r"Expected `alpha` to be a number or a (scalar )?float"):
        keras_kd.DistillationLoss(alpha=value if not isinstance(value, tf.Variable) else tf.Variable(0))


@pytest.mark.parametrize(
    "argument, value, match",
    [
        ("alpha", "x", r"Expected `alpha` to be a number or a float tf.Variable. Received: alpha='x'"),
        ("temperature", "x", r"Expected `temperature` to be a number"),
        ("temperature", tf.Variable(-1.0), r"Expected `temperature` > 0.0 and finite. Received: temperature=-1.0"),
        ("alpha", keras.Variable(2.0), r"Expected `alpha` in \[0.0, 1.0\] and finite. Received: alpha=2.0"),
        ("alpha", np.float32(1.5), r"Received: alpha=1.5"),
    ],
)
def test_setters_check_like_the_constructor(argument, value, match):
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match=match):
        setattr(loss, argument, value)
    assert loss.temperature == 2.0 and loss.alpha == 0.5  # unchanged


def test_setters_take_valid_variables_and_arrays():
    loss = keras_kd.DistillationLoss()
    loss.temperature = tf.Variable(6.0)
    loss.alpha = np.array(0.25)
    assert loss.temperature == 6.0 and loss.alpha == 0.25


# --- hard losses on probabilities: the student outputs logits ------------------------


def _probability_hard_losses(K):
    return [
        K.losses.SparseCategoricalCrossentropy(),  # Keras's default: from_logits=False
        K.losses.CategoricalCrossentropy(label_smoothing=0.1),
        K.losses.sparse_categorical_crossentropy,
        functools.partial(K.losses.sparse_categorical_crossentropy, axis=-1),
        "sparse_categorical_crossentropy",
    ]


def test_hard_loss_on_probabilities_warns_in_every_form(K):
    """A cross-entropy with from_logits=False reads the logits as probabilities: 8.5 instead of
    the cross-entropy 1.85 of these logits. Every form of it warns, naming the fix."""
    for hard_loss in _probability_hard_losses(K):
        with pytest.warns(UserWarning, match=r"from_logits=True"):
            keras_kd.DistillationLoss(hard_loss=hard_loss)


def test_hard_loss_from_logits_is_silent_and_equals_reference(K):
    s, t = _logits(40, (6, 4)), _logits(41, (6, 4))
    y = np.array([0, 3, 1, 2, 3, 0])
    forms = [
        K.losses.SparseCategoricalCrossentropy(from_logits=True),
        functools.partial(K.losses.sparse_categorical_crossentropy, from_logits=True),
    ]
    for hard_loss in forms:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3, hard_loss=hard_loss)
        targets = B.targets(labels=y, logits=t) if K is keras else TeacherTargets(labels=y, logits=t)
        got = float(loss(targets, s))
        np.testing.assert_allclose(got, ref.distillation_loss(y, s, t, 2.0, 0.3), rtol=1e-5)


@pytest.mark.parametrize("name", DIVS)
def test_divergence_function_round_trips_like_its_name(name):
    """``divergence=keras_kd.jensen_shannon`` (the exported function) used to fail to deserialize."""
    s, t = _logits(42, (5, 4)), _logits(43, (5, 4))
    y = np.array([0, 3, 1, 2, 3])
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3, divergence=keras_kd.DIVERGENCES[name])
    assert loss.get_config()["divergence"] == name
    for serialize, deserialize in [
        (keras.losses.serialize, keras.losses.deserialize),
        (keras.saving.serialize_keras_object, keras.saving.deserialize_keras_object),
    ]:
        restored = deserialize(json.loads(json.dumps(serialize(loss))))
        got = float(restored(B.targets(labels=y, logits=t), s))
        np.testing.assert_allclose(got, ref.distillation_loss(y, s, t, 2.0, 0.3, name=name), rtol=1e-5)


def test_renormalize_refuses_unsafe_divergence_functions_like_names():
    with pytest.raises(ValueError, match="renormalize"):
        keras_kd.DistillationLoss(divergence=keras_kd.reverse_kl, topk_fill="renormalize")
    with pytest.raises(ValueError, match="renormalize"):
        keras_kd.DistillationLoss(divergence=keras_kd.logit_mse, topk_fill="renormalize")


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("T, alpha", [(4.0, 0.1), (1.0, 1.0), (3.0, 0.0)])
def test_training_equals_keras_distiller(jit, T, alpha):
    """Two epochs of the user's own ``fit`` with DistillationLoss give the same student weights as
    Keras's own ``keras.distillation.Distiller`` (LogitsDistillation with KLDivergence)."""
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(64, 8)).astype("float32"), rng.integers(0, 4, 64)

    def mlp(seed):
        keras.utils.set_random_seed(seed)
        inp = keras.Input((8,))
        return keras.Model(inp, keras.layers.Dense(4)(keras.layers.Dense(16, activation="relu")(inp)))

    teacher, theirs, ours = mlp(1), mlp(2), mlp(2)
    distiller = keras.distillation.Distiller(
        teacher=teacher,
        student=theirs,
        distillation_losses=keras.distillation.LogitsDistillation(temperature=T, loss=keras.losses.KLDivergence()),
        student_loss_weight=alpha,
    )
    distiller.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    distiller.fit(x, y, batch_size=32, epochs=2, verbose=0, shuffle=False)
    ours.compile(keras.optimizers.SGD(0.5), loss=keras_kd.DistillationLoss(temperature=T, alpha=alpha), jit_compile=jit)
    ours.fit(keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), teacher), epochs=2, verbose=0)
    for theirs_w, ours_w in zip(theirs.get_weights(), ours.get_weights()):
        np.testing.assert_allclose(ours_w, theirs_w, atol=1e-5)
