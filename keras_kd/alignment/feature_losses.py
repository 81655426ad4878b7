"""Feature losses: per-example values of ``(teacher_features, student_features)``.

Teacher first, as the divergences of `keras_kd.losses`. Each returns a float32
tensor of shape ``(batch,)``; `FeatureAlignmentLoss` reduces over the batch.
The math is written once against `keras_kd._ops`: TF tensors (either Keras
flavour on TensorFlow) get TensorFlow ops, JAX arrays and tracers (Keras 3 on
JAX, inside the jitted step) get ``jax.numpy``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Union

from keras_kd import _ops

FeatureLoss = Callable[[Any, Any], Any]

# tf.math.l2_normalize's floor on the squared norm: an all-zero row stays zero.
_EPSILON = 1e-12


def _flat(ops, features):
    """``(batch, ...)`` features as float32 ``(batch, positions)``."""
    features = ops.cast(features, "float32")
    # TF: the batch size may be unknown until run time; JAX shapes are static under jit.
    batch = ops.dynamic_shape(features)[0] if ops.is_tf else features.shape[0]
    return ops.reshape(features, [batch, -1])


def _l2_normalize(ops, x):
    """``x / max(||x||_2, sqrt(eps))`` along the last axis, as ``tf.math.l2_normalize``."""
    squared = ops.sum(ops.square(x), axis=-1, keepdims=True)
    return x / ops.sqrt(ops.maximum(squared, _EPSILON))


def feature_mse(teacher_features, student_features):
    """Mean squared difference of the features, per example.

    Formula: ``mean_j (s_j - t_j)^2`` over all non-batch positions ``j``.
    The FitNets hint loss (Romero et al. 2015) up to a constant factor.

    Args:
        teacher_features: teacher features, shape ``(batch, ...)``.
        student_features: projected student features, same shape.

    Returns:
        A float32 tensor of shape ``(batch,)``.

    Example:

    >>> import numpy as np
    >>> t = np.array([[1.0, 2.0], [0.0, 0.0]], np.float32)
    >>> s = np.array([[1.0, 4.0], [1.0, -1.0]], np.float32)
    >>> np.asarray(feature_mse(t, s))
    array([2., 1.], dtype=float32)

    References:
        Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.
    """
    ops = _ops.namespace(student_features, teacher_features)
    return ops.mean(ops.square(_flat(ops, student_features) - _flat(ops, teacher_features)), axis=-1)


def feature_l1(teacher_features, student_features):
    """Mean absolute difference of the features, per example.

    Formula: ``mean_j |s_j - t_j|`` over all non-batch positions ``j``.

    Example:

    >>> import numpy as np
    >>> np.asarray(feature_l1(np.array([[1.0, 2.0]]), np.array([[0.0, 4.0]])))
    array([1.5], dtype=float32)
    """
    ops = _ops.namespace(student_features, teacher_features)
    return ops.mean(ops.abs(_flat(ops, student_features) - _flat(ops, teacher_features)), axis=-1)


def feature_cosine(teacher_features, student_features):
    """Cosine distance between the flattened features, per example.

    Formula: ``1 - <s, t> / (||s|| ||t||)`` with ``s`` and ``t`` flattened
    per example; in ``[0, 2]``, 0 when the features point the same way
    whatever their scale. An all-zero feature counts as orthogonal (distance 1).

    Example:

    >>> import numpy as np
    >>> np.asarray(feature_cosine(np.array([[1.0, 0.0]]), np.array([[0.0, 3.0]])))
    array([1.], dtype=float32)
    """
    ops = _ops.namespace(student_features, teacher_features)
    s = _l2_normalize(ops, _flat(ops, student_features))
    t = _l2_normalize(ops, _flat(ops, teacher_features))
    return 1.0 - ops.sum(s * t, axis=-1)


def attention_map(features, p: float = 2.0):
    """Spatial attention map of Zagoruyko & Komodakis (2017), per example.

    Formula: ``a = vec(sum_c |f[..., c]|^p)`` over the channel (last) axis,
    then ``a / ||a||_2``. Works on ``(batch, H, W, C)`` maps (``H * W``
    positions) and ``(batch, N, D)`` token sequences (``N`` positions).

    Returns:
        A float32 tensor of shape ``(batch, positions)`` with unit L2 rows.
    """
    ops = _ops.namespace(features)
    features = ops.cast(features, "float32")
    rank = ops.ndim(features)
    if rank is not None and rank < 3:
        raise ValueError(
            "Attention transfer needs features with positions and channels, "
            f"(batch, H, W, C) or (batch, N, D). Received shape {ops.static_shape(features)}."
        )
    energy = ops.sum(ops.abs(features) ** p, axis=-1)
    return _l2_normalize(ops, _flat(ops, energy))


def attention_transfer(teacher_features, student_features, p: float = 2.0):
    """Attention-transfer loss (Zagoruyko & Komodakis 2017), per example.

    Formula: ``mean_j (a_s[j] - a_t[j])^2`` with ``a = attention_map(f, p)``,
    as in the authors' code (``(at(x) - at(y)).pow(2).mean()``). Only the
    positions must match; the channel counts of student and teacher may
    differ. The values are small (the maps have unit norm): the authors
    multiply the loss by ``beta / 2 = 500``, so use a large ``weight``.

    References:
        Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving
        the Performance of Convolutional Neural Networks via Attention
        Transfer", ICLR 2017.
    """
    ops = _ops.namespace(student_features, teacher_features)
    return ops.mean(ops.square(attention_map(student_features, p) - attention_map(teacher_features, p)), axis=-1)


FEATURE_LOSSES = {
    "mse": feature_mse,
    "l1": feature_l1,
    "cosine": feature_cosine,
    "attention": attention_transfer,
}


def is_attention(identifier) -> bool:
    """Whether a feature loss is attention transfer, by name, function or partial.

    Attention transfer compares spatial maps only, so its pairs need no
    channel projector, however it was named.
    """
    fn = get_feature_loss(identifier)
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn is attention_transfer


def get_feature_loss(identifier: Union[str, FeatureLoss]) -> FeatureLoss:
    """Resolves a feature-loss name (see `FEATURE_LOSSES`) or passes a callable through."""
    if callable(identifier):
        return identifier
    if isinstance(identifier, str) and identifier in FEATURE_LOSSES:
        return FEATURE_LOSSES[identifier]
    raise ValueError(
        f"Unknown feature loss {identifier!r}. Expected one of {sorted(FEATURE_LOSSES)} "
        "or a callable `fn(teacher_features, student_features) -> per-example values`."
    )


# ---------------------------------------------------------------------------
# Argument checks