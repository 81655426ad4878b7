"""Hyperparameter values of the loss: numbers or variables, checked the same way.

Temperature and alpha live in ``tf.Variable``s so that callbacks
(`keras_kd.DistillationScheduler`) and keras-tuner change them between epochs
without retracing the step; `Hyperparameter` also makes such changes take
effect on JAX, where an untracked variable is a jit constant.
"""

from __future__ import annotations

import math
import contextlib
import numbers

import keras
import numpy as np
import tensorflow as tf


# True inside `deferred_variables()`: numbers get their variable on first use.
_DEFERRED = [False]


@contextlib.contextmanager
def deferred_variables():
    """Hyperparameters made inside get their variables on first use (or `materialize`): for objects
    made at import (the registry's ``DecoupledKD()``), where an eager op would start TensorFlow's
    runtime before a program configures MultiWorkerMirroredStrategy's collectives."""
    _DEFERRED[0] = True
    try:
        yield
    finally:
        _DEFERRED[0] = False


def materialize(obj):
    """Makes the variables of ``obj``'s deferred hyperparameters now (outside any traced step, where
    a first variable would make tf.function trace twice)."""
    for value in list(getattr(obj, "__dict__", {}).values()):
        if isinstance(value, Hyperparameter):
            value._variable  # noqa: B018 - creates it


def _is_variable(value):
    return isinstance(value, (tf.Variable, keras.Variable))


def scalar_value(value, argument):
    """The float value of a number, a scalar tensor/array or a variable; a clear error otherwise."""
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise ValueError(f"Expected `{argument}` to be a number or a float tf.Variable. Received: {argument}={value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    dtype = getattr(value, "dtype", None)
    shape = getattr(value, "shape", None)
    try:
        dtype = tf.as_dtype(dtype) if dtype is not None else None
    except TypeError:
        dtype = None
    if dtype is None or not (dtype.is_floating or dtype.is_integer) or shape is None or len(shape) != 0:
        raise ValueError(
            f"Expected `{argument}` to be a number or a scalar float tf.Variable. Received: {argument}={value!r}"
        )
    return float(tf.convert_to_tensor(value).numpy())


def check_range(value, argument, low, high, low_open):
    bad = not math.isfinite(value) or (value <= low if low_open else value < low) or value > high
    if bad:
        bound = f"> {low}" if low_open else f"in [{low}, {high}]"
        raise ValueError(f"Expected `{argument}` {bound} and finite. Received: {argument}={value}")


def as_variable(value, argument, low, high, low_open):
    """A float32 variable holding ``value``, after checking its range.

    A user's variable (tf.Variable or keras.Variable) is kept as is, so that
    the user may change it, but its current value is checked like a number.
    """
    checked = scalar_value(value, argument)
    check_range(checked, argument, low, high, low_open)
    if _is_variable(value):
        if not tf.as_dtype(value.dtype).is_floating:
            raise ValueError(
                f"Expected `{argument}` to be a number or a scalar float tf.Variable (it is assigned "
                f"fractional values). Received a variable of dtype {tf.as_dtype(value.dtype).name}: "
                f"{argument}={value!r}"
            )
        return value
    return tf.Variable(checked, trainable=False, dtype=tf.float32, name=f"kd_{argument}")



class Hyperparameter:
    """One hyperparameter of the loss (temperature, alpha, a DKD weight), read right on every backend.

    * TensorFlow: the step reads a float32 ``tf.Variable`` (ours, or the one
      the user passed), so a change between epochs takes effect without
      retracing, as before.
    * JAX: a variable that the model does not track is a jit *constant*
      there, so in a JAX process the value can also live in a
      `keras_kd._step_state.StepState` (`state`). Inside a JAX step `read`
      gives, in this order:

      1. for a variable the user passed, or one that anyone took through
         `variable` (and may ``assign`` directly): its value at run time
         (`keras_kd._step_state.current_variable`: threaded if the model
         tracks it, else a host read per step);
      2. when a keras_kd callback has bound `state` to the model
         (``keras_kd.Callback.set_model``): the value Keras threads through
         the step (free);
      3. otherwise: the current value as a trace-time constant (free); `set`
         with another value then calls ``jax.clear_caches()``, so the next
         step retraces with the new value.

    Either way a change is never silently ignored.
    """

    def __init__(self, value, argument, low, high=math.inf, low_open=False):
        self.argument = argument
        self._bounds = (low, high, low_open)
        self._user_variable = _is_variable(value)
        if self._user_variable or not isinstance(value, numbers.Real) or not _DEFERRED[0]:
            self._var = as_variable(value, argument, low, high, low_open)
        else:  # a number: checked now, its variable made on first use (never at import, e.g. for
            # the registry's DecoupledKD(): an eager op there would start TensorFlow's runtime
            # before a program configures MultiWorkerMirroredStrategy's collectives)
            check_range(scalar_value(value, argument), argument, low, high, low_open)
            self._var = None
            self._initial = float(value)
        self._read_at_run_time = self._user_variable
        self._baked = None  # the value a JAX trace holds as a constant, if any
        self._state = None

    @property
    def _variable(self):
        if self._var is None:
            with tf.init_scope():  # outside any tf.function being traced
                self._var = as_variable(self._initial, self.argument, *self._bounds)
        return self._var

    @property
    def state(self):
        """The value as a `keras_kd._step_state.StepState` for keras_kd callbacks to bind (JAX processes
        only, else None). Built on first use, outside any step: never at import, so that importing
        keras_kd neither creates JAX variables nor initialises JAX's devices."""
        if self._state is None and keras.backend.backend() == "jax" and not self._user_variable:
            from keras_kd import _step_state  # noqa: PLC0415 - JAX processes only

            self._state = _step_state.StepState({"value": self.get()}, name=f"kd_{self.argument}")
        return self._state

    def get(self) -> float:
        """The current value (a Python float)."""
        value = self._variable
        if isinstance(value, keras.Variable):
            value = value.value
        with tf.init_scope():  # also while a tf.function traces (a tf.Variable reads eagerly there)
            return float(np.asarray(value))

    def set(self, value):
        """Checks and assigns ``value`` (see the class docstring for JAX)."""
        value = scalar_value(value, self.argument)
        check_range(value, self.argument, *self._bounds)
        self._variable.assign(value)
        if self._state is not None:
            self._state.assign("value", value)
        if self._baked is not None and self._baked != value:
            self._clear_jax_traces()

    def _clear_jax_traces(self):
        self._baked = None
        import jax  # noqa: PLC0415 - only reached after a JAX trace

        jax.clear_caches()

    @property
    def variable(self):
        """The variable holding the value; from now on JAX steps read it at run time (it may be assigned)."""
        if not self._read_at_run_time:
            self._read_at_run_time = True
            if self._baked is not None or self._state is not None:  # a traced step may hold a constant
                self._clear_jax_traces()
        return self._variable

    def read(self, ops):
        """The value as a float32 scalar of ``ops``'s backend (see the class docstring)."""
        if ops.is_tf:
            return tf.cast(tf.convert_to_tensor(self._variable), tf.float32)
        from keras_kd import _step_state  # noqa: PLC0415

        if self._read_at_run_time:  # threaded if the model tracks it, else a host read per step
            value = _step_state.current_variable(self._variable)
        elif self._state is not None:  # threaded when bound, else a constant that `set` retraces
            value = self._state.current("value")
        else:  # no callback asked for the state: a constant that `set` retraces
            self._baked = self.get()
            return ops.constant(self._baked, "float32")
        return ops.stop_gradient(ops.cast(ops.reshape(value, ()), "float32"))
