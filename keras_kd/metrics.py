"""Distillation metrics that read the targets contract.

Plain functions ``fn(y_true, y_pred) -> per-example values``: both Keras
flavours wrap them in a mean metric named after the function, so they go
straight into ``compile(metrics=[...])`` next to the user's own metrics.
"""

from __future__ import annotations

import tensorflow as tf

from keras_kd import _compat
from keras_kd import _labels
from keras_kd import _ops
from keras_kd import targets as targets_lib


def _label_class(labels, y_pred):
    """Class ids from sparse ids (any dtype), one-hot/soft labels (argmax) or binary 0/1 labels."""
    ops = _ops.namespace(y_pred)
    return _labels.class_ids(ops.convert_to_tensor(labels), y_pred.shape[-1], ops.ndim(y_pred))


@_compat.register_serializable()
def teacher_agreement(y_true, y_pred):
    """1 where the student's predicted class equals the teacher's, else 0.

    The predicted class is the argmax of the logits, or ``logit > 0`` for a
    one-logit (binary) model. For top-k targets the teacher's class is its
    top-1 index. Batches without a teacher (plain labels, e.g. a validation
    set without `keras_kd.with_teacher`) give the student's **accuracy** on
    the labels instead (class ids, the argmax of one-hot labels, or 0/1
    binary labels), so validation without a teacher is still measured;
    ``val_teacher_agreement`` is then the validation accuracy.

    Raises:
        ValueError: for a batch with neither a teacher nor labels (unlabelled
            data without teacher), where no agreement can be measured.
    """
    ops = _ops.namespace(y_pred, y_true)
    y_pred = ops.convert_to_tensor(y_pred)
    student = _labels.predicted_class(y_pred)
    if not targets_lib.is_targets(y_true):
        return ops.cast(student == _label_class(y_true, y_pred), "float32")
    y_true = targets_lib.materialize(y_true)
    if y_true.logits is not None:
        teacher = _labels.predicted_class(ops.cast(ops.convert_to_tensor(y_true.logits), "float32"))
    elif y_true.topk_values is not None:
        values = ops.convert_to_tensor(y_true.topk_values)
        best = ops.argmax(values, axis=-1, dtype="int32")
        indices = ops.convert_to_tensor(y_true.topk_indices)
        if ops.is_tf:  # one gather op
            teacher = tf.cast(tf.gather(indices, best, batch_dims=best.shape.rank), tf.int64)
        else:
            teacher = ops.cast(ops.take_along_axis(indices, best[..., None], axis=-1)[..., 0], ops.int_dtype)
        if y_pred.shape[-1] == 1:  # one class: the single top-1 logit decides
            teacher = _labels.predicted_class(ops.cast(values, "float32"))
    elif y_true.has_labels:
        teacher = _label_class(y_true.labels, y_pred)
    else:
        raise ValueError(
            "teacher_agreement received a batch with neither teacher targets nor labels (unlabelled data "
            "without a teacher): there is nothing to agree with. Attach the teacher with "
            "`keras_kd.with_teacher` or leave the metric out for this data."
        )
    return ops.cast(student == teacher, "float32")


def loss_components(loss):
    """Metrics that report a `DistillationLoss`'s two terms separately.

    Args:
        loss: the `keras_kd.DistillationLoss` the model is compiled with.

    Returns:
        ``[kd_hard, kd_soft]``: per-example hard-label loss and distillation
        term (``T^2 * D``, before alpha), as metric functions. They call the
        loss's pure `DistillationLoss.components`: the loss's observers (e.g.
        `keras_kd.HardSampleReweighting`) still run once per step. On batches
        without a teacher (e.g. a validation set without `with_teacher`)
        there is no distillation term and ``kd_soft`` reports 0, so
        ``val_kd_soft = 0`` there means "not measured", not "the student
        equals the teacher"; ``kd_hard`` is then the whole loss.

    Example:

    ```python
    kd = keras_kd.DistillationLoss()
    student.compile("adam", loss=kd,
                    metrics=["accuracy", keras_kd.teacher_agreement,
                             *keras_kd.loss_components(kd)])
    ```
    """

    return [LossComponent(loss, "hard"), LossComponent(loss, "soft")]


@_compat.register_serializable()
class LossComponent:
    """One term of a `DistillationLoss` as a metric function (see `loss_components`).

    A callable object rather than a closure so that a model compiled with it
    saves and loads (it serializes its loss); its ``__name__`` (``kd_hard`` or
    ``kd_soft``) names the metric in the logs.

    Args:
        loss: the `keras_kd.DistillationLoss` whose terms to report.
        component: ``"hard"`` (hard-label loss) or ``"soft"`` (distillation
            term, 0 on batches without a teacher).

    Raises:
        ValueError: for another ``component``.
    """

    def __init__(self, loss, component: str):
        if component not in ("hard", "soft"):
            raise ValueError(f"Expected `component` to be 'hard' or 'soft'. Received: component={component!r}")
        self.loss = loss
        self.component = component
        self.__name__ = f"kd_{component}"

    def __call__(self, y_true, y_pred):
        hard, soft = self.loss.components(y_true, y_pred)
        if self.component == "hard":
            return hard
        return _ops.namespace(hard).zeros_like(hard) if soft is None else soft

    def __repr__(self):
        return f"<keras_kd metric {self.__name__}>"

    def get_config(self):
        return {"loss": _compat.serialize(self.loss), "component": self.component}

    @classmethod
    def from_config(cls, config):
        return cls(_compat.deserialize(config["loss"]), config["component"])
