"""Difficulty signals of `HardSampleReweighting` and the difficulty-to-weight map.

Each signal is ``fn(labels, teacher_logits, student_logits, soft)``: labels,
teacher and student logits, and ``soft``, the loss's per-example distillation
term. One value per example (time steps are averaged). Written once against
`keras_kd._ops`: TensorFlow values get TensorFlow ops, JAX arrays (Keras 3 on
JAX, inside the jitted step) get ``jax.numpy``.

Labels are read by `keras_kd._labels` like everywhere else: sparse class ids
of any integer or float dtype, or dense ``(batch, K)`` one-hot or mixed (mixup)
labels. Cross-entropies use dense labels as they are (the cross-entropy
against the mixed distribution); ``teacher_wrong`` compares the teacher's
prediction with their argmax. A last dimension of 1 is one Bernoulli logit
(binary model, 0/1 labels): cross-entropy is binary cross-entropy, the
predicted class is ``logit > 0``, the entropy is the Bernoulli entropy.

Unlabelled examples (label `keras_kd.NO_LABEL`, e.g. a transfer set mixed with
the labelled data) have no value for the signals that need a label
(`NEEDS_LABELS`): those return NaN there, and the reweighting leaves such
examples' rows untouched (they keep weight 1 and do not count in
``kd_teacher_wrong_share``).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from keras_kd import _labels
from keras_kd import _ops
from keras_kd.losses import hard


def _isnan(x):
    return x != x  # NaN is the only value unequal to itself (no isnan in every namespace)


def _per_example(values):
    """float32 per example: the mean over any further (time) axes, NaN (unlabelled) entries left out."""
    ops = _ops.namespace(values)
    values = ops.cast(values, "float32")
    rank = ops.ndim(values)
    if rank is not None and rank > 1:
        axes = list(range(1, rank))
        known = ~_isnan(values)
        total = ops.sum(ops.where(known, values, ops.zeros_like(values)), axis=axes)
        count = ops.sum(ops.cast(known, "float32"), axis=axes)
        values = ops.where(count > 0, total / ops.maximum(count, 1.0), np.float32(np.nan))
    return values


def _class_ids(labels, logits):
    """Integer class ids of the logits' batch shape; `NO_LABEL` kept."""
    ops = _ops.namespace(logits)
    return _labels.class_ids(labels, ops.static_shape(logits)[-1], ops.ndim(logits))


def _unless_unlabelled(values, ids):
    return _ops.namespace(values).where(_labels.labelled(ids), values, np.float32(np.nan))


def _cross_entropy(labels, logits):
    """The loss's own hard term (`keras_kd.losses.default_hard_loss`: binary,
    dense or sparse cross-entropy) per position; NaN where the label is `NO_LABEL`."""
    logits = _ops.namespace(logits).convert_to_tensor(logits)
    return _unless_unlabelled(hard.default_hard_loss(labels, logits), _class_ids(labels, logits))


def signal_kl(labels, teacher_logits, student_logits, soft):
    """The loss's own teacher-student divergence term (``T^2 * D``): where the
    student is furthest from the teacher. Emphasised (online hard example
    mining, Shrivastava et al. 2016, applied to the distillation term). No
    labels needed."""
    return _per_example(soft)


def signal_student_ce(labels, teacher_logits, student_logits, soft):
    """Student cross-entropy on the label: the examples the student gets
    wrong. Emphasised (OHEM, Shrivastava et al. 2016; focal loss, Lin et al.
    2017)."""
    return _per_example(_cross_entropy(labels, student_logits))


def signal_teacher_ce(labels, teacher_logits, student_logits, soft):
    """Teacher cross-entropy on the label: examples hard even for the teacher.
    Emphasised with ``strength > 0``, de-emphasised with ``strength < 0``
    (teacher-confidence weighting, e.g. Zhou et al. 2021)."""
    return _per_example(_cross_entropy(labels, teacher_logits))


def signal_wsld(labels, teacher_logits, student_logits, soft):
    """WSLD weight ``1 - exp(-CE_student / CE_teacher)`` (Zhou et al., "Rethinking
    Soft Labels for Knowledge Distillation: A Bias-Variance Tradeoff
    Perspective", ICLR 2021): large where the teacher explains the label
    better than the student, small where the teacher is worse than the
    student (e.g. a wrong teacher or a wrong label)."""
    ce_s = _cross_entropy(labels, student_logits)
    ce_t = _cross_entropy(labels, teacher_logits)
    return _per_example(1.0 - _ops.namespace(ce_s).exp(-ce_s / (ce_t + 1e-7)))


def signal_teacher_wrong(labels, teacher_logits, student_logits, soft):
    """1 where the teacher's prediction differs from the label (the argmax of
    dense labels), else 0. De-emphasised: the teacher is an unreliable guide
    there, or the label is wrong (label-noise cleaning by a trained model, e.g.
    Northcutt et al., "Confident Learning", 2021)."""
    ops = _ops.namespace(teacher_logits)
    teacher_logits = ops.convert_to_tensor(teacher_logits)
    ids = _class_ids(labels, teacher_logits)
    wrong = ops.cast(_labels.predicted_class(teacher_logits) != ops.cast(ids, ops.int_dtype), "float32")
    return _per_example(_unless_unlabelled(wrong, ids))


def signal_teacher_entropy(labels, teacher_logits, student_logits, soft):
    """Entropy of the teacher's softmax: ambiguous examples. Emphasised
    (uncertainty sampling, Settles 2009); no labels needed."""
    ops = _ops.namespace(teacher_logits)
    logits = ops.cast(teacher_logits, "float32")
    if ops.static_shape(logits)[-1] == 1:  # Bernoulli entropy: the softmax of the two-class logits [0, z]
        logits = _labels.two_class_logits(logits)
    log_p = ops.log_softmax(logits, -1)
    return _per_example(-ops.sum(ops.multiply_no_nan(log_p, ops.exp(log_p)), axis=-1))


SIGNALS = {
    "kl": signal_kl,
    "student_ce": signal_student_ce,
    "teacher_ce": signal_teacher_ce,
    "wsld": signal_wsld,
    "teacher_wrong": signal_teacher_wrong,
    "teacher_entropy": signal_teacher_entropy,
}
NEEDS_LABELS = {"student_ce", "teacher_ce", "wsld", "teacher_wrong"}


def raw_weights(signal: str, difficulty: np.ndarray, strength: float) -> np.ndarray:
    """Maps smoothed difficulties to un-normalised weights.

    * ``wsld``: the WSLD weight itself, ``w ** strength``.
    * ``teacher_wrong``: ``exp(-strength * d)`` (d is the smoothed share of
      epochs in which the teacher was wrong on the example).
    * the others: ``(d / mean(d)) ** strength``.
    """
    d = np.maximum(np.asarray(difficulty, np.float64), 0.0)
    if signal == "wsld":
        return np.power(d + 1e-6, strength)
    if signal == "teacher_wrong":
        return np.exp(-strength * d)
    mean = d.mean() if d.size else 1.0
    return np.power(d / (mean + 1e-12) + 1e-6, strength)


def normalise(weights: np.ndarray, clip: Tuple[float, float]) -> np.ndarray:
    """Scales to mean 1, then clips to ``clip``."""
    weights = np.asarray(weights, np.float64)
    mean = weights.mean() if weights.size else 1.0
    weights = weights / mean if mean > 0 else np.ones_like(weights)
    return np.clip(weights, clip[0], clip[1])
