"""Weights, masks and reduction of per-position loss values, like a Keras loss.

`reduce_values` is the one place where ``sample_weight``, masks, the
reduction and the replica scaling are applied; `reduction_coefficients` gives
the same reduction as per-position coefficients, for the fused gradient
(`keras_kd.losses.fused`), which folds them into its analytic backward pass.
"""

from __future__ import annotations

from keras_kd import _compat
from keras_kd import _ops

REDUCTIONS = ("sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none", None)


def _broadcast_like(weights, values):
    """Casts ``weights`` to float32 and broadcasts it to the shape of ``values``.

    Weights of shape ``(batch,)`` spread over trailing (time) axes; a trailing
    axis of size 1 is dropped.
    """
    ops = _ops.namespace(values)
    weights = ops.cast(ops.convert_to_tensor(weights), "float32")
    rank = ops.ndim(values)
    if ops.ndim(weights) is not None and rank is not None:
        if ops.ndim(weights) == rank + 1 and weights.shape[-1] == 1:
            weights = ops.squeeze(weights, -1)
        while ops.ndim(weights) < rank:
            weights = weights[..., None]
    if ops.is_tf and values.shape.is_fully_defined() and weights.shape == values.shape:
        return weights  # already that shape (the usual traced step): no BroadcastTo op
    return ops.broadcast_to(weights, ops.dynamic_shape(values) if ops.is_tf else values.shape)


def _weights_and_count(values, sample_weight, mask):
    """The combined per-position weights (or None) and the count of positions the means divide by."""
    ops = _ops.namespace(values)
    weights = None if sample_weight is None else _broadcast_like(sample_weight, values)
    count = ops.cast(ops.size(values), "float32")
    if mask is not None:
        mask = _broadcast_like(mask, values)
        weights = mask if weights is None else weights * mask
        count = ops.sum(mask)
    return weights, count


def _mean_scale(weights, count, reduction, scale_for_replicas):
    if reduction == "mean_with_sample_weight" and weights is not None:
        count = _ops.namespace(weights).sum(weights)
    replicas = _compat.num_replicas_in_sync()
    if scale_for_replicas and replicas > 1:
        count = count * replicas
    return count


def reduce_values(values, sample_weight=None, mask=None, reduction="sum_over_batch_size", scale_for_replicas=True):
    """Weights, masks and reduces per-position loss values like a Keras loss.

    ``sample_weight`` has shape ``(batch,)`` or the shape of ``values``
    (e.g. ``(batch, time)``). Masked positions get weight 0 and, for the mean
    reductions, are left out of the count. Under a `tf.distribute` strategy
    the means are divided by the number of replicas (unless
    ``scale_for_replicas=False``, for training loops that do it themselves),
    as Keras does, so the replicas' summed gradients equal one device's.
    """
    ops = _ops.namespace(values)
    values = ops.cast(values, "float32")
    weights, count = _weights_and_count(values, sample_weight, mask)
    if weights is not None:
        values = values * weights
    if reduction in (None, "none"):
        return values
    total = ops.sum(values)
    if reduction == "sum":
        return total
    return ops.divide_no_nan(total, _mean_scale(weights, count, reduction, scale_for_replicas))


def reduction_coefficients(values, sample_weight=None, mask=None, reduction="sum_over_batch_size",
                           scale_for_replicas=True):
    """Per-position coefficients ``c`` (or a scalar) with ``reduce_values(v) == sum(c * v)``.

    For every reduction but ``"none"``; ``values`` gives the shape only. An
    empty count gives ``c = 0`` (the loss 0), as ``divide_no_nan`` does.
    """
    ops = _ops.namespace(values)
    weights, count = _weights_and_count(values, sample_weight, mask)
    if reduction == "sum":
        return ops.constant(1.0) if weights is None else weights
    scale = ops.divide_no_nan(ops.constant(1.0), _mean_scale(weights, count, reduction, scale_for_replicas))
    return scale if weights is None else weights * scale
