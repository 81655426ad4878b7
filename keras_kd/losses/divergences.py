"""Divergences between temperature-scaled logits, and the registry of their names.

Arguments are logits already divided by the temperature, teacher first, as in
``D(teacher || student)``; each returns the divergence over the last (class)
axis, one value per example (or per example and time step). Label-aware
divergences (`keras_kd.DecoupledKD`, ``DIVERGENCES["dkd"]``) also read the
labels: they take ``(teacher_logits, student_logits, class_ids)``, which
`DistillationLoss` passes; see `keras_kd.losses.label_aware`.

To add a divergence: write ``fn(teacher_logits, student_logits)`` here and add
it to `DIVERGENCES` (plus `ZERO_MASS_SAFE` if it stays finite where the
teacher gives a class no mass). Write it against ``ops = _ops.namespace(x)``
(`keras_kd._ops`) and it runs on TensorFlow and JAX tensors alike.
"""

from __future__ import annotations

import math
from typing import Callable, Union

from keras_kd import _ops
from keras_kd.losses import label_aware
from keras_kd.losses import values as values_lib

Divergence = Callable[..., object]


def _xlogy_ratio(probs, log_probs, other_log_probs):
    """sum p * (log p - log q) with 0 * log 0 = 0 (p may be exactly 0).

    ``multiply_no_nan`` drops only exact zeros of ``p``: NaN probabilities
    (from NaN or Inf logits) propagate, so a broken teacher never yields a
    finite loss, with or without the eager checks (XLA drops ``tf.debugging``
    assertions). One op, where three ``tf.where`` used to be.
    """
    ops = _ops.namespace(probs)
    return ops.sum(ops.multiply_no_nan(log_probs - other_log_probs, probs), axis=-1)


def forward_kl(teacher_logits, student_logits):
    """KL(teacher || student) between the softmaxes of the logits.

    Formula: ``sum_c p_t[c] * (log p_t[c] - log p_s[c])``, with
    ``p = softmax(logits)`` and ``0 * log 0 = 0`` (teacher logits may be
    ``-inf`` for classes it gives no mass).

    Reference: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
    Network", 2015.
    """
    ops = _ops.namespace(student_logits, teacher_logits)
    t_log = ops.log_softmax(teacher_logits, axis=-1)
    s_log = ops.log_softmax(student_logits, axis=-1)
    return _xlogy_ratio(ops.exp(t_log), t_log, s_log)


def reverse_kl(teacher_logits, student_logits):
    """KL(student || teacher), the mode-seeking direction.

    Reference: Gu et al., "MiniLLM: Knowledge Distillation of Large Language
    Models", 2024.
    """
    ops = _ops.namespace(student_logits, teacher_logits)
    t_log = ops.log_softmax(teacher_logits, axis=-1)
    s_log = ops.log_softmax(student_logits, axis=-1)
    return _xlogy_ratio(ops.exp(s_log), s_log, t_log)


def jensen_shannon(teacher_logits, student_logits):
    """Jensen-Shannon divergence: ``(KL(p_t || m) + KL(p_s || m)) / 2``,
    ``m = (p_t + p_s) / 2``. Symmetric and bounded by ``log 2``.
    """
    ops = _ops.namespace(student_logits, teacher_logits)
    t_log = ops.log_softmax(teacher_logits, axis=-1)
    s_log = ops.log_softmax(student_logits, axis=-1)
    m_log = ops.logsumexp(ops.stack([t_log, s_log]), axis=0) - math.log(2.0)
    return 0.5 * (_xlogy_ratio(ops.exp(t_log), t_log, m_log) + _xlogy_ratio(ops.exp(s_log), s_log, m_log))


def soft_cross_entropy(teacher_logits, student_logits):
    """Cross-entropy of the student's softmax against the teacher's:
    ``-sum_c p_t[c] log p_s[c]``. Equals `forward_kl` plus the teacher's
    entropy, which has no gradient for the student.
    """
    ops = _ops.namespace(student_logits, teacher_logits)
    t_probs = ops.softmax(teacher_logits, axis=-1)
    s_log = ops.log_softmax(student_logits, axis=-1)
    return -ops.sum(ops.multiply_no_nan(s_log, t_probs), axis=-1)


def logit_mse(teacher_logits, student_logits):
    """Mean squared difference of the (temperature-scaled) logits over classes.

    With the T^2 factor the result does not depend on the temperature:
    ``T^2 * mean((s/T - t/T)^2) = mean((s - t)^2)``.

    Reference: Ba & Caruana, "Do Deep Nets Really Need to be Deep?", 2014.
    """
    ops = _ops.namespace(student_logits, teacher_logits)
    return ops.mean(ops.square(student_logits - teacher_logits), axis=-1)


def logit_huber(teacher_logits, student_logits, delta: float = 1.0):
    """Huber loss (``delta=1``) of the logit differences, mean over classes."""
    ops = _ops.namespace(student_logits, teacher_logits)
    err = ops.abs(student_logits - teacher_logits)
    quad = ops.minimum(err, delta)
    return ops.mean(0.5 * ops.square(quad) + delta * (err - quad), axis=-1)


# Name -> divergence. Every value is ``fn(teacher_logits, student_logits)``
# except the label-aware ones ("dkd", a `keras_kd.DecoupledKD`), which take
# ``(teacher_logits, student_logits, class_ids)`` (see `get_divergence`).
DIVERGENCES = {
    "kl": forward_kl,
    "reverse_kl": reverse_kl,
    "js": jensen_shannon,
    "soft_cross_entropy": soft_cross_entropy,
    "mse": logit_mse,
    "huber": logit_huber,
    # label-aware: called as fn(teacher_logits, student_logits, class_ids)
    "dkd": None,  # below: made without an eager op at import
}
with values_lib.deferred_variables():
    DIVERGENCES["dkd"] = label_aware.DecoupledKD()
# The name of each built-in divergence function (so that passing the function
# serialises and is checked exactly like passing its name).
_DIVERGENCE_NAMES = {fn: name for name, fn in DIVERGENCES.items()}
# Divergences that stay finite when the teacher gives a class no mass.
ZERO_MASS_SAFE = {"kl", "js", "soft_cross_entropy"}


def divergence_name(divergence):
    """The name of a built-in divergence (given by name, as the function or as the
    default label-aware instance, e.g. ``DecoupledKD()`` is "dkd"), else None."""
    if isinstance(divergence, str):
        return divergence
    try:
        return _DIVERGENCE_NAMES.get(divergence)
    except TypeError:  # unhashable callable
        return None


def get_divergence(identifier: Union[str, Divergence]) -> Divergence:
    """Resolves a divergence name (see `DIVERGENCES`) or passes a callable through.

    Label-aware divergences (`keras_kd.DecoupledKD`, ``"dkd"``) are callables
    too, but take three arguments, ``(teacher_logits, student_logits,
    class_ids)``; called with two they raise a ``TypeError`` that says so.
    `DistillationLoss` passes the class ids from the labels. Tell them apart
    with `keras_kd.losses.is_label_aware`.
    """
    if callable(identifier):
        return identifier
    if identifier in DIVERGENCES:
        return DIVERGENCES[identifier]
    raise ValueError(
        f"Unknown divergence {identifier!r}. Expected one of "
        f"{sorted(DIVERGENCES)}, a callable "
        "`fn(teacher_logits, student_logits) -> per-example values`, or a label-aware divergence "
        "such as keras_kd.DecoupledKD()."
    )

