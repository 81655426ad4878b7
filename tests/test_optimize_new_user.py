"""A new user's students through keras_kd.optimize: a Conv1D student on
MNIST-1D-shaped inputs (40, 1), BatchNormalization, float16 and mixed precision.

What tfmot 0.8 cannot do (QAT of 1-D convolutions and pooling, a
BatchNormalization it cannot fold, any wrapper on mixed-precision layers,
TFLite kernels in float16) must be refused up front, naming the layers and
the way out, instead of a tfmot traceback or a silently different model; what
it can do must give the numbers the references give.
"""

import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from keras_kd import optimize

RNG = np.random.default_rng(0)
X1D = RNG.normal(size=(64, 40, 1)).astype("float32")


def conv1d_student(K, batch_norm=False):
    L = K.layers
    inp = K.Input((40, 1), name="signal")
    h = L.Conv1D(8, 5, padding="same", name="conv")(inp)
    if batch_norm:
        h = L.BatchNormalization(name="bn")(h)
    h = L.ReLU(name="relu")(h)
    h = L.MaxPooling1D(name="pool")(h)
    h = L.GlobalAveragePooling1D(name="gap")(h)
    return K.Model(inp, L.Dense(10, name="logits")(h), name="mnist1d_student")


def _litert(flatbuffer, x):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    rows = []
    for row in x:
        interpreter.set_tensor(inp["index"], row[None])
        interpreter.invoke()
        rows.append(interpreter.get_tensor(out["index"])[0])
    return np.stack(rows)


@pytest.mark.parametrize("preserve_sparsity", [False, True])
def test_conv1d_student_qat_is_refused_with_the_two_ways_out(preserve_sparsity):
    student = optimize.to_tf_keras(conv1d_student(keras, batch_norm=True))
    with pytest.raises(ValueError) as info:
        optimize.quantize_for_distillation(student, preserve_sparsity=preserve_sparsity)
    message = str(info.value)
    # Every layer tfmot refuses, at once (the prune-preserving scheme's registry
    # "supports" MaxPooling1D but then fails on it: listed too).
    assert "tfmot cannot quantize 3 layer(s)" in message
    for layer in ("conv (Conv1D)", "bn (BatchNormalization)", "pool (MaxPooling1D)"):
        assert layer in message
    assert "Conv2D(f, (k, 1))" in message and "to_tflite(student, representative_data=" in message
    assert "only together with the Conv2D, DepthwiseConv2D or Dense layer right before it" in message


def test_conv1d_student_post_training_int8_matches_litert_by_hand():
    student = conv1d_student(keras)
    for converted in (student, optimize.to_tf_keras(student)):
        flatbuffer = optimize.to_tflite(converted, X1D)  # MNIST-1D-shaped calibration data
        logits = _litert(flatbuffer, X1D)
        labels = logits.argmax(-1)
        labels[:16] = (labels[:16] + 1) % 10  # 48 of 64 right, by construction
        assert optimize.evaluate_tflite(flatbuffer, (X1D, labels), batch_size=10) == pytest.approx(48 / 64)
        # int8 outputs stay close to the float model (a tolerance of a few
        # quantization steps of the logits' range).
        reference = np.asarray(converted(X1D))
        assert np.abs(logits - reference).max() < 0.05 * np.abs(reference).max() + 1e-3


def test_partial_prune_preserving_qat_warns_about_sparse_float_layers():
    L = tf_keras.layers
    inp = tf_keras.Input((16,))
    h = L.Dense(16, name="stays_float")(inp)
    model = tf_keras.Model(inp, L.Dense(4, name="quantized")(h))
    kernel = model.get_layer("stays_float").get_weights()
    kernel[0][:, :8] = 0.0  # half zeros, as a stripped pruned layer
    model.get_layer("stays_float").set_weights(kernel)
    with pytest.warns(UserWarning, match=r"layers that stay float \(stays_float: 0.50 zeros\)"):
        optimize.quantize_for_distillation(model, layers=["quantized"], preserve_sparsity=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimize.quantize_for_distillation(model, preserve_sparsity=True)  # every layer quantized


def _dense(K, dtype):
    inp = K.Input((40,))
    h = K.layers.Dense(16, dtype=dtype, name="hidden")(inp)
    h = K.layers.BatchNormalization(dtype=dtype, name="bn")(h)
    h = K.layers.ReLU(dtype=dtype, name="relu")(h)  # Dense + BN + ReLU: tfmot folds it for QAT
    return K.Model(inp, K.layers.Dense(4, dtype="float32", name="logits")(h), name=f"{dtype}_student")


def _float32_copy(student):
    # The fix the errors give, verbatim.
    float_student = tf_keras.models.clone_model(
        student, clone_function=lambda layer: layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})
    )
    float_student.set_weights(student.get_weights())
    return float_student


def test_mixed_precision_is_refused_by_tfmot_wrappers_and_tflite():
    student = _dense(tf_keras, "mixed_float16")
    pattern = r"`student` \('mixed_float16_student'\) to compute in one dtype.*hidden \(mixed_float16\)"
    with pytest.raises(ValueError, match=pattern):
        optimize.prune_for_distillation(student, 0.5, end_step=4)
    with pytest.raises(ValueError, match=r"(?s)to compute in float32: tfmot's fake-quantization.*clone_model"):
        optimize.quantize_for_distillation(student)
    for model in (student, optimize.to_keras3(student)):
        with pytest.raises(ValueError, match=r"`to_tflite` needs .* float32: TFLite's builtin kernels"):
            optimize.to_tflite(model, int8=False)
    # The fix works: a float32 copy with the same (float32) weights.
    float_student = _float32_copy(student)
    x = RNG.normal(size=(8, 40)).astype("float32")
    np.testing.assert_allclose(float_student(x), student(x), atol=0.05)  # float16 compute vs float32
    optimize.quantize_for_distillation(float_student)
    flatbuffer = optimize.to_tflite(float_student, int8=False)
    np.testing.assert_allclose(_litert(flatbuffer, x), float_student(x), atol=1e-5)


def test_float16_student_prunes_to_the_target_but_is_refused_by_qat():
    tf_keras.utils.set_random_seed(0)
    student = _dense(tf_keras, "float16")
    pruned, callbacks = optimize.prune_for_distillation(student, 0.5, end_step=4)
    pruned.compile(tf_keras.optimizers.SGD(0.01), "mse")
    x = RNG.normal(size=(16, 40)).astype("float32")
    pruned.fit(x, np.zeros((16, 4), "float32"), batch_size=4, epochs=1, callbacks=callbacks, verbose=0)
    stripped = optimize.strip(pruned)
    kernel = stripped.get_layer("hidden").get_weights()[0]
    assert kernel.dtype == np.float16
    # tfmot keeps every weight whose magnitude equals the threshold (`abs >= k-th largest`);
    # float16 magnitudes tie often, so a few weights more than half may stay: at most 1%.
    assert 0.49 <= np.mean(kernel == 0) <= 0.5
    with pytest.raises(ValueError, match=r"hidden \(float16\)"):
        optimize.quantize_for_distillation(stripped)


def test_bridge_warns_when_weights_are_rounded_to_float16():
    # tf_keras keeps a float16 BatchNormalization's variables in float32,
    # Keras 3 in float16: the copy rounds them, and says so.
    student = _dense(tf_keras, "float16")
    bn = student.get_layer("bn")
    bn.set_weights([RNG.normal(size=16) + 1e-4 for _ in range(3)] + [RNG.uniform(0.5, 2.0, size=16)])
    with pytest.warns(UserWarning, match=re.escape("bn (float32 -> float16)")):
        converted = optimize.to_keras3(student)
    expected = [w.astype(np.float16) for w in bn.get_weights()]
    for got, want in zip(converted.get_layer("bn").get_weights(), expected):
        np.testing.assert_array_equal(got, want)  # rounded, nothing else
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimize.to_tf_keras(_dense(keras, "float16"))  # float16 -> float32 variables: exact


def test_a_keras3_quantized_model_is_refused_with_the_order_to_follow():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="a"), keras.layers.Dense(2, name="b")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Layer InputLayer does not have a `quantize` method"
        model.quantize("int8")
    pattern = r"(?s)2 layer\(s\).*a \(Dense\): dtype policy 'QuantizedDTypePolicy'.*Convert the float model"
    with pytest.raises(ValueError, match=pattern):
        optimize.to_tf_keras(model)
