"""keras_kd.alignment on Keras 3's JAX backend (run with KERAS_BACKEND=jax).

Feature losses inside jax.jit, the training model's loss in the user's own
compile/evaluate/fit, feature weights changed between epochs, the hint stage,
export, .keras saving, online teacher features (`attach`, the teacher runs
through tf.numpy_function) and tf_keras models in a JAX process (pure TF).
References: tests/reference.py (NumPy) and Keras's own layers.
"""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_kd import alignment
from keras_kd import losses as losses_lib
from tests import reference

pytestmark = pytest.mark.backend("jax")

import jax  # noqa: E402 - the JAX job installs jax[cpu] (keras-kd[jax])
import jax.numpy as jnp  # noqa: E402

X = np.random.default_rng(0).normal(size=(6, 8, 8, 1)).astype("float32")
Y = np.array([0, 1, 2, 0, 1, 2])
REFERENCES = {
    "mse": reference.feature_mse,
    "l1": reference.feature_l1,
    "cosine": reference.feature_cosine,
    "attention": reference.attention_transfer,
}


def net(K, feat_shape, name, classes=3, frozen=False):
    """x -> Dense -> Reshape(feat_shape) named "feat" -> Flatten -> Dense logits."""
    inp = K.Input((8, 8, 1))
    h = K.layers.Flatten()(inp)
    h = K.layers.Dense(int(np.prod(feat_shape)), name="pre")(h)
    f = K.layers.Reshape(feat_shape, name="feat")(h)
    out = K.layers.Dense(classes, name="logits")(K.layers.Flatten(name="flat")(f))
    model = K.Model(inp, out, name=name)
    if frozen:
        model.trainable = False
    return model


def features_of(model, x, name="feat"):
    return np.asarray(keras.Model(model.inputs, model.get_layer(name).output).predict(x, verbose=0))


def np_ce(labels, logits):
    return float(np.mean(reference.sparse_ce(labels, np.asarray(logits, np.float64))))


def plain_data(a, batch=len(X)):
    """((x, teacher features), y) computed here, independent of `attach`."""
    _, *features = a.feature_extractor.predict(X, verbose=0)
    return tf.data.Dataset.from_tensor_slices(((X, *features), Y)).batch(batch), features


# ---------------------------------------------------------------------------
# Feature losses: JAX arrays, eager and jitted, against NumPy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 4, 4, 5), (3, 6, 7)])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_feature_losses_equal_numpy_eager_and_jitted(name, shape):
    rng = np.random.default_rng(1)
    t, s = (rng.normal(size=shape).astype("float32") for _ in range(2))
    fn = alignment.FEATURE_LOSSES[name]
    want = REFERENCES[name](t, s)
    eager = fn(jnp.asarray(t), jnp.asarray(s))
    assert isinstance(eager, jax.Array) and eager.dtype == jnp.float32 and eager.shape == (3,)
    np.testing.assert_allclose(eager, want, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(jax.jit(fn)(t, s), want, rtol=1e-4, atol=1e-7)


def test_attention_p4_cosine_zero_rows_and_finite_gradients():
    rng = np.random.default_rng(2)
    t, s = rng.normal(size=(2, 3, 3, 4)).astype("float32"), rng.normal(size=(2, 3, 3, 6)).astype("float32")
    p4 = functools.partial(alignment.attention_transfer, p=4.0)
    np.testing.assert_allclose(jax.jit(p4)(t, s), reference.attention_transfer(t, s, p=4.0), rtol=1e-4)
    zero = np.zeros((2, 5), np.float32)
    # cosine: an all-zero feature counts as orthogonal (distance 1), as on TF.
    np.testing.assert_allclose(alignment.feature_cosine(jnp.asarray(zero), jnp.ones((2, 5))), [1.0, 1.0])
    for fn in alignment.FEATURE_LOSSES.values():
        grad = jax.grad(lambda v, fn=fn: jnp.sum(fn(jnp.zeros((2, 3, 3, 4)), v)))(jnp.zeros((2, 3, 3, 4)))
        assert np.all(np.isfinite(grad))
    with pytest.raises(ValueError, match="positions and channels"):
        alignment.attention_transfer(jnp.zeros((2, 3)), jnp.zeros((2, 3)))


def test_feature_loss_docstring_examples_run_on_jax():
    import doctest

    from keras_kd.alignment import feature_losses

    result = doctest.testmod(feature_losses, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 3 and result.failed == 0


# ---------------------------------------------------------------------------
# The training model in the user's compile / evaluate / fit
# ---------------------------------------------------------------------------


def test_loss_is_hard_loss_plus_weighted_feature_losses_with_projectors():
    # Pair 0: the logits, identity (equal shapes); pair 1: average-pool 2x2 then a 1x1 conv 8 -> 16.
    s = net(keras, (8, 8, 8), "s")
    t = net(keras, (4, 4, 16), "t", frozen=True)
    a = alignment.align(s, t, [("logits", "logits"), ("feat", "feat")], weight=[0.2, 0.7], feature_loss=["l1", "mse"])
    data, (t_logits, t_feat) = plain_data(a)
    a.model.compile("sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    result = a.model.evaluate(data, verbose=0, return_dict=True)
    s_logits, s_feat = s.predict(X, verbose=0), features_of(s, X, "feat")
    pooled = s_feat.reshape(6, 4, 2, 4, 2, 8).mean(axis=(2, 4))  # 2x2 average pooling
    kernel, bias = a.model.get_layer("kd_proj1_conv1x1").get_weights()
    projected = pooled @ kernel[0, 0] + bias
    np.testing.assert_allclose(t_logits, t.predict(X, verbose=0), rtol=1e-6)
    feature = 0.2 * reference.feature_l1(t_logits, s_logits).mean() + 0.7 * reference.feature_mse(t_feat, projected).mean()
    np.testing.assert_allclose(result["loss"], np_ce(Y, s_logits) + feature, rtol=1e-4)
    np.testing.assert_allclose(result["accuracy"], np.mean(np.argmax(s_logits, 1) == Y))
    # Keras cannot update a layer's metric inside JAX's stateless step: not logged rather than a wrong 0.
    assert "feature_loss" not in result


def test_attention_transfer_across_channel_counts():
    s, t = net(keras, (4, 4, 3), "s"), net(keras, (2, 2, 32), "t", frozen=True)
    a = alignment.align(s, t, [("feat", "feat")], feature_loss="attention", weight=500.0)
    assert "average-pool 2x2" in a.pairs[0].steps and "conv" not in a.pairs[0].steps
    data, (t_feat,) = plain_data(a)
    a.model.compile("sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    got = a.model.evaluate(data, verbose=0, return_dict=True)["loss"]
    pooled = features_of(s, X).reshape(6, 2, 2, 2, 2, 3).mean(axis=(2, 4))
    want = np_ce(Y, s.predict(X, verbose=0)) + 500.0 * reference.attention_transfer(t_feat, pooled).mean()
    np.testing.assert_allclose(got, want, rtol=1e-4)


class _SetWeightAtEpoch(keras.callbacks.Callback):
    def __init__(self, aligned, epoch, value):
        super().__init__()
        self.aligned, self.epoch, self.value = aligned, epoch, value

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            self.aligned.feature_weight = self.value


def test_feature_weight_changed_between_epochs_takes_effect_in_the_jitted_step():
    s, t = net(keras, (4, 4, 8), "s"), net(keras, (4, 4, 8), "t", frozen=True)
    a = alignment.align(s, t, [("feat", "feat")], weight=0.3)
    data, (t_feat,) = plain_data(a)
    # learning rate 0: the weights stay, so each epoch's loss is the same formula with that epoch's weight
    a.model.compile(keras.optimizers.SGD(0.0), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = a.model.fit(data, epochs=3, verbose=0, callbacks=[
        _SetWeightAtEpoch(a, 1, 0.0), _SetWeightAtEpoch(a, 2, 2.0)]).history["loss"]
    ce = np_ce(Y, s.predict(X, verbose=0))
    mse = reference.feature_mse(t_feat, features_of(s, X)).mean()
    np.testing.assert_allclose(history, [ce + 0.3 * mse, ce, ce + 2.0 * mse], rtol=1e-4)
    assert a.feature_weight == [2.0]


def test_hint_stage_trains_the_lower_layers_only():
    s, t = net(keras, (4, 4, 8), "s"), net(keras, (4, 4, 16), "t", frozen=True)
    a = alignment.align(s, t, [("feat", "feat")], weight=1.0)
    data, (t_feat,) = plain_data(a, batch=3)
    head, lower = s.get_layer("logits").get_weights(), s.get_layer("pre").get_weights()[0].copy()
    a.hint_model.compile(optimizer=keras.optimizers.SGD(0.1))
    kernel, bias = a.hint_model.get_layer("kd_proj0_conv1x1").get_weights()
    start = a.hint_model.evaluate(data, verbose=0)
    np.testing.assert_allclose(start, reference.feature_mse(t_feat, features_of(s, X) @ kernel[0, 0] + bias).mean(),
                               rtol=1e-4)
    history = a.hint_model.fit(data, epochs=3, verbose=0).history["loss"]
    assert history[-1] < history[0]
    for w, h in zip(s.get_layer("logits").get_weights(), head):
        np.testing.assert_array_equal(w, h)
    assert not np.allclose(s.get_layer("pre").get_weights()[0], lower)


def test_export_and_keras_file_round_trip(tmp_path):
    s, t = net(keras, (4, 4, 8), "s"), net(keras, (2, 2, 16), "t", frozen=True)
    config = s.get_config()
    a = alignment.align(s, t, [("feat", "feat")], weight=0.3)
    data, _ = plain_data(a, batch=3)
    a.model.compile(keras.optimizers.Adam(0.05), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    a.model.fit(data, epochs=2, verbose=0)
    clean = a.export()
    assert clean.get_config() == config and not any(layer.name.startswith("kd_") for layer in clean.layers)
    for trained, exported in zip(s.get_weights(), clean.get_weights()):
        np.testing.assert_array_equal(exported, trained)
    np.testing.assert_allclose(clean.predict(X, verbose=0), s.predict(X, verbose=0), rtol=1e-6)
    # .keras: the training model (with its loss layer) loads and trains on JAX.
    want = a.model.evaluate(data, verbose=0)
    a.model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    loaded.compile(keras.optimizers.Adam(0.05), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    np.testing.assert_allclose(loaded.evaluate(data, verbose=0), want, rtol=1e-5)
    loaded.fit(data, epochs=1, verbose=0)


def test_nested_submodel_and_sequential_student():
    inner_in = keras.Input((8, 8, 1))
    inner = keras.Model(inner_in, keras.layers.Dense(4, name="inner_feat")(inner_in), name="backbone")
    inp = keras.Input((8, 8, 1))
    logits = keras.layers.Dense(3)(keras.layers.Flatten()(inner(inp)))
    s = keras.Model(inp, logits, name="s")
    t = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Dense(4, name="t_feat"),
                          keras.layers.Flatten(), keras.layers.Dense(3)], name="t")
    t.trainable = False
    a = alignment.align(s, t, [("backbone/inner_feat", t.layers[0])], weight=0.5)
    data, (t_feat,) = plain_data(a)
    a.model.compile("sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    s_feat = np.asarray(inner.predict(X, verbose=0))
    want = np_ce(Y, s.predict(X, verbose=0)) + 0.5 * reference.feature_mse(t_feat, s_feat).mean()
    np.testing.assert_allclose(a.model.evaluate(data, verbose=0), want, rtol=1e-4)


# ---------------------------------------------------------------------------
# Online teacher features (`attach`): the JAX teacher runs inside tf.data
# ---------------------------------------------------------------------------


def test_attach_and_distillation_loss_equal_numpy():
    s, t = net(keras, (4, 4, 8), "s"), net(keras, (2, 2, 16), "t", frozen=True)
    a = alignment.align(s, t, [("feat", "feat")], weight=0.3)
    attached = a.attach(tf.data.Dataset.from_tensor_slices((X, Y)).batch(4))
    (x, f), targets = next(iter(attached))
    t_logits, t_feat = (np.asarray(o) for o in a.feature_extractor.predict(X[:4], verbose=0))
    np.testing.assert_allclose(f.numpy(), t_feat, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(targets.logits.numpy(), t_logits, rtol=1e-5, atol=1e-6)
    kd = losses_lib.DistillationLoss(temperature=2.0, alpha=0.4)
    a.model.compile("sgd", loss=a.loss(kd), metrics=["accuracy"])
    full = a.attach(tf.data.Dataset.from_tensor_slices((X, Y)).batch(len(X)))
    result = a.model.evaluate(full, verbose=0, return_dict=True)
    kernel, bias = a.model.get_layer("kd_proj0_conv1x1").get_weights()
    pooled = features_of(s, X).reshape(6, 2, 2, 2, 2, 8).mean(axis=(2, 4))
    feature = 0.3 * reference.feature_mse(features_of(t, X), pooled @ kernel[0, 0] + bias).mean()
    logits, teacher = s.predict(X, verbose=0), t.predict(X, verbose=0)
    kd_value = reference.distillation_loss(Y, logits, teacher, T=2.0, alpha=0.4)
    np.testing.assert_allclose(result["loss"], float(np.mean(kd_value)) + feature, rtol=1e-4)
    np.testing.assert_allclose(result["accuracy"], np.mean(np.argmax(logits, 1) == Y))
    history = a.model.fit(a.attach(tf.data.Dataset.from_tensor_slices((X, Y)).batch(3)), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_attach_with_teacher_and_student_inputs():
    # The teacher reads the full 8x8 image, the student every second row (4x8).
    t = net(keras, (4, 4, 8), "t", frozen=True)
    inp = keras.Input((4, 8, 1))
    f = keras.layers.Reshape((4, 4, 8), name="feat")(keras.layers.Dense(128, name="pre")(keras.layers.Flatten()(inp)))
    s = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Flatten()(f)), name="s")
    a = alignment.align(s, t, [("feat", "feat")], weight=0.5, student_inputs=lambda x: x[..., ::2, :, :])
    attached = a.attach(tf.data.Dataset.from_tensor_slices((X, Y)).batch(len(X)))
    (x, feat), _ = next(iter(attached))
    np.testing.assert_array_equal(x.numpy(), X[:, ::2])
    np.testing.assert_allclose(feat.numpy(), features_of(t, X), rtol=1e-5, atol=1e-6)
    a.model.compile("sgd", loss=a.loss(losses_lib.DistillationLoss(temperature=1.0, alpha=1.0)))
    want = np_ce(Y, s.predict(X[:, ::2], verbose=0)) + 0.5 * reference.feature_mse(
        features_of(t, X), features_of(s, X[:, ::2])).mean()
    np.testing.assert_allclose(a.model.evaluate(attached, verbose=0), want, rtol=1e-4)


def test_cache_features_build_reopen_and_train(tmp_path):
    s, t = net(keras, (4, 4, 8), "s"), net(keras, (2, 2, 16), "t", frozen=True)
    a = alignment.align(s, t, [("feat", "feat")], weight=0.3)
    t_logits, t_feat = (np.asarray(o) for o in a.feature_extractor.predict(X, verbose=0))
    raw = tf.data.Dataset.from_tensor_slices((X, Y))
    for _ in range(2):  # built, then read back (the teacher re-runs on the first rows to check them)
        cached = raw.apply(a.cache_features(str(tmp_path / "features"), dtype="float32"))
        (x, feat), targets = next(iter(cached.batch(len(X))))
        np.testing.assert_allclose(feat.numpy(), t_feat, rtol=1e-6)
        np.testing.assert_allclose(targets.logits.numpy(), t_logits, rtol=1e-6)
        np.testing.assert_array_equal(targets.example_id.numpy(), np.arange(len(X)))
    a.model.compile("sgd", loss=a.loss(losses_lib.DistillationLoss(temperature=2.0, alpha=0.4)))
    assert np.all(np.isfinite(a.model.fit(cached.batch(3), epochs=1, verbose=0).history["loss"]))


def test_tf_keras_models_keep_the_tensorflow_path_in_a_jax_process():
    import tf_keras

    s, t = net(tf_keras, (4, 4, 8), "s"), net(tf_keras, (4, 4, 8), "t", frozen=True)
    a = alignment.align(s, t, [("feat", "feat")], weight=0.3)
    kd = losses_lib.DistillationLoss(temperature=2.0, alpha=0.5)
    a.model.compile(optimizer="sgd", loss=a.loss(kd))
    data = a.attach(tf.data.Dataset.from_tensor_slices((X, Y)).batch(len(X)))
    result = a.model.evaluate(data, verbose=0, return_dict=True)
    f_s = tf_keras.Model(s.inputs, s.get_layer("feat").output).predict(X, verbose=0)
    f_t = tf_keras.Model(t.inputs, t.get_layer("feat").output).predict(X, verbose=0)
    kd_value = reference.distillation_loss(Y, s.predict(X, verbose=0), t.predict(X, verbose=0), T=2.0, alpha=0.5)
    feature = 0.3 * reference.feature_mse(f_t, f_s).mean()
    np.testing.assert_allclose(result["feature_loss"], feature, rtol=1e-4)  # tf_keras logs it, on any backend
    np.testing.assert_allclose(result["loss"], float(np.mean(kd_value)) + feature, rtol=1e-4)


def test_tf_keras_teacher_feeds_a_jax_student():
    import tf_keras

    s, t = net(keras, (4, 4, 8), "s"), net(tf_keras, (4, 4, 8), "t", frozen=True)
    a = alignment.align(s, t, [("feat", "feat")], weight=0.3)
    kd = losses_lib.DistillationLoss(temperature=2.0, alpha=0.5)
    a.model.compile(optimizer="sgd", loss=a.loss(kd))
    result = a.model.evaluate(a.attach(tf.data.Dataset.from_tensor_slices((X, Y)).batch(len(X))), verbose=0)
    f_t = tf_keras.Model(t.inputs, t.get_layer("feat").output).predict(X, verbose=0)
    kd_value = reference.distillation_loss(Y, s.predict(X, verbose=0), t.predict(X, verbose=0), T=2.0, alpha=0.5)
    np.testing.assert_allclose(result, kd_value + 0.3 * reference.feature_mse(f_t, features_of(s, X)).mean(),
                               rtol=1e-4)
