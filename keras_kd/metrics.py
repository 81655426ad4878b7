"""Distillation metrics that read the targets contract.

Plain functions ``fn(y_true, y_pred) -> per-example values``: both Keras
flavours wrap them in a mean metric named after the function, so they go
straight into ``compile(metrics=[...])`` next to the user's own metrics.
"""

from __future__ import annotations

import tensorflow as tf

from keras_kd import _compat
from keras_kd import targets as targets_lib


@_compat.register_serializable()
def teacher_agreement(y_true, y_pred):
    """1 where the student's argmax class equals the teacher's, else 0.

    For top-k targets the teacher's class is its top-1 index. Targets without a
    teacher (plain labels) give the student's accuracy on the labels' argmax
    class ids instead, so validation sets without teacher are still measured.
    """
    y_pred = tf.convert_to_tensor(y_pred)
    student = tf.argmax(y_pred, axis=-1, output_type=tf.int64)
    if not targets_lib.is_targets(y_true):
        return tf.zeros_like(student, dtype=tf.float32)
    y_true = targets_lib.materialize(y_true)
    if y_true.logits is not None:
        teacher = tf.argmax(y_true.logits, axis=-1, output_type=tf.int64)
    elif y_true.topk_values is not None:
        best = tf.argmax(y_true.topk_values, axis=-1, output_type=tf.int32)
        teacher = tf.cast(tf.gather(y_true.topk_indices, best, batch_dims=best.shape.rank), tf.int64)
    else:
        return tf.zeros_like(student, dtype=tf.float32)
    return tf.cast(tf.equal(student, teacher), tf.float32)


def loss_components(loss):
    """Metrics that report a `DistillationLoss`'s two terms separately.

    Args:
        loss: the `keras_kd.DistillationLoss` the model is compiled with.

    Returns:
        ``[kd_hard, kd_soft]``: per-example hard-label loss and distillation
        term (``T^2 * D``, before alpha), as metric functions.

    Example:

    ```python
    kd = keras_kd.DistillationLoss()
    student.compile("adam", loss=kd,
                    metrics=["accuracy", keras_kd.teacher_agreement,
                             *keras_kd.loss_components(kd)])
    ```
    """

    def kd_hard(y_true, y_pred):
        return loss.components(y_true, y_pred)[0]

    def kd_soft(y_true, y_pred):
        hard, soft = loss.components(y_true, y_pred)
        return tf.zeros_like(hard) if soft is None else soft

    return [kd_hard, kd_soft]
