"""Shared fixtures: every behaviour runs under Keras 3 and tf_keras."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices for MirroredStrategy tests; must happen before TF runs
# any op in this process.
try:
    _cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
except RuntimeError:  # already initialised (e.g. imported twice)
    pass

import keras  # noqa: E402
import tf_keras  # noqa: E402


@pytest.fixture(params=["keras", "tf_keras"])
def K(request):
    """The Keras module under test: Keras 3 or tf_keras."""
    module = keras if request.param == "keras" else tf_keras
    module.utils.set_random_seed(0)
    return module


def mlp(K, inputs=8, hidden=16, classes=4, name=None):
    """A small Functional MLP emitting logits."""
    inp = K.Input((inputs,))
    h = K.layers.Dense(hidden, activation="relu")(inp)
    out = K.layers.Dense(classes)(h)
    return K.Model(inp, out, name=name)


@pytest.fixture
def toy_data():
    """Random inputs, labels and a dataset factory (batched)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 8)).astype("float32")
    y = rng.integers(0, 4, size=96)

    def make(batch=32, sample_weight=None):
        parts = (x, y) if sample_weight is None else (x, y, sample_weight)
        return tf.data.Dataset.from_tensor_slices(parts).batch(batch)

    return x, y, make
