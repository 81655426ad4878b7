"""Shared fixtures: every behaviour runs under Keras 3 and tf_keras.

The Keras 3 backend is the process's ``KERAS_BACKEND`` (TensorFlow by default;
``make test`` also runs the suite with ``KERAS_BACKEND=jax``). tf_keras is
always TensorFlow. ``@pytest.mark.backend("jax")`` keeps a test to the JAX run,
``@pytest.mark.backend("tensorflow")`` to the TensorFlow run; the other run
deselects it (it is not reported as skipped). On JAX the tf_keras cases (of the
`K` fixture or of a test's ``flavour`` parameter) are deselected too: tf_keras
runs the same TensorFlow code in both runs, and the TensorFlow run has them
(``--tf-keras-on-jax`` keeps them). Under ``make test``, which runs both jobs at
once, the tf_keras cases of the files in `TF_KERAS_IN_JAX_JOB` run in the JAX
job instead (``--tf-keras-split``, given to both jobs): still once each, and the
two jobs' CPU is balanced.
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

# Under `make test` (``--tf-keras-split``), the tf_keras cases of these files run in
# the JAX job, not the TensorFlow job. tf_keras is TensorFlow whatever Keras 3's
# backend is, so each case still runs once, on the same code. Why: the two jobs
# share 2 cores and the TensorFlow job (integration/ plus every tf_keras case) had
# ~1.5x the JAX job's CPU (2,648 vs 1,725 CPU-s in a per-test CPU log of
# 2026-12-02), so it ran alone for the last quarter of the run. These files'
# tf_keras cases are ~455 CPU-s of it (312 cases). Not listed: files whose tf_keras cases
# depend on Keras 3's backend (test_online_teacher: a tf_keras teacher's default
# placement is the pipeline in a JAX process, as a JAX step cannot run it;
# test_bridge: a tf_keras model converts to a Keras 3 model of the process's backend).
TF_KERAS_IN_JAX_JOB = frozenset({
    "test_bad_inputs.py", "test_alignment.py", "test_callbacks.py", "test_storage.py", "test_cache.py",
    "test_fit.py", "test_hooks.py", "test_alignment_data.py", "test_transfer_labels.py",
    "test_reweighting_backup.py",
})


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
    parser.addoption(
        "--tf-keras-split", action="store_true",
        help="the tf_keras cases of tests/conftest.TF_KERAS_IN_JAX_JOB's files run in the JAX job, not "
             "the TensorFlow job (`make test` passes it to both jobs: each case still runs once)",
    )


def _tf_keras_case(item):
    """A tf_keras case: of the `K` fixture, or of a test's own ``flavour`` parameter
    (``"tf_keras"`` or the module)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(params.get(name) is tf_keras or params.get(name) == "tf_keras" for name in ("K", "flavour"))


def _runs_tf_keras_case(config, item, current, wanted):
    """Whether this job runs a tf_keras case (see the module docstring). Only unmarked
    cases move: one marked ``backend(...)`` stays where its marker puts it."""
    in_jax_job = (config.getoption("--tf-keras-split", default=False) and not wanted
                  and item.path.name in TF_KERAS_IN_JAX_JOB)
    if current == "jax":
        return in_jax_job or config.getoption("--tf-keras-on-jax", default=False)
    return not in_jax_job


def pytest_collection_modifyitems(config, items):
    """Deselects the tests marked for the other Keras 3 backend and the tf_keras
    cases the other job runs (on JAX: all of them, unless --tf-keras-on-jax; with
    --tf-keras-split, those of `TF_KERAS_IN_JAX_JOB`'s files move to the JAX job)."""
    current = keras.backend.backend()
    keep, drop = [], []
    for item in items:
        wanted = _marked_backends(item)
        other = wanted and current not in wanted
        elsewhere = _tf_keras_case(item) and not _runs_tf_keras_case(config, item, current, wanted)
        (drop if other or elsewhere else keep).append(item)
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
