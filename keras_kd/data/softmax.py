"""Is the teacher's output a softmax? Judged once per dataset.

A Keras model is judged by its output layer's activation (no data needed),
when the dataset is built; any other teacher by its outputs on the first
batch the dataset yields.
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


def warn_if_softmax(teachers, output_index, run_one):
    """Warns once when a teacher outputs probabilities instead of logits.

    A Keras model is judged by the activation of its output layer, now and
    with no data. Any other teacher (functions, subclassed models, output
    layers without an activation) is judged by its outputs on the first batch
    the dataset yields: the returned transform adds that check to the
    pipeline. Nothing is read from the dataset here (a batch read now would be
    taken from the user's pipeline: lost from a one-shot generator, a seeded
    reshuffling ``shuffle`` moved on to its next order).

    Args:
        teachers: the teacher, or an ensemble's members, as a list.
        output_index: which output holds the logits.
        run_one: ``run_one(teacher, inputs)`` -> that teacher's logits.

    Returns:
        None when every teacher was judged from its layers, else
        ``watch(dataset, teacher_inputs)``: ``dataset`` with the check on its
        first element (once per returned transform, however many epochs),
        where ``teacher_inputs(*element)`` gives the teachers' inputs.
    """
    which = (lambda i: "The teacher's") if len(teachers) == 1 else (lambda i: f"Teacher {i} of the ensemble's")
    unknown = []
    for i, teacher in enumerate(teachers):
        kind = _final_activation(teacher, output_index)
        if kind == "softmax":
            warnings.warn(f"{which(i)} output layer applies a softmax. {_SOFTMAX_ADVICE}", stacklevel=3)
            return None
        if kind is None:
            unknown.append(i)
    if not unknown:
        return None
    checked = []

    def judge(inputs):
        if checked:
            return
        checked.append(True)
        for i in unknown:
            if _looks_like_probabilities(np.asarray(run_one(teachers[i], inputs))):
                warnings.warn(
                    f"{which(i)} outputs on the first batch look like probabilities (in [0, 1], rows "
                    f"summing to 1). {_SOFTMAX_ADVICE}",
                    stacklevel=2,
                )
                return

    def watch(dataset, teacher_inputs):
        def check(index, element):
            def first():
                inputs = teacher_inputs(*element)
                flat = tf.nest.flatten(inputs, expand_composites=True)

                def on_host(*values):
                    judge(tf.nest.pack_sequence_as(inputs, list(values), expand_composites=True))
                    return True

                return tf.py_function(on_host, flat, Tout=tf.bool)

            done = tf.cond(tf.equal(index, 0), first, lambda: tf.constant(True))
            with tf.control_dependencies([done]):
                return tf.nest.map_structure(tf.identity, element, expand_composites=True)

        return dataset.enumerate().map(check)

    return watch
