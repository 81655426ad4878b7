"""Tests for keras_kd.alignment: projectors, feature losses, export, data paths.

Every behaviour runs under Keras 3 and tf_keras (the ``K`` fixture of
conftest.py). References are NumPy formulas written here or Keras's own
layers, never the code under test compared with itself.
"""

import json
import os
import warnings

import numpy as np
import pytest
import tensorflow as tf

from keras_kd import _compat
from keras_kd import alignment
from keras_kd import data as data_lib
from keras_kd import losses as losses_lib
from keras_kd import targets as targets_lib

align = alignment.align


def net(K, feat_shape, name, classes=3, input_shape=(8, 8, 1), frozen=False):
    """x -> Dense -> Reshape(feat_shape) named "feat" -> Flatten -> Dense logits."""
    inp = K.Input(input_shape)
    h = K.layers.Flatten()(inp)
    h = K.layers.Dense(int(np.prod(feat_shape)), name="pre")(h)
    f = K.layers.Reshape(feat_shape, name="feat")(h)
    h = K.layers.Flatten(name="flat")(f)
    out = K.layers.Dense(classes, name="logits")(h)
    model = K.Model(inp, out, name=name)
    if frozen:
        model.trainable = False
    return model


def quiet_align(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return align(*args, **kwargs)


def projected(K, aligned, index=0):
    """A model from the student's inputs to the projected student feature of pair ``index``."""
    loss_inputs = aligned.model.get_layer("kd_feature_loss").input
    return K.Model(aligned.student.inputs, loss_inputs[1 + 2 * index])


def feature_of(K, model, name="feat"):
    return K.Model(model.inputs, model.get_layer(name).output)


X = np.random.default_rng(0).normal(size=(6, 8, 8, 1)).astype("float32")
Y = np.array([0, 1, 2, 0, 1, 2])


# ---------------------------------------------------------------------------
# Projectors: one case per kind, both flavours
# ---------------------------------------------------------------------------

SHAPE_CASES = [
    # (student feature, teacher feature, kwargs, words expected in the summary)
    ((16,), (32,), {}, ["Dense 16 -> 32"]),
    ((16,), (16,), {}, ["identity"]),
    ((4, 4, 8), (4, 4, 16), {}, ["1x1 conv 8 -> 16"]),
    ((4, 4, 8), (4, 4, 16), {"projector": "conv3x3"}, ["3x3 conv 8 -> 16"]),
    ((4, 4, 8), (4, 4, 16), {"projector": "dense"}, ["Dense 8 -> 16"]),
    ((8, 8, 8), (4, 4, 16), {}, ["average-pool 2x2", "1x1 conv 8 -> 16"]),
    ((8, 4, 4), (2, 4, 4), {}, ["average-pool 4x1"]),
    ((3, 3, 8), (4, 4, 8), {}, ["bilinear resize to 4x4"]),
    ((6, 6, 4), (4, 4, 4), {}, ["bilinear resize to 4x4"]),
    ((8, 8, 4), (4, 4, 4), {"resample": "resize"}, ["bilinear resize to 4x4"]),
    ((12, 8), (6, 16), {}, ["average-pool the sequence by 2", "Dense 8 -> 16"]),
    ((5, 8), (7, 8), {}, ["linear interpolation to length 7"]),
    ((4, 4, 8), (16, 12), {}, ["reshape map to 16 tokens", "Dense 8 -> 12"]),
    ((17, 12), (4, 4, 8), {}, ["drop the class token", "4x4 map", "1x1 conv 12 -> 8"]),
    ((16, 12), (2, 2, 8), {}, ["4x4 map", "average-pool 2x2", "1x1 conv 12 -> 8"]),
    ((4, 4, 8), (2, 2, 32), {"feature_loss": "attention"}, ["average-pool 2x2"]),
]


@pytest.mark.parametrize("s_shape,t_shape,kwargs,words", SHAPE_CASES)
def test_projector_shapes(K, s_shape, t_shape, kwargs, words):
    student, teacher = net(K, s_shape, "student"), net(K, t_shape, "teacher", frozen=True)
    aligned = align(student, teacher, [("feat", "feat")], **kwargs)
    pair = aligned.pairs[0]
    assert pair.student_shape == s_shape and pair.teacher_shape == t_shape
    for word in words:
        assert word in pair.steps
    out = projected(K, aligned).predict(X, verbose=0)
    expected = t_shape if kwargs.get("feature_loss") != "attention" else t_shape[:-1] + s_shape[-1:]
    assert out.shape == (len(X),) + expected
    # The training model's feature inputs have the teacher's shape.
    assert tuple(aligned.model.inputs[1].shape[1:]) == t_shape
    assert all(not layer.name.startswith("kd_") for layer in student.layers)


def test_projector_values_pool_tokens_and_interpolation(K):
    # Average pooling 2x2: NumPy block mean of the student feature.
    s, t = net(K, (8, 8, 4), "s"), net(K, (4, 4, 4), "t", frozen=True)
    a = align(s, t, [("feat", "feat")])
    f = feature_of(K, s).predict(X, verbose=0)
    block_mean = f.reshape(6, 4, 2, 4, 2, 4).mean(axis=(2, 4))
    np.testing.assert_allclose(projected(K, a).predict(X, verbose=0), block_mean, rtol=1e-5, atol=1e-6)
    # 17 tokens (class token + 4x4 grid) -> map: drop token 0, reshape row-major.
    s, t = net(K, (17, 8), "s"), net(K, (4, 4, 8), "t", frozen=True)
    a = align(s, t, [("feat", "feat")])
    f = feature_of(K, s).predict(X, verbose=0)
    np.testing.assert_allclose(projected(K, a).predict(X, verbose=0), f[:, 1:].reshape(6, 4, 4, 8), rtol=1e-6)
    # Map -> tokens.
    s, t = net(K, (4, 4, 8), "s"), net(K, (16, 8), "t", frozen=True)
    a = align(s, t, [("feat", "feat")])
    f = feature_of(K, s).predict(X, verbose=0)
    np.testing.assert_allclose(projected(K, a).predict(X, verbose=0), f.reshape(6, 16, 8), rtol=1e-6)
    # Length 5 -> 7 by linear interpolation with half-pixel centres:
    # source position of output j is (j + 0.5) * 5 / 7 - 0.5, clamped to [0, 4].
    s, t = net(K, (5, 3), "s"), net(K, (7, 3), "t", frozen=True)
    a = align(s, t, [("feat", "feat")])
    f = feature_of(K, s).predict(X, verbose=0)
    pos = np.clip((np.arange(7) + 0.5) * 5 / 7 - 0.5, 0, 4)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, 4)
    frac = (pos - lo)[None, :, None]
    expected = f[:, lo] * (1 - frac) + f[:, hi] * frac
    np.testing.assert_allclose(projected(K, a).predict(X, verbose=0), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("projector", ["dense", "conv1x1", "conv3x3"])
def test_identity_and_zeros_init(K, projector):
    s, t = net(K, (4, 4, 8), "s"), net(K, (4, 4, 8), "t", frozen=True)
    f = feature_of(K, s).predict(X, verbose=0)
    a = align(s, t, [("feat", "feat")], projector=projector, init="identity")
    assert a.pairs[0].init == "identity"
    np.testing.assert_allclose(projected(K, a).predict(X, verbose=0), f, rtol=1e-5, atol=1e-6)
    a = align(s, t, [("feat", "feat")], projector=projector, init="zeros")
    np.testing.assert_array_equal(projected(K, a).predict(X, verbose=0), np.zeros_like(f))
    # "auto" picks identity for equal widths and Glorot otherwise.
    assert align(s, t, [("feat", "feat")], projector=projector).pairs[0].init == "identity"
    wide = net(K, (4, 4, 16), "t2", frozen=True)
    assert align(s, wide, [("feat", "feat")], projector=projector).pairs[0].init == "glorot"


def test_custom_projector_layer_and_factory(K):
    s, t = net(K, (4, 4, 8), "s"), net(K, (2, 2, 16), "t", frozen=True)
    layer = K.layers.Conv2D(16, 2, strides=2, name="my_proj")
    a = align(s, t, [("feat", "feat")], projector=layer)
    assert a.pairs[0].projector == "custom" and "my_proj" in a.pairs[0].steps
    factory = lambda s_shape, t_shape: K.layers.Conv2D(t_shape[-1], 2, strides=2)  # noqa: E731
    a = align(s, t, [("feat", "feat")], projector=factory)
    assert projected(K, a).predict(X, verbose=0).shape == (6, 2, 2, 16)
    message = r"turns student features \(batch, 4, 4, 8\) into \(batch, 4, 4, 16\)"
    with pytest.raises(ValueError, match=message):
        align(s, t, [("feat", "feat")], projector=K.layers.Conv2D(16, 1))


UNALIGNABLE = [
    ((16,), (4, 4, 8), {}, r"\(batch, 16\).*\(batch, 4, 4, 8\).*projector='auto'.*ranks differ"),
    ((15, 8), (4, 4, 8), {}, r"15 tokens form no square grid"),
    ((16,), (32,), {"projector": "conv1x1"}, r"projector='conv1x1'.*needs \(H, W, C\) feature maps"),
    ((6, 6, 4), (4, 4, 4), {"resample": "pool"}, r"resample='pool' needs student positions \(6, 6\)"),
    ((4, 4, 8), (4, 4, 16), {"projector": "identity"}, r"projector='identity' keeps the width 8"),
    ((4, 4, 8), (4, 4, 16), {"init": "identity"}, r"init='identity'.*maps 8 -> 16"),
    ((4, 4, 8), (16,), {"feature_loss": "attention"}, r"attention.*needs \(H, W, C\) maps"),
]


@pytest.mark.parametrize("s_shape,t_shape,kwargs,message", UNALIGNABLE)
def test_unalignable_pairs(K, s_shape, t_shape, kwargs, message):
    student, teacher = net(K, s_shape, "student"), net(K, t_shape, "teacher", frozen=True)
    with pytest.raises(ValueError, match=message):
        align(student, teacher, [("feat", "feat")], **kwargs)


def test_summary_explains_choice(K):
    s, t = net(K, (8, 8, 8), "s"), net(K, (4, 4, 16), "t", frozen=True)
    a = align(s, t, [("feat", "feat")], weight=0.25)
    lines = []
    a.summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert "feat (batch, 8, 8, 8) -> feat (batch, 4, 4, 16)" in text
    assert "average-pool 2x2, then 1x1 conv 8 -> 16 channels" in text
    assert "weight=0.25" in text and "init=glorot" in text
    # 1x1 conv 8 -> 16: 8 * 16 weights + 16 biases.
    assert "projector parameters: 144" in text


# ---------------------------------------------------------------------------
# Feature losses against NumPy formulas
# ---------------------------------------------------------------------------


def np_flat(a):
    return a.reshape(len(a), -1).astype(np.float64)


def np_attention(f, p=2.0):
    # Zagoruyko & Komodakis 2017: sum over channels of |f|^p, vectorised, L2-normalised.
    a = (np.abs(f.astype(np.float64)) ** p).sum(axis=-1).reshape(len(f), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_feature_losses_hand_values():
    t = tf.constant([[1.0, 2.0], [0.0, 0.0]])
    s = tf.constant([[1.0, 4.0], [1.0, -1.0]])
    # mse: ((1-1)^2 + (4-2)^2) / 2 = 2;  ((1-0)^2 + (-1-0)^2) / 2 = 1
    np.testing.assert_allclose(alignment.feature_mse(t, s), [2.0, 1.0])
    # l1: (0 + 2) / 2 = 1;  (1 + 1) / 2 = 1
    np.testing.assert_allclose(alignment.feature_l1(t, s), [1.0, 1.0])
    # cosine: 1 - (1*1 + 2*4) / (sqrt(5) * sqrt(17));  a zero teacher is orthogonal: 1
    np.testing.assert_allclose(alignment.feature_cosine(t, s), [1 - 9 / np.sqrt(85), 1.0], atol=1e-6)


def test_feature_loss_docstring_examples_run():
    import doctest

    from keras_kd.alignment import feature_losses

    result = doctest.testmod(feature_losses, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 3 and result.failed == 0


@pytest.mark.parametrize("shape", [(3, 4, 4, 5), (3, 6, 7)])
def test_feature_losses_match_numpy(shape):
    rng = np.random.default_rng(1)
    t = rng.normal(size=shape).astype("float32")
    s = rng.normal(size=shape).astype("float32")
    diff = np_flat(s) - np_flat(t)
    np.testing.assert_allclose(alignment.feature_mse(t, s), (diff**2).mean(1), rtol=1e-5)
    np.testing.assert_allclose(alignment.feature_l1(t, s), np.abs(np_flat(s) - np_flat(t)).mean(1), rtol=1e-5)
    norms = np.linalg.norm(np_flat(s), axis=1) * np.linalg.norm(np_flat(t), axis=1)
    cos = (np_flat(s) * np_flat(t)).sum(1) / norms
    np.testing.assert_allclose(alignment.feature_cosine(t, s), 1 - cos, rtol=1e-5, atol=1e-6)
    expected = ((np_attention(s) - np_attention(t)) ** 2).mean(1)
    np.testing.assert_allclose(alignment.attention_transfer(t, s), expected, rtol=1e-4)
    expected = ((np_attention(s, 4) - np_attention(t, 4)) ** 2).mean(1)
    np.testing.assert_allclose(alignment.attention_transfer(t, s, p=4.0), expected, rtol=1e-4)


def test_attention_transfer_properties():
    rng = np.random.default_rng(2)
    t = rng.normal(size=(2, 4, 4, 32)).astype("float32")
    s = rng.normal(size=(2, 4, 4, 8)).astype("float32")
    # Channel counts may differ; the maps are scale-free; equal maps give 0.
    value = np.asarray(alignment.attention_transfer(t, s))
    np.testing.assert_allclose(alignment.attention_transfer(t, 3.0 * s), value, rtol=1e-5)
    np.testing.assert_allclose(alignment.attention_transfer(t, t), [0.0, 0.0], atol=1e-7)
    with pytest.raises(ValueError, match="positions and channels"):
        alignment.attention_transfer(tf.zeros((2, 3)), tf.zeros((2, 3)))


def test_feature_loss_gradients_finite():
    t = tf.zeros((2, 3, 3, 4))
    s = tf.Variable(tf.zeros((2, 3, 3, 4)))
    for fn in alignment.FEATURE_LOSSES.values():
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(fn(t, s))
        assert np.all(np.isfinite(tape.gradient(value, s).numpy()))


# ---------------------------------------------------------------------------
# Training: the loss that fit optimises, export, the hint stage
# ---------------------------------------------------------------------------


# Reads the `feature_loss` metric, which Keras 3 cannot log on JAX (keras-team/keras#21639);
# the same losses on JAX: tests/test_jax_alignment.py.
@pytest.mark.backend("tensorflow")
def test_total_loss_is_kd_plus_weighted_feature_loss(K):
    s, t = net(K, (4, 4, 8), "s"), net(K, (4, 4, 8), "t", frozen=True)
    a = align(s, t, [("feat", "feat")], weight=0.3, feature_loss="mse")
    kd = losses_lib.DistillationLoss(temperature=2.0, alpha=0.5)
    a.model.compile(optimizer="sgd", loss=a.loss(kd), metrics=["accuracy"])
    data = a.attach(tf.data.Dataset.from_tensor_slices((X, Y)).batch(len(X)))
    result = a.model.evaluate(data, verbose=0, return_dict=True)
    # Independent pieces: the student's and teacher's own "feat" outputs and logits.
    f_s = feature_of(K, s).predict(X, verbose=0)
    f_t = feature_of(K, t).predict(X, verbose=0)
    feature = 0.3 * np.mean((f_s - f_t) ** 2)  # identity projector: shapes already match
    kd_value = float(kd(targets_lib.TeacherTargets(labels=tf.constant(Y), logits=t.predict(X, verbose=0)),
                        s.predict(X, verbose=0)))
    np.testing.assert_allclose(result["feature_loss"], feature, rtol=1e-4)
    np.testing.assert_allclose(result["loss"], kd_value + feature, rtol=1e-4)
    # Metrics see the hard labels: accuracy of the student's argmax.
    np.testing.assert_allclose(result["accuracy"], np.mean(s.predict(X, verbose=0).argmax(1) == Y))


def test_export_gives_original_config_and_trained_weights(K):
    s, t = net(K, (4, 4, 8), "s"), net(K, (2, 2, 16), "t", frozen=True)
    config, initial = s.get_config(), [w.copy() for w in s.get_weights()]
    a = align(s, t, [("feat", "feat")])
    a.model.compile(optimizer=K.optimizers.Adam(0.05), loss=a.loss(losses_lib.DistillationLoss()))
    a.model.fit(a.attach(tf.data.Dataset.from_tensor_slices((X, Y)).batch(3)), epochs=2, verbose=0)
    clean = a.export()
    assert clean is not s and clean.get_config() == config
    assert _compat.flavour_of(clean) == _compat.flavour_of(s)
    assert [layer.name for layer in clean.layers] == [layer.name for layer in s.layers]
    assert not any(layer.name.startswith("kd_") for layer in clean.layers)
    assert len(clean.inputs) == 1 and len(clean.outputs) == 1
    for before, trained, exported in zip(initial, s.get_weights(), clean.get_weights()):
        np.testing.assert_array_equal(exported, trained)
    assert any(not np.allclose(b, e) for b, e in zip(initial, clean.get_weights()))
    np.testing.assert_allclose(clean.predict(X, verbose=0), s.predict(X, verbose=0), rtol=1e-6)
    # Training on does not change an exported model.
    frozen = [w.copy() for w in clean.get_weights()]
    a.model.fit(a.attach(tf.data.Dataset.from_tensor_slices((X, Y)).batch(3)), epochs=1, verbose=0)
    for w, f in zip(clean.get_weights(), frozen):
        np.testing.assert_array_equal(w, f)


# Reads the `feature_loss` metric, which Keras 3 cannot log on JAX (keras-team/keras#21639);
# the same losses on JAX: tests/test_jax_alignment.py.
@pytest.mark.backend("tensorflow")
def test_hint_stage_then_distillation(K):
    s, t = net(K, (4, 4, 8), "s"), net(K, (4, 4, 16), "t", frozen=True)
    a = align(s, t, [("feat", "feat")], weight=1.0)
    hint_layers = {layer.name for layer in a.hint_model.layers}
    assert "pre" in hint_layers and "kd_proj0_conv1x1" in hint_layers and "logits" not in hint_layers
    head = [w.copy() for w in s.get_layer("logits").get_weights()]
    lower = s.get_layer("pre").get_weights()[0].copy()
    data = a.attach(tf.data.Dataset.from_tensor_slices((X, Y)).batch(3))
    a.hint_model.compile(optimizer=K.optimizers.SGD(0.1))
    history = a.hint_model.fit(data, epochs=3, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    for w, h in zip(s.get_layer("logits").get_weights(), head):
        np.testing.assert_array_equal(w, h)  # stage 1 never touches the head
    assert not np.allclose(s.get_layer("pre").get_weights()[0], lower)
    # Stage 2: distillation only.
    a.feature_weight = 0.0
    assert a.feature_weight == [0.0]
    kd = losses_lib.DistillationLoss()
    a.model.compile(optimizer="sgd", loss=a.loss(kd))
    result = a.model.evaluate(data, verbose=0, return_dict=True)
    assert result["feature_loss"] == 0.0
    with pytest.raises(ValueError, match=r"feature_weight.*-1"):
        a.feature_weight = -1.0


def test_nested_submodels_and_layer_objects(K):
    # Student: functional with a nested Sequential backbone; teacher: nested functional.
    backbone = K.Sequential(
        [K.Input((8, 8, 1)), K.layers.Conv2D(4, 3, padding="same", name="conv_a"),
         K.layers.Conv2D(6, 3, strides=2, padding="same", name="conv_b")],
        name="backbone",
    )
    inp = K.Input((8, 8, 1))
    out = K.layers.Dense(3, name="logits")(K.layers.GlobalAveragePooling2D()(backbone(inp)))
    student = K.Model(inp, out, name="student")
    t_in = K.Input((8, 8, 1))
    t_conv = K.layers.Conv2D(12, 3, strides=2, padding="same", name="t_conv")
    t_body = K.Model(t_in, t_conv(t_in), name="body")
    t_x = K.Input((8, 8, 1))
    teacher = K.Model(t_x, K.layers.Dense(3)(K.layers.Flatten()(t_body(t_x))), name="teacher")
    teacher.trainable = False
    a = align(student, teacher, [(backbone.get_layer("conv_b"), "t_conv")])
    assert a.pairs[0].student_layer == "backbone/conv_b" and a.pairs[0].teacher_layer == "body/t_conv"
    assert a.pairs[0].student_shape == (4, 4, 6) and a.pairs[0].teacher_shape == (4, 4, 12)
    # One forward pass: the feature fed to the projector is the backbone's own conv_b output.
    probe = K.Model(student.inputs, a.model.get_layer("kd_feature_loss").input[1])
    conv_b = K.Model(backbone.inputs, backbone.get_layer("conv_b").output)
    kernel, bias = a.model.get_layer("kd_proj0_conv1x1").get_weights()
    expected = conv_b.predict(X, verbose=0) @ kernel[0, 0] + bias
    np.testing.assert_allclose(probe.predict(X, verbose=0), expected, rtol=1e-4, atol=1e-5)
    # The training model outputs what the student outputs.
    feats = a.feature_extractor.predict(X, verbose=0)
    np.testing.assert_allclose(
        a.model.predict([X, feats[1]], verbose=0), student.predict(X, verbose=0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(feats[0], teacher.predict(X, verbose=0), rtol=1e-5, atol=1e-6)
    body_conv = K.Model(t_body.inputs, t_body.get_layer("t_conv").output)
    np.testing.assert_allclose(feats[1], body_conv.predict(X, verbose=0), rtol=1e-5, atol=1e-6)
    # The clean copy of a nested student keeps its config too.
    assert a.export().get_config() == student.get_config()


# Reads the `feature_loss` metric, which Keras 3 cannot log on JAX (keras-team/keras#21639);
# the same losses on JAX: tests/test_jax_alignment.py.
@pytest.mark.backend("tensorflow")
def test_sequential_student_by_layer_object(K):
    student = K.Sequential(
        [K.Input((8, 8, 1)), K.layers.Conv2D(4, 3, padding="same", name="c1"), K.layers.Flatten(),
         K.layers.Dense(3, name="logits")],
        name="seq",
    )
    teacher = net(K, (8, 8, 2), "t", frozen=True)
    a = align(student, teacher, [(student.layers[0], "feat")])
    assert a.pairs[0].steps == "1x1 conv 4 -> 2 channels"
    a.model.compile(optimizer="adam", loss=a.loss(losses_lib.DistillationLoss()), metrics=["accuracy"])
    history = a.model.fit(a.attach(tf.data.Dataset.from_tensor_slices((X, Y)).batch(3)), epochs=1, verbose=0)
    assert {"loss", "feature_loss", "accuracy"} <= set(history.history)
    exported = a.export()
    assert exported.get_config() == student.get_config()
    np.testing.assert_allclose(exported.predict(X, verbose=0), student.predict(X, verbose=0), rtol=1e-6)


def test_cross_flavour_teacher():
    keras3, tf_keras = _compat.module("keras"), _compat.module("tf_keras")
    student, teacher = net(keras3, (4, 4, 8), "s"), net(tf_keras, (4, 4, 16), "t", frozen=True)
    a = align(student, teacher, [("feat", "feat")])
    assert _compat.flavour_of(a.model) == "keras" and _compat.flavour_of(a.feature_extractor) == "tf_keras"
    a.model.compile(optimizer="adam", loss=a.loss(losses_lib.DistillationLoss()))
    history = a.model.fit(a.attach(tf.data.Dataset.from_tensor_slices((X, Y)).batch(3)), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_exported_tf_keras_student_prunes_with_tfmot():
    tfmot = pytest.importorskip("tensorflow_model_optimization")
    tf_keras = _compat.module("tf_keras")
    student, teacher = net(tf_keras, (4, 4, 8), "s"), net(tf_keras, (4, 4, 16), "t", frozen=True)
    clean = align(student, teacher, [("feat", "feat")]).export()
    pruned = tfmot.sparsity.keras.prune_low_magnitude(clean)
    assert any("prune_low_magnitude" in layer.name for layer in pruned.layers)
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    assert [layer.name for layer in stripped.layers] == [layer.name for layer in student.layers]


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_unknown_layer_lists_closest_names(K):
    s, t = net(K, (4, 4, 8), "s"), net(K, (4, 4, 8), "t", frozen=True)
    message = r"Unknown layer 'fet' in pair 0: student 's'.*Closest names: \['feat'"
    with pytest.raises(ValueError, match=message):
        align(s, t, [("fet", "feat")])
    message = r"Unknown layer 'logit' in pair 1: teacher.*Closest names: \['logits'"
    with pytest.raises(ValueError, match=message):
        align(s, t, [("feat", "feat"), ("feat", "logit")])
    stranger = K.layers.Dense(2, name="stranger")
    with pytest.raises(ValueError, match="'stranger' in pair 0 is not part of student"):
        align(s, t, [(stranger, "feat")])
    with pytest.raises(TypeError, match="by string or by layer object"):
        align(s, t, [(3, "feat")])


def test_ambiguous_and_shared_layers(K):
    def branch(name):
        return K.Sequential([K.Input((8, 8, 1)), K.layers.Conv2D(2, 1, name="feat")], name=name)

    inp = K.Input((8, 8, 1))
    h = K.layers.Conv2D(2, 1, name="top")(inp)
    merged = K.layers.Concatenate()([h, branch("a")(inp), branch("b")(inp)])
    s = K.Model(inp, K.layers.Dense(3)(K.layers.Flatten()(merged)), name="s")
    t = net(K, (8, 8, 2), "t", frozen=True)
    with pytest.raises(ValueError, match=r"'feat' in pair 0 is ambiguous.*\['a/feat', 'b/feat'\]"):
        align(s, t, [("feat", "feat")])
    assert align(s, t, [("b/feat", "feat")]).pairs[0].student_layer == "b/feat"
    # A top-level name is an exact path: it wins over nested layers of the same name.
    assert align(s, t, [("top", "feat")]).pairs[0].student_layer == "top"
    shared = K.layers.Dense(4, name="shared")
    inp = K.Input((4,))
    s2 = K.Model(inp, K.layers.Dense(3)(shared(shared(inp))), name="s2")
    t2_in = K.Input((4,))
    t2 = K.Model(t2_in, K.layers.Dense(3)(K.layers.Dense(4, name="f")(t2_in)), name="t2")
    t2.trainable = False
    with pytest.raises(ValueError, match="'shared' is called more than once"):
        align(s2, t2, [("shared", "f")])


def test_subclassed_and_unbuilt_models(K):
    class Sub(K.Model):
        def __init__(self):
            super().__init__()
            self.dense = K.layers.Dense(3)

        def call(self, x):
            return self.dense(K.layers.Flatten()(x))

    sub = Sub()
    sub(X)
    t = net(K, (4, 4, 8), "t", frozen=True)
    with pytest.raises(TypeError, match="subclassed model.*Functional API"):
        align(sub, t, [("dense", "feat")])
    unbuilt = K.Sequential([K.layers.Dense(3)])
    with pytest.raises(ValueError, match="never built.*build"):
        align(unbuilt, t, [("dense", "feat")])
    with pytest.raises(TypeError, match=r"Expected `teacher` to be a Keras 3 or tf_keras `Model`"):
        align(t, "not a model", [("feat", "feat")])


def test_trainable_teacher_warns(K):
    s = net(K, (4, 4, 8), "s")
    message = r"tapped layers \['feat'\] are trainable.*teacher.trainable = False"
    with pytest.warns(UserWarning, match=message):
        align(s, net(K, (4, 4, 8), "t"), [("feat", "feat")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        align(s, net(K, (4, 4, 8), "t", frozen=True), [("feat", "feat")])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"weight": -1.0}, r"Expected `weight` >= 0 and finite. Received: weight=-1.0"),
        ({"weight": [0.5, 0.5]}, r"`weight` to be one value or a list of 1 values"),
        ({"projector": "conv5x5"}, r"`projector` in .*Received: projector='conv5x5'"),
        ({"init": "orthogonal"}, r"`init` to be one of .*Received: init='orthogonal'"),
        ({"resample": "nearest"}, r"`resample` to be one of .*Received: resample='nearest'"),
        ({"feature_loss": "kl"}, r"Unknown feature loss 'kl'"),
        ({"teacher_pool_size": 0}, r"`teacher_pool_size`.*Received: teacher_pool_size=0"),
        ({"teacher_pool_size": 8}, r"teacher_pool_size=8 is larger than the teacher features \(batch, 4, 4, 8\)"),
        ({"pairs": []}, r"`pairs` to be a non-empty list"),
        ({"pairs": [("feat",)]}, r"Received: pairs\[0\]=\('feat',\)"),
    ],
)
def test_bad_arguments(K, kwargs, message):
    s, t = net(K, (4, 4, 8), "s"), net(K, (4, 4, 8), "t", frozen=True)
    kwargs = dict(kwargs)
    pairs = kwargs.pop("pairs", [("feat", "feat")])
    with pytest.raises(ValueError, match=message):
        align(s, t, pairs, **kwargs)


def test_loss_checks_and_double_alignment(K):
    s, t = net(K, (4, 4, 8), "s"), net(K, (4, 4, 8), "t", classes=5, frozen=True)
    a = align(s, t, [("feat", "feat")])
    with pytest.raises(ValueError, match=r"same number of classes.*the student 's': 3, the teacher 't': 5"):
        a.loss(losses_lib.DistillationLoss())
    t3 = net(K, (4, 4, 8), "t3", frozen=True)
    a = align(s, t3, [("feat", "feat")])
    kd = losses_lib.DistillationLoss()
    assert a.loss(kd) is kd
    hard = a.loss()
    assert isinstance(hard, losses_lib.DistillationLoss) and hard.alpha == 1.0
    with pytest.raises(ValueError, match="already an alignment training model"):
        align(a.model, t3, [("feat", "feat")])
    # Aligning twice from the same student is fine (separate training models).
    b = align(s, t3, [("feat", "feat")])
    assert b.model is not a.model and b.export().get_config() == s.get_config()


def test_nested_backbone_rerun_keeps_the_call_arguments(K):
    # The transfer-learning pattern `backbone(x, training=False)`: re-running the
    # backbone inline to reach a nested tap must keep what that call does to
    # BatchNormalization (tf_keras keeps it frozen; Keras 3's fit overrides the
    # stored training=False). Reference: one step of the student's own fit.
    b_in = K.Input((8, 8, 1))
    b = K.layers.Conv2D(4, 3, padding="same", name="b_conv")(b_in)
    b = K.layers.BatchNormalization(name="b_bn")(b)
    backbone = K.Model(b_in, K.layers.Activation("relu", name="b_relu")(b), name="backbone")
    inp = K.Input((8, 8, 1))
    h = backbone(inp, training=False)
    student = K.Model(inp, K.layers.Dense(3)(K.layers.GlobalAveragePooling2D()(h)), name="s")
    teacher = net(K, (8, 8, 6), "t", frozen=True)
    a = align(student, teacher, [("b_relu", "feat")], weight=0.0)
    assert a.pairs[0].student_layer == "backbone/b_relu"
    initial = [w.copy() for w in student.get_weights()]
    initial_stats = [w.copy() for w in backbone.get_layer("b_bn").get_weights()[2:]]
    kd = losses_lib.DistillationLoss()
    a.model.compile(optimizer="sgd", loss=a.loss(kd))
    a.model.fit(a.attach(tf.data.Dataset.from_tensor_slices((X, Y)).batch(6)), epochs=1, verbose=0)
    aligned_stats = [w.copy() for w in backbone.get_layer("b_bn").get_weights()[2:]]
    student.set_weights(initial)
    student.compile(optimizer="sgd", loss=kd)
    student.fit(data_lib.with_teacher(tf.data.Dataset.from_tensor_slices((X, Y)).batch(6), teacher),
                epochs=1, verbose=0)
    for own, aligned in zip(backbone.get_layer("b_bn").get_weights()[2:], aligned_stats):
        np.testing.assert_allclose(aligned, own, rtol=1e-6, atol=1e-7)
    if _compat.flavour_of(student) == "tf_keras":
        for before, after in zip(initial_stats, aligned_stats):
            np.testing.assert_array_equal(before, after)


# Reads the `feature_loss` metric, which Keras 3 cannot log on JAX (keras-team/keras#21639);
# the same losses on JAX: tests/test_jax_alignment.py.
@pytest.mark.backend("tensorflow")
def test_per_pair_losses_weights_and_custom_callable(K):
    s, t = net(K, (4, 4, 8), "s"), net(K, (4, 4, 8), "t", frozen=True)

    def max_abs(teacher_features, student_features):
        diff = tf.reshape(student_features - teacher_features, [tf.shape(student_features)[0], -1])
        return tf.reduce_max(tf.abs(diff), axis=-1)

    a = align(s, t, [("feat", "feat"), ("pre", "pre")], feature_loss=["l1", max_abs], weight=[0.2, 0.7])
    assert [p.feature_loss for p in a.pairs] == ["l1", "max_abs"]
    assert a.feature_weight == pytest.approx([0.2, 0.7])
    a.model.compile(optimizer="sgd", loss=a.loss(losses_lib.DistillationLoss()))
    result = a.model.evaluate(a.attach(tf.data.Dataset.from_tensor_slices((X, Y)).batch(6)), verbose=0,
                              return_dict=True)
    f_s, f_t = feature_of(K, s).predict(X, verbose=0), feature_of(K, t).predict(X, verbose=0)
    p_s, p_t = feature_of(K, s, "pre").predict(X, verbose=0), feature_of(K, t, "pre").predict(X, verbose=0)
    expected = 0.2 * np.mean(np.abs(f_s - f_t)) + 0.7 * np.mean(np.abs(p_s - p_t).max(axis=1))
    np.testing.assert_allclose(result["feature_loss"], expected, rtol=1e-4)


# Reads the `feature_loss` metric, which Keras 3 cannot log on JAX (keras-team/keras#21639);
# the same losses on JAX: tests/test_jax_alignment.py.
@pytest.mark.backend("tensorflow")
@pytest.mark.parametrize("structure", ["list", "dict"])
def test_multi_input_models(K, structure):
    def make(name, width):
        a_in, b_in = K.Input((4,), name="a"), K.Input((3,), name="b")
        h = K.layers.Concatenate()([K.layers.Dense(width, name="da")(a_in), b_in])
        feat = K.layers.Dense(width, name="feat")(h)
        inputs = [a_in, b_in] if structure == "list" else {"b": b_in, "a": a_in}
        return K.Model(inputs, K.layers.Dense(2)(feat), name=name)

    s, t = make("s", 4), make("t", 8)
    t.trainable = False
    a = align(s, t, [("feat", "feat")])
    rng = np.random.default_rng(3)
    xa, xb = rng.normal(size=(6, 4)).astype("float32"), rng.normal(size=(6, 3)).astype("float32")
    x = (xa, xb) if structure == "list" else {"a": xa, "b": xb}
    a.model.compile(optimizer="sgd", loss=a.loss(losses_lib.DistillationLoss()))
    ds = tf.data.Dataset.from_tensor_slices((x, Y % 2)).batch(6)
    result = a.model.evaluate(a.attach(ds), verbose=0, return_dict=True)
    f_s = K.Model(s.input, s.get_layer("feat").output).predict(x, verbose=0)
    f_t = K.Model(t.input, t.get_layer("feat").output).predict(x, verbose=0)
    kernel, bias = a.model.get_layer("kd_proj0_dense").get_weights()
    np.testing.assert_allclose(result["feature_loss"], 0.5 * np.mean((f_s @ kernel + bias - f_t) ** 2), rtol=1e-4)


def test_custom_layer_inside_functional_student(K):
    class Scale(K.layers.Layer):  # a subclassed layer, not registered
        def __init__(self, factor=2.0, **kwargs):
            super().__init__(**kwargs)
            self.factor = factor

        def call(self, x):
            return x * self.factor

        def get_config(self):
            return {**super().get_config(), "factor": self.factor}

    inp = K.Input((8, 8, 1))
    h = Scale(3.0, name="scale")(K.layers.Conv2D(4, 3, padding="same", name="conv")(inp))
    student = K.Model(inp, K.layers.Dense(3)(K.layers.Flatten()(h)), name="s")
    teacher = net(K, (8, 8, 4), "t", frozen=True)
    a = align(student, teacher, [("scale", "feat")])
    assert a.pairs[0].steps == "identity (shapes already match)"
    clean = a.export(custom_objects={"Scale": Scale})
    assert clean.get_config() == student.get_config()
    np.testing.assert_allclose(clean.predict(X, verbose=0), student.predict(X, verbose=0), rtol=1e-6)


# ---------------------------------------------------------------------------
# "attention" by name, by function or partial: one behaviour
# ---------------------------------------------------------------------------


# Reads the `feature_loss` metric, which Keras 3 cannot log on JAX (keras-team/keras#21639);
# the same losses on JAX: tests/test_jax_alignment.py.
@pytest.mark.backend("tensorflow")
@pytest.mark.parametrize("s_shape,t_shape", [((4, 4, 8), (2, 2, 32)), ((4, 4, 8), (4, 4, 16)), ((12, 8), (6, 4))])
def test_attention_by_name_or_function_is_the_same(K, s_shape, t_shape):
    import functools

    results = []
    for loss in ("attention", alignment.attention_transfer, functools.partial(alignment.attention_transfer, p=2.0)):
        K.utils.set_random_seed(0)
        s, t = net(K, s_shape, "s"), net(K, t_shape, "t", frozen=True)
        a = align(s, t, [("feat", "feat")], feature_loss=loss, weight=0.7)
        a.model.compile("sgd", loss=a.loss())
        data = a.attach(tf.data.Dataset.from_tensor_slices((X, Y)).batch(len(X)))
        value = a.model.evaluate(data, verbose=0, return_dict=True)["feature_loss"]
        # No channel projector: only positions are matched (pooled or interpolated).
        assert "conv" not in a.pairs[0].steps and "Dense" not in a.pairs[0].steps, a.pairs[0].steps
        assert a.pairs[0].feature_loss == "attention"
        f_s = projected(K, a).predict(X, verbose=0)
        f_t = next(iter(data))[0][1].numpy()
        want = 0.7 * ((np_attention(f_s) - np_attention(f_t)) ** 2).mean(1).mean()
        np.testing.assert_allclose(value, want, rtol=1e-4)
        results.append((a.pairs[0].steps, value))
    assert results[0] == results[1] == results[2]


def test_attention_function_needs_positions(K):
    s, t = net(K, (4, 4, 8), "s"), net(K, (16,), "t", frozen=True)
    with pytest.raises(ValueError, match=r"attention.*needs \(H, W, C\) maps"):
        align(s, t, [("feat", "feat")], feature_loss=alignment.attention_transfer)


# ---------------------------------------------------------------------------
# A saved training model loads in a fresh process
# ---------------------------------------------------------------------------

_FRESH_LOAD = """
import os, sys, json
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow as tf
import keras_kd  # registers the loss and the feature-loss layer
for request in sys.stdin:  # one JSON line per check: [flavour, data_path, *paths]
    flavour, data_path, *paths = json.loads(request)
    K = __import__(flavour)
    d = np.load(data_path)
    targets = keras_kd.TeacherTargets(labels=d["y"], logits=d["t"])
    ds = tf.data.Dataset.from_tensor_slices(((d["x"], d["f"]), targets)).batch(3)
    out = {}
    for path in paths:
        model = K.models.load_model(path)
        result = model.evaluate(ds, verbose=0, return_dict=True)
        logits = model.predict((d["x"], d["f"]), verbose=0)
        history = model.fit(ds, epochs=1, verbose=0)
        out[path] = {"loss": result["loss"], "feature_loss": result["feature_loss"],
                     "logits": logits.tolist(), "trained": bool(np.isfinite(history.history["loss"]).all())}
    print("RESULT" + json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def fresh_loader(tmp_path_factory):
    """A fresh process that never saw the models (it imports keras_kd, then loads what it is sent),
    shared by both flavours' checks: a second interpreter would only import TensorFlow again (~10 CPU-s)."""
    import queue
    import subprocess
    import sys
    import threading

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    stderr = open(tmp_path_factory.mktemp("fresh_load") / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, "-c", _FRESH_LOAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=stderr, text=True, env=env, cwd=root)
    lines = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put(None)], daemon=True).start()

    def load(*args):
        assert proc.poll() is None, f"the loading process ended ({proc.returncode})"
        proc.stdin.write(json.dumps(args) + "\n")
        proc.stdin.flush()
        while (line := lines.get(timeout=600)) is not None:
            if line.startswith("RESULT"):
                return json.loads(line[len("RESULT"):])
        stderr.seek(0)
        raise AssertionError(f"the loading process ended ({proc.wait()}):\n{stderr.read()[-3000:]}")

    yield load
    proc.stdin.close()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
    stderr.close()


# Reads the `feature_loss` metric, which Keras 3 cannot log on JAX (keras-team/keras#21639);
# the same losses on JAX: tests/test_jax_alignment.py.
@pytest.mark.backend("tensorflow")
def test_saved_aligned_model_loads_in_a_fresh_process(K, tmp_path, fresh_loader):
    s, t = net(K, (4, 4, 8), "s"), net(K, (2, 2, 16), "t", frozen=True)
    a = align(s, t, [("feat", "feat")], weight=0.3)
    kd = losses_lib.DistillationLoss(temperature=3.0, alpha=0.2)
    a.model.compile("adam", loss=a.loss(kd), metrics=["accuracy"])
    data = a.attach(tf.data.Dataset.from_tensor_slices((X, Y)).batch(3))
    a.model.fit(data, epochs=1, verbose=0)
    want = a.model.evaluate(data, verbose=0, return_dict=True)
    (x, f), targets = next(iter(a.attach(tf.data.Dataset.from_tensor_slices((X, Y)).batch(len(X)))))
    np.savez(tmp_path / "data.npz", x=x.numpy(), f=f.numpy(), y=Y, t=targets.logits.numpy())
    formats = ["m.keras"] if K.__name__ == "keras" else ["m.keras", "m.h5"]
    paths = [str(tmp_path / name) for name in formats]
    for path in paths:
        a.model.save(path)
    results = fresh_loader(K.__name__, str(tmp_path / "data.npz"), *paths)
    for path in paths:
        got = results[path]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), path
        assert got["feature_loss"] == pytest.approx(want["feature_loss"], rel=1e-5), path
        np.testing.assert_allclose(got["logits"], s.predict(X, verbose=0), rtol=1e-5, atol=1e-6)
        assert got["trained"], path
