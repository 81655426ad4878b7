"""The teacher side of one step: dense float32 teacher logits from any targets form.

TensorFlow or JAX by the student logits' type (`keras_kd._ops`). On JAX the
NaN/Inf check of the teacher logits cannot raise (nothing raises inside
``jax.jit``): the affected rows' loss is NaN, as on TensorFlow under XLA.
"""

from __future__ import annotations

from keras_kd import _ops
from keras_kd import targets as targets_lib
from keras_kd.losses import guards

_TEACHER_NAN_MESSAGE = (
    "keras_kd: teacher logits contain NaN or Inf. Check the teacher (its weights, inputs and "
    "final layer) or the cached logits."
)


def _check_class_count(raw, student_logits):
    t_classes, num_classes = raw.shape[-1], student_logits.shape[-1]
    if t_classes is not None and num_classes is not None and t_classes != num_classes:
        hint = (
            " A one-logit student is a binary classifier: give the teacher one logit too."
            if 1 in (t_classes, num_classes)
            else ""
        )
        raise ValueError(
            f"Teacher logits have shape {raw.shape} but the student's "
            f"logits have shape {student_logits.shape}: the class counts "
            f"differ ({t_classes} vs {num_classes}).{hint}"
        )


def _topk_rows(targets, raw, topk_fill, ops):
    """Per-row NaN guard for top-k targets, including the log-sum-exp consistency check."""
    nan_rows = guards.nan_rows(ops.cast(raw, "float32"))
    if targets.topk_logsumexp is None or topk_fill != "uniform":
        return nan_rows
    lse = ops.cast(targets.topk_logsumexp, "float32")
    lse_k = ops.logsumexp(ops.cast(raw, "float32"), axis=-1)
    # log-sum-exp over all classes is at least that over the top k, up to the
    # rounding of float16-stored values (relative 2^-11, 4x margin); rows with
    # NaN/Inf values are left to the NaN check, which names them.
    inconsistent = (nan_rows == 0.0) & (lse < lse_k - 2e-3 * (1.0 + ops.abs(lse_k)))
    return guards.nan_where_invalid(
        nan_rows + lse * 0.0,
        ~inconsistent,
        "keras_kd: top-k targets have `topk_logsumexp` smaller than the log-sum-exp of their own "
        "top-k logits, which is impossible for the log-sum-exp of all the teacher's logits (was it "
        "computed from other logits, e.g. divided by a temperature, or from probabilities?). "
        "Store tf.reduce_logsumexp(teacher_logits, -1) of the raw logits.",
    )


def dense_teacher(targets, student_logits, topk_fill):
    """Dense float32 teacher logits and their per-row NaN guard, or None without teacher.

    Args:
        targets: a materialised `TeacherTargets` (dense or top-k teacher).
        student_logits: the student's logits (for the class count and positions).
        topk_fill: how top-k targets fill the other classes.

    Returns:
        ``(dense, nan_rows)``: ``nan_rows`` is 0 for rows whose teacher values
        are all finite, NaN otherwise; adding it to a per-row term makes that
        term NaN (which XLA keeps); without XLA it raises with a clear message
        (``CheckNumerics``). None when the targets carry no teacher.

    Raises:
        ValueError: while tracing, for teacher logits whose positions or class
            count differ from the student's.
    """
    ops = _ops.namespace(student_logits)
    num_classes = student_logits.shape[-1]
    raw = targets.logits if targets.logits is not None else targets.topk_values
    if raw is None:
        return None
    raw = ops.convert_to_tensor(raw)
    guards.check_teacher_positions(raw.shape, student_logits.shape)
    if targets.logits is not None:
        _check_class_count(raw, student_logits)
        dense = ops.cast(raw, "float32")
        nan_rows = guards.nan_rows(dense)
    else:
        dense = targets_lib.dense_teacher_logits(targets, num_classes, topk_fill)
        nan_rows = _topk_rows(targets, raw, topk_fill, ops)
    # Any NaN/Inf in a teacher row makes that row's term NaN, which XLA (and JAX) keep; on TF
    # without XLA, CheckNumerics raises with the message. (-inf would otherwise read as "no mass".)
    return dense, ops.check_numerics(nan_rows, _TEACHER_NAN_MESSAGE)
