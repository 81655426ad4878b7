"""Label and prediction decoding, in one place (pure TensorFlow).

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

import tensorflow as tf

NO_LABEL = -1
"""The label of an unlabelled example: no hard-label term, no label-aware divergence."""

INVALID_ID = -2
"""What `class_ids` returns for a sparse float label that is not an integer (or NaN)."""


def _static_rank(tensor):
    return tensor.shape.rank


def is_dense(labels, num_classes, logits_rank=None) -> bool:
    """Whether ``labels`` are dense ``(..., K)`` labels (one-hot or soft) for ``K = num_classes``.

    Decided from static shapes while tracing: dense labels have the logits'
    rank (``logits_rank``; when None, at least rank 2) and a last axis of
    ``num_classes > 1``. A one-logit model's labels are never dense.
    """
    labels = tf.convert_to_tensor(labels)
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
        return tf.squeeze(labels, axis=-1)
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
    labels = tf.convert_to_tensor(labels)
    if is_dense(labels, num_classes, logits_rank):
        return tf.argmax(labels, axis=-1, output_type=tf.int64)
    labels = _squeeze_trailing_one(labels, logits_rank)
    if num_classes == 1:
        values = tf.cast(labels, tf.float32)
        ids = tf.cast(values > 0.5, tf.int64)
        return tf.where(tf.equal(values, float(NO_LABEL)), tf.constant(NO_LABEL, tf.int64), ids)
    if labels.dtype == tf.int64 or (keep_dtype and labels.dtype == tf.int32):
        return labels
    if labels.dtype.is_floating:
        whole = tf.equal(labels, tf.math.floor(labels)) & tf.math.is_finite(labels)
        safe = tf.where(whole, labels, tf.zeros_like(labels))
        return tf.where(whole, tf.cast(safe, tf.int64), tf.constant(INVALID_ID, tf.int64))
    return tf.cast(labels, tf.int64)


def labelled(ids):
    """Boolean mask: True where an example has a label (``ids != NO_LABEL``)."""
    return tf.not_equal(ids, NO_LABEL)


def valid_class_ids(ids, num_classes, allow_unlabelled=True):
    """Boolean mask: ids in ``[0, num_classes)``, or `NO_LABEL` when ``allow_unlabelled``.

    ``ids`` are int32 or int64; ``num_classes`` a Python int or a scalar tensor. Every other
    negative id (including `INVALID_ID`) is invalid.
    """
    limit = tf.cast(num_classes, ids.dtype)
    # integers: ``ids >= -1`` and ``ids < 0`` is exactly ``ids == NO_LABEL``
    return (ids >= (NO_LABEL if allow_unlabelled else 0)) & (ids < limit)


def predicted_class(logits):
    """Predicted class ids (``int64``): the argmax, or ``logit > 0`` for one logit (binary)."""
    logits = tf.convert_to_tensor(logits)
    if logits.shape[-1] == 1:
        return tf.cast(tf.squeeze(logits, -1) > 0, tf.int64)
    return tf.argmax(logits, axis=-1, output_type=tf.int64)


def two_class_logits(logits):
    """``[0, z]`` for one Bernoulli logit ``z``: its softmax is ``[1 - sigmoid(z), sigmoid(z)]``."""
    logits = tf.convert_to_tensor(logits)
    return tf.concat([tf.zeros_like(logits), logits], axis=-1)
