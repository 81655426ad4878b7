"""The fused step for the common case: hard cross-entropy + forward KL, one analytic gradient.

Autodiff through ``alpha * CE + (1 - alpha) * T^2 * KL`` and the reduction
builds a backward graph several times larger than the forward one, and on a
small student that graph, not the FLOPs, is the loss's cost. The gradient
with respect to the student logits ``s`` has a closed form:

```
d/ds [alpha * CE(y, s)] = alpha * (softmax(s) * sum(y) - y)          # the kernel's own backprop
d/ds [(1 - alpha) * T^2 * KL(p_t || softmax(s / T))]
    = (1 - alpha) * T * (softmax(s / T) - p_t)                         # sum(p_t) = 1
```

times the reduction's coefficient for the position (`reduction_coefficients`).
`fused_kd_loss` computes the forward values exactly as the general path does
(the same kernels, ``multiply_no_nan`` for ``0 * log 0``, the same NaN guards)
and returns this gradient through ``tf.custom_gradient``. Temperature and
alpha are read from their variables by the caller on every step, so schedules
take effect without retracing.

Used by `DistillationLoss.__call__` when the divergence is ``"kl"``, the hard
loss is the default, the logits are ``(batch, classes)`` with ``classes >= 2``
and the targets carry a teacher and labels; everything else takes the
general (autodiff) path. `DistillationLoss.terms`/``components``/``call``
always take the general path.
"""

from __future__ import annotations

import tensorflow as tf


def fused_kd_loss(student_logits, teacher_logits, nan_rows, labels, labelled, temperature, alpha,
                  scale_by_temperature_squared, coefficients=None):
    """``alpha * CE + (1 - alpha) * [T^2] * KL`` with an analytic gradient.

    Args:
        student_logits: float32 ``(batch, classes)``.
        teacher_logits: float32 dense teacher logits, same shape (no gradient).
        nan_rows: ``(batch,)``, 0 or NaN per row (the teacher's NaN guard).
        labels: ``int64`` class ids ``(batch,)`` in range (`NO_LABEL` already
            replaced), or dense float32 labels ``(batch, classes)``.
        labelled: float32 ``(batch,)`` mask of labelled examples, or None.
        temperature, alpha: float32 scalars (read from their variables).
        scale_by_temperature_squared: multiply the KL by ``T^2``.
        coefficients: the reduction's coefficients (`reduction_coefficients`,
            a scalar or ``(batch,)``): the loss is ``sum(coefficients *
            values)``. None for the per-example values (reduction "none").

    Returns:
        ``(loss, hard, soft)``: the reduced loss (or per-example values), and
        the per-example hard and soft terms for the observers (values only:
        the gradient flows through ``loss``).
    """
    dense_labels = labels.dtype.is_floating
    inv_t = 1.0 / temperature
    soft_scale = temperature * temperature if scale_by_temperature_squared else tf.ones_like(temperature)
    t_log = tf.nn.log_softmax(teacher_logits * inv_t)
    p_t = tf.exp(t_log)
    w_hard, w_soft = alpha, (1.0 - alpha) * soft_scale
    side = {}

    @tf.custom_gradient
    def forward(s):
        if dense_labels:
            hard, hard_bp = tf.raw_ops.SoftmaxCrossEntropyWithLogits(features=s, labels=labels)
        else:
            hard, hard_bp = tf.raw_ops.SparseSoftmaxCrossEntropyWithLogits(features=s, labels=labels)
        if labelled is not None:
            hard = hard * labelled
        s_log = tf.nn.log_softmax(s * inv_t)
        soft = soft_scale * tf.reduce_sum(tf.math.multiply_no_nan(t_log - s_log, p_t), axis=-1) + nan_rows
        values = w_hard * hard + (1.0 - alpha) * soft
        side["hard"], side["soft"] = hard, soft
        loss = values if coefficients is None else tf.reduce_sum(values * coefficients)

        def backward(upstream):
            scale = upstream if coefficients is None else upstream * coefficients
            c_hard = w_hard * scale if labelled is None else w_hard * scale * labelled
            c_soft = (w_soft * inv_t) * scale
            c_hard, c_soft = _column(c_hard, s), _column(c_soft, s)
            return hard_bp * c_hard + (tf.exp(s_log) - p_t) * c_soft

        return loss, backward

    loss = forward(student_logits)
    return loss, side["hard"], side["soft"]


def _column(coefficient, like):
    """A scalar or ``(batch,)`` coefficient as something that broadcasts against ``(batch, classes)``."""
    return coefficient[:, None] if coefficient.shape.rank == 1 else coefficient
