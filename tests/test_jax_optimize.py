"""keras_kd.optimize from a process whose Keras backend is JAX (KERAS_BACKEND=jax).

tfmot wraps only tf_keras models, so the chains run on tf_keras (TensorFlow)
in any process; what changes on JAX is the Keras 3 side: the student given to
`to_tf_keras`, the model `to_keras3` gives back, a Keras 3 teacher (it runs
through tf.numpy_function inside tf.data) and the float TFLite export.
References: the source model's own outputs, NumPy zero counts, tests/reference.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import keras_kd
from keras_kd import optimize
from tests import reference

pytestmark = pytest.mark.backend("jax")

RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 6, 6, 1)).astype("float32")
Y = RNG.integers(0, 4, size=64)


def cnn(name="student", filters=4):
    inp = keras.Input((6, 6, 1), name="image")
    h = keras.layers.Conv2D(filters, 3, padding="same", name="conv")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dropout(0.1)(h)
    h = keras.layers.Dense(16, activation="relu", name="hidden")(h)
    return keras.Model(inp, keras.layers.Dense(4, name="logits")(h), name=name)


@pytest.fixture(scope="module")
def jax_teacher():
    keras.utils.set_random_seed(1)
    model = cnn("teacher", filters=8)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(X, Y, epochs=3, verbose=0)
    model.trainable = False
    return model


def test_to_tf_keras_of_a_jax_model_and_back():
    keras.utils.set_random_seed(0)
    student = cnn()
    student.get_layer("bn").set_weights([RNG.uniform(0.5, 2, 4).astype("float32") for _ in range(4)])
    converted = optimize.to_tf_keras(student)
    assert isinstance(converted, tf_keras.Model)
    for a, b in zip(converted.get_weights(), student.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(converted(X, training=False).numpy(), np.asarray(student(X, training=False)),
                               atol=1e-5)
    back = optimize.to_keras3(converted)
    assert isinstance(back, keras.Model)
    np.testing.assert_allclose(np.asarray(back(X, training=False)), np.asarray(student(X, training=False)),
                               atol=1e-5)
    # The model that comes back is a Keras 3 model on JAX: it trains with its own fit.
    back.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert np.isfinite(back.fit(X, Y, epochs=1, verbose=0).history["loss"][0])


def test_prune_then_pqat_then_tflite_with_a_jax_teacher(jax_teacher):
    tf_keras.utils.set_random_seed(0)
    student = optimize.to_tf_keras(cnn())
    train = keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((X, Y)).batch(16), jax_teacher)
    pruned, callbacks = optimize.prune_for_distillation(
        student, 0.5, end_step=8, layers=["hidden", "logits"], teacher=jax_teacher)
    kd = keras_kd.DistillationLoss(temperature=2.0, alpha=0.3)
    pruned.compile(tf_keras.optimizers.Adam(1e-3), loss=kd)
    pruned.fit(train, epochs=3, callbacks=callbacks, verbose=0)
    sparse = optimize.strip(pruned)
    for name in ("hidden", "logits"):  # zeros counted straight from the kernels
        assert np.mean(sparse.get_layer(name).kernel.numpy() == 0) == pytest.approx(0.5, abs=0.02)
    # The loss fit optimises is the NumPy distillation loss of the JAX teacher's logits.
    sparse.compile(loss=kd)
    got = sparse.evaluate(keras_kd.with_teacher(tf.data.Dataset.from_tensor_slices((X, Y)).batch(64),
                                                jax_teacher), verbose=0)
    want = reference.distillation_loss(Y, sparse.predict(X, verbose=0), np.asarray(jax_teacher.predict(X, verbose=0)),
                                       T=2.0, alpha=0.3)
    np.testing.assert_allclose(got, want, rtol=1e-4)

    pqat = optimize.quantize_for_distillation(sparse, preserve_sparsity=True)
    pqat.compile(tf_keras.optimizers.Adam(1e-3), loss=kd)
    pqat.fit(train, epochs=1, verbose=0)
    assert np.mean(pqat.get_layer("quant_hidden").weights[0].numpy() == 0) >= 0.48
    flatbuffer = optimize.to_tflite(pqat)
    _, logits = optimize.evaluate_tflite(flatbuffer, (X, Y), return_logits=True)
    expected = pqat.predict(X, verbose=0)
    # int8 kernels and the fake-quant graph round differently: a few output quantization steps.
    assert np.mean(np.abs(logits - expected)) < 0.05 * np.abs(expected).max()


def test_float_tflite_of_a_jax_model_equals_its_predictions():
    keras.utils.set_random_seed(0)
    student = cnn()
    flatbuffer = optimize.to_tflite(student, int8=False)
    accuracy, logits = optimize.evaluate_tflite(flatbuffer, (X, Y), return_logits=True)
    expected = np.asarray(student.predict(X, verbose=0))
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    assert accuracy == pytest.approx(np.mean(expected.argmax(-1) == Y))


def test_refusals_name_the_piece_the_backend_and_the_alternative():
    student = cnn()
    with pytest.raises(TypeError, match=r"prune_for_distillation.*tf_keras.*to_tf_keras"):
        optimize.prune_for_distillation(student, 0.5, end_step=4)
    with pytest.raises(TypeError, match=r"quantize_for_distillation.*tf_keras.*to_tf_keras"):
        optimize.quantize_for_distillation(student)
    inp = keras.Input((6,))
    lam = keras.Model(inp, keras.layers.Dense(2)(keras.layers.Lambda(lambda v: keras.ops.tanh(v) * 2.0)(inp)))
    with pytest.raises(ValueError, match=r"(?s)lambda.*backend 'jax'.*built-in layer.*custom_objects=\{'Lambda'"):
        optimize.to_tf_keras(lam)
    # The alternative the message gives: the function's TensorFlow version.
    converted = optimize.to_tf_keras(lam, custom_objects={
        "Lambda": lambda layer: tf_keras.layers.Lambda(lambda v: tf.tanh(v) * 2.0, name=layer.name)})
    x = RNG.normal(size=(4, 6)).astype("float32")
    np.testing.assert_allclose(converted(x).numpy(), np.asarray(lam(x)), atol=1e-5)
