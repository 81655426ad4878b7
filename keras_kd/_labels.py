"""Label and prediction decoding, in one place (TensorFlow or JAX, by the labels' type: `keras_kd._ops`).

Every consumer of labels (the loss's hard term, label-aware divergences,
metrics, reweighting signals, TFLite evaluation) reads them the same way:

* sparse class ids of any integer or float dtype (``uint8`` from
  ``keras.datasets``, ``float32`` from a CSV), with an optional trailing axis
  of size 1;
* dense ``(..., K)`` labels, one-hot or soft (mixup), whose class is the argmax;
* for a one-logit (binary, Bernoulli) model, 0/1 or soft labels in ``[0, 1]``,
  whose class is ``label > 0.5``;
* `NO_LABEL` (``-1``) marks an unlabelled example (transfer sets): it is kept
  as ``-1`` so that consumers can leave the example out.

Nothing here validates ranges: `class_ids` returns ``INVALID_ID`` for sparse
float labels that are not integers (``2.5``, NaN), so that one range check
(``valid_class_ids``) rejects them together with out-of-range ids.
"""

from __future__ import annotations

from keras_kd import _ops

NO_LABEL = -1
"""The label of an unlabelled example: no hard-label term, no label-aware divergence."""

INVALID_ID = -2
"""What `class_ids` returns for a sparse float label that is not an integer (or NaN)."""


def _static_rank(tensor):
    return _ops.namespace(tensor).ndim(tensor)


def is_dense(labels, num_classes, logits_rank=None) -> bool:
    """Whether ``labels`` are dense ``(..., K)`` labels (one-hot or soft) for ``K = num_classes``.

    Decided from static shapes while tracing: dense labels have the logits'
    rank (``logits_rank``; when None, at least rank 2) and a last axis of
    ``num_classes > 1``. A one-logit model's labels are never dense.
    """
    labels = _ops.namespace(labels).convert_to_tensor(labels)
    rank = _static_rank(labels)
    _check_not_scalar(rank, logits_rank)
    if rank is None or num_classes in (None, 1) or labels.shape[-1] != num_classes:
        return False
    return rank == logits_rank if logits_rank is not None else rank >= 2


def _check_not_scalar(rank, logits_rank):
    """Refuses scalar labels for a batch of logits (rank >= 1): one label per batch."""
    if rank == 0 and logits_rank is not None and logits_rank >= 1:
        raise ValueError(
            "Expected one label per example, but received scalar labels (shape ()) for a batch of logits "
            f"(rank {logits_rank}): the labels were attached after batching. Apply `keras_kd.unlabelled` "
            "(or any map that adds labels) before `.batch()`."
        )


def _squeeze_trailing_one(labels, logits_rank):
    rank = _static_rank(labels)
    if rank is None or rank == 0 or labels.shape[-1] != 1:
        return labels
    if logits_rank is None or rank == logits_rank:
        return _ops.namespace(labels).squeeze(labels, axis=-1)
    return labels


def class_ids(labels, num_classes, logits_rank=None, keep_dtype=False):
    """Class ids (``int64``, the batch shape of the logits) from any form of labels.

    Args:
        labels: sparse class ids (any integer or float dtype, optionally with
            a trailing axis of 1), dense ``(..., num_classes)`` one-hot or soft
            labels, or, for ``num_classes == 1``, 0/1 or soft binary labels.
            `NO_LABEL` entries stay ``NO_LABEL``.
        num_classes: the model's last dimension (1 for a one-logit binary
            model), or None when unknown.
        logits_rank: the logits' rank, which tells dense ``(batch, K)``
            labels from per-time-step ids ``(batch, T)``; when None, any
            labels of rank >= 2 with a last axis of ``num_classes`` are dense.
        keep_dtype: return sparse ``int32`` ids as ``int32`` (no cast), for
            kernels that read both.

    Returns:
        ``int64`` ids: the argmax of dense labels, ``label > 0.5`` for binary
        labels, the ids themselves otherwise; `NO_LABEL` kept; `INVALID_ID`
        for sparse float labels that are not integers (``1.5``, NaN).

    Raises:
        ValueError: for scalar labels with ``logits_rank >= 1`` (one label
            for a whole batch, e.g. labels added after ``.batch()``).

    Example:

    ```python
    class_ids([[0.2, 0.8], [1.0, 0.0]], 2)  # [1, 0]: dense labels
    class_ids([[3.0], [-1.0], [2.5]], 10)   # [3, NO_LABEL, INVALID_ID]
    class_ids([0.9, 0.2], 1)                # [1, 0]: binary labels
    ```
    """
    ops = _ops.namespace(labels)
    labels = ops.convert_to_tensor(labels)
    ids_dtype = ops.int_dtype  # int64 (int32 on JAX without x64)
    if is_dense(labels, num_classes, logits_rank):
        return ops.argmax(labels, axis=-1, dtype=ids_dtype)
    labels = _squeeze_trailing_one(labels, logits_rank)
    if num_classes == 1:
        values = ops.cast(labels, "float32")
        ids = ops.cast(values > 0.5, ids_dtype)
        return ops.where(values == float(NO_LABEL), ops.constant(NO_LABEL, ids_dtype), ids)
    dtype = ops.dtype_name(labels)
    if dtype == ids_dtype or (keep_dtype and dtype == "int32"):
        return labels
    if ops.is_floating(labels):
        whole = (labels == ops.floor(labels)) & ops.isfinite(labels)
        safe = ops.where(whole, labels, ops.zeros_like(labels))
        return ops.where(whole, ops.cast(safe, ids_dtype), ops.constant(INVALID_ID, ids_dtype))
    return ops.cast(labels, ids_dtype)


def labelled(ids):
    """Boolean mask: True where an example has a label (``ids != NO_LABEL``)."""
    return ids != NO_LABEL


def valid_class_ids(ids, num_classes, allow_unlabelled=True):
    """Boolean mask: ids in ``[0, num_classes)``, or `NO_LABEL` when ``allow_unlabelled``.

    ``ids`` are int32 or int64; ``num_classes`` a Python int or a scalar tensor. Every other
    negative id (including `INVALID_ID`) is invalid.
    """
    ops = _ops.namespace(ids)
    limit = ops.cast(num_classes, ops.dtype_name(ids))
    # integers: ``ids >= -1`` and ``ids < 0`` is exactly ``ids == NO_LABEL``
    return (ids >= (NO_LABEL if allow_unlabelled else 0)) & (ids < limit)


def predicted_class(logits):
    """Predicted class ids (``int64``): the argmax, or ``logit > 0`` for one logit (binary)."""
    ops = _ops.namespace(logits)
    logits = ops.convert_to_tensor(logits)
    if logits.shape[-1] == 1:
        return ops.cast(ops.squeeze(logits, -1) > 0, ops.int_dtype)
    return ops.argmax(logits, axis=-1, dtype=ops.int_dtype)


def two_class_logits(logits):
    """``[0, z]`` for one Bernoulli logit ``z``: its softmax is ``[1 - sigmoid(z), sigmoid(z)]``."""
    ops = _ops.namespace(logits)
    logits = ops.convert_to_tensor(logits)
    return ops.concatenate([ops.zeros_like(logits), logits], axis=-1)
