"""One compiled student per configuration, shared by the test cases that only change data values.

Building, compiling and tracing a fresh student (and, under XLA or ``jax.jit``, compiling its
step) costs about a second per case, most of a 2-step fit. Keras reuses the traced (and
compiled) training step while the model is not recompiled and the dataset's element spec is
unchanged, so the cases of a family that feed the same configuration different VALUES (a NaN
here, an out-of-range label there) can share one student, reset to its initial weights and a
fresh optimizer state before each case.

The key always includes the dataset's element spec: a case whose data has another structure,
dtype or shape (or the in-step placement's per-dataset teacher key) gets its own student and
never silently retraces a shared one. Cases about trace-time behaviour (warnings given once
while tracing, retracing, counting calls) must not use this: they keep fresh models.
"""

import numpy as np

_SHARED = {}


class _Traces:
    n = 0


def traces(model):
    """How many times ``model``'s ``train_step`` was traced (run as Python) since it was shared."""
    return model._kd_test_traces.n


def _count_traces(model):
    """Wraps the instance's ``train_step`` to count its Python runs (one per trace, on every backend).
    The count lives in an object, not a list: Keras 3 would track (copy) a list attribute."""
    counter = _Traces()
    step = model.train_step

    def train_step(*args, **kwargs):
        counter.n += 1
        return step(*args, **kwargs)

    model.train_step = train_step
    model._kd_test_traces = counter


def student(key, element_spec, build, compile):
    """The student ``build()`` made and ``compile(model)`` compiled, once per ``(key, element_spec)``.

    ``key`` names everything else the compiled step depends on (test family, Keras flavour,
    ``jit_compile``, loss configuration). Each call returns the shared model with its initial
    weights and zeroed optimizer state (iterations, slots; the learning rate is kept), as a
    freshly built one would be.
    """
    full_key = (key, repr(element_spec))
    entry = _SHARED.get(full_key)
    if entry is None:
        model = build()
        compile(model)
        _count_traces(model)
        entry = _SHARED[full_key] = (model, model.get_weights(), float(np.asarray(model.optimizer.learning_rate)))
    model, weights, learning_rate = entry
    model.set_weights(weights)
    variables = model.optimizer.variables
    for variable in variables() if callable(variables) else variables:
        # Assigned even when unchanged: Keras 3 on JAX leaves purged (None) values after a fit that raised.
        value = learning_rate if "learning_rate" in variable.name else 0
        dtype = getattr(variable.dtype, "as_numpy_dtype", variable.dtype)  # tf.DType or Keras 3's name
        variable.assign(np.full(variable.shape, value, dtype))
    return model


def outputs(model, x):
    """What ``model.predict(x, verbose=0)`` returns for these tests' few-dozen rows, by one direct
    call: ``predict`` would trace (under XLA, compile) a predict function per model for one batch."""
    return np.asarray(model(x, training=False))
