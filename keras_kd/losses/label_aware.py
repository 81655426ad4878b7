"""Label-aware divergences: divergences that also read each example's class.

A label-aware divergence is a `LabelAwareDivergence`: called as
``divergence(teacher_logits, student_logits, class_ids)`` with logits already
divided by the temperature (as every divergence) and ``class_ids``, the
examples' ``int64`` target classes (decoded by `keras_kd._labels.class_ids`:
sparse ids, the argmax of dense/mixup labels, ``label > 0.5`` for a one-logit
model). It returns one value per example, before the loss's ``T^2`` factor and
``1 - alpha`` weight. It is serialisable (``get_config``/``from_config``,
registered with both Keras flavours), so a compiled `DistillationLoss` using
one saves and loads with the model.

`DistillationLoss` refuses to run a label-aware divergence without labels:
targets without labels (``has_labels=False``) raise ``ValueError`` while
tracing; `keras_kd.NO_LABEL` examples (transfer sets) and labels out of range
raise ``InvalidArgumentError`` (eager and graph mode) or give a NaN loss
(under XLA).

To write one: subclass `LabelAwareDivergence`, implement ``call`` and
``get_config`` (mirroring ``__init__``), decorate the class with
``keras_kd._compat.register_serializable()``.
"""

from __future__ import annotations

from keras_kd import _checks
from keras_kd import _compat
from keras_kd import _labels
from keras_kd import _ops
from keras_kd.losses import guards
from keras_kd.losses import hard as hard_lib
from keras_kd.losses import values as values_lib


class LabelAwareDivergence:
    """Base class of divergences that read the labels.

    Attributes:
        name: the short name used in messages (and, for the built-in default
            instance, in `keras_kd.losses.DIVERGENCES`).
        zero_mass_safe: whether the divergence stays finite where the teacher
            gives a class no mass (``topk_fill="renormalize"``).
    """

    name = "label_aware"
    zero_mass_safe = False

    def __call__(self, teacher_logits, student_logits, class_ids=None):
        if class_ids is None:
            raise TypeError(
                f"{self!r} (divergence {self.name!r}) is label-aware: it needs the class ids, called as "
                "`fn(teacher_logits, student_logits, class_ids)` with int64 ids in [0, classes). "
                "Received only teacher and student logits. `DistillationLoss(divergence=...)` passes the "
                "class ids from the labels: use it, or pass them yourself."
            )
        return self.call(teacher_logits, student_logits, class_ids)

    def call(self, teacher_logits, student_logits, class_ids):
        """Per-example values; ``class_ids`` are valid ``int64`` ids in ``[0, classes)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement `call`.")

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        # by type only: stable when a weight changes mid-fit (autograph hashes the callable), and
        # equal instances (same type and config) still hash alike
        return hash(type(self).__name__)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def is_label_aware(divergence) -> bool:
    """Whether ``divergence`` reads the labels (a `LabelAwareDivergence`)."""
    return isinstance(divergence, LabelAwareDivergence)


def _unlabelled_message(name):
    return (
        f"keras_kd: divergence={name!r} (a label-aware divergence, e.g. keras_kd.DecoupledKD) needs a class "
        "label for every example, but the batch has unlabelled examples (keras_kd.NO_LABEL) or labels out of "
        "range. Distil transfer sets (unlabelled data) with a divergence that does not read labels, e.g. "
        "divergence='kl', or give every example its label."
    )


def call_with_labels(divergence, teacher_logits, student_logits, labels, raw_student_logits):
    """Runs a label-aware divergence on the batch's labels, refusing examples without a valid one.

    Args:
        divergence: a `LabelAwareDivergence`.
        teacher_logits, student_logits: logits divided by T (the two-class
            logits ``[0, z / T]`` for a one-logit model).
        labels: the batch's labels (any form `keras_kd._labels` reads), or
            None for targets without labels.
        raw_student_logits: the student's own logits (their shape decides how
            the labels are read).

    Returns:
        Per-example values; NaN for `NO_LABEL` or out-of-range labels, which
        also raise ``InvalidArgumentError`` without XLA.

    Raises:
        ValueError: for ``labels=None`` or labels whose shape fits no class count.
    """
    if labels is None:
        raise ValueError(
            f"divergence={divergence.name!r} (a label-aware divergence, {divergence!r}) needs the labels, "
            "but the targets carry none (unlabelled data, has_labels=False). Distil unlabelled data with a "
            "divergence that does not read labels, e.g. divergence='kl', or attach the labels to the dataset."
        )
    ops = _ops.namespace(student_logits)
    labels = ops.convert_to_tensor(labels)
    hard_lib.check_label_shape(labels, raw_student_logits)
    num_classes = raw_student_logits.shape[-1]
    ids = _labels.class_ids(labels, num_classes, ops.ndim(raw_student_logits))
    classes = 2 if num_classes == 1 else (num_classes or ops.dynamic_shape(student_logits, ops.int_dtype)[-1])
    valid = _labels.valid_class_ids(ids, classes, allow_unlabelled=False)
    values = divergence(teacher_logits, student_logits, ops.where(valid, ids, ops.zeros_like(ids)))
    return guards.nan_where_invalid(ops.cast(values, "float32"), valid, _unlabelled_message(divergence.name))


def _kl_terms(p_log, q_log):
    """``p * (log p - log q)`` element-wise with ``0 * log 0 = 0``; NaN propagates."""
    ops = _ops.namespace(p_log)
    return ops.multiply_no_nan(p_log - q_log, ops.exp(p_log))


def decoupled_kd(teacher_logits, student_logits, class_ids, target_weight=1.0, non_target_weight=8.0):
    """Decoupled KD per example: ``target_weight * TCKD + non_target_weight * NCKD``.

    With ``p = softmax(teacher_logits)``, ``q = softmax(student_logits)``
    (logits already divided by T) and ``g`` the target class:

    * ``TCKD = KL([p_g, 1 - p_g] || [q_g, 1 - q_g])``, the binary
      (target, all others) distributions;
    * ``NCKD = KL(p_hat || q_hat)`` over the non-target classes, with
      ``p_hat_c = p_c / (1 - p_g)`` for ``c != g``.

    Computed in log space: ``log(1 - p_g)`` is the log-sum-exp of the
    non-target logits minus that of all logits, so nothing is subtracted from 1.

    Args:
        teacher_logits: teacher logits divided by T, shape ``batch + (K,)``.
        student_logits: student logits divided by T, same shape.
        class_ids: ``int64`` target classes in ``[0, K)``, shape ``batch``.
        target_weight: weight of TCKD (the paper's alpha).
        non_target_weight: weight of NCKD (the paper's beta).

    Returns:
        Per-example values of shape ``batch``.

    References:
        Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation",
        CVPR 2022.
    """
    ops = _ops.namespace(student_logits, teacher_logits)
    num_classes = ops.dynamic_shape(student_logits)[-1] if ops.is_tf else student_logits.shape[-1]
    target = ops.one_hot_bool(class_ids, num_classes)
    neg_inf = ops.constant(-float("inf"), "float32")

    def split(logits):
        log_all = ops.logsumexp(logits, axis=-1)
        others = ops.where(target, neg_inf, logits)
        log_others = ops.logsumexp(others, axis=-1)
        log_target = ops.sum(ops.where(target, logits, ops.zeros_like(logits)), axis=-1) - log_all
        # log p_hat over the non-target classes; the target's own entry is -inf (no mass)
        return log_target, log_others - log_all, others - log_others[..., None]

    t_target, t_rest, t_hat = split(ops.cast(teacher_logits, "float32"))
    s_target, s_rest, s_hat = split(ops.cast(student_logits, "float32"))
    tckd = _kl_terms(t_target, s_target) + _kl_terms(t_rest, s_rest)
    # the target entries: p_hat = 0 there, and (-inf) - (-inf) is NaN; zero them first
    t_hat_safe = ops.where(target, ops.zeros_like(t_hat), t_hat)
    s_hat_safe = ops.where(target, ops.zeros_like(s_hat), s_hat)
    nckd = ops.sum(ops.multiply_no_nan(t_hat_safe - s_hat_safe, ops.exp(t_hat)), axis=-1)
    return target_weight * tckd + non_target_weight * nckd


@_compat.register_serializable()
class DecoupledKD(LabelAwareDivergence):
    """Decoupled Knowledge Distillation (DKD), a label-aware divergence.

    Splits the classical KD term into the target-class part (TCKD, the binary
    "target vs. the rest" distributions) and the non-target part (NCKD, the
    distribution over the other classes), and weighs them separately, which
    frees the non-target "dark knowledge" from being suppressed by a confident
    teacher. Used by `keras_kd.DistillationLoss`, the soft term per example is

    ```
    T^2 * (target_weight * TCKD + non_target_weight * NCKD)
    ```

    and the total stays ``alpha * hard + (1 - alpha) * soft``.

    Labels: sparse class ids, one-hot labels, or mixed dense labels (mixup),
    whose target class is their argmax. Every example needs a label:
    `keras_kd.NO_LABEL` examples raise (NaN under XLA); targets without labels
    raise ``ValueError``. Top-k targets: DKD sees the same dense teacher
    logits as every divergence (``topk_fill="uniform"``); ``"renormalize"``
    is refused (the non-target distribution would have zero-mass classes).
    A one-logit (binary) model: the two-class logits ``[0, z / T]`` have one
    non-target class, so NCKD is 0 and DKD is ``target_weight`` times the
    Bernoulli KL.

    Args:
        target_weight: weight of TCKD, ``>= 0``. Defaults to 1.0.
        non_target_weight: weight of NCKD, ``>= 0``. Defaults to 8.0
            (the paper's CIFAR-100 setting).

    Both weights may be changed between epochs (``dkd.non_target_weight = 4.0``,
    checked like in ``__init__``); the change takes effect at the next step on
    TensorFlow and JAX (see `keras_kd.losses.values.Hyperparameter`).

    Raises:
        ValueError: for a negative, non-finite or non-number weight.

    Example:

    ```python
    kd = keras_kd.DistillationLoss(
        temperature=4.0, alpha=0.1,
        divergence=keras_kd.DecoupledKD(target_weight=1.0, non_target_weight=8.0))
    # or, with these defaults: keras_kd.DistillationLoss(divergence="dkd")
    ```

    References:
        Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation",
        CVPR 2022.
    """

    name = "dkd"
    zero_mass_safe = False

    def __init__(self, target_weight=1.0, non_target_weight=8.0):
        self._target_weight = values_lib.Hyperparameter(
            _checks.number(target_weight, "target_weight", low=0.0), "target_weight", 0.0)
        self._non_target_weight = values_lib.Hyperparameter(
            _checks.number(non_target_weight, "non_target_weight", low=0.0), "non_target_weight", 0.0)

    @property
    def target_weight(self) -> float:
        return self._target_weight.get()

    @target_weight.setter
    def target_weight(self, value):
        self._target_weight.set(_checks.number(value, "target_weight", low=0.0))

    @property
    def non_target_weight(self) -> float:
        return self._non_target_weight.get()

    @non_target_weight.setter
    def non_target_weight(self, value):
        self._non_target_weight.set(_checks.number(value, "non_target_weight", low=0.0))

    def call(self, teacher_logits, student_logits, class_ids):
        ops = _ops.namespace(student_logits, teacher_logits)
        return decoupled_kd(teacher_logits, student_logits, class_ids, self._target_weight.read(ops),
                            self._non_target_weight.read(ops))

    def get_config(self):
        return {"target_weight": self.target_weight, "non_target_weight": self.non_target_weight}
