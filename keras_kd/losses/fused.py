"""The fused step for the common case: hard cross-entropy + forward KL, one analytic gradient.

Autodiff through ``alpha * CE + (1 - alpha) * T^2 * KL`` and the reduction
builds a backward graph larger than the forward one, and on a small student
that graph's op count, not the FLOPs, is the loss's cost. The gradient with
respect to the student logits ``s`` has a closed form:

```
d/ds [alpha * CE(y, s)] = alpha * (softmax(s) * sum(y) - y)          # the kernel's own backprop
d/ds [(1 - alpha) * T^2 * KL(p_t || softmax(s / T))]
    = (1 - alpha) * T * (softmax(s / T) - p_t)                         # sum(p_t) = 1
```

times the reduction's coefficient for the position (`reduction_coefficients`).
`fused_kd_loss` computes the forward values with the same kernels as the
general path (``multiply_no_nan`` for ``0 * log 0``, the same NaN guards) and
returns this gradient through ``tf.custom_gradient``. Every factor that has
no gradient (alpha, T, the reduction's weights, the labelled mask) is folded
into two per-example coefficients before the custom gradient, so the forward
and backward passes are a handful of ops. Temperature and alpha are read
from their variables by the caller at every step, so schedules take effect
without retracing.

Used by `DistillationLoss.__call__` when the divergence is ``"kl"``, the hard
loss is the default, the logits are ``(batch, classes)`` with ``classes >= 2``
and the targets carry a teacher and labels; everything else takes the
general (autodiff) path. `DistillationLoss.terms`/``components``/``call``
always take the general path.
"""

from __future__ import annotations

import tensorflow as tf


def fused_kd_loss(student_logits, teacher_logits, nan_rows, labels, labelled, temperature, alpha,
                  scale_by_temperature_squared, coefficients=None, per_example_terms=False):
    """``sum(c * (alpha * CE + (1 - alpha) * [T^2] * KL))`` with an analytic gradient.

    Args:
        student_logits: float32 ``(batch, classes)``.
        teacher_logits: float32 dense teacher logits, same shape (no gradient).
        nan_rows: ``(batch,)``, 0 or NaN per row (the teacher's NaN guard).
        labels: class ids ``(batch,)`` (int32 or int64) in range, `NO_LABEL`
            already replaced, or dense float32 labels ``(batch, classes)``.
        labelled: float32 ``(batch,)`` mask of labelled examples, or None.
        temperature, alpha: float32 scalars (read from their variables).
        scale_by_temperature_squared: multiply the KL by ``T^2``.
        coefficients: the reduction's coefficients ``c`` (a scalar or
            ``(batch,)``, see `reduction_coefficients`); None for the
            per-example values (reduction "none").
        per_example_terms: also return the per-example hard and soft terms
            (for observers); otherwise they are None and not computed.

    Returns:
        ``(loss, hard, soft)``: the reduced loss (per-example values when
        ``coefficients`` is None), and the per-example terms or None. The
        gradient flows through ``loss`` only.
    """
    dense_labels = labels.dtype.is_floating
    inv_t = 1.0 / temperature
    t_log = tf.nn.log_softmax(teacher_logits * inv_t)
    p_t = tf.exp(t_log)
    # Per-example coefficients of the hard and the soft (KL) term in the loss.
    soft_scale = (1.0 - alpha) * temperature * temperature if scale_by_temperature_squared else 1.0 - alpha
    c = 1.0 if coefficients is None else coefficients
    c_hard = alpha * c if labelled is None else (alpha * c) * labelled
    c_soft = soft_scale * c
    c_soft_grad = c_soft * inv_t
    side = {}

    @tf.custom_gradient
    def forward(s):
        if dense_labels:
            hard, hard_bp = tf.raw_ops.SoftmaxCrossEntropyWithLogits(features=s, labels=labels)
        else:
            hard, hard_bp = tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(features=s, labels=labels)
        s_log = tf.nn.log_softmax(s * inv_t)
        kl = tf.reduce_sum(tf.math.multiply_no_nan(t_log - s_log, p_t), axis=-1) + nan_rows
        values = c_hard * hard + c_soft * kl
        loss = values if coefficients is None else tf.reduce_sum(values)
        if per_example_terms:
            side["hard"] = hard if labelled is None else hard * labelled
            side["kl"] = kl

        def backward(upstream):
            g_hard, g_soft = _column(upstream * c_hard), _column(upstream * c_soft_grad)
            return hard_bp * g_hard + (tf.exp(s_log) - p_t) * g_soft

        return loss, backward

    loss = forward(student_logits)
    if not per_example_terms:
        return loss, None, None
    t2 = temperature * temperature if scale_by_temperature_squared else 1.0
    return loss, side["hard"], t2 * side["kl"]


def _column(coefficient):
    """A scalar or ``(batch,)`` coefficient as something that broadcasts against ``(batch, classes)``."""
    return coefficient[:, None] if coefficient.shape.rank == 1 else coefficient
