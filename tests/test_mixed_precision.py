"""Mixed precision end to end: loss, cache (float16 storage), reweighting, alignment.

A student under ``mixed_float16`` / ``mixed_bfloat16`` trains from a float16
teacher-logit cache with hard-sample reweighting and feature alignment; every
loss is finite and within tolerance of the same run in float32. The alignment
arm's evaluated loss equals a NumPy reference that includes the feature term
(on JAX, Keras does not log the ``feature_loss`` metric: keras-team/keras#21639).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kd
from tests import reference as ref


def _mlp(prefix, width):
    inp = keras.Input((16,))
    h = keras.layers.Dense(width, activation="relu", name=f"{prefix}_hidden")(inp)
    # Logits in float32, as Keras recommends for mixed precision outputs.
    return keras.Model(inp, keras.layers.Dense(5, name=f"{prefix}_logits", dtype="float32")(h))


def _run(policy, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 16)).astype("float32")
    y = rng.integers(0, 5, size=128)
    keras.utils.set_random_seed(0)
    teacher = _mlp("t", 32)  # float32 teacher
    keras.mixed_precision.set_global_policy(policy)
    raw = tf.data.Dataset.from_tensor_slices((x, y))
    histories = {}
    try:
        # Logit distillation from a float16 cache, with reweighting.
        keras.utils.set_random_seed(1)
        student = _mlp("s", 16)
        cached = raw.apply(keras_kd.cache_teacher_logits(teacher, str(tmp_path / f"c-{policy}"), dtype="float16",
                                                         verbose=0))
        rew = keras_kd.HardSampleReweighting(signal="kl", warmup_epochs=1, num_examples=128)
        student.compile(keras.optimizers.SGD(0.05), loss=keras_kd.DistillationLoss(temperature=2.0, alpha=0.3))
        histories["cache"] = student.fit(rew.attach(cached.batch(32)), epochs=3, verbose=0, callbacks=[rew]).history
        # Feature alignment from a float16 feature cache, with reweighting.
        keras.utils.set_random_seed(1)
        student = _mlp("s", 16)
        aligned = keras_kd.align(student, teacher, pairs=[("s_hidden", "t_hidden")], feature_loss="mse", weight=0.1)
        features = raw.apply(aligned.cache_features(str(tmp_path / f"f-{policy}"), dtype="float16"))
        rew2 = keras_kd.HardSampleReweighting(signal="kl", warmup_epochs=1, num_examples=128)
        aligned.model.compile(keras.optimizers.SGD(0.05),
                              loss=aligned.loss(keras_kd.DistillationLoss(temperature=2.0, alpha=0.3)))
        histories["alignment"] = aligned.model.fit(rew2.attach(features.batch(32)), epochs=3, verbose=0,
                                                   callbacks=[rew2]).history
        histories["evaluated"] = _evaluated_and_reference(aligned, features)
        hidden_dtype = student.get_layer("s_hidden").compute_dtype
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return histories, rew.table.weights.numpy(), hidden_dtype


def _evaluated_and_reference(aligned, features):
    """``(evaluated loss, NumPy KD + feature term, NumPy feature term)`` of the trained alignment arm."""
    (x, teacher_features), targets = next(iter(features.batch(128)))
    t = np.asarray(targets.logits)  # the cached (float16) teacher logits
    s = aligned.student.predict(x, verbose=0)
    projected = aligned.hint_model.predict([x, teacher_features], verbose=0)  # the projected student features
    feature = 0.1 * ref.feature_mse(np.asarray(teacher_features, np.float64), np.asarray(projected, np.float64)).mean()
    kd = ref.distillation_loss(np.asarray(targets.labels), s, t, T=2.0, alpha=0.3)
    result = aligned.model.evaluate(features.batch(32), verbose=0, return_dict=True)
    if keras.backend.backend() != "jax":  # logged on TensorFlow (not on JAX: keras-team/keras#21639)
        np.testing.assert_allclose(result["feature_loss"], feature, rtol=2e-2)
    return result["loss"], kd + feature, feature


@pytest.mark.parametrize("policy, tolerance", [("mixed_float16", 2e-2), ("mixed_bfloat16", 6e-2)])
def test_mixed_precision_matches_float32(policy, tolerance, tmp_path):
    ref_history, ref_weights, _ = _run("float32", tmp_path)
    history, weights, hidden_dtype = _run(policy, tmp_path)
    assert hidden_dtype == policy.split("_")[1]
    logged = [("cache", "loss"), ("alignment", "loss")]
    if keras.backend.backend() != "jax":  # not logged on JAX (keras-team/keras#21639): checked below instead
        logged.append(("alignment", "feature_loss"))
    for arm, key in logged:
        values = history[arm][key]
        assert np.all(np.isfinite(values)), (arm, key)
        # float16 keeps ~3 decimal digits, bfloat16 ~2: relative tolerances of 2e-2 / 6e-2.
        np.testing.assert_allclose(values, ref_history[arm][key], rtol=tolerance, atol=tolerance * 0.1,
                                   err_msg=f"{arm} {key}")
    # The loss includes the feature term (any backend): evaluated = NumPy KD + 0.1 * feature MSE.
    for evaluated, want, feature in (ref_history["evaluated"], history["evaluated"]):
        assert np.isfinite(evaluated) and feature > 0.01 * want
        np.testing.assert_allclose(evaluated, want, rtol=tolerance)
    np.testing.assert_allclose(history["evaluated"][2], ref_history["evaluated"][2], rtol=tolerance)
    assert np.all(np.isfinite(weights))
    assert weights.mean() == pytest.approx(1.0, abs=0.05)
    np.testing.assert_allclose(weights, ref_weights, rtol=5 * tolerance, atol=5 * tolerance)
