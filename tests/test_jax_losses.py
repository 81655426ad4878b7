"""DistillationLoss, its divergences and metrics on JAX arrays (Keras 3 on JAX), against tests/reference.py.

The loss picks its math by the tensors' type (`keras_kd._ops`): JAX arrays get ``jax.numpy``. Each case
runs eagerly and under ``jax.jit`` (what Keras's JAX trainer compiles the step with).
"""

import math

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd._jax_targets import JaxTeacherTargets
from keras_kd.targets import TeacherTargets
from tests import reference as ref

pytestmark = pytest.mark.backend("jax")

N, C = 6, 5
RNG = np.random.default_rng(0)
S = RNG.normal(size=(N, C)).astype("float32") * 2.0
T_LOGITS = RNG.normal(size=(N, C)).astype("float32") * 2.0
Y = np.array([0, 1, 2, 3, 4, 1])


def run(loss, targets, student, jit, sample_weight=None):
    """The loss eagerly, or jitted with every input an argument (runtime values, as in Keras's step:
    XLA cannot constant-fold them, so the NaN guards are tested as they run in training)."""
    fn = lambda t, s, w: loss(t, s, sample_weight=w)  # noqa: E731
    return np.asarray(jax.jit(fn)(targets, student, sample_weight) if jit else fn(targets, student, sample_weight))


def targets(labels=Y, logits=T_LOGITS, **fields):
    return JaxTeacherTargets(labels=jnp.asarray(labels), logits=None if logits is None else jnp.asarray(logits),
                             **fields)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("name", ["kl", "reverse_kl", "js", "soft_cross_entropy", "mse", "huber"])
def test_every_divergence_matches_reference(name, jit):
    loss = keras_kd.DistillationLoss(temperature=3.0, alpha=0.3, divergence=name)
    got = run(loss, targets(), jnp.asarray(S), jit)
    np.testing.assert_allclose(got, ref.distillation_loss(Y, S, T_LOGITS, 3.0, 0.3, name), rtol=2e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_dkd_matches_reference(jit):
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.2, divergence=keras_kd.DecoupledKD(1.5, 4.0))
    want = (0.2 * ref.sparse_ce(Y, S) + 0.8 * ref.decoupled_kd(Y, S, T_LOGITS, 2.0, 1.5, 4.0)).mean()
    np.testing.assert_allclose(run(loss, targets(), jnp.asarray(S), jit), want, rtol=2e-5)


def test_same_values_as_the_tensorflow_path():
    for name in ["kl", "js", "dkd"]:
        loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.4, divergence=name)
        tf_value = float(loss(TeacherTargets(labels=tf.constant(Y), logits=tf.constant(T_LOGITS)), tf.constant(S)))
        np.testing.assert_allclose(run(loss, targets(), jnp.asarray(S), True), tf_value, rtol=1e-5)


def test_gradient_is_the_closed_form():
    loss = keras_kd.DistillationLoss(temperature=4.0, alpha=0.1)
    grad = jax.jit(jax.grad(lambda s: loss(targets(), s)))(jnp.asarray(S))
    np.testing.assert_allclose(grad, ref.kd_gradient(Y, S, T_LOGITS, 4.0, 0.1, 1.0 / N), rtol=1e-4, atol=1e-7)


def _topk(k):
    order = np.argsort(-T_LOGITS, axis=-1)[:, :k]
    values = np.take_along_axis(T_LOGITS, order, -1)
    lse = np.log(np.exp(T_LOGITS.astype(np.float64)).sum(-1)).astype("float32")
    return order.astype("int32"), values, lse


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("fill", ["uniform", "renormalize"])
def test_topk_targets(fill, jit):
    k = 2
    idx, values, lse = _topk(k)
    # reference dense teacher: top-k logits in place; the rest share the missing mass (uniform) or get none
    dense = np.full((N, C), -np.inf)
    np.put_along_axis(dense, idx, values.astype(np.float64), -1)
    if fill == "uniform":
        missing = np.exp(lse.astype(np.float64)) - np.exp(values.astype(np.float64)).sum(-1)
        dense = np.where(np.isinf(dense), np.log(missing / (C - k))[:, None], dense)
    with np.errstate(invalid="ignore"):
        want = ref.distillation_loss(Y, S, dense, 2.0, 0.3)
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3, topk_fill=fill)
    t = JaxTeacherTargets(labels=jnp.asarray(Y), topk_indices=jnp.asarray(idx), topk_values=jnp.asarray(values),
                          topk_logsumexp=jnp.asarray(lse) if fill == "uniform" else None)
    np.testing.assert_allclose(run(loss, t, jnp.asarray(S), jit), want, rtol=2e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_sample_weights_and_reductions(jit):
    w = np.array([1.0, 0.0, 2.0, 0.5, 1.0, 3.0], "float32")
    values = 0.3 * ref.sparse_ce(Y, S) + 0.7 * 4.0 * ref.divergence("kl", T_LOGITS / 2.0, S / 2.0)
    cases = {
        "sum_over_batch_size": (values * w).sum() / N,
        "sum": (values * w).sum(),
        "mean_with_sample_weight": (values * w).sum() / w.sum(),
        "none": values * w,
    }
    for reduction, want in cases.items():
        loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3, reduction=reduction)
        np.testing.assert_allclose(run(loss, targets(), jnp.asarray(S), jit, jnp.asarray(w)), want, rtol=2e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_mask_of_a_sequence_model(jit):
    # A Masking layer's mask reaches the loss (Keras keeps JAX arrays' masks in a table): masked steps
    # are left out of the mean.
    steps = 4
    x = RNG.normal(size=(3, steps, 2)).astype("float32")
    x[0, 2:] = 0.0
    x[2, 3] = 0.0
    mask = np.any(x != 0.0, -1)
    t = RNG.normal(size=(3, steps, C)).astype("float32")
    y = RNG.integers(0, C, (3, steps))
    model = keras.Sequential([keras.Input((steps, 2)), keras.layers.Masking(0.0), keras.layers.Dense(C)])
    model.compile(loss=keras_kd.DistillationLoss(temperature=2.0, alpha=0.5), jit_compile=jit)
    ds = tf.data.Dataset.from_tensor_slices((x, TeacherTargets(labels=y, logits=t))).batch(3)
    s = model.predict(x, verbose=0)
    want = ref.distillation_loss(y, s, t, 2.0, 0.5, mask=mask.astype(np.float64))
    np.testing.assert_allclose(model.evaluate(ds, verbose=0), want, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mixed_precision_student_logits(dtype):
    s = jnp.asarray(S, dtype)
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3)
    got = jax.jit(lambda s: loss(targets(), s))(s)
    assert got.dtype == jnp.float32
    rounded = np.asarray(s.astype(jnp.float32))
    np.testing.assert_allclose(got, ref.distillation_loss(Y, rounded, T_LOGITS, 2.0, 0.3), rtol=1e-5)
    grad = jax.grad(lambda s: loss(targets(), s))(s)
    assert grad.dtype == jnp.dtype(dtype) and bool(jnp.all(jnp.isfinite(grad.astype(jnp.float32))))


@pytest.mark.parametrize("jit", [False, True])
def test_binary_one_logit_student(jit):
    s, t, y = S[:, :1], T_LOGITS[:, :1], np.array([0, 1, 1, 0, 1, 0])
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.4)
    got = run(loss, targets(y, t), jnp.asarray(s), jit)
    np.testing.assert_allclose(got, ref.binary_distillation_loss(y, s, t, 2.0, 0.4), rtol=2e-5)
    mse = keras_kd.DistillationLoss(temperature=2.0, alpha=0.0, divergence="mse")  # the single logits, as they are
    np.testing.assert_allclose(run(mse, targets(y, t), jnp.asarray(s), jit), ((s - t) ** 2).mean(), rtol=2e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_no_label_examples_have_no_hard_term(jit):
    y = np.array([0, -1, 2, -1, 4, 1])
    labelled = y >= 0
    hard = ref.sparse_ce(np.maximum(y, 0), S) * labelled
    soft = 4.0 * ref.divergence("kl", T_LOGITS / 2.0, S / 2.0)
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.5)
    np.testing.assert_allclose(run(loss, targets(y), jnp.asarray(S), jit), (0.5 * hard + 0.5 * soft).mean(),
                               rtol=2e-5)
    # unlabelled targets: the distillation term alone; a label-aware divergence refuses them
    unlabelled = targets(np.zeros(N, "int32"), has_labels=False)
    np.testing.assert_allclose(run(loss, unlabelled, jnp.asarray(S), jit), (0.5 * soft).mean(), rtol=2e-5)
    with pytest.raises(ValueError, match="needs the labels"):
        run(keras_kd.DistillationLoss(divergence="dkd"), unlabelled, jnp.asarray(S), jit)


@pytest.mark.parametrize("jit", [False, True])
def test_bad_inputs_give_nan_as_under_xla(jit):
    # Nothing raises inside jax.jit: bad values make the loss NaN, as TensorFlow does under XLA.
    loss = keras_kd.DistillationLoss()
    bad_teacher = T_LOGITS.copy()
    bad_teacher[2, 1] = np.nan
    inf_teacher = T_LOGITS.copy()
    inf_teacher[0, 0] = np.inf
    cases = [
        targets(logits=bad_teacher),
        targets(logits=inf_teacher),
        targets(np.array([0, 1, 7, 3, 4, 1])),  # id >= classes
        targets(np.array([0, 1, -2, 3, 4, 1])),  # negative, not NO_LABEL
        targets(np.array([0.0, 1.0, 2.5, 3.0, 4.0, 1.0], "float32")),  # fractional float id
        targets(np.eye(C, dtype="float32")[Y] * 0.5),  # dense rows that are not distributions
    ]
    for case in cases:
        assert np.isnan(run(loss, case, jnp.asarray(S), jit)), case
    # one bad row poisons the batch loss but not the other rows' per-example values
    per_example = keras_kd.DistillationLoss(reduction="none")
    values = run(per_example, targets(logits=bad_teacher), jnp.asarray(S), jit)
    assert np.isnan(values[2]) and np.all(np.isfinite(np.delete(values, 2)))
    dkd = keras_kd.DistillationLoss(divergence="dkd")
    assert np.isnan(run(dkd, targets(np.array([0, -1, 2, 3, 4, 1])), jnp.asarray(S), jit))
    binary = targets(np.array([0, 1, 2, 0, 1, 0]), T_LOGITS[:, :1])
    assert np.isnan(run(loss, binary, jnp.asarray(S[:, :1]), jit))


def test_teacher_agreement_and_loss_components():
    s = jnp.asarray(S)
    agree = np.argmax(S, -1) == np.argmax(T_LOGITS, -1)
    np.testing.assert_array_equal(jax.jit(keras_kd.teacher_agreement)(targets(), s), agree)
    idx, values, lse = _topk(2)
    topk = JaxTeacherTargets(labels=jnp.asarray(Y), topk_indices=jnp.asarray(idx), topk_values=jnp.asarray(values),
                             topk_logsumexp=jnp.asarray(lse))
    np.testing.assert_array_equal(keras_kd.teacher_agreement(topk, s), agree)
    np.testing.assert_array_equal(keras_kd.teacher_agreement(jnp.asarray(Y), s), np.argmax(S, -1) == Y)
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3)
    kd_hard, kd_soft = keras_kd.loss_components(loss)
    np.testing.assert_allclose(jax.jit(kd_hard)(targets(), s), ref.sparse_ce(Y, S), rtol=2e-5)
    np.testing.assert_allclose(kd_soft(targets(), s), 4.0 * ref.divergence("kl", T_LOGITS / 2, S / 2), rtol=2e-5)
    np.testing.assert_array_equal(kd_soft(jnp.asarray(Y), s), np.zeros(N))


def test_setters_retrace_jitted_steps():
    # On JAX the loss's hyperparameters are trace-time constants: a setter retraces steps that hold another value.
    dkd = keras_kd.DecoupledKD(1.0, 8.0)
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3, divergence=dkd)
    step = jax.jit(lambda s: loss(targets(), s))
    s = jnp.asarray(S)

    def want():
        soft = ref.decoupled_kd(Y, S, T_LOGITS, loss.temperature, dkd.target_weight, dkd.non_target_weight)
        return (loss.alpha * ref.sparse_ce(Y, S) + (1 - loss.alpha) * soft).mean()

    np.testing.assert_allclose(step(s), want(), rtol=2e-5)
    loss.alpha, loss.temperature = 0.7, 3.0
    np.testing.assert_allclose(step(s), want(), rtol=2e-5)
    dkd.non_target_weight = 2.0
    np.testing.assert_allclose(step(s), want(), rtol=2e-5)
    with pytest.raises(ValueError, match="alpha"):
        loss.alpha = 1.5


def test_variables_are_read_at_run_time():
    # A variable the user passes (or takes from the loss) may be assigned directly: JAX steps read it every step.
    alpha = keras.Variable(0.25, trainable=False, dtype="float32")
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=alpha)
    step = jax.jit(lambda s: loss(targets(), s))
    for value in (0.25, 0.75):
        alpha.assign(value)
        np.testing.assert_allclose(step(jnp.asarray(S)), ref.distillation_loss(Y, S, T_LOGITS, 2.0, value), rtol=2e-5)
    other = keras_kd.DistillationLoss(temperature=2.0, alpha=0.5)
    step = jax.jit(lambda s: other(targets(), s))
    step(jnp.asarray(S))
    other.temperature_variable.assign(3.0)
    np.testing.assert_allclose(step(jnp.asarray(S)), ref.distillation_loss(Y, S, T_LOGITS, 3.0, 0.5), rtol=2e-5)


class _SetEachEpoch(keras.callbacks.Callback):
    """A user's own callback that changes the loss between epochs."""

    def __init__(self, loss, values):
        super().__init__()
        self.loss, self.values = loss, values

    def on_epoch_begin(self, epoch, logs=None):
        for name, schedule in self.values.items():
            target = self.loss.divergence if name.startswith("dkd_") else self.loss
            setattr(target, name.removeprefix("dkd_"), schedule[epoch])


@pytest.mark.parametrize("jit", [True, False])
def test_fit_alpha_and_dkd_weights_changed_between_epochs(jit):
    x = RNG.normal(size=(16, 3)).astype("float32")
    y, t = RNG.integers(0, C, 16), RNG.normal(size=(16, C)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, TeacherTargets(labels=y, logits=t))).batch(16)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(C)])
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.5, divergence=keras_kd.DecoupledKD(1.0, 8.0))
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=loss, jit_compile=jit)  # lr 0: the model stays put
    alphas, weights = [0.5, 0.0, 1.0, 0.2], [8.0, 8.0, 8.0, 1.0]
    history = model.fit(ds, epochs=4, verbose=0, callbacks=[_SetEachEpoch(loss, {"alpha": alphas,
                                                                                   "dkd_non_target_weight": weights})])
    s = model.predict(x, verbose=0)
    want = [(a * ref.sparse_ce(y, s) + (1 - a) * ref.decoupled_kd(y, s, t, 2.0, 1.0, w)).mean()
            for a, w in zip(alphas, weights)]
    np.testing.assert_allclose(history.history["loss"], want, rtol=1e-5)
    assert len(set(np.round(history.history["loss"], 5))) == 4
    assert math.isclose(loss.alpha, 0.2, rel_tol=1e-6) and loss.divergence.non_target_weight == 1.0


@pytest.mark.parametrize("jit", [True, False])
def test_evaluate_with_sample_weights_and_metrics(jit):
    # End to end through Keras's JAX data adapter: (x, TeacherTargets, w) from tf.data; the user's
    # "accuracy" measures the hard labels, keras_kd's metrics read the teacher.
    x = RNG.normal(size=(12, 3)).astype("float32")
    y, t = RNG.integers(0, C, 12), RNG.normal(size=(12, C)).astype("float32")
    w = RNG.uniform(0.5, 2.0, 12).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(C)])
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3)
    model.compile(loss=loss, metrics=["accuracy", keras_kd.teacher_agreement, *keras_kd.loss_components(loss)],
                  jit_compile=jit)
    ds = tf.data.Dataset.from_tensor_slices((x, TeacherTargets(labels=y, logits=t), w)).batch(12)
    got = model.evaluate(ds, verbose=0, return_dict=True)
    s = model.predict(x, verbose=0)
    mean = np.mean  # `metrics=` are unweighted in Keras (`weighted_metrics=` would weigh them)
    np.testing.assert_allclose(got["loss"], ref.distillation_loss(y, s, t, 2.0, 0.3, weights=w), rtol=1e-5)
    np.testing.assert_allclose(got["accuracy"], mean(np.argmax(s, -1) == y), rtol=1e-6)
    np.testing.assert_allclose(got["teacher_agreement"], mean(np.argmax(s, -1) == np.argmax(t, -1)), rtol=1e-6)
    np.testing.assert_allclose(got["kd_hard"], mean(ref.sparse_ce(y, s)), rtol=1e-5)
    np.testing.assert_allclose(got["kd_soft"], mean(4.0 * ref.divergence("kl", t / 2.0, s / 2.0)), rtol=1e-5)


def test_observer_sees_jax_values_once_per_traced_step():
    # Hooks run inside the jitted step with JAX arrays; a Python side effect runs once per trace.
    seen = []
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3)
    loss.add_observer(lambda tt, logits, hard, soft: seen.append((tt.logits, hard, soft)))
    loss.add_weighting(lambda tt: jnp.where(tt.example_id == 0, 0.0, 1.0))
    t = targets(example_id=jnp.arange(N))
    step = jax.jit(lambda tt, s: loss(tt, s))
    got = step(t, jnp.asarray(S))
    step(t, jnp.asarray(S))
    assert len(seen) == 1  # traced once, run twice
    hard, soft = ref.sparse_ce(Y, S), 4.0 * ref.divergence("kl", T_LOGITS / 2.0, S / 2.0)
    w = np.ones(N)
    w[0] = 0.0
    np.testing.assert_allclose(got, ((0.3 * hard + 0.7 * soft) * w).mean(), rtol=2e-5)
    eager = []
    loss.remove_observer(loss.observers[0])
    loss.add_observer(lambda tt, logits, h, s: eager.append((np.asarray(tt.logits), np.asarray(h), np.asarray(s))))
    loss(t, jnp.asarray(S))
    np.testing.assert_allclose(eager[0][0], T_LOGITS)
    np.testing.assert_allclose(eager[0][1], hard, rtol=2e-5)
    np.testing.assert_allclose(eager[0][2], soft, rtol=2e-5)


@pytest.mark.parametrize("jit", [True, False])
def test_bad_data_in_evaluate_gives_nan(jit):
    # Through Keras's JAX step with runtime values: NaN, never a silent finite loss.
    x = RNG.normal(size=(8, 3)).astype("float32")
    y, t = RNG.integers(0, C, 8), RNG.normal(size=(8, C)).astype("float32")
    unlabelled, out_of_range, nan_teacher = y.copy(), y.copy(), t.copy()
    unlabelled[2], out_of_range[3], nan_teacher[1, 1] = keras_kd.NO_LABEL, C, np.nan
    cases = [("dkd", unlabelled, t), ("kl", out_of_range, t), ("kl", y, nan_teacher), ("dkd", y, nan_teacher)]
    for divergence, labels, logits in cases:
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(C)])
        model.compile(loss=keras_kd.DistillationLoss(divergence=divergence), jit_compile=jit)
        ds = tf.data.Dataset.from_tensor_slices((x, TeacherTargets(labels=labels, logits=logits))).batch(8)
        assert np.isnan(model.evaluate(ds, verbose=0)), (divergence, labels, logits)


def test_numpy_logits_follow_tf_targets():
    # In a JAX process, NumPy logits with a TensorFlow TeacherTargets take the TensorFlow math.
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3)
    value = loss(TeacherTargets(labels=tf.constant(Y), logits=tf.constant(T_LOGITS)), S)
    assert isinstance(value, tf.Tensor)
    np.testing.assert_allclose(float(value), ref.distillation_loss(Y, S, T_LOGITS, 2.0, 0.3), rtol=2e-5)
