"""The fused gradient of the common case (keras_kd.losses.fused): loss and gradients wrt the student
logits equal the NumPy reference (closed form, tests/reference.py) and the autodiff path, in every setting
the loss supports.

The fused step is TensorFlow's (JAX differentiates the loss itself): in the JAX job the same cases feed JAX
arrays (tests/backend_inputs.py) and ``jax.grad`` must give the same values and gradients."""

import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd import TeacherTargets
from tests import backend_inputs as B
from tests import reference as ref
from tests.conftest import mlp

JIT = pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
TOL = dict(rtol=1e-6, atol=1e-6)


def _logits(seed, shape, scale=3.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype("float32")


def _autodiff(loss):
    """The same loss on the general (autodiff) path: the fused step switched off."""
    clone = keras_kd.DistillationLoss.from_config(loss.get_config())
    clone._fused = False
    return clone


def _loss_and_grad(loss, targets, s, jit=False, **kwargs):
    return B.value_and_grad(lambda s: loss(targets, s, **kwargs), s, jit)


def _check(loss, targets, s, want_value, want_grad, jit, **kwargs):
    assert loss._fused
    value, grad = _loss_and_grad(loss, targets, s, jit, **kwargs)
    np.testing.assert_allclose(value, want_value, **TOL)
    np.testing.assert_allclose(grad, want_grad, **TOL)
    value_a, grad_a = _loss_and_grad(_autodiff(loss), targets, s, jit, **kwargs)
    np.testing.assert_allclose(value, value_a, **TOL)
    np.testing.assert_allclose(grad, grad_a, **TOL)


@JIT
@pytest.mark.parametrize("T, alpha", [(1.0, 0.0), (4.0, 0.1), (2.0, 0.5), (10.0, 1.0)])
def test_mean_matches_reference(jit, T, alpha):
    s, t = _logits(1, (8, 5)), _logits(2, (8, 5))
    y = np.random.default_rng(3).integers(0, 5, size=8)
    loss = keras_kd.DistillationLoss(temperature=T, alpha=alpha)
    _check(loss, B.targets(labels=y, logits=t), s, ref.distillation_loss(y, s, t, T, alpha),
           ref.kd_gradient(y, s, t, T, alpha, 1 / 8), jit)


@JIT
@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean", "mean_with_sample_weight"])
def test_reductions_with_sample_weights_and_mask(jit, reduction):
    s, t = _logits(4, (6, 4)), _logits(5, (6, 4))
    y = np.array([0, 1, 2, 3, 0, 1])
    w = np.array([1.0, 0.0, 2.0, 0.5, 1.0, 3.0], np.float32)
    mask = np.array([1, 1, 1, 0, 1, 1], bool)
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3, reduction=reduction)
    values = 0.3 * ref.sparse_ce(y, s) + 0.7 * 4.0 * ref.kl(ref.log_softmax(t / 2.0), ref.log_softmax(s / 2.0))
    weights = w * mask
    count = {"sum": 1.0, "mean_with_sample_weight": weights.sum()}.get(reduction, mask.sum())
    coef = weights / count

    autodiff = _autodiff(loss)

    targets, weights = B.targets(labels=y, logits=t), B.array(w)
    for kd in (loss, autodiff):
        value, grad = B.value_and_grad(lambda s: kd(targets, B.with_mask(s * 1.0, mask), sample_weight=weights),
                                       s, jit)
        np.testing.assert_allclose(value, (coef * values).sum(), **TOL)
        np.testing.assert_allclose(grad, ref.kd_gradient(y, s, t, 2.0, 0.3, coef), **TOL)


def test_reduction_none_gives_per_example_values_and_gradients():
    s, t = _logits(6, (5, 3)), _logits(7, (5, 3))
    y = np.array([0, 1, 2, 0, 1])
    w = np.array([1.0, 2.0, 0.5, 0.0, 1.0], np.float32)
    loss = keras_kd.DistillationLoss(temperature=3.0, alpha=0.2, reduction="none")
    targets = B.targets(labels=y, logits=t)
    values = 0.2 * ref.sparse_ce(y, s) + 0.8 * 9.0 * ref.kl(ref.log_softmax(t / 3.0), ref.log_softmax(s / 3.0))
    got, grad = B.value_and_grad(lambda s: loss(targets, s, sample_weight=B.array(w)), s, jit=None)  # eagerly
    np.testing.assert_allclose(got, values * w, **TOL)
    np.testing.assert_allclose(grad, ref.kd_gradient(y, s, t, 3.0, 0.2, w), **TOL)


@JIT
def test_unlabelled_and_dense_labels(jit):
    s, t = _logits(8, (6, 4)), _logits(9, (6, 4))
    y = np.array([0, keras_kd.NO_LABEL, 2, 3, keras_kd.NO_LABEL, 1])
    labelled = (y >= 0).astype(float)
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.4)
    hard = ref.sparse_ce(np.maximum(y, 0), s) * labelled
    soft = 4.0 * ref.kl(ref.log_softmax(t / 2.0), ref.log_softmax(s / 2.0))
    _check(loss, B.targets(labels=y, logits=t), s, (0.4 * hard + 0.6 * soft).mean(),
           ref.kd_gradient(np.maximum(y, 0), s, t, 2.0, 0.4, 1 / 6, labelled=labelled), jit)
    mixed = np.random.default_rng(10).dirichlet(np.ones(4), size=6).astype("float32")
    _check(loss, B.targets(labels=mixed, logits=t), s,
           (0.4 * ref.categorical_ce(mixed, s) + 0.6 * soft).mean(),
           ref.kd_gradient(None, s, t, 2.0, 0.4, 1 / 6, dense_labels=mixed), jit)


@JIT
def test_topk_targets(jit):
    t = _logits(11, (5, 6))
    idx = np.argsort(-t, -1)[:, :3].astype("int32")
    vals = np.take_along_axis(t, idx, -1)
    lse = np.log(np.exp(t.astype(np.float64)).sum(-1)).astype("float32")
    fields = dict(labels=[0, 1, 2, 3, 4], topk_indices=idx, topk_values=vals, topk_logsumexp=lse)
    dense = keras_kd.targets.dense_teacher_logits(TeacherTargets(**fields), 6, "uniform").numpy()
    targets = B.targets(**fields)
    s = _logits(12, (5, 6))
    y = np.arange(5)
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.1)
    _check(loss, targets, s, ref.distillation_loss(y, s, dense, 2.0, 0.1), ref.kd_gradient(y, s, dense, 2.0, 0.1, 1 / 5),
           jit)


def test_without_temperature_squared():
    s, t = _logits(13, (4, 3)), _logits(14, (4, 3))
    y = np.array([0, 1, 2, 0])
    loss = keras_kd.DistillationLoss(temperature=4.0, alpha=0.5, scale_by_temperature_squared=False)
    want = ref.distillation_loss(y, s, t, 4.0, 0.5, t2=False)
    # Without T^2 the soft gradient is (softmax(s/T) - p_t) / T: the T^2 reference divided by T^2.
    grad = 0.25 * 0.5 * (ref.softmax(s) - np.eye(3)[y]) + 0.25 * 0.5 * (ref.softmax(s / 4.0) - ref.softmax(t / 4.0)) / 4.0
    _check(loss, B.targets(labels=y, logits=t), s, want, grad, jit=False)


@JIT
def test_variables_changed_between_calls_take_effect(jit):
    s, t = _logits(15, (4, 5)), _logits(16, (4, 5))
    y = np.array([0, 1, 2, 3])
    loss = keras_kd.DistillationLoss(temperature=1.0, alpha=0.0)
    targets = B.targets(labels=y, logits=t)

    if B.JAX:  # a value set outside a fit is a jit constant on JAX: the setter makes the jitted step retrace
        import jax  # noqa: PLC0415

        step = jax.value_and_grad(lambda s: loss(targets, s))
        run = jax.jit(step) if jit else step
    else:  # one trace: the values are variables read by the fused graph
        @tf.function(jit_compile=jit)
        def run(s):
            with tf.GradientTape() as tape:
                tape.watch(s)
                value = loss(targets, s)
            return value, tape.gradient(value, s)

    run(B.array(s))
    loss.temperature, loss.alpha = 3.0, 0.25  # as DistillationScheduler does mid-fit
    value, grad = run(B.array(s))
    if not B.JAX:
        assert run.experimental_get_tracing_count() == 1
    np.testing.assert_allclose(np.asarray(value), ref.distillation_loss(y, s, t, 3.0, 0.25), **TOL)
    np.testing.assert_allclose(np.asarray(grad), ref.kd_gradient(y, s, t, 3.0, 0.25, 1 / 4), **TOL)


@JIT
def test_nan_teacher_and_bad_labels_never_train_silently(jit):
    s = _logits(17, (3, 4))
    t = _logits(18, (3, 4))
    t[1, 2] = np.nan
    loss = keras_kd.DistillationLoss()
    bad_teacher = B.targets(labels=[0, 1, 2], logits=t)
    bad_labels = B.targets(labels=[0, 7, -2], logits=_logits(19, (3, 4)))
    for targets in (bad_teacher, bad_labels):
        if jit or B.JAX:  # XLA drops the assertions; nothing raises on JAX, eager or jitted: a NaN loss
            value, grad = _loss_and_grad(loss, targets, s, jit=True)
            assert np.isnan(value)
        else:
            with pytest.raises(tf.errors.InvalidArgumentError, match="keras_kd"):
                _loss_and_grad(loss, targets, s, jit=False)


def test_float16_logits():
    s, t = _logits(20, (6, 5)), _logits(21, (6, 5))
    y = np.array([0, 1, 2, 3, 4, 0])
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3)
    targets = B.targets(labels=y, logits=t)
    value, grad = B.value_and_grad(lambda s16: loss(targets, s16), s.astype("float16"), jit=None)
    assert value.dtype == np.float32 and grad.dtype == np.float16
    s_rounded = s.astype("float16").astype("float32")
    np.testing.assert_allclose(float(value), ref.distillation_loss(y, s_rounded, t, 2.0, 0.3), rtol=1e-5)
    np.testing.assert_allclose(grad.astype("float64"), ref.kd_gradient(y, s_rounded, t, 2.0, 0.3, 1 / 6),
                               rtol=2e-3, atol=1e-4)


def test_observers_see_the_fused_terms():
    s, t = _logits(22, (4, 3)), _logits(23, (4, 3))
    y = np.array([0, keras_kd.NO_LABEL, 2, 1])
    seen = {}
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3)
    loss.add_observer(lambda targets, logits, hard, soft: seen.update(hard=hard, soft=soft, logits=targets.logits))
    loss(B.targets(labels=y, logits=t), B.array(s))
    hard, soft = loss.components(B.targets(labels=y, logits=t), B.array(s))  # the pure general path
    np.testing.assert_allclose(np.asarray(seen["hard"]), np.asarray(hard), **TOL)  # tf or jax arrays
    np.testing.assert_allclose(np.asarray(seen["soft"]), np.asarray(soft), **TOL)
    np.testing.assert_allclose(np.asarray(seen["logits"]), t)
    assert np.asarray(seen["hard"])[1] == 0.0


@JIT
def test_fit_steps_equal_the_autodiff_path(K, jit, toy_data):
    """Three SGD steps with the fused loss move the weights as the autodiff path does (both flavours)."""
    x, y, make = toy_data
    teacher = mlp(K, hidden=32)
    init = mlp(K).get_weights()
    ds = keras_kd.with_teacher(make(batch=32, sample_weight=np.linspace(0.5, 2, 96).astype("float32")), teacher,
                               placement="pipeline")

    def train(fused):
        student = mlp(K)
        student.set_weights(init)
        loss = keras_kd.DistillationLoss(temperature=3.0, alpha=0.2)
        loss._fused = fused
        student.compile(K.optimizers.SGD(0.5), loss=loss, jit_compile=jit)
        student.fit(ds, epochs=1, verbose=0, shuffle=False)
        return student.get_weights()

    for a, b, c in zip(train(True), train(False), init):
        assert not np.allclose(a, c)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_general_path_is_kept_for_everything_else():
    # Other divergences, a custom hard loss, sequences and one-logit students take the autodiff path.
    assert not keras_kd.DistillationLoss(divergence="js")._fused
    assert not keras_kd.DistillationLoss(hard_loss=lambda y, s: tf.zeros(tf.shape(s)[:-1]))._fused
    loss = keras_kd.DistillationLoss()
    seq = TeacherTargets(labels=np.zeros((2, 3), int), logits=np.zeros((2, 3, 4), "float32"))
    binary = TeacherTargets(labels=np.zeros(2, int), logits=np.zeros((2, 1), "float32"))
    assert not loss._fusable(seq, tf.zeros((2, 3, 4)))
    assert not loss._fusable(binary, tf.zeros((2, 1)))
    assert loss._fusable(TeacherTargets(labels=[0, 1], logits=np.zeros((2, 4), "float32")), tf.zeros((2, 4)))
