"""One teacher or an ensemble, as one function ``inputs -> float32 logits``.

Shared by both placements of `with_teacher`: the selection of the logits
output (`targets.teacher_output`) and the combination of an ensemble's logits
(`targets.ensemble_logits`) live in `keras_kd.targets`, so the cache and the
online teacher agree.
"""

from __future__ import annotations

import tensorflow as tf

from keras_kd import _checks
from keras_kd import targets as targets_lib


def teacher_members(teacher, output_index, ensemble):
    """The teachers as a list (an ensemble's members checked) and the ensemble rule.

    Raises:
        ValueError: for an empty list, members with different class counts or
            input shapes, or an unknown ``ensemble``.
        TypeError: for a member that is not callable.
    """
    ensemble = _checks.one_of(ensemble, "ensemble", targets_lib.ENSEMBLES)
    return _checks.teacher_list(teacher, output_index), ensemble


def _name(teacher, i):
    name = getattr(teacher, "name", None)
    return f"teacher {i} ({name!r})" if name else f"teacher {i}"


def member_logits(teacher, inputs, output_index):
    """One teacher's float32 logits: its selected output, in inference mode."""
    outputs = teacher(inputs, training=False)
    return tf.cast(targets_lib.teacher_output(outputs, output_index), tf.float32)


def teacher_function(teachers, output_index, ensemble):
    """``run(inputs)``: the (ensemble's) float32 logits for one batch of inputs.

    Each member runs in inference mode (``training=False``). Members whose
    class counts differ are refused while tracing (callables declare none
    before they run); the message lists every member's count.
    """

    def one(teacher, inputs):
        return member_logits(teacher, inputs, output_index)

    if len(teachers) == 1:
        teacher = teachers[0]
        return lambda inputs: one(teacher, inputs)

    def run(inputs):
        logits = [one(t, inputs) for t in teachers]
        shapes = [tuple(z.shape.as_list()[1:]) for z in logits]
        if len(set(shapes)) > 1:
            listed = ", ".join(f"{_name(t, i)}: {s}" for i, (t, s) in enumerate(zip(teachers, shapes)))
            raise ValueError(
                "Expected every teacher of an ensemble to output logits of the same shape (the same "
                f"classes). Received: {listed}. Ensemble only teachers of the same classes."
            )
        return targets_lib.ensemble_logits(logits, ensemble)

    return run
