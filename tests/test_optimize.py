"""Tests for keras_kd.optimize: the Keras 3 <-> tf_keras bridge, pruning and
quantization-aware training with distillation, TFLite conversion and LiteRT
evaluation.

References are independent of the code under test: the source model's own
outputs (bridge), NumPy counts of zero weights (sparsity), tf_keras's own
``predict`` of the QAT model (TFLite), hand-written quantization formulas.
The bridge runs in both directions (the ``K`` fixture builds the source
model); tfmot accepts only tf_keras models, so the tfmot tests use tf_keras.
"""

import os
import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import keras_kd
from keras_kd import optimize
from keras_kd.cache import cache_teacher_logits

RNG = np.random.default_rng(0)
X = RNG.normal(size=(96, 16)).astype("float32")
Y = RNG.integers(0, 4, size=96)


def other(K):
    """(convert, convert_back, target module) for a model built with ``K``."""
    if K is keras:
        return optimize.to_tf_keras, optimize.to_keras3, tf_keras
    return optimize.to_keras3, optimize.to_tf_keras, keras


def outputs(model, x):
    return np.asarray(model(x, training=False))


def mlp(K, hidden=32, classes=4, name="student"):
    inp = K.Input((16,), name="features")
    h = K.layers.Dense(hidden, activation="relu", name="hidden")(inp)
    return K.Model(inp, K.layers.Dense(classes, name="logits")(h), name=name)


@pytest.fixture(scope="module")
def teacher():
    tf_keras.utils.set_random_seed(1)
    model = mlp(tf_keras, hidden=64, name="teacher")
    model.compile(
        tf_keras.optimizers.Adam(1e-2), tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(X, Y, epochs=5, verbose=0)
    model.trainable = False
    return model


def batches(teacher, batch=32):
    raw = tf.data.Dataset.from_tensor_slices((X, Y)).batch(batch)
    return keras_kd.with_teacher(raw, teacher)


# ---------------------------------------------------------------------------
# Bridge: one model per family of layers, both directions
# ---------------------------------------------------------------------------


def cnn(K):
    L = K.layers
    inp = K.Input((8, 8, 3), name="image")
    h = L.Conv2D(4, 3, padding="same", activation="relu")(inp)
    h = L.BatchNormalization()(h)
    h = L.DepthwiseConv2D(3, padding="same")(h)
    h = L.SeparableConv2D(4, 3)(h)
    h = L.MaxPooling2D()(h)
    h = L.Add()([h, L.AveragePooling2D(pool_size=1)(h)])
    h = L.ZeroPadding2D()(h)
    h = L.UpSampling2D()(h)
    h = L.Conv2D(2, 1, strides=2)(h)
    h = L.Concatenate()([L.GlobalAveragePooling2D()(h), L.GlobalMaxPooling2D()(h), L.Flatten()(h)])
    h = L.Dropout(0.5)(h)
    h = L.Dense(16)(h)
    h = L.LeakyReLU(0.2)(h)
    h = L.Activation("gelu")(h)
    h = L.ReLU(max_value=6.0)(h)
    h = L.LayerNormalization()(h)
    h = L.Lambda(lambda v: v * 2.0)(h)
    h = L.Reshape((4, 4))(h)
    h = L.GlobalAveragePooling1D()(h)
    model = K.Model(inp, L.Dense(5)(h), name="cnn")
    bn = [layer for layer in model.layers if isinstance(layer, L.BatchNormalization)][0]
    # Non-trivial moving statistics, so that inference-mode BN is checked.
    bn.set_weights([RNG.uniform(0.5, 2.0, size=w.shape).astype("float32") for w in bn.get_weights()])
    return model, RNG.normal(size=(4, 8, 8, 3)).astype("float32")


def rnn(K):
    L = K.layers
    tokens = K.Input((6,), dtype="int32")
    h = L.Embedding(20, 8, mask_zero=True)(tokens)
    h = L.LSTM(8, return_sequences=True)(h)
    h = L.GRU(4)(h)
    # Padding at the end: the output depends on the mask reaching the LSTM.
    x = np.array([[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 9]], dtype="int32")
    return K.Model(tokens, L.Dense(3)(h), name="rnn"), x


def sequential(K):
    model = K.Sequential(
        [K.Input((16,)), K.layers.Dense(8, activation="tanh"), K.layers.Dropout(0.1), K.layers.Dense(4)],
        name="seq",
    )
    return model, X[:5]


def nested(K):
    inner = K.Sequential([K.Input((8,)), K.layers.Dense(8, activation="relu")], name="inner")
    inp = K.Input((16,))
    h = inner(K.layers.Dense(8)(inp))
    return K.Model(inp, K.layers.Dense(4)(h), name="outer"), X[:5]


def attention(K):
    q = K.Input((4, 6))
    h = K.layers.MultiHeadAttention(2, 3)(q, q)
    model = K.Model(q, K.layers.Dense(2)(K.layers.Flatten()(h)), name="mha")
    return model, RNG.normal(size=(2, 4, 6)).astype("float32")


@pytest.mark.parametrize("build", [cnn, rnn, sequential, nested, attention], ids=lambda f: f.__name__)
def test_bridge_round_trip_keeps_outputs(K, build):
    model, x = build(K)
    convert, back, target = other(K)
    expected = outputs(model, x)
    weights_before = [w.copy() for w in model.get_weights()]

    converted = convert(model)
    assert type(converted).__module__.split(".")[0] == target.__name__
    np.testing.assert_allclose(outputs(converted, x), expected, atol=1e-5)
    assert type(converted).__name__ == type(model).__name__  # Sequential stays Sequential
    assert [layer.name for layer in converted.layers] == [layer.name for layer in model.layers]

    returned = back(converted)
    np.testing.assert_allclose(outputs(returned, x), expected, atol=1e-5)
    # The source is left alone and shares no variables with the copy.
    for w in converted.weights:
        w.assign(tf.zeros_like(w))
    for before, after in zip(weights_before, model.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_bridge_error_lists_every_unconvertible_layer():
    L = keras.layers

    class Doubling(L.Layer):
        def call(self, x):
            return x * 2

    inp = keras.Input((4,))
    h = Doubling(name="doubling")(L.Dense(4)(inp))
    h = keras.ops.add(h, h)
    h = L.RMSNormalization(name="rms")(h)
    h = L.Dense(3, lora_rank=2, name="low_rank")(h)
    with pytest.raises(ValueError) as info:
        optimize.to_tf_keras(keras.Model(inp, h, name="odd"))
    message = str(info.value)
    assert "4 layer(s) or op(s) cannot be converted" in message
    assert "doubling (Doubling): custom layer class" in message and "custom_objects=" in message
    assert re.search(r"add(_\d+)? \(Add\): a Keras 3 operation", message)
    assert "rms (RMSNormalization): tf_keras.layers has no 'RMSNormalization' layer" in message
    assert "low_rank (Dense): argument `lora_rank=2`" in message


def test_bridge_custom_objects_and_bad_inputs():
    class Doubling(keras.layers.Layer):
        def call(self, x):
            return x * 2

    class TfkDoubling(tf_keras.layers.Layer):
        def call(self, x):
            return x * 2

    inp = keras.Input((16,))
    model = keras.Model(inp, Doubling(name="doubling")(keras.layers.Dense(4)(inp)))
    converted = optimize.to_tf_keras(model, custom_objects={"Doubling": TfkDoubling})
    np.testing.assert_allclose(outputs(converted, X[:4]), outputs(model, X[:4]), atol=1e-5)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    sub = Subclassed()
    sub(X[:1])
    with pytest.raises(ValueError, match="sub .*subclassed model"):
        optimize.to_tf_keras(sub)
    with pytest.raises(TypeError, match="Expected `model` to be a Keras 3 model"):
        optimize.to_tf_keras(mlp(tf_keras))
    with pytest.raises(TypeError, match="Expected `model` to be a tf_keras model"):
        optimize.to_keras3(mlp(keras))
    with pytest.raises(TypeError, match="Expected `model` to be a Keras 3 or tf_keras `Model`"):
        optimize.to_tf_keras("model")


# ---------------------------------------------------------------------------
# Pruning with distillation
# ---------------------------------------------------------------------------


def test_prune_with_distillation_reaches_target_and_strip_keeps_it(teacher):
    tf_keras.utils.set_random_seed(0)
    student = mlp(tf_keras)
    before = [w.copy() for w in student.get_weights()]
    # 3 batches per epoch; the schedule ends at step 12, training runs 18 steps.
    pruned, callbacks = optimize.prune_for_distillation(student, 0.75, end_step=12, teacher=teacher)
    assert [type(c).__name__ for c in callbacks] == ["UpdatePruningStep"]
    pruned.compile(tf_keras.optimizers.Adam(1e-3), loss=keras_kd.DistillationLoss(), metrics=["accuracy"])
    history = pruned.fit(batches(teacher), epochs=6, callbacks=callbacks, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))

    stripped = optimize.strip(pruned)
    assert [type(layer).__name__ for layer in stripped.layers] == ["InputLayer", "Dense", "Dense"]
    # Independent count: zeros in each kernel, read straight from the layers.
    for name in ("hidden", "logits"):
        kernel = stripped.get_layer(name).kernel.numpy()
        assert np.mean(kernel == 0) == pytest.approx(0.75, abs=0.01)
    assert optimize.sparsity(stripped) == pytest.approx({"hidden": 0.75, "logits": 0.75}, abs=0.01)
    assert optimize.sparsity(pruned) == optimize.sparsity(stripped)  # names match across strip
    np.testing.assert_allclose(outputs(stripped, X), outputs(pruned, X), atol=1e-6)
    # The student passed in is untouched (tfmot alone would have pruned it in place).
    for b, a in zip(before, student.get_weights()):
        np.testing.assert_array_equal(b, a)
    # Stripping twice is safe, and a stripped float model comes back to Keras 3.
    np.testing.assert_allclose(outputs(optimize.strip(stripped), X), outputs(stripped, X), atol=1e-6)
    back = optimize.to_keras3(stripped)
    assert optimize.sparsity(back) == optimize.sparsity(stripped)


def test_prune_with_cached_teacher_and_hard_sample_reweighting(teacher, tmp_path):
    raw = tf.data.Dataset.from_tensor_slices((X, Y))
    cache = cache_teacher_logits(teacher, str(tmp_path / "cache"), verbose=0)
    cached = raw.apply(cache)
    reweighting = keras_kd.HardSampleReweighting(warmup_epochs=1)
    train = reweighting.attach(cached).shuffle(96, seed=0).batch(32)
    student = mlp(tf_keras)
    pruned, callbacks = optimize.prune_for_distillation(student, 0.5, end_step=9, teacher=cache)
    pruned.compile(tf_keras.optimizers.Adam(1e-3), loss=keras_kd.DistillationLoss(), metrics=["accuracy"])
    history = pruned.fit(train, epochs=4, callbacks=callbacks + [reweighting], verbose=0)
    assert "kd_weight_mean" in history.history
    assert min(optimize.sparsity(optimize.strip(pruned)).values()) >= 0.49


def test_prune_chosen_layers_only():
    student = mlp(tf_keras)
    pruned, _ = optimize.prune_for_distillation(student, 0.5, end_step=10, layers=["hidden"])
    kinds = {layer.name: type(layer).__name__ for layer in pruned.layers}
    assert kinds == {
        "features": "InputLayer",
        "prune_low_magnitude_hidden": "PruneLowMagnitude",
        "logits": "Dense",
    }
    with pytest.raises(ValueError, match=r"Unknown: \['hiden'\]. The model's layers are"):
        optimize.prune_for_distillation(student, 0.5, end_step=10, layers=["hiden"])
    # Sequential models, and layers chosen by class.
    seq = tf_keras.Sequential([tf_keras.Input((16,)), tf_keras.layers.Dense(8), tf_keras.layers.Dropout(0.1)])
    pruned, _ = optimize.prune_for_distillation(seq, 0.5, end_step=10, layers=[tf_keras.layers.Dense])
    assert [type(layer).__name__ for layer in pruned.layers] == ["PruneLowMagnitude", "Dropout"]
    np.testing.assert_allclose(outputs(pruned, X), outputs(seq, X), atol=1e-6)  # weights carried over


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_sparsity=1.0, end_step=10), r"`target_sparsity` in \[0, 1\). Received: .*=1.0"),
        (dict(target_sparsity=0.5, end_step=0), r"`end_step` > `begin_step`. Received: .*end_step=0"),
        (dict(target_sparsity=0.5, end_step=10, frequency=3), r"multiple of `frequency`.*frequency=3"),
        (dict(target_sparsity=0.2, initial_sparsity=0.5, end_step=10), r"initial_sparsity=0.5, target_sp"),
        (dict(target_sparsity=0.5, end_step=10, block_pooling_type="MIN"), r"block_pooling_type='MIN'"),
    ],
)
def test_prune_argument_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optimize.prune_for_distillation(mlp(tf_keras), **kwargs)


class _Scale(tf_keras.layers.Layer):
    """A custom layer with a weight and no PrunableLayer / QuantizeConfig."""

    def build(self, shape):
        self.scale = self.add_weight(name="scale", shape=(shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.scale


def _with_custom_layer():
    inp = tf_keras.Input((16,))
    h = _Scale(name="my_scale")(tf_keras.layers.Dense(8, name="hidden")(inp))
    return tf_keras.Model(inp, tf_keras.layers.Dense(4, name="logits")(h), name="custom")


def test_tfmot_refusals_name_the_layer_and_the_fix():
    model = _with_custom_layer()
    with pytest.raises(ValueError) as info:
        optimize.prune_for_distillation(model, 0.5, end_step=10)
    assert "my_scale (_Scale): custom layer class" in str(info.value)
    assert "PrunableLayer" in str(info.value) and "layers=[...]" in str(info.value)
    optimize.prune_for_distillation(model, 0.5, end_step=10, layers=["hidden", "logits"])  # the way out

    with pytest.raises(ValueError) as info:
        optimize.quantize_for_distillation(model)
    assert "my_scale (_Scale): custom layer class" in str(info.value) and "QuantizeConfig" in str(info.value)
    optimize.quantize_for_distillation(model, layers=["hidden"])

    keras3 = mlp(keras)
    for call in (
        lambda: optimize.prune_for_distillation(keras3, 0.5, end_step=10),
        lambda: optimize.quantize_for_distillation(keras3),
        lambda: optimize.strip(keras3),
    ):
        with pytest.raises(TypeError, match=r"Keras 3 model \('student'\).*to_tf_keras"):
            call()

    class Subclassed(tf_keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.dense = tf_keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    sub = Subclassed()
    sub(X[:1])
    with pytest.raises(TypeError, match=r"\('sub', Subclassed\) is a subclassed model"):
        optimize.prune_for_distillation(sub, 0.5, end_step=10)


def test_student_class_count_must_match_teacher(teacher, tmp_path):
    student = mlp(tf_keras, classes=5)
    pattern = r"Received: the student 'student': 5, the teacher 'teacher': 4\. Give the student a 4-unit"
    with pytest.raises(ValueError, match=pattern):
        optimize.prune_for_distillation(student, 0.5, end_step=10, teacher=teacher)
    cache = cache_teacher_logits(teacher, str(tmp_path / "cache"), verbose=0)
    with pytest.raises(ValueError, match="has not been built yet"):
        optimize.check_num_classes(student, cache)
    tf.data.Dataset.from_tensor_slices((X, Y)).apply(cache)
    pattern = r"Received: the student 'student': 5, the teacher-logit cache at .*: 4\."
    with pytest.raises(ValueError, match=pattern):
        optimize.quantize_for_distillation(student, teacher=cache)
    with pytest.raises(ValueError, match=pattern):
        optimize.check_num_classes(student, str(tmp_path / "cache"))  # the directory alone
    assert optimize.check_num_classes(mlp(tf_keras), cache) == 4
    # Either flavour on either side: counts come from the output shapes.
    with pytest.raises(ValueError, match=r"Received: the student 'student': 4, the teacher 'k3': 10\."):
        optimize.check_num_classes(mlp(tf_keras), mlp(keras, classes=10, name="k3"))
    assert optimize.check_num_classes(mlp(keras), 4) == 4
    with pytest.raises(TypeError, match="Expected `teacher` to be a Keras model"):
        optimize.check_num_classes(student, 4.5)
    with pytest.raises(ValueError, match=r"Expected `teacher` to be a positive integer. Received: teacher=0"):
        optimize.check_num_classes(student, 0)
    # An ensemble (issue 17): its members must agree, and the student with them.
    ensemble = [mlp(keras, name="a"), mlp(tf_keras, name="b")]
    assert optimize.check_num_classes(mlp(tf_keras), ensemble) == 4
    with pytest.raises(ValueError, match=r"the student 'student': 5, the teachers \['a', 'b'\]: 4"):
        optimize.check_num_classes(student, ensemble)
    with pytest.raises(ValueError, match=r"teacher 1 \('c'\): 5"):
        optimize.check_num_classes(student, [mlp(keras, name="a"), mlp(keras, classes=5, name="c")])


# ---------------------------------------------------------------------------
# Quantization-aware training with distillation
# ---------------------------------------------------------------------------


def test_qat_trains_with_distillation_loss_and_leaves_student_alone(teacher):
    student = mlp(tf_keras)
    before = [w.copy() for w in student.get_weights()]
    qat = optimize.quantize_for_distillation(student, teacher=teacher)
    kinds = [type(layer).__name__ for layer in qat.layers]
    assert kinds == ["InputLayer", "QuantizeLayer", "QuantizeWrapperV2", "QuantizeWrapperV2"]
    # The float weights are carried over (activation ranges are learned in training).
    np.testing.assert_array_equal(qat.get_layer("quant_hidden").weights[0].numpy(), before[0])
    qat.compile(tf_keras.optimizers.Adam(1e-3), loss=keras_kd.DistillationLoss(), metrics=["accuracy"])
    kernel = qat.get_layer("quant_hidden").weights[0].numpy().copy()
    history = qat.fit(batches(teacher).take(1), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.array_equal(kernel, qat.get_layer("quant_hidden").weights[0].numpy())
    for b, a in zip(before, student.get_weights()):
        np.testing.assert_array_equal(b, a)
    with pytest.raises(ValueError, match="already quantization-aware"):
        optimize.quantize_for_distillation(qat)
    # `strip` keeps quantization wrappers (and the learned ranges).
    np.testing.assert_allclose(outputs(optimize.strip(qat), X), outputs(qat, X), atol=1e-6)
    with pytest.raises(ValueError, match="quantization-aware layer.*to_tflite"):
        optimize.to_keras3(qat)


def test_partial_quantization_wraps_only_the_chosen_layers(teacher):
    qat = optimize.quantize_for_distillation(mlp(tf_keras), layers=["hidden"])
    kinds = [type(layer).__name__ for layer in qat.layers]
    assert kinds == ["InputLayer", "QuantizeLayer", "QuantizeWrapperV2", "Dense"]
    qat.compile(tf_keras.optimizers.Adam(1e-3), loss=keras_kd.DistillationLoss())
    qat.fit(batches(teacher).take(1), verbose=0)
    seq = tf_keras.Sequential([tf_keras.Input((16,)), tf_keras.layers.Dense(8, name="a"), tf_keras.layers.Dense(4)])
    qat = optimize.quantize_for_distillation(seq, layers=lambda layer: layer.name == "a")
    assert [type(layer).__name__ for layer in qat.layers] == ["QuantizeLayer", "QuantizeWrapperV2", "Dense"]
    qat = optimize.quantize_for_distillation(seq, layers=[seq.layers[-1]])  # a layer object
    # tfmot also quantizes the output (only) of the float layer feeding a quantized one.
    assert [layer.name for layer in qat.layers] == ["quant_a", "quant_" + seq.layers[-1].name]
    assert type(qat.layers[0].quantize_config).__name__ == "OutputOnlyConfig"


def test_prune_preserving_qat_keeps_the_zeros(teacher):
    pruned, callbacks = optimize.prune_for_distillation(mlp(tf_keras), 0.75, end_step=6)
    pruned.compile(tf_keras.optimizers.Adam(1e-3), loss=keras_kd.DistillationLoss())
    pruned.fit(batches(teacher), epochs=3, callbacks=callbacks, verbose=0)
    with pytest.raises(ValueError, match="still has tfmot pruning wrappers.*strip"):
        optimize.quantize_for_distillation(pruned, preserve_sparsity=True)
    with pytest.raises(ValueError, match="still has tfmot pruning wrappers.*strip"):
        optimize.to_tflite(pruned)
    with pytest.raises(ValueError, match="pruning wrapper; remove the wrappers first"):
        optimize.to_keras3(pruned)
    sparse = optimize.strip(pruned)
    pqat = optimize.quantize_for_distillation(sparse, preserve_sparsity=True)
    pqat.compile(tf_keras.optimizers.Adam(1e-2), loss=keras_kd.DistillationLoss())
    pqat.fit(batches(teacher), epochs=2, verbose=0)
    kernel = pqat.get_layer("quant_hidden").weights[0].numpy()
    assert np.mean(kernel == 0) >= 0.74
    assert min(optimize.sparsity(pqat).values()) >= 0.74
    # Plain QAT does not keep them: the reason PQAT exists, and it says so.
    hand = np.mean(sparse.get_layer("hidden").kernel.numpy() == 0)
    with pytest.warns(UserWarning, match=rf"hidden: {hand:.2f}.* zeros; pruned\?.*preserve_sparsity=True"):
        qat = optimize.quantize_for_distillation(sparse)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dense student: no warning
        optimize.quantize_for_distillation(mlp(tf_keras))
    qat.compile(tf_keras.optimizers.Adam(1e-2), loss=keras_kd.DistillationLoss())
    qat.fit(batches(teacher), epochs=2, verbose=0)
    assert np.mean(qat.get_layer("quant_hidden").weights[0].numpy() == 0) < 0.5


# ---------------------------------------------------------------------------
# TFLite conversion and LiteRT evaluation
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_qat(teacher):
    tf_keras.utils.set_random_seed(0)
    qat = optimize.quantize_for_distillation(mlp(tf_keras))
    qat.compile(tf_keras.optimizers.Adam(3e-3), loss=keras_kd.DistillationLoss())
    qat.fit(batches(teacher), epochs=5, verbose=0)
    return qat


def _tensor_types(flatbuffer):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    return interpreter, {d["name"]: d["dtype"] for d in interpreter.get_tensor_details()}


def test_qat_tflite_int8_matches_the_keras_model(trained_qat, tmp_path):
    path = tmp_path / "student.tflite"
    flatbuffer = optimize.to_tflite(trained_qat, path=path)
    assert path.read_bytes() == flatbuffer
    _, types = _tensor_types(flatbuffer)
    assert sum(t == np.int8 for t in types.values()) >= 4  # int8 weights and activations

    expected = trained_qat.predict(X, verbose=0)
    accuracy, logits = optimize.evaluate_tflite(str(path), (X, Y), return_logits=True)
    # Integer-only I/O: evaluate_tflite quantizes inputs and dequantizes logits.
    int8_io = optimize.to_tflite(trained_qat, io_dtype="int8")
    interpreter, _ = _tensor_types(int8_io)
    assert interpreter.get_input_details()[0]["dtype"] == np.int8
    out_scale = interpreter.get_output_details()[0]["quantization"][0]
    accuracy8, logits8 = optimize.evaluate_tflite(int8_io, (X, Y), return_logits=True)
    # Tolerance: the fake-quant graph and the int8 kernels round the int32
    # accumulators differently, by at most one step per layer: 3 output steps.
    np.testing.assert_allclose(logits, expected, atol=3 * out_scale)
    np.testing.assert_allclose(logits8, expected, atol=3 * out_scale)
    keras_accuracy = np.mean(expected.argmax(-1) == Y)
    # A rounding step may flip an argmax between two nearly tied classes.
    assert abs(accuracy - keras_accuracy) <= 2 / len(Y)
    assert abs(accuracy8 - keras_accuracy) <= 2 / len(Y)


def test_evaluate_tflite_quantizes_inputs_by_the_formula(trained_qat):
    int8_io = optimize.to_tflite(trained_qat, io_dtype="int8")
    interpreter, _ = _tensor_types(int8_io)
    detail = interpreter.get_input_details()[0]
    scale, zero = detail["quantization"]
    x = X[:8]
    # Hand quantization: q = clip(round(x / scale) + zero, -128, 127).
    q = np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
    interpreter.resize_tensor_input(detail["index"], list(q.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(detail["index"], q)
    interpreter.invoke()
    out = interpreter.get_output_details()[0]
    o_scale, o_zero = out["quantization"]
    by_hand = (interpreter.get_tensor(out["index"]).astype(np.float32) - o_zero) * o_scale
    _, logits = optimize.evaluate_tflite(int8_io, tf.data.Dataset.from_tensor_slices(x), return_logits=True)
    np.testing.assert_array_equal(logits, by_hand)


def test_evaluate_tflite_reads_targets_one_hot_and_unbatched(trained_qat, teacher):
    flatbuffer = optimize.to_tflite(trained_qat)
    reference = optimize.evaluate_tflite(flatbuffer, (X, Y))
    assert optimize.evaluate_tflite(flatbuffer, batches(teacher)) == reference  # TeacherTargets labels
    one_hot = tf.data.Dataset.from_tensor_slices((X, np.eye(4)[Y]))  # unbatched
    assert optimize.evaluate_tflite(flatbuffer, one_hot, batch_size=7) == reference
    with pytest.raises(ValueError, match="no labels"):
        optimize.evaluate_tflite(flatbuffer, tf.data.Dataset.from_tensor_slices(X))
    with pytest.raises(ValueError, match=r"takes inputs of shape \[-1, 16\]"):
        optimize.evaluate_tflite(flatbuffer, (X[:, :8], Y))
    with pytest.raises(FileNotFoundError):
        optimize.evaluate_tflite("missing.tflite", (X, Y))


def test_float_models_of_both_flavours_convert(K):
    K.utils.set_random_seed(0)
    model = mlp(K)
    float_bytes = optimize.to_tflite(model, int8=False)
    _, logits = optimize.evaluate_tflite(float_bytes, (X, Y), return_logits=True)
    np.testing.assert_allclose(logits, outputs(model, X), atol=1e-5)

    with pytest.raises(ValueError, match="needs `representative_data`"):
        optimize.to_tflite(model)
    # Post-training full-integer quantization, calibrated on batched data.
    int8_bytes = optimize.to_tflite(model, tf.data.Dataset.from_tensor_slices((X, Y)).batch(8))
    _, types = _tensor_types(int8_bytes)
    assert sum(t == np.int8 for t in types.values()) >= 4
    _, int8_logits = optimize.evaluate_tflite(int8_bytes, (X, Y), return_logits=True)
    # Calibrated int8 keeps most decisions of a random-weight model.
    assert np.mean(int8_logits.argmax(-1) == logits.argmax(-1)) >= 0.9
    with pytest.raises(ValueError, match="io_dtype='int16'"):
        optimize.to_tflite(model, X, io_dtype="int16")


def test_failed_conversion_says_why():
    inp = tf_keras.Input((4,))
    det = tf_keras.layers.Lambda(lambda v: tf.linalg.det(tf.reshape(v, (-1, 2, 2))))(inp)
    model = tf_keras.Model(inp, det, name="determinant")
    with pytest.raises(optimize.TFLiteConversionError) as info:
        optimize.to_tflite(model, int8=False)
    message = str(info.value)
    assert message.startswith("TFLite conversion of `model` ('determinant') failed")
    assert "no TFLite builtin kernel: MatrixDeterminant" in message
    assert len(message) < 600  # the gist, not the converter's MLIR dump


def test_file_size():
    blob = b"\0" * 1000
    assert optimize.file_size(blob) == 1000
    assert optimize.file_size(blob, compressed=True) < 100
    dense = mlp(tf_keras, hidden=256)
    sparse = tf_keras.models.clone_model(dense)
    sparse.set_weights([np.where(RNG.random(w.shape) < 0.75, 0, w) for w in dense.get_weights()])
    # Zeros do not shrink a file; they compress.
    assert abs(optimize.file_size(sparse) - optimize.file_size(dense)) < 2048
    assert optimize.file_size(sparse, compressed=True) < 0.6 * optimize.file_size(dense, compressed=True)
    assert optimize.file_size(mlp(keras)) > 0


# ---------------------------------------------------------------------------
# Alignment composes
# ---------------------------------------------------------------------------


def test_alignment_then_tfmot_and_tfmot_then_alignment(teacher):
    from keras_kd.alignment import align

    raw = tf.data.Dataset.from_tensor_slices((X, Y)).batch(32)
    kd = keras_kd.DistillationLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # 1. align, train, export: the clean student is what tfmot wraps.
        aligned = align(mlp(tf_keras), teacher, pairs=[("hidden", "hidden")])
        aligned.model.compile("adam", loss=aligned.loss(kd))
        aligned.model.fit(aligned.attach(raw), verbose=0)
        clean = aligned.export()
        qat = optimize.quantize_for_distillation(clean, teacher=teacher)
        kernel = qat.get_layer("quant_hidden").weights[0].numpy()
        np.testing.assert_array_equal(kernel, clean.get_weights()[0])

        # 2. prune, then align the wrapped model: feature targets train the pruned student.
        pruned, callbacks = optimize.prune_for_distillation(mlp(tf_keras), 0.5, end_step=6)
        aligned = align(pruned, teacher, pairs=[("prune_low_magnitude_hidden", "hidden")])
        aligned.model.compile("adam", loss=aligned.loss(kd))
        aligned.model.fit(aligned.attach(raw), epochs=3, callbacks=callbacks, verbose=0)
    assert min(optimize.sparsity(optimize.strip(pruned)).values()) >= 0.49
    # export() rebuilds a plain student: for a wrapped one it says what to do instead.
    with pytest.raises(ValueError, match=r"optimize.strip\(model\)"):
        aligned.export()


def test_importing_tfmot_leaves_the_environment_alone():
    # tfmot's compat module sets TF_USE_LEGACY_KERAS=1 at import and reads
    # tf.keras; keras_kd imports it lazily, keeps tf.keras on the Keras the
    # environment chose, and puts the variable back. A fresh process shows it.
    import subprocess
    import sys

    code = (
        "import os, tensorflow as tf, tf_keras; from keras_kd import optimize; "
        "optimize.sparsity(tf_keras.Sequential([tf_keras.Input((2,)), tf_keras.layers.Dense(1)])); "
        "import sys; assert 'tensorflow_model_optimization' in sys.modules; "
        "print(os.environ.get('TF_USE_LEGACY_KERAS'), tf.keras.version()[0])"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.split()[-2:] == ["None", "3"]


def test_optimize_is_reachable_without_importing_tfmot():
    # Issue 16: `keras_kd.optimize` after a plain `import keras_kd`, and every
    # module of the package, without importing tfmot (it comes on first use).
    import subprocess
    import sys

    code = (
        "import sys, keras_kd; o = keras_kd.optimize; "
        "from keras_kd.optimize import bridge, pruning, qat, tflite, evaluate; "
        "assert o.to_tf_keras is bridge.to_tf_keras; "
        "print('tensorflow_model_optimization' in sys.modules, 'keras_tuner' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split()[-2:] == ["False", "False"]


def test_a_missing_private_attribute_names_it_and_the_version():
    from keras_kd import _compat

    class Graph:
        pass

    pattern = (
        rf"private attribute `Graph._nodes_by_depth` of tf_keras, and the installed tf_keras "
        rf"{re.escape(tf_keras.__version__)} does not have it"
    )
    with pytest.raises(_compat.PrivateAPIError, match=pattern):
        _compat.private_attribute(Graph(), "_nodes_by_depth", "tf_keras")
    # Each read the library relies on is there in the installed versions.
    assert _compat.private_attribute(tf_keras.layers.Dense(1), "_flatten_layers", "tf_keras")

