"""State that Keras 3's JAX training step threads through ``jax.jit``.

On JAX, Keras compiles the step as a pure function of the model's state: its
trainable and non-trainable variables, the optimizer's and the metrics'
variables. Any other variable read inside the step is a constant, baked in
when the step is traced: a temperature or alpha that a callback changes
between epochs would be silently ignored, and a variable written in the step
(`keras_kd.HardSampleReweighting`'s table) would never change.

keras_kd keeps such values in a `StepState`: named float32 Keras variables
that are made part of the model's metric state (`bind`). Keras then passes
them into every step and takes their new values out (a ``var.assign`` inside
the loss is part of the step's result), reads them from the variables at the
start of every epoch, and writes them back at its end. Inside a traced step
`current` returns:

* for a bound state, the value Keras threads in (no cost per step);
* for an unbound one, its current value as a trace-time constant (no cost per
  step either); the state remembers that it was baked in, and an `assign` of
  another value then clears JAX's compilation caches (``jax.clear_caches()``),
  so the next step is traced again with the new value (one retrace per
  change).

`current_variable` reads a variable keras_kd does not own (a user's own
``keras.Variable``/``tf.Variable`` passed as a hyperparameter, which may be
assigned behind keras_kd's back): threaded if the model tracks it, else read
from the host at every step through ``jax.pure_callback`` (~50 us per step on
a CPU).

`StepState.assign` and `StepState.value` work at any moment of a ``fit``:
mid-epoch they first write Keras's current JAX state back to the variables
(``model.jax_state_sync()``, which is what Keras asks callbacks to do), so
the next step reads the new value.

TensorFlow never uses this module: there, ``tf.Variable``s read in the step
are live.
"""

from __future__ import annotations

import weakref
from typing import Dict, Optional

import numpy as np

_CONTAINER = "_keras_kd_step_state"


def _keras():
    import keras  # noqa: PLC0415 - Keras 3 only

    return keras


class StepState:
    """Named float32 Keras variables that a JAX training step reads or writes.

    Args:
        values: ``{name: initial value}`` (numbers or arrays).
        name: prefix of the variables' names.
    """

    def __init__(self, values: Dict[str, object], name: str = "keras_kd"):
        keras = _keras()
        self.name = name
        self.variables = {}
        for key, value in values.items():
            value = np.asarray(value, np.float32)
            self.variables[key] = keras.Variable(
                value, trainable=False, dtype="float32", name=f"{name}_{key}"
            )
        self._model_ref = None  # weakref of the model that threads this state
        self._baked = set()  # keys traced into a step as constants (unbound)

    def __deepcopy__(self, memo):
        # keras-tuner deep-copies callbacks: a copy keeps the same variables.
        memo[id(self)] = self
        return self

    @property
    def model(self):
        return self._model_ref() if self._model_ref is not None else None

    def current(self, key: str):
        """The value to use inside a JAX step (see the module docstring)."""
        value = self.variables[key].value  # Keras gives the threaded value inside the model's step
        if self._model_ref is None and not _is_tracer(value):
            self._baked.add(key)  # unbound: a constant of any step traced now
        return value

    def _sync(self):
        model = self.model
        sync = getattr(model, "jax_state_sync", None)
        if sync is not None:
            sync()  # no-op unless a fit/evaluate holds newer values than the variables

    def value(self, key: str) -> np.ndarray:
        """The current value, as NumPy (valid at any moment of a ``fit``)."""
        self._sync()
        return np.asarray(self.variables[key].value)

    def assign(self, key: str, value):
        """Sets a value; the next step uses it (mid-epoch too)."""
        self._sync()
        variable = self.variables[key]
        value = np.asarray(value, np.float32).reshape(variable.shape)
        if key in self._baked and not np.array_equal(np.asarray(variable.value), value, equal_nan=True):
            import jax  # noqa: PLC0415

            self._baked.clear()
            jax.clear_caches()  # the steps that baked the old value are traced again
        variable.assign(value)


def current_variable(variable):
    """A variable's value inside a JAX step: threaded if the model tracks it,
    else read from the host at every call (``jax.pure_callback``), which also
    works outside a step."""
    value = getattr(variable, "value", None) if hasattr(variable, "path") else None  # a Keras variable
    if value is not None and _is_tracer(value):
        return value
    import jax  # noqa: PLC0415

    shape = tuple(variable.shape)
    return jax.pure_callback(
        lambda: np.asarray(_host_value(variable), np.float32).reshape(shape),
        jax.ShapeDtypeStruct(shape, np.float32),
    )


def _is_tracer(value) -> bool:
    import jax  # noqa: PLC0415

    return isinstance(value, jax.core.Tracer)


def _host_value(variable):
    value = variable.value if hasattr(variable, "path") else variable  # Keras variable, or a tf.Variable
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def _container_class():
    keras = _keras()

    class KerasKdStepState(keras.metrics.Metric):
        """The metric that makes the bound `StepState`s part of the model's state.

        It reports nothing (``result()`` is ``{}``) and is never reset by
        Keras's per-epoch ``reset_metrics``.
        """

        def __init__(self):
            super().__init__(name="keras_kd_step_state")
            self._bound = []

        @property
        def variables(self):
            return [v for state in self._bound for v in state.variables.values()]

        def update_state(self, *args, **kwargs):
            pass

        def reset_state(self):
            pass

        def result(self):
            return {}

    return KerasKdStepState


_CONTAINER_CLASS = None


def _container(model, create: bool):
    global _CONTAINER_CLASS
    container = model.__dict__.get(_CONTAINER)
    if container is None and create:
        if _CONTAINER_CLASS is None:
            _CONTAINER_CLASS = _container_class()
        container = _CONTAINER_CLASS()
        setattr(model, _CONTAINER, container)  # the model tracks it as one of its metrics
    return container


def bind(model, state: StepState) -> bool:
    """Makes ``model``'s JAX step thread ``state`` (idempotent).

    Call it before the step is traced (``on_train_begin`` or earlier) or
    retrace afterwards (``model.make_train_function(force=True)``).

    Returns:
        True if bound; False for a model whose state is locked (a built
        subclassed model), where `current` keeps reading from the host.
    """
    bound_to = state.model
    if bound_to is model:
        return True
    if bound_to is not None:
        unbind(bound_to, state)
    try:
        container = _container(model, create=True)
    except ValueError:  # Keras refuses new state on a built, locked layer
        return False
    if state not in container._bound:
        container._bound.append(state)
    state._model_ref = weakref.ref(model)
    return True


def unbind(model, state: StepState):
    """Stops threading ``state`` (its variables keep their last values)."""
    state._sync()
    container = _container(model, create=False)
    if container is not None and state in container._bound:
        container._bound.remove(state)
    if state.model is model:
        state._model_ref = None


def bound_model(state: Optional[StepState]):
    """The model threading ``state``, or None."""
    return None if state is None else state.model
