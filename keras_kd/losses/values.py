"""Hyperparameter values of the loss: numbers or variables, checked the same way.

Temperature and alpha live in ``tf.Variable``s so that callbacks
(`keras_kd.DistillationScheduler`) and keras-tuner change them between epochs
without retracing the step.
"""

from __future__ import annotations

import math
import numbers

import keras
import tensorflow as tf


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
