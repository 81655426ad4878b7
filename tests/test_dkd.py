"""Decoupled KD (Zhao et al., CVPR 2022) against the paper's formula (tests/reference.py) and hand arithmetic."""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from keras_kd import TeacherTargets
from tests import backend_inputs as B  # the JAX job feeds JAX arrays: the loss's JAX math
from tests import reference as ref
from tests.conftest import mlp

JIT = pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])


def _logits(seed, shape, scale=3.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype("float32")


def _soft(loss, y, t, s):
    """The per-example distillation term of a DistillationLoss (alpha=0 makes it the whole value)."""
    return np.asarray(loss.components(B.targets(labels=y, logits=t), s)[1])  # a tf or a jax array


def test_hand_computed_values():
    # T=1, three classes, target 0, teacher uniform: p_t = [1/3, 1/3, 1/3], b_t = [1/3, 2/3].
    # (a) student [ln 2, 0, 0]: p_s = [1/2, 1/4, 1/4], b_s = [1/2, 1/2];
    #     TCKD = 1/3 ln(2/3) + 2/3 ln(4/3); the non-target parts are both [1/2, 1/2]: NCKD = 0.
    # (b) student [0, ln 3, 0]: p_s = [1/5, 3/5, 1/5], b_s = [1/5, 4/5];
    #     TCKD = 1/3 ln(5/3) + 2/3 ln(5/6); p_hat_s = [3/4, 1/4]: NCKD = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3).
    t = np.zeros((2, 3), "float32")
    s = np.array([[math.log(2.0), 0, 0], [0, math.log(3.0), 0]], "float32")
    loss = keras_kd.DistillationLoss(temperature=1.0, alpha=0.0, divergence=keras_kd.DecoupledKD(2.0, 8.0))
    tckd_a = math.log(2 / 3) / 3 + 2 * math.log(4 / 3) / 3
    tckd_b = math.log(5 / 3) / 3 + 2 * math.log(5 / 6) / 3
    nckd_b = 0.5 * math.log(4 / 3)
    np.testing.assert_allclose(_soft(loss, [0, 0], t, s), [2.0 * tckd_a, 2.0 * tckd_b + 8.0 * nckd_b], rtol=1e-6)


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("weights", [(1.0, 8.0), (0.5, 2.0), (1.0, 0.0), (0.0, 1.0)])
@pytest.mark.parametrize("classes", [2, 5, 10])
def test_matches_paper_formula(T, weights, classes):
    s, t = _logits(1, (7, classes)), _logits(2, (7, classes))
    y = np.random.default_rng(3).integers(0, classes, size=7)
    loss = keras_kd.DistillationLoss(temperature=T, alpha=0.0, divergence=keras_kd.DecoupledKD(*weights))
    # float32 log-space KL: absolute rounding ~1e-7 per unit, times T^2 (as for the other divergences' tests)
    np.testing.assert_allclose(_soft(loss, y, t, s), ref.decoupled_kd(y, s, t, T, *weights), rtol=2e-5, atol=1e-5)


def test_total_is_alpha_hard_plus_one_minus_alpha_soft():
    s, t = _logits(4, (6, 5)), _logits(5, (6, 5))
    y = np.array([0, 1, 2, 3, 4, 0])
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3, divergence="dkd")
    want = (0.3 * ref.sparse_ce(y, s) + 0.7 * ref.decoupled_kd(y, s, t, 2.0, 1.0, 8.0)).mean()
    np.testing.assert_allclose(float(loss(B.targets(labels=y, logits=t), s)), want, rtol=1e-5)


def test_name_is_the_default_instance():
    assert keras_kd.losses.get_divergence("dkd") == keras_kd.DecoupledKD()
    assert keras_kd.DecoupledKD() == keras_kd.DecoupledKD(target_weight=1.0, non_target_weight=8.0)
    assert keras_kd.DecoupledKD(1.0, 4.0) != keras_kd.DecoupledKD()
    assert "dkd" in keras_kd.DIVERGENCES
    s, t = _logits(6, (4, 5)), _logits(7, (4, 5))
    y = np.array([1, 2, 3, 4])
    by_name = keras_kd.DistillationLoss(divergence="dkd", alpha=0.0)
    by_instance = keras_kd.DistillationLoss(divergence=keras_kd.DecoupledKD(), alpha=0.0)
    np.testing.assert_allclose(_soft(by_name, y, t, s), _soft(by_instance, y, t, s), rtol=1e-7)


def test_label_forms_give_the_same_target():
    s, t = _logits(8, (4, 5)), _logits(9, (4, 5))
    y = np.array([1, 0, 3, 4])
    want = ref.decoupled_kd(y, s, t, 2.0)
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.0, divergence="dkd")
    for labels in (y, y[:, None], y.astype("uint8"), y.astype("float32"), np.eye(5, dtype="float32")[y]):
        np.testing.assert_allclose(_soft(loss, labels, t, s), want, rtol=2e-5)
    # Mixed (mixup) labels: the target is the larger share.
    mixed = 0.7 * np.eye(5, dtype="float32")[y] + 0.3 * np.eye(5, dtype="float32")[[2, 2, 2, 2]]
    np.testing.assert_allclose(_soft(loss, mixed, t, s), want, rtol=2e-5)


def test_config_round_trip_and_json():
    dkd = keras_kd.DecoupledKD(target_weight=0.5, non_target_weight=4.0)
    assert dkd.get_config() == {"target_weight": 0.5, "non_target_weight": 4.0}
    assert keras_kd.DecoupledKD.from_config(dkd.get_config()) == dkd
    loss = keras_kd.DistillationLoss(temperature=3.0, alpha=0.2, divergence=dkd)
    config = json.loads(json.dumps(loss.get_config()))
    clone = keras_kd.DistillationLoss.from_config(config)
    assert clone.divergence == dkd and clone.get_config() == loss.get_config()
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert restored.divergence == dkd
    # The default instance serialises as its name.
    assert keras_kd.DistillationLoss(divergence=keras_kd.DecoupledKD()).get_config()["divergence"] == "dkd"


def test_compiled_loss_survives_model_save_and_load(K, toy_data, tmp_path):
    x, y, make = toy_data
    teacher, student = mlp(K), mlp(K)
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.2, divergence=keras_kd.DecoupledKD(0.5, 4.0))
    student.compile("adam", loss=loss)
    student.fit(keras_kd.with_teacher(make(), teacher, placement="pipeline"), epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    student.save(path)
    restored = K.models.load_model(path).loss
    if not isinstance(restored, keras_kd.DistillationLoss):  # tf_keras keeps it in compiled_loss
        restored = K.models.load_model(path).compiled_loss._user_losses
    assert isinstance(restored, keras_kd.DistillationLoss)
    assert restored.divergence == keras_kd.DecoupledKD(0.5, 4.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_weight": -1.0}, "Expected `target_weight` >= 0"),
        ({"non_target_weight": float("nan")}, "non_target_weight"),
        ({"target_weight": True}, "target_weight"),
        ({"non_target_weight": "8"}, "non_target_weight"),
    ],
)
def test_bad_weights(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_kd.DecoupledKD(**kwargs)


def test_targets_without_labels_name_dkd_and_the_fix():
    t = _logits(10, (3, 4))
    loss = keras_kd.DistillationLoss(divergence="dkd")
    with pytest.raises(ValueError, match=r"(?s)'dkd'.*needs the labels.*divergence='kl'"):
        loss(B.targets(labels=[0, 0, 0], logits=t, has_labels=False), np.zeros((3, 4), "float32"))


@pytest.mark.backend("tensorflow")  # TF runtime assertion; JAX gives NaN, as under XLA
def test_unlabelled_examples_raise_without_xla():
    t = _logits(11, (3, 4))
    loss = keras_kd.DistillationLoss(divergence="dkd")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)'dkd'.*NO_LABEL.*divergence='kl'"):
        loss(TeacherTargets(labels=[0, keras_kd.NO_LABEL, 2], logits=t), np.zeros((3, 4), "float32"))


@JIT
def test_unlabelled_examples_in_fit(K, jit, toy_data):
    x, y, _ = toy_data
    y = y.copy()
    y[5] = keras_kd.NO_LABEL
    teacher, student = mlp(K), mlp(K)
    student.compile("sgd", loss=keras_kd.DistillationLoss(divergence="dkd"), jit_compile=jit)
    ds = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), teacher, placement="pipeline")
    if jit or (K is keras and keras.backend.backend() == "jax"):  # XLA/JAX: no assertions, the loss is NaN
        history = student.fit(ds, epochs=1, verbose=0)
        assert np.isnan(history.history["loss"][0])
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="dkd"):
            student.fit(ds, epochs=1, verbose=0)


def test_topk_renormalize_is_refused_uniform_is_documented():
    with pytest.raises(ValueError, match=r"divergence='dkd'.*topk_fill='uniform'"):
        keras_kd.DistillationLoss(divergence="dkd", topk_fill="renormalize")
    # topk_fill='uniform': DKD of the dense logits that the top-k targets fill in.
    t = _logits(12, (4, 6))
    idx = np.argsort(-t, -1)[:, :3].astype("int32")
    vals = np.take_along_axis(t, idx, -1)
    lse = np.log(np.exp(t.astype(np.float64)).sum(-1)).astype("float32")
    fields = dict(labels=[0, 1, 2, 3], topk_indices=idx, topk_values=vals, topk_logsumexp=lse)
    dense = keras_kd.targets.dense_teacher_logits(TeacherTargets(**fields), 6, "uniform").numpy()
    targets = B.targets(**fields)
    s = _logits(13, (4, 6))
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.0, divergence="dkd")
    np.testing.assert_allclose(np.asarray(loss.components(targets, s)[1]), ref.decoupled_kd([0, 1, 2, 3], s, dense, 2.0),
                               rtol=2e-5)


def test_binary_one_logit_is_target_weight_times_bernoulli_kl():
    # Two-class logits [0, z / T]: one non-target class, so NCKD = 0 and TCKD is the Bernoulli KL.
    s = np.array([[0.5], [-1.0], [2.0]], "float32")
    t = np.array([[1.5], [0.3], [-2.0]], "float32")
    y = np.array([1, 0, 1])
    loss = keras_kd.DistillationLoss(temperature=2.0, alpha=0.0, divergence=keras_kd.DecoupledKD(3.0, 8.0))
    want = 3.0 * 4.0 * ref.bernoulli_kl(t[:, 0] / 2.0, s[:, 0] / 2.0)
    np.testing.assert_allclose(_soft(loss, y, t, s), want, rtol=1e-5)


def test_gradients_finite_at_extreme_logits():
    s = np.array([[60.0, -60.0, 0.0], [-80.0, 80.0, 1.0]], "float32")
    t = np.array([[50.0, -50.0, 0.0], [80.0, -80.0, 0.0]], "float32")
    loss = keras_kd.DistillationLoss(temperature=1.0, alpha=0.0, divergence="dkd")
    targets = B.targets(labels=[0, 1], logits=t)
    value, grad = B.value_and_grad(lambda s: loss(targets, s), s, jit=None)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(grad))


@JIT
def test_fit_evaluates_to_the_reference(K, jit, toy_data):
    x, y, make = toy_data
    teacher, student = mlp(K, hidden=32), mlp(K)
    student.compile(K.optimizers.Adam(0.01), loss=keras_kd.DistillationLoss(temperature=4.0, alpha=0.1, divergence="dkd"),
                    jit_compile=jit)
    ds = keras_kd.with_teacher(make(batch=96), teacher, placement="pipeline")
    got = student.evaluate(ds, verbose=0)
    s, t = student.predict(x, verbose=0), teacher.predict(x, verbose=0)
    want = (0.1 * ref.sparse_ce(y, s) + 0.9 * ref.decoupled_kd(y, s, t, 4.0)).mean()
    assert got == pytest.approx(want, rel=1e-5)
    history = student.fit(ds, epochs=5, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.parametrize("get", [lambda: keras_kd.DIVERGENCES["dkd"], lambda: keras_kd.losses.get_divergence("dkd"),
                                 lambda: keras_kd.DecoupledKD(non_target_weight=2.0)])
def test_two_argument_call_says_it_needs_class_ids(get):
    t = B.array([[2.0, 0.0, -1.0]], "float32")
    s = B.array([[0.5, 0.5, 0.0]], "float32")
    dkd = get()
    assert keras_kd.losses.is_label_aware(dkd)
    with pytest.raises(TypeError, match=r"(?s)DecoupledKD.*'dkd'.*class ids.*DistillationLoss"):
        dkd(t, s)
    # With the class ids it is the paper's formula (tests/reference.py).
    got = np.asarray(dkd(t, s, B.array([0], "int64" if not B.JAX else "int32")))
    w = dkd.get_config()
    want = ref.decoupled_kd([0], np.asarray(s), np.asarray(t), 1.0, w["target_weight"], w["non_target_weight"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
