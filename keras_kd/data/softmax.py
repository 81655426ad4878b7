"""Is the teacher's output a softmax? Judged once, when a dataset is built.

A Keras model is judged by its output layer's activation (no data needed);
any other teacher by its outputs on a probe of zeros shaped like the
dataset's teacher inputs (no data read either).
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np
import tensorflow as tf

from keras_kd import targets as targets_lib

_SOFTMAX_ADVICE = (
    "DistillationLoss expects logits and applies its own softmax, so it would distil from "
    "softmax(p / T), which is nearly uniform. Give `with_teacher` the pre-softmax model, e.g. "
    "`keras.Model(teacher.input, teacher.layers[-1].output)` after setting the last layer's "
    "activation to None, or select a logits output with `output_index`."
)


def _final_activation(teacher, output_index) -> Optional[str]:
    """``"softmax"``, ``"other"`` (a known non-softmax activation) or ``None`` (cannot tell).

    Read from the layer that produces the selected output of a Keras model, with
    no data; ``None`` for callables and for layers whose activation is unknown.
    """
    try:
        outputs = getattr(teacher, "outputs", None)
    except (AttributeError, ValueError):  # an unbuilt Keras 3 Sequential raises
        return None
    if not outputs:
        return None
    try:  # the same selection as the teacher's logits at run time
        tensor = targets_lib.teacher_output(outputs if len(outputs) > 1 else outputs[0], output_index)
    except (IndexError, KeyError, TypeError):
        return None
    history = getattr(tensor, "_keras_history", None)
    layer = history[0] if history else None
    if layer is None:
        return None
    if type(layer).__name__ == "Softmax":
        return "softmax"
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    name = getattr(activation, "__name__", "")
    if name == "softmax":
        return "softmax"
    return "other" if name else None


def _looks_like_probabilities(values: np.ndarray) -> bool:
    """Rows in [0, 1] that sum to 1 (what a softmax output looks like)."""
    values = np.asarray(values, np.float64)
    if values.ndim < 1 or values.size == 0 or values.shape[-1] < 2 or not np.isfinite(values).all():
        return False
    return bool(values.min() >= 0.0 and values.max() <= 1.0 and np.all(np.abs(values.sum(-1) - 1.0) < 1e-3))


def warn_if_softmax(teachers, output_index, run_one, inputs_spec):
    """Warns once when a teacher outputs probabilities instead of logits.

    A Keras model is judged by the activation of its output layer (free). Any
    other teacher (functions, subclassed models, output layers without an
    activation) is run once, now, on a probe: zeros shaped and typed like the
    dataset's teacher inputs (`probe_inputs`). Nothing is read from the
    dataset: a batch read here would be taken from the user's pipeline (lost
    from a one-shot generator, a seeded reshuffling ``shuffle`` moved on to
    its next order). A softmax gives rows in [0, 1] summing to 1 whatever its
    input; logits at zero inputs are the biases' image, which do not.

    Args:
        teachers: the teacher, or an ensemble's members, as a list.
        output_index: which output holds the logits.
        run_one: ``run_one(teacher, inputs)`` -> that teacher's logits.
        inputs_spec: the ``element_spec`` of the teachers' inputs.

    Raises:
        Whatever the teacher raises on the probe, where every dimension of
        the probe is the dataset's own (static): a teacher that fails there
        fails on the data too, and says so here rather than inside ``fit``.
        Where a dimension had to be chosen (the batch size without
        ``drop_remainder``, a variable length) a failure only skips the
        check: the chosen size may be what failed, and the data will tell.
    """
    which = (lambda i: "The teacher's") if len(teachers) == 1 else (lambda i: f"Teacher {i} of the ensemble's")
    unknown = []
    for i, teacher in enumerate(teachers):
        kind = _final_activation(teacher, output_index)
        if kind == "softmax":
            warnings.warn(f"{which(i)} output layer applies a softmax. {_SOFTMAX_ADVICE}", stacklevel=3)
            return
        if kind is None:
            unknown.append(i)
    if not unknown:
        return
    probe = probe_inputs(inputs_spec)
    if probe is None:
        return  # ragged, sparse or unknown-rank inputs: no probe to build
    inputs, exact = probe
    for i in unknown:
        try:
            outputs = np.asarray(run_one(teachers[i], inputs))
        except Exception:  # noqa: BLE001 - re-raised unless the probe's shape was invented
            if exact:
                raise
            return
        if _looks_like_probabilities(outputs):
            warnings.warn(
                f"{which(i)} outputs look like probabilities (in [0, 1], rows summing to 1, on a probe "
                f"batch of zeros shaped like the dataset's inputs). {_SOFTMAX_ADVICE}",
                stacklevel=3,
            )
            return


_PROBE_BATCH = 2


def probe_inputs(spec):
    """Zeros (empty strings, False) of ``spec``'s structure, shapes and dtypes.

    Returns:
        ``(inputs, exact)``, or None when a component is not a dense tensor
        of known rank. An unknown batch (first) dimension becomes 2, another
        unknown dimension 1; ``exact`` is True when no dimension was unknown.
    """
    exact = True
    flat = tf.nest.flatten(spec)
    values = []
    for component in flat:
        if type(component) is not tf.TensorSpec or component.shape.rank is None:
            return None
        dims = []
        for axis, dim in enumerate(component.shape):
            if dim is None:
                exact = False
                dim = _PROBE_BATCH if axis == 0 else 1
            dims.append(dim)
        if component.dtype == tf.string:
            values.append(tf.fill(dims, ""))
        else:
            values.append(tf.zeros(dims, component.dtype))
    return tf.nest.pack_sequence_as(spec, values), exact
