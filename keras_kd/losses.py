"""Distillation losses: divergences between temperature-scaled logits, and
`DistillationLoss`, the loss a user passes to their own ``compile``.

Everything here is TensorFlow math in float32, whatever the model's dtype
policy. Divergence functions return per-position values (one per example, or
per example and time step); reduction, sample weights and masks are applied in
one place, `DistillationLoss.__call__`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable, Union

import keras
import tensorflow as tf

from keras_kd import _compat
from keras_kd import targets as targets_lib

Divergence = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


# ---------------------------------------------------------------------------
# Divergences. Arguments are logits already divided by the temperature; the
# teacher comes first, as in D(teacher || student). Each returns the
# divergence over the last (class) axis.
# ---------------------------------------------------------------------------


def _xlogy_ratio(probs, log_probs, other_log_probs):
    """sum p * (log p - log q) with 0 * log 0 = 0 (p may be exactly 0)."""
    positive = probs > 0
    safe_log = tf.where(positive, log_probs, tf.zeros_like(log_probs))
    safe_other = tf.where(positive, other_log_probs, tf.zeros_like(other_log_probs))
    return tf.reduce_sum(tf.where(positive, probs * (safe_log - safe_other), 0.0), axis=-1)


def forward_kl(teacher_logits, student_logits):
    """KL(teacher || student) between the softmaxes of the logits.

    Formula: ``sum_c p_t[c] * (log p_t[c] - log p_s[c])``, with
    ``p = softmax(logits)`` and ``0 * log 0 = 0`` (teacher logits may be
    ``-inf`` for classes it gives no mass).

    Reference: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
    Network", 2015.
    """
    t_log = tf.nn.log_softmax(teacher_logits, axis=-1)
    s_log = tf.nn.log_softmax(student_logits, axis=-1)
    return _xlogy_ratio(tf.exp(t_log), t_log, s_log)


def reverse_kl(teacher_logits, student_logits):
    """KL(student || teacher), the mode-seeking direction.

    Reference: Gu et al., "MiniLLM: Knowledge Distillation of Large Language
    Models", 2024.
    """
    t_log = tf.nn.log_softmax(teacher_logits, axis=-1)
    s_log = tf.nn.log_softmax(student_logits, axis=-1)
    return _xlogy_ratio(tf.exp(s_log), s_log, t_log)


def jensen_shannon(teacher_logits, student_logits):
    """Jensen-Shannon divergence: ``(KL(p_t || m) + KL(p_s || m)) / 2``,
    ``m = (p_t + p_s) / 2``. Symmetric and bounded by ``log 2``.
    """
    t_log = tf.nn.log_softmax(teacher_logits, axis=-1)
    s_log = tf.nn.log_softmax(student_logits, axis=-1)
    m_log = tf.reduce_logsumexp(tf.stack([t_log, s_log]), axis=0) - math.log(2.0)
    return 0.5 * (_xlogy_ratio(tf.exp(t_log), t_log, m_log) + _xlogy_ratio(tf.exp(s_log), s_log, m_log))


def soft_cross_entropy(teacher_logits, student_logits):
    """Cross-entropy of the student's softmax against the teacher's:
    ``-sum_c p_t[c] log p_s[c]``. Equals `forward_kl` plus the teacher's
    entropy, which has no gradient for the student.
    """
    t_probs = tf.nn.softmax(teacher_logits, axis=-1)
    s_log = tf.nn.log_softmax(student_logits, axis=-1)
    return -tf.reduce_sum(tf.where(t_probs > 0, t_probs * s_log, 0.0), axis=-1)


def logit_mse(teacher_logits, student_logits):
    """Mean squared difference of the (temperature-scaled) logits over classes.

    With the T^2 factor the result does not depend on the temperature:
    ``T^2 * mean((s/T - t/T)^2) = mean((s - t)^2)``.

    Reference: Ba & Caruana, "Do Deep Nets Really Need to be Deep?", 2014.
    """
    return tf.reduce_mean(tf.square(student_logits - teacher_logits), axis=-1)


def logit_huber(teacher_logits, student_logits, delta: float = 1.0):
    """Huber loss (``delta=1``) of the logit differences, mean over classes."""
    err = tf.abs(student_logits - teacher_logits)
    quad = tf.minimum(err, delta)
    return tf.reduce_mean(0.5 * tf.square(quad) + delta * (err - quad), axis=-1)


DIVERGENCES = {
    "kl": forward_kl,
    "reverse_kl": reverse_kl,
    "js": jensen_shannon,
    "soft_cross_entropy": soft_cross_entropy,
    "mse": logit_mse,
    "huber": logit_huber,
}
# Divergences that stay finite when the teacher gives a class no mass.
_ZERO_MASS_SAFE = {"kl", "js", "soft_cross_entropy"}

_REDUCTIONS = ("sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none", None)


def get_divergence(identifier: Union[str, Divergence]) -> Divergence:
    """Resolves a divergence name (see `DIVERGENCES`) or passes a callable through."""
    if callable(identifier):
        return identifier
    if identifier in DIVERGENCES:
        return DIVERGENCES[identifier]
    raise ValueError(
        f"Unknown divergence {identifier!r}. Expected one of "
        f"{sorted(DIVERGENCES)} or a callable "
        "`fn(teacher_logits, student_logits) -> per-example values`."
    )


# ---------------------------------------------------------------------------
# Hard-label loss
# ---------------------------------------------------------------------------


def _check_label_range(labels, num_classes):
    labels = tf.cast(labels, tf.int64)
    return tf.debugging.assert_less(
        labels,
        tf.cast(num_classes, tf.int64),
        message=f"keras_kd: labels out of range; the student has {num_classes} classes",
    ), tf.debugging.assert_non_negative(labels, message="keras_kd: negative labels")


def default_hard_loss(labels, student_logits):
    """Cross-entropy from logits for sparse class ids or one-hot labels.

    Labels whose rank equals the logits' rank and whose last dimension equals
    the class count are one-hot (or soft) labels; anything else is class ids
    (a trailing axis of size 1 is squeezed). Sparse labels are checked to be
    in ``[0, classes)``.
    """
    student_logits = tf.cast(student_logits, tf.float32)
    labels = tf.convert_to_tensor(labels)
    num_classes = student_logits.shape[-1]
    if labels.shape.rank == student_logits.shape.rank and labels.shape[-1] == num_classes and num_classes != 1:
        return tf.nn.softmax_cross_entropy_with_logits(tf.cast(labels, tf.float32), student_logits)
    if labels.shape.rank == student_logits.shape.rank and labels.shape[-1] == 1:
        labels = tf.squeeze(labels, axis=-1)
    if labels.dtype.is_floating:
        labels = tf.cast(labels, tf.int64)
    with tf.control_dependencies(_check_label_range(labels, num_classes)):
        labels = tf.identity(labels)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels, student_logits)


def _resolve_hard_loss(hard_loss):
    if hard_loss is None:
        return default_hard_loss
    if isinstance(hard_loss, str):
        if "crossentropy" in hard_loss:
            warnings.warn(
                f"hard_loss={hard_loss!r} resolves to a loss on probabilities, but "
                "DistillationLoss expects the student to output logits. Use "
                "hard_loss=None (cross-entropy from logits) or a loss instance "
                "with from_logits=True.",
                stacklevel=3,
            )
        return keras.losses.get(hard_loss)
    if hasattr(hard_loss, "call") and _compat.flavour_of(hard_loss) is not None:
        # A Keras (3 or tf_keras) Loss instance: `call` gives per-example values.
        return hard_loss.call
    if callable(hard_loss):
        return hard_loss
    raise ValueError(
        "Expected `hard_loss` to be None, a Keras loss name, a Keras `Loss` "
        f"instance or a callable. Received: hard_loss={hard_loss!r}"
    )


# ---------------------------------------------------------------------------
# DistillationLoss
# ---------------------------------------------------------------------------


def _as_variable(value, argument, low, high, low_open):
    if isinstance(value, tf.Variable) or isinstance(value, keras.Variable):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"Expected `{argument}` to be a number or a tf.Variable. Received: {argument}={value!r}"
        )
    _check_range(float(value), argument, low, high, low_open)
    return tf.Variable(float(value), trainable=False, dtype=tf.float32, name=f"kd_{argument}")


def _check_range(value, argument, low, high, low_open):
    bad = not math.isfinite(value) or (value <= low if low_open else value < low) or value > high
    if bad:
        bound = f"> {low}" if low_open else f"in [{low}, {high}]"
        raise ValueError(f"Expected `{argument}` {bound} and finite. Received: {argument}={value}")


@_compat.register_serializable()
class DistillationLoss(_compat.loss_base()):
    """Hinton-style distillation loss for a plain ``compile``/``fit``.

    Use it as the ``loss`` of the student's own ``compile`` and feed ``fit`` a
    dataset whose targets carry the teacher's outputs (`keras_kd.with_teacher`
    or the teacher-logit cache). The student outputs logits.

    Formula:

    ```
    loss = alpha * hard_loss(labels, s)
         + (1 - alpha) * T^2 * D(teacher(x) / T || s / T)
    ```

    computed per example (and per time step for ``(batch, time, classes)``
    logits), then weighted by ``sample_weight`` and masks and reduced like any
    Keras loss. With targets that carry no teacher (plain labels, e.g. a
    validation set without `with_teacher`) the loss is ``hard_loss`` alone.

    Args:
        temperature: softening temperature ``T > 0``. A number, or a
            ``tf.Variable`` that callbacks or keras-tuner may change between
            epochs without recompiling. Defaults to 4.0.
        alpha: weight of the hard-label loss, in ``[0, 1]``; ``1 - alpha``
            weighs the distillation term. A number or a ``tf.Variable``.
            Defaults to 0.1.
        divergence: ``"kl"`` (teacher-to-student forward KL, default),
            ``"reverse_kl"``, ``"js"``, ``"soft_cross_entropy"``, ``"mse"`` on
            logits, ``"huber"`` on logits, or a callable
            ``fn(teacher_logits / T, student_logits / T)`` returning
            per-example values.
        hard_loss: loss on the hard labels: ``None`` for cross-entropy from
            logits (class ids or one-hot labels), a Keras loss name, a Keras 3
            or tf_keras ``Loss`` instance, or a callable
            ``fn(labels, logits) -> per-example values``.
        scale_by_temperature_squared: multiply the distillation term by
            ``T^2`` so its gradients keep their size across temperatures
            (Hinton et al. 2015). Defaults to True.
        topk_fill: how top-k teacher targets fill the classes outside the top
            k: ``"uniform"`` or ``"renormalize"`` (see
            `keras_kd.targets.dense_teacher_logits`). Defaults to "uniform".
        reduction: as for any Keras loss. Defaults to "sum_over_batch_size";
            masked positions are left out of the mean.
        name: name of the loss. Defaults to "distillation_loss".

    Raises:
        ValueError: for ``temperature <= 0`` or non-finite, ``alpha`` outside
            ``[0, 1]``, or an unknown divergence; while training, for teacher
            logits whose class count differs from the student's, teacher
            logits with NaN or Inf, or labels out of range.

    Example:

    ```python
    student.compile(optimizer="adam",
                    loss=keras_kd.DistillationLoss(temperature=4.0, alpha=0.1),
                    metrics=["accuracy"])
    student.fit(keras_kd.with_teacher(train_ds, teacher), epochs=10)
    ```

    References:
        Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
        Network", 2015.
    """

    def __init__(
        self,
        temperature=4.0,
        alpha=0.1,
        divergence="kl",
        hard_loss=None,
        scale_by_temperature_squared=True,
        topk_fill="uniform",
        reduction="sum_over_batch_size",
        name="distillation_loss",
    ):
        if reduction not in _REDUCTIONS:
            raise ValueError(f"Expected `reduction` in {_REDUCTIONS}. Received: reduction={reduction!r}")
        super().__init__(name=name, reduction=reduction, dtype="float32")
        self._temperature = _as_variable(temperature, "temperature", 0.0, math.inf, True)
        self._alpha = _as_variable(alpha, "alpha", 0.0, 1.0, False)
        self.divergence = divergence
        self._divergence_fn = get_divergence(divergence)
        if topk_fill not in ("uniform", "renormalize"):
            raise ValueError(
                f"Expected `topk_fill` to be 'uniform' or 'renormalize'. Received: topk_fill={topk_fill!r}"
            )
        if topk_fill == "renormalize" and isinstance(divergence, str) and divergence not in _ZERO_MASS_SAFE:
            raise ValueError(
                f"divergence={divergence!r} is infinite or undefined where the teacher "
                "gives a class no mass, which topk_fill='renormalize' does. Use "
                f"topk_fill='uniform' or one of {sorted(_ZERO_MASS_SAFE)}."
            )
        self.topk_fill = topk_fill
        self.hard_loss = hard_loss
        self._hard_loss_fn = _resolve_hard_loss(hard_loss)
        self.scale_by_temperature_squared = bool(scale_by_temperature_squared)
        self._observers = []
        self._weightings = []

    # -- hyperparameters, changeable between epochs --------------------------

    @property
    def temperature(self) -> float:
        return float(tf.convert_to_tensor(self._temperature).numpy())

    @temperature.setter
    def temperature(self, value):
        _check_range(float(value), "temperature", 0.0, math.inf, True)
        self._temperature.assign(float(value))

    @property
    def alpha(self) -> float:
        return float(tf.convert_to_tensor(self._alpha).numpy())

    @alpha.setter
    def alpha(self, value):
        _check_range(float(value), "alpha", 0.0, 1.0, False)
        self._alpha.assign(float(value))

    @property
    def temperature_variable(self):
        """The variable that holds the temperature (for schedules)."""
        return self._temperature

    @property
    def alpha_variable(self):
        """The variable that holds alpha (for schedules)."""
        return self._alpha

    # -- observers -----------------------------------------------------------

    def add_observer(self, observer):
        """Calls ``observer(targets, student_logits, hard, soft)`` on every batch.

        ``hard`` and ``soft`` are the per-example terms this loss computes
        anyway (``soft`` is ``T^2 * D``, before alpha); ``targets`` is the
        batch's `TeacherTargets` with the teacher's logits materialised. This
        is how callbacks such as `keras_kd.HardSampleReweighting` read
        per-example values from the training step without an extra pass. The
        observer runs inside the traced step: it may create TF ops (e.g.
        variable updates), and is only seen by steps traced after it is
        added.
        """
        if observer not in self._observers:
            self._observers.append(observer)

    def remove_observer(self, observer):
        """Removes an observer added with `add_observer` (no-op if absent)."""
        if observer in self._observers:
            self._observers.remove(observer)

    def add_weighting(self, weighting):
        """Multiplies ``weighting(targets)`` (one weight per example) into the
        sample weights of batches whose targets carry example ids. Like
        observers, seen only by steps traced after it is added."""
        if weighting not in self._weightings:
            self._weightings.append(weighting)

    def remove_weighting(self, weighting):
        """Removes a weighting added with `add_weighting` (no-op if absent)."""
        if weighting in self._weightings:
            self._weightings.remove(weighting)

    # -- per-example terms -------------------------------------------------

    def _teacher_logits(self, targets, student_logits):
        num_classes = student_logits.shape[-1]
        raw = targets.logits if targets.logits is not None else targets.topk_values
        if raw is None:
            return None
        if targets.logits is not None:
            t_classes = raw.shape[-1]
            if t_classes is not None and num_classes is not None and t_classes != num_classes:
                raise ValueError(
                    f"Teacher logits have shape {raw.shape} but the student's "
                    f"logits have shape {student_logits.shape}: the class counts "
                    f"differ ({t_classes} vs {num_classes})."
                )
        raw = tf.debugging.assert_all_finite(
            tf.cast(raw, tf.float32), "keras_kd: teacher logits contain NaN or Inf"
        )
        if targets.logits is not None:
            return raw
        return targets_lib.dense_teacher_logits(
            targets_lib.TeacherTargets(
                labels=targets.labels,
                topk_indices=targets.topk_indices,
                topk_values=raw,
                topk_logsumexp=targets.topk_logsumexp,
            ),
            num_classes,
            self.topk_fill,
        )

    def distillation_term(self, teacher_logits, student_logits):
        """``T^2 * D(teacher / T || student / T)`` per example (no alpha)."""
        temperature = tf.cast(tf.convert_to_tensor(self._temperature), tf.float32)
        student_logits = tf.cast(student_logits, tf.float32)
        value = self._divergence_fn(teacher_logits / temperature, student_logits / temperature)
        if self.scale_by_temperature_squared:
            value = value * tf.square(temperature)
        return tf.cast(value, tf.float32)

    def hard_term(self, labels, student_logits):
        """The hard-label loss per example."""
        return tf.cast(self._hard_loss_fn(labels, tf.cast(student_logits, tf.float32)), tf.float32)

    def components(self, y_true, y_pred):
        """Per-example ``(hard, distillation)`` terms; ``distillation`` is None
        when ``y_true`` carries no teacher."""
        y_pred = tf.cast(y_pred, tf.float32)
        if not targets_lib.is_targets(y_true):
            return self.hard_term(y_true, y_pred), None
        y_true = targets_lib.materialize(y_true)
        teacher = self._teacher_logits(y_true, y_pred)
        if y_true.has_labels:
            hard = self.hard_term(y_true.labels, y_pred)
        else:  # unlabelled data: no hard-label term
            hard = tf.zeros(tf.shape(y_pred)[:-1], tf.float32)
        if teacher is None:
            return hard, None
        soft = self.distillation_term(teacher, y_pred)
        for observer in self._observers:
            observer(y_true, y_pred, hard, soft)
        return hard, soft

    def call(self, y_true, y_pred):
        """Per-example loss values (before weights, masks and reduction)."""
        hard, soft = self.components(y_true, y_pred)
        if soft is None:
            return hard
        alpha = tf.cast(tf.convert_to_tensor(self._alpha), tf.float32)
        return alpha * hard + (1.0 - alpha) * soft

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Keras's base __call__ converts y_true to a tensor, which would keep
        # only the labels of a TeacherTargets; reduce here instead, with the
        # same semantics.
        mask = _compat.get_keras_mask(y_pred)
        with tf.name_scope(self.name):
            values = self.call(y_true, y_pred)
            if self._weightings and targets_lib.is_targets(y_true) and y_true.example_id is not None:
                for weighting in self._weightings:
                    w = weighting(y_true)
                    sample_weight = w if sample_weight is None else tf.cast(sample_weight, tf.float32) * w
            return reduce_values(
                values,
                sample_weight,
                mask,
                self.reduction,
                scale_for_replicas=not self.caller_scales_for_replicas(),
            )

    def get_config(self):
        return {
            "temperature": self.temperature,
            "alpha": self.alpha,
            "divergence": _compat.serialize(self.divergence),
            "hard_loss": _compat.serialize(self.hard_loss),
            "scale_by_temperature_squared": self.scale_by_temperature_squared,
            "topk_fill": self.topk_fill,
            "reduction": self.reduction,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["divergence"] = _compat.deserialize(config.get("divergence", "kl"))
        config["hard_loss"] = _compat.deserialize(config.get("hard_loss"))
        return cls(**config)


def _broadcast_like(weights, values):
    """Casts ``weights`` to float32 and broadcasts it to the shape of ``values``.

    Weights of shape ``(batch,)`` spread over trailing (time) axes; a trailing
    axis of size 1 is dropped.
    """
    weights = tf.cast(weights, tf.float32)
    rank = values.shape.rank
    if weights.shape.rank is not None and rank is not None:
        if weights.shape.rank == rank + 1 and weights.shape[-1] == 1:
            weights = tf.squeeze(weights, -1)
        while weights.shape.rank < rank:
            weights = weights[..., None]
    return tf.broadcast_to(weights, tf.shape(values))


def reduce_values(values, sample_weight=None, mask=None, reduction="sum_over_batch_size", scale_for_replicas=True):
    """Weights, masks and reduces per-position loss values like a Keras loss.

    ``sample_weight`` has shape ``(batch,)`` or the shape of ``values``
    (e.g. ``(batch, time)``). Masked positions get weight 0 and, for the mean
    reductions, are left out of the count. Under a `tf.distribute` strategy
    the means are divided by the number of replicas (unless
    ``scale_for_replicas=False``, for training loops that do it themselves),
    as Keras does, so the replicas' summed gradients equal one device's.
    """
    values = tf.cast(values, tf.float32)
    weights = None if sample_weight is None else _broadcast_like(sample_weight, values)
    count = tf.cast(tf.size(values), tf.float32)
    if mask is not None:
        mask = _broadcast_like(mask, values)
        weights = mask if weights is None else weights * mask
        count = tf.reduce_sum(mask)
    if weights is not None:
        values = values * weights
    if reduction in (None, "none"):
        return values
    total = tf.reduce_sum(values)
    if reduction == "sum":
        return total
    if reduction == "mean_with_sample_weight" and weights is not None:
        count = tf.reduce_sum(weights)
    loss = tf.math.divide_no_nan(total, count)
    replicas = _compat.num_replicas_in_sync()
    if scale_for_replicas and replicas > 1:
        loss = loss / replicas
    return loss
