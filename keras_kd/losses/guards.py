"""Checks on the step's inputs that hold in every execution mode, and what the step sees.

Bad per-example input (non-finite teacher logits, labels out of range) raises
``InvalidArgumentError`` in eager and graph mode and makes the affected
examples' loss NaN under XLA, which drops assertions: it never trains silently.
Shape mismatches raise ``ValueError`` while tracing.

On JAX nothing can raise from inside ``jax.jit``: the assertions are no-ops
(`keras_kd._ops`) and the NaN is the whole check, exactly what TF gives under
XLA. The NaN guards are written against `keras_kd._ops`, so both backends build
the same values.
"""

from __future__ import annotations

import tensorflow as tf

from keras_kd import _ops


def nan_where_invalid(values, valid, message):
    """``values`` where ``valid``, NaN elsewhere; raises in eager and graph mode.

    This is how the loss refuses bad per-example input (non-finite teacher
    logits, labels out of range) in every setting: without XLA the
    ``tf.debugging.Assert`` raises ``InvalidArgumentError`` with ``message``;
    with ``jit_compile=True`` XLA drops the assertion, but the affected
    examples' loss is NaN, so training visibly fails (loss ``nan``) instead of
    silently training on wrong values.

    The NaN is added as a term that depends on ``valid`` only, so the
    gradient of ``values`` is unchanged and no extra gradient ops are built.

    Args:
        values: per-example values.
        valid: boolean tensor of the same shape, computed from the inputs
            (labels, teacher logits), not from trainable values.
        message: the error message (start it with ``"keras_kd: "``).

    Returns:
        ``values`` with NaN where ``valid`` is False.
    """
    ops = _ops.namespace(values)
    if not ops.is_tf:
        # JAX: no assertion can run; a select, which XLA never simplifies away (it may rewrite
        # ``values + 0 / valid`` into a finite value when ``valid`` comes from a runtime input)
        return ops.where(valid, values, ops.constant(float("nan"), ops.dtype_name(values)))
    check = ops.assert_all(valid, message)
    with ops.control_dependencies([check] if check is not None else []):
        penalty = _nan_penalty(valid, ops.dtype_name(values), ops)
    return values + penalty


def _nan_penalty(valid, dtype="float32", ops=None):
    """0 where ``valid``, NaN elsewhere, as ``0 / valid``: two element-wise ops, cheaper
    on CPU than a broadcasting ``tf.where``; it depends on inputs only (no gradient)."""
    ops = ops or _ops.namespace(valid)
    return ops.constant(0.0, dtype) / ops.cast(valid, dtype)


def nan_rows(values):
    """Per row (all but the last axis): 0 when every value is finite, else NaN.

    ``sum(values * 0)``: two ops, and NaN for any NaN or +-Inf in the row.
    """
    return _ops.namespace(values).sum(values * 0.0, axis=-1)


def check_teacher_positions(teacher_shape, student_shape):
    """Teacher and student logits must agree on every axis but the last (the classes, or k).

    TensorFlow would broadcast a teacher of shape ``(batch, classes)`` against a
    sequence student ``(batch, time, classes)`` (or a size-1 axis against any
    size) and silently compare the wrong positions, so this is checked while
    tracing, wherever the shapes are known.

    Raises:
        ValueError: naming both shapes, for a different rank or a known
            non-class axis that differs.
    """
    teacher_shape, student_shape = tf.TensorShape(teacher_shape), tf.TensorShape(student_shape)
    t_rank, s_rank = teacher_shape.rank, student_shape.rank
    if t_rank is None or s_rank is None:
        return
    differs = t_rank != s_rank or any(
        a is not None and b is not None and a != b for a, b in zip(teacher_shape[:-1], student_shape[:-1])
    )
    if differs:
        raise ValueError(
            f"Teacher logits have shape {teacher_shape} but the student's logits have shape {student_shape}: "
            "they must agree on every axis but the last (batch, and time steps for sequence models), one "
            "teacher row per student position. Give the teacher the same inputs and output positions as the "
            "student (e.g. both per time step, or both per sequence)."
        )


_PROBABILITY_OPS = ("Softmax", "Sigmoid")


def producing_activation(tensor):
    """``"Softmax"``/``"Sigmoid"`` when ``tensor`` comes out of that activation, else None.

    Uses what Keras itself uses for its own losses' warning: the
    ``_keras_logits`` attribute Keras activations set, or (in a traced graph)
    the producing op, looking through casts and identities.
    """
    if hasattr(tensor, "_keras_logits"):
        op = getattr(tensor, "op", None)
        return getattr(op, "type", None) if getattr(op, "type", None) in _PROBABILITY_OPS else "Softmax or Sigmoid"
    op = getattr(tensor, "op", None) if not isinstance(tensor, (tf.__internal__.EagerTensor, tf.Variable)) else None
    for _ in range(4):
        if op is None:
            return None
        if op.type in _PROBABILITY_OPS:
            return op.type
        if op.type not in ("Cast", "Identity") or not op.inputs:
            return None
        op = op.inputs[0].op
    return None


def in_training_step():
    """Whether a gradient tape is recording, i.e. this is a training step (not
    evaluate/predict); None if this TensorFlow no longer tells (the canary in
    tests/test_private_canaries.py fails first)."""
    try:
        from tensorflow.python.eager import record  # noqa: PLC0415 - private, guarded
    except ImportError:  # pragma: no cover - TF moved it
        return None
    could_possibly_record = getattr(record, "could_possibly_record", None)
    return None if could_possibly_record is None else bool(could_possibly_record())


def graph_key():
    graph = tf.compat.v1.get_default_graph()
    return getattr(graph, "name", None) or id(graph)

