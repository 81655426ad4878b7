"""Pruning, QAT and TFLite figures that must be exact, against independent references.

References: tfmot's own ``quantize_model`` and ``PolynomialDecay`` schedule,
NumPy zero counts of the kernels tfmot prunes, the Keras model's own outputs,
and LiteRT's interpreter driven by hand through the model's signature.
"""

import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import keras_kd
from keras_kd import optimize

RNG = np.random.default_rng(0)


def tfmot():
    optimize.sparsity(_dense_model())  # keras_kd imports tfmot on first use, keeping tf.keras
    import tensorflow_model_optimization

    return tensorflow_model_optimization


# ---------------------------------------------------------------------------
# Pruning schedule and sparsity
# ---------------------------------------------------------------------------


def _dense_model():
    inp = tf_keras.Input((8,))
    return tf_keras.Model(inp, tf_keras.layers.Dense(4, name="d")(tf_keras.layers.Dense(16, name="h")(inp)))


@pytest.mark.parametrize("end_step", [97, 101, 64, 20, 7])
def test_default_frequency_lands_on_end_step(end_step):
    pruned, _ = optimize.prune_for_distillation(_dense_model(), 0.6, end_step=end_step)
    schedule = pruned.get_layer("prune_low_magnitude_h").pruning_schedule
    updates = [s for s in range(end_step + 10) if bool(schedule(tf.constant(s, tf.int64))[0])]
    # By hand: every `end_step // 16` steps (every step for shorter spans),
    # the last exactly at end_step, where tfmot's schedule gives the target.
    every = max(1, end_step // 16)
    assert updates == list(range(end_step % every, end_step + 1, every))
    assert updates[-1] == end_step
    assert float(schedule(tf.constant(end_step, tf.int64))[1]) == pytest.approx(0.6)
    if end_step >= 32:
        assert min(np.diff(updates)) >= end_step // 16 > 1  # not every step


def test_prime_span_reaches_the_target_in_training():
    model = _dense_model()
    pruned, callbacks = optimize.prune_for_distillation(model, 0.5, end_step=37)
    pruned.compile(tf_keras.optimizers.SGD(0.01), "mse")
    x = RNG.normal(size=(37, 8)).astype("float32")
    pruned.fit(x, np.zeros((37, 4), "float32"), batch_size=1, epochs=1, callbacks=callbacks, verbose=0)
    kernel = optimize.strip(pruned).get_layer("h").get_weights()[0]
    assert np.mean(kernel == 0) == pytest.approx(0.5, abs=1 / kernel.size)  # hand count


def test_end_step_from_unknown_or_infinite_cardinality_says_how_to_count():
    ds = tf.data.Dataset.range(8).filter(lambda v: v > 2).batch(2)
    for dataset in (ds, ds.repeat()):
        end_step = int(dataset.cardinality()) * 8
        with pytest.raises(ValueError, match=r"end_step=-\d+.*cardinality.*sum\(1 for _ in dataset\)"):
            optimize.prune_for_distillation(_dense_model(), 0.5, end_step=end_step)


def _conv_model():
    L = tf_keras.layers
    inp = tf_keras.Input((8, 8, 4))
    h = L.Conv2D(8, 3, name="conv")(inp)
    h = L.DepthwiseConv2D(3, name="depthwise")(h)
    h = L.SeparableConv2D(8, 3, name="separable")(h)
    return tf_keras.Model(inp, L.Dense(4, name="logits")(L.Flatten()(h)))


def test_sparsity_counts_only_the_kernels_tfmot_prunes():
    model = _conv_model()
    with pytest.warns(UserWarning, match=r"depthwise \(DepthwiseConv2D\): depthwise_kernel[\s\S]*"
                      r"separable \(SeparableConv2D\): depthwise_kernel"):
        pruned, callbacks = optimize.prune_for_distillation(model, 0.75, end_step=4, frequency=1)
    pruned.compile(tf_keras.optimizers.SGD(0.01), "mse")
    x = RNG.normal(size=(8, 8, 8, 4)).astype("float32")
    pruned.fit(x, np.zeros((8, 4), "float32"), batch_size=1, epochs=1, callbacks=callbacks, verbose=0)
    stripped = optimize.strip(pruned)
    report = optimize.sparsity(stripped)
    # Hand counts of the kernels tfmot prunes.
    expected = {
        "conv": np.mean(stripped.get_layer("conv").kernel.numpy() == 0),
        "separable": np.mean(stripped.get_layer("separable").pointwise_kernel.numpy() == 0),
        "logits": np.mean(stripped.get_layer("logits").kernel.numpy() == 0),
    }
    assert report == pytest.approx(expected)
    assert all(v == pytest.approx(0.75, abs=0.01) for v in report.values())
    assert "depthwise" not in report  # never pruned, never reported
    assert optimize.sparsity(pruned) == pytest.approx(report)  # wrapped: the same names and counts
    assert np.mean(stripped.get_layer("depthwise").depthwise_kernel.numpy() == 0) == 0


def test_no_warning_when_every_kernel_is_pruned():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimize.prune_for_distillation(_dense_model(), 0.5, end_step=16)


# ---------------------------------------------------------------------------
# QAT: whatever tfmot's quantize_model accepts
# ---------------------------------------------------------------------------


def _conv_bn_relu():
    L = tf_keras.layers
    inp = tf_keras.Input((8, 8, 3))
    h = L.Conv2D(4, 3, name="conv")(inp)
    h = L.BatchNormalization(name="bn")(h)
    h = L.ReLU(name="relu")(h)
    h = L.Conv2D(4, 3, name="conv2")(h)
    h = L.BatchNormalization(name="bn2")(h)
    h = L.Activation("relu", name="act2")(h)
    h = L.GlobalAveragePooling2D(name="gap")(h)
    model = tf_keras.Model(inp, L.Dense(3, name="logits")(h), name="convbn")
    for name in ("bn", "bn2"):
        layer = model.get_layer(name)
        shapes = [w.shape for w in layer.get_weights()]
        layer.set_weights([RNG.uniform(0.5, 2.0, size=shape).astype("float32") for shape in shapes])
    return model


def test_conv_batch_norm_relu_quantizes_like_tfmot_quantize_model():
    model = _conv_bn_relu()
    ours = optimize.quantize_for_distillation(model)
    copy = tf_keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    reference = tfmot().quantization.keras.quantize_model(copy)

    def structure(m):
        return [(type(layer).__name__, re.sub(r"_\d+$", "", layer.name)) for layer in m.layers]

    assert structure(ours) == structure(reference)
    for a, b in zip(ours.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(a, b)
    # The same training steps give the same model.
    x = RNG.normal(size=(6, 8, 8, 3)).astype("float32")
    y = RNG.normal(size=(6, 3)).astype("float32")
    for m in (ours, reference):
        m.compile(tf_keras.optimizers.SGD(0.01), "mse")
        m.fit(x, y, batch_size=3, epochs=2, shuffle=False, verbose=0)
    np.testing.assert_allclose(ours.predict(x, verbose=0), reference.predict(x, verbose=0), atol=1e-5)


def test_layer_tfmot_refuses_is_named_with_the_fix():
    L = tf_keras.layers
    inp = tf_keras.Input((8, 8, 3))
    h = L.Conv2D(4, 3, name="conv")(inp)
    h = L.BatchNormalization(name="lonely_bn")(L.MaxPooling2D()(h))  # no Conv before it: no fold
    model = tf_keras.Model(inp, L.Dense(2)(L.Flatten()(h)))
    copy = tf_keras.models.clone_model(model)
    with pytest.raises(RuntimeError, match="lonely_bn"):
        tfmot().quantization.keras.quantize_model(copy)  # tfmot refuses it too
    pattern = (
        r"lonely_bn \(BatchNormalization\): tfmot quantizes a BatchNormalization only together "
        r"with the Conv2D, DepthwiseConv2D or Dense layer right before it[\s\S]*layers=\[\.\.\.\]"
    )
    with pytest.raises(ValueError, match=pattern):
        optimize.quantize_for_distillation(model)


# ---------------------------------------------------------------------------
# evaluate_tflite: the model's first Keras output, and only labelled data
# ---------------------------------------------------------------------------


def _two_outputs(K):
    inp = K.Input((6,), name="x")
    features = K.layers.Dense(12, name="features")(inp)
    logits = K.layers.Dense(4, name="logits")(K.layers.Activation("tanh")(features))
    return K.Model(inp, [logits, features], name="two")


@pytest.mark.parametrize("K", [keras, tf_keras], ids=["keras", "tf_keras"])
def test_evaluate_tflite_scores_the_first_keras_output(K):
    K.utils.set_random_seed(0)
    model = _two_outputs(K)
    x = RNG.normal(size=(50, 6)).astype("float32")
    logits, features = (np.asarray(t) for t in model(x))
    y = logits.argmax(-1)
    y[:10] = (y[:10] + 1) % 4  # 40 of 50 right
    flatbuffer = optimize.to_tflite(model, int8=False)
    # LiteRT driven by hand, through the signature, one example at a time.
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=flatbuffer).get_signature_runner()
    by_hand = np.concatenate([runner(x=x[i : i + 1])["output_0"] for i in range(len(x))])
    np.testing.assert_allclose(by_hand, logits, atol=1e-5)
    accuracy, scored = optimize.evaluate_tflite(flatbuffer, (x, y), return_logits=True, batch_size=16)
    assert accuracy == pytest.approx(40 / 50)
    np.testing.assert_allclose(scored, logits, atol=1e-5)
    inputs = tf.data.Dataset.from_tensor_slices(x)
    _, second = optimize.evaluate_tflite(flatbuffer, inputs, return_logits=True, output=1)
    np.testing.assert_allclose(second, features, atol=1e-5)
    with pytest.raises(ValueError, match=r"Unknown `output`='nope'"):
        optimize.evaluate_tflite(flatbuffer, (x, y), output="nope")


def _hand_litert_predictions(flatbuffer, x):
    """LiteRT driven by hand, one example at a time, quantizing the input and
    dequantizing the output with the tensors' own parameters."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    logits = []
    for row in x:
        value = row[None]
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            value = np.clip(np.round(value / scale) + zero, info.min, info.max).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], value)
        interpreter.invoke()
        q = interpreter.get_tensor(out["index"])[0].astype(np.float32)
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            q = (q - zero) * scale
        logits.append(q)
    return np.stack(logits)


@pytest.mark.parametrize("io_dtype", ["float32", "int8", "uint8"])
def test_evaluate_tflite_binary_one_logit_model_thresholds_the_logit(io_dtype):
    # A one-logit model is a Bernoulli logit: argmax over one unit would
    # always say class 0 (the accuracy would be the share of label 0).
    keras.utils.set_random_seed(0)
    x = RNG.normal(size=(40, 5)).astype("float32")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1)])
    model.set_weights([np.array([[2.0], [1.0], [0.0], [0.0], [0.0]], "float32"), np.zeros(1, "float32")])
    labels = (x[:, 0] > 0).astype("uint8")  # uint8 labels, as keras.datasets gives
    flatbuffer = optimize.to_tflite(model, (x, labels), int8=io_dtype != "float32", io_dtype=io_dtype)
    by_hand = _hand_litert_predictions(flatbuffer, x)[:, 0]
    expected = float(np.mean((by_hand > 0).astype("uint8") == labels))
    assert expected > 0.75 and np.mean(labels == 0) < 0.75  # the two readings differ here
    for y in (labels, labels[:, None], labels.astype("float32")):
        assert optimize.evaluate_tflite(flatbuffer, (x, y), batch_size=7) == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"one-logit \(binary\) model needs labels in \[0, 1\]"):
        optimize.evaluate_tflite(flatbuffer, (x, labels.astype("int64") * 2))


def test_evaluate_tflite_refuses_labels_that_do_not_fit_the_output():
    x = RNG.normal(size=(20, 6)).astype("float32")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    flatbuffer = optimize.to_tflite(model, int8=False)
    y = RNG.integers(0, 3, size=20)
    pattern = r"labels of shape \(20, 4\) do not match the model's outputs of shape \(20, 3\)"
    with pytest.raises(ValueError, match=pattern):
        optimize.evaluate_tflite(flatbuffer, (x, np.eye(4)[y]), batch_size=20)  # another model's one-hot
    pattern = r"Expected class ids in \[0, 2\] for a model with 3 outputs. Received labels in \[0, 5\]"
    with pytest.raises(ValueError, match=pattern):
        optimize.evaluate_tflite(flatbuffer, (x, np.where(y == 2, 5, y)))
    with pytest.raises(ValueError, match="not whole numbers"):
        optimize.evaluate_tflite(flatbuffer, (x, y + 0.5))
    # representative_data given wrongly: the shapes are named.
    pattern = r"inputs of shape \[None, 6\]; `representative_data` has shape \[20, 5\]"
    with pytest.raises(ValueError, match=pattern):
        optimize.to_tflite(model, x[:, :5])
    pattern = r"inputs of shape \[None, 6\]; `representative_data`'s x has shape \(5,\)"
    with pytest.raises(ValueError, match=pattern):
        optimize.to_tflite(model, tf.data.Dataset.from_tensor_slices(x[:, :5]))
    with pytest.raises(ValueError, match=r"`tflite` is not a TFLite model .*Pass the bytes"):
        optimize.evaluate_tflite(b"not a flatbuffer", (x, y))
    # Soft labels (label smoothing) are read by their argmax, like one-hot.
    logits = _hand_litert_predictions(flatbuffer, x)
    soft = np.eye(3)[y] * 0.9 + 0.1 / 3
    assert optimize.evaluate_tflite(flatbuffer, (x, soft)) == pytest.approx(np.mean(logits.argmax(-1) == y))


def test_evaluate_tflite_leaves_no_label_examples_out():
    # keras_kd.NO_LABEL (-1) marks an unlabelled example: it is not scored
    # (it used to be refused as a class id out of range).
    x = RNG.normal(size=(12, 6)).astype("float32")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    flatbuffer = optimize.to_tflite(model, int8=False)
    predicted = _hand_litert_predictions(flatbuffer, x).argmax(-1)
    y = np.where(np.arange(12) % 3 == 0, -1, predicted)  # the labelled 8 are right ...
    y[1] = (predicted[1] + 1) % 3  # ... but one: 7 of 8 by hand
    assert optimize.evaluate_tflite(flatbuffer, (x, y), batch_size=5) == pytest.approx(7 / 8)
    with pytest.raises(ValueError, match=r"Every label of `dataset` \(12 examples\) is keras_kd.NO_LABEL"):
        optimize.evaluate_tflite(flatbuffer, (x, np.full(12, -1)))
    accuracy, logits = optimize.evaluate_tflite(flatbuffer, (x, np.full(12, -1)), return_logits=True)
    assert accuracy is None and logits.shape == (12, 3)


def test_evaluate_tflite_refuses_unlabelled_keras_kd_data():
    teacher = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    x = RNG.normal(size=(10, 6)).astype("float32")
    flatbuffer = optimize.to_tflite(teacher, int8=False)
    numbered = keras_kd.add_example_ids(tf.data.Dataset.from_tensor_slices(x)).batch(5)
    unlabelled = keras_kd.with_teacher(numbered, teacher, placement="pipeline")
    with pytest.raises(ValueError, match="has_labels=False"):
        optimize.evaluate_tflite(flatbuffer, unlabelled)
    accuracy, logits = optimize.evaluate_tflite(flatbuffer, unlabelled, return_logits=True)
    assert accuracy is None
    np.testing.assert_allclose(logits, np.asarray(teacher(x)), atol=1e-5)


@pytest.mark.parametrize("K", [keras, tf_keras], ids=["keras", "tf_keras"])
def test_sparsity_of_recurrent_embedding_and_attention_layers_by_hand(K):
    L = K.layers
    tokens = K.Input((5,), dtype="int32")
    h = L.Embedding(10, 6, name="emb")(tokens)
    h = L.LSTM(6, return_sequences=True, name="lstm")(h)
    h = L.MultiHeadAttention(2, 3, name="mha")(h, h)
    model = K.Model(tokens, L.Dense(2, name="out")(L.Flatten()(h)))
    for layer in model.layers:
        shapes = [w.shape for w in layer.get_weights()]
        layer.set_weights([np.where(RNG.random(shape) < 0.3, 0.0, 1.0).astype("float32") for shape in shapes])
    lstm, mha = model.get_layer("lstm"), model.get_layer("mha")
    kernels = {
        "emb": [model.get_layer("emb").embeddings],
        "lstm": [lstm.cell.kernel, lstm.cell.recurrent_kernel],
        "mha": [getattr(mha, f"_{part}_dense").kernel for part in ("query", "key", "value", "output")],
        "out": [model.get_layer("out").kernel],
    }
    expected = {
        name: sum(int(np.sum(np.asarray(w) == 0)) for w in ws) / sum(int(np.size(w)) for w in ws)
        for name, ws in kernels.items()
    }
    assert optimize.sparsity(model) == pytest.approx(expected)


def test_quantization_aware_two_output_model_is_scored_on_its_logits():
    tf_keras.utils.set_random_seed(0)
    qat = optimize.quantize_for_distillation(_two_outputs(tf_keras))
    x = RNG.normal(size=(64, 6)).astype("float32")
    qat.compile(tf_keras.optimizers.Adam(1e-3), ["mse", "mse"])
    qat.fit(x, [RNG.normal(size=(64, 4)), RNG.normal(size=(64, 12))], epochs=2, verbose=0)
    logits, _ = qat.predict(x, verbose=0)
    flatbuffer = optimize.to_tflite(qat)
    inputs = tf.data.Dataset.from_tensor_slices(x)
    _, scored = optimize.evaluate_tflite(flatbuffer, inputs, return_logits=True)
    assert scored.shape == logits.shape
    # int8 kernels against the fake-quant graph: a few output quantization steps.
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=flatbuffer).get_signature_runner()
    scale = runner.get_output_details()["output_0"]["quantization_parameters"]["scales"]
    step = float(scale[0]) if len(scale) else float(np.ptp(logits)) / 255
    np.testing.assert_allclose(scored, logits, atol=4 * step + 1e-6)


def test_activation_tfmot_cannot_quantize_is_named():
    inp = tf_keras.Input((6,))
    model = tf_keras.Model(inp, tf_keras.layers.Dense(3, activation="hard_sigmoid", name="gate")(inp))
    copy = tf_keras.models.clone_model(model)
    with pytest.raises(ValueError, match="Only some Keras activations"):
        tfmot().quantization.keras.quantize_model(copy)  # tfmot refuses it too
    with pytest.raises(ValueError, match=r"gate \(Dense\): activation 'hard_sigmoid'\ntfmot's QAT quantizes"):
        optimize.quantize_for_distillation(model)
    inp = keras.Input((6,))
    keras3 = keras.Model(inp, keras.layers.Dense(3, activation="hard_sigmoid", name="gate")(inp))
    with pytest.raises(ValueError, match=r"gate \(Dense\): activation 'keras3_hard_sigmoid'"):
        optimize.quantize_for_distillation(optimize.to_tf_keras(keras3))
