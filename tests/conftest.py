"""Shared fixtures: every behaviour runs under Keras 3 and tf_keras.

The Keras 3 backend is the process's ``KERAS_BACKEND`` (TensorFlow by default;
``make test`` also runs the suite with ``KERAS_BACKEND=jax``). tf_keras is
always TensorFlow. ``@pytest.mark.backend("jax")`` keeps a test to the JAX run,
``@pytest.mark.backend("tensorflow")`` to the TensorFlow run; the other run
deselects it (it is not reported as skipped). On JAX the tf_keras cases (of the
`K` fixture or of a test's ``flavour`` parameter) are deselected too: tf_keras
runs the same TensorFlow code in both runs, and the TensorFlow run has them
(``--tf-keras-on-jax`` keeps them).
"""

import gc
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices for MirroredStrategy tests; must happen before TF runs
# any op in this process. Harmless on the JAX backend: JAX keeps its own devices
# and TensorFlow still runs the tf.data pipelines there.
try:
    _cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )
except RuntimeError:  # already initialised (e.g. imported twice)
    pass

import keras  # noqa: E402
import tf_keras  # noqa: E402

BACKENDS = ("tensorflow", "jax")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "backend(name): run only when Keras 3's backend is `name` ('tensorflow' or 'jax'); "
        "deselected otherwise",
    )


def _marked_backends(item):
    names = set()
    for mark in item.iter_markers(name="backend"):
        if len(mark.args) != 1 or mark.args[0] not in BACKENDS:
            raise pytest.UsageError(
                f"{item.nodeid}: @pytest.mark.backend takes one of {BACKENDS}, got {mark.args!r}"
            )
        names.add(mark.args[0])
    return names


def pytest_addoption(parser):
    parser.addoption(
        "--tf-keras-on-jax", action="store_true",
        help="on the JAX backend, also run the tf_keras cases of the `K` fixture (TensorFlow code, "
             "already run by the TensorFlow job; deselected on JAX by default)",
    )


def _tf_keras_case(item):
    """A tf_keras case: of the `K` fixture, or of a test's own ``flavour`` parameter
    (``"tf_keras"`` or the module)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(params.get(name) is tf_keras or params.get(name) == "tf_keras" for name in ("K", "flavour"))


def pytest_collection_modifyitems(config, items):
    """Deselects the tests marked for the other Keras 3 backend and, on JAX,
    the tf_keras cases of `K` (unless --tf-keras-on-jax)."""
    current = keras.backend.backend()
    skip_tf_keras = current == "jax" and not config.getoption("--tf-keras-on-jax", default=False)
    keep, drop = [], []
    for item in items:
        wanted = _marked_backends(item)
        other = wanted and current not in wanted
        (drop if other or (skip_tf_keras and _tf_keras_case(item)) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_collection_finish(session):
    """Moves what the imports and the collection built (~490k objects: TensorFlow,
    Keras, tf_keras, tfmot, keras-tuner) out of the garbage collector's view
    (``gc.freeze``): they live as long as the process anyway, and every full
    collection would scan them again, ~0.35 CPU-s each, and
    ``keras.backend.clear_session()`` and keras-tuner's trials run one each
    time. Objects the tests create are collected as usual."""
    gc.collect()
    gc.freeze()


def pytest_report_header(config):
    return f"Keras 3 backend: {keras.backend.backend()} (tf_keras: tensorflow)"


@pytest.fixture(params=["keras", "tf_keras"])
def K(request):
    """The Keras module under test: Keras 3 (on the process's backend) or tf_keras (TensorFlow)."""
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
