"""Hard-label losses: the default cross-entropy from logits, and resolving ``hard_loss``.

Labels are decoded by `keras_kd._labels` (one place for every consumer):
sparse class ids of any dtype, dense one-hot or mixed (mixup) ``(..., K)``
labels, 0/1 labels for a one-logit (binary) student, and `keras_kd.NO_LABEL`
for unlabelled examples, which get no hard term (value 0, no gradient).
"""

from __future__ import annotations

import functools
import warnings

import keras
import tensorflow as tf

from keras_kd import _compat
from keras_kd import _labels
from keras_kd import _ops
from keras_kd.losses import guards

_NO_LABEL = float(_labels.NO_LABEL)


def binary_hard_loss(labels, student_logits):
    """Binary cross-entropy from a one-logit (Bernoulli) student.

    Formula: ``-(y log sigmoid(s) + (1 - y) log sigmoid(-s))`` per example;
    0 for `keras_kd.NO_LABEL` (unlabelled) examples.

    Args:
        labels: 0/1 (or soft) labels in ``[0, 1]``, or ``NO_LABEL``, any
            numeric dtype, shape ``batch`` or ``batch + (1,)``.
        student_logits: logits of shape ``batch + (1,)``.

    Returns:
        Per-example values of shape ``batch``. Labels outside ``[0, 1]``
        (other than ``NO_LABEL``) raise (eager and graph mode) or give NaN
        (under XLA).

    Raises:
        ValueError: for labels with a last dimension other than 1 at the
            logits' rank (e.g. one-hot labels for a one-logit student).
    """
    ops = _ops.namespace(student_logits)
    logits = ops.cast(student_logits, "float32")
    labels = ops.convert_to_tensor(labels)
    rank = ops.ndim(logits)
    if ops.ndim(labels) == rank and labels.shape[-1] not in (1, None):
        raise ValueError(
            f"The student has one logit (binary classification) but the labels have shape {labels.shape}. "
            "Pass 0/1 labels of shape (batch,) or (batch, 1), or give the student one logit per class."
        )
    labels = ops.cast(labels, "float32")
    if ops.ndim(labels) == rank - 1:
        labels = labels[..., None]
    unlabelled = labels == _NO_LABEL
    valid = ((labels >= 0.0) & (labels <= 1.0)) | unlabelled
    values = guards.nan_where_invalid(
        ops.sigmoid_cross_entropy(ops.where(unlabelled, 0.0, labels), logits),
        valid,
        "keras_kd: binary labels out of range: a one-logit student needs labels in [0, 1] "
        "(0/1 class labels or probabilities), or keras_kd.NO_LABEL (-1) for an unlabelled example.",
    )
    values = values * ops.cast(~unlabelled, "float32")
    return ops.squeeze(values, axis=-1)


def check_label_shape(labels, student_logits):
    """Raises ``ValueError`` for labels at the logits' rank whose last axis is neither 1 nor the class count."""
    ops = _ops.namespace(student_logits)
    num_classes = student_logits.shape[-1]
    same_rank = ops.ndim(labels) == ops.ndim(student_logits)
    if same_rank and labels.shape[-1] not in (1, None, num_classes):
        raise ValueError(
            f"Labels of shape {labels.shape} do not fit the student's logits of shape {student_logits.shape}: "
            f"pass class ids of shape (batch,), or dense (one-hot or mixup) labels with {num_classes} columns "
            "(one per class of the student)."
        )


def label_range_message(num_classes):
    return (
        f"keras_kd: labels out of range: the student has {num_classes} classes, so class ids must be in "
        f"[0, {num_classes}) (or keras_kd.NO_LABEL, -1, for an unlabelled example; float labels must be whole "
        "numbers). Fix the labels, or the number of output units of the student."
    )


def sparse_ids(labels, student_logits):
    """Checked class ids for the sparse cross-entropy kernel, and the labelled mask.

    Returns:
        ``(ids, labelled)``: int32/int64 ids with `NO_LABEL` replaced by 0 (the
        kernel never sees it), and a float32 mask, 1 for labelled examples.
        Out-of-range ids raise ``InvalidArgumentError`` before the kernel
        runs; under XLA (no assertions) they reach the kernel, which gives NaN.
    """
    ops = _ops.namespace(student_logits)
    num_classes = student_logits.shape[-1]
    rank = ops.ndim(student_logits)
    if ops.dtype_name(labels) in ("int32", "int64"):  # the kernel reads both: no cast (one op less per step)
        ids = _labels.class_ids(labels, num_classes, rank, keep_dtype=True)
    else:
        ids = _labels.class_ids(labels, num_classes, rank)
    ids_dtype = ops.dtype_name(ids)
    limit = num_classes if num_classes is not None else ops.dynamic_shape(student_logits, ids_dtype)[-1]
    valid = _labels.valid_class_ids(ids, limit)
    # The kernel must not see bad ids before the check has run (it would raise its own, vaguer error).
    # On JAX (no runtime assertions) bad ids become INVALID_ID, for which the kernel gives NaN.
    with ops.control_dependencies([ops.assert_all(valid, label_range_message(num_classes))]):
        labelled = _labels.labelled(ids)
        if ops.is_tf:
            ids = ops.where(labelled, ids, ops.constant(0, ids_dtype))
        else:
            ids = ops.where(labelled, ops.where(valid, ids, ops.constant(_labels.INVALID_ID, ids_dtype)),
                            ops.constant(0, ids_dtype))
    return ids, ops.cast(labelled, "float32")


_DENSE_SUM_TOLERANCE = 1e-3


def dense_labels(labels):
    """Dense labels as float32, NaN in the rows that are not distributions.

    A row must be ``>= 0`` with a sum within 1e-3 of 1 (one-hot, mixup and
    cutmix labels are): a negative entry would give a negative cross-entropy,
    an all-zero row would drop the example's hard term and a row summing to
    0.5 would halve it, silently (Keras's ``CategoricalCrossentropy`` does not
    check). Raises ``InvalidArgumentError`` in eager and graph mode; NaN loss
    under XLA. Two reductions over the labels: the sparse path never runs it.
    """
    ops = _ops.namespace(labels)
    labels = ops.cast(labels, "float32")
    valid = (ops.min(labels, axis=-1) >= 0.0) & (
        ops.abs(ops.sum(labels, axis=-1) - 1.0) <= _DENSE_SUM_TOLERANCE
    )
    message = (
        "keras_kd: dense labels must be distributions over the classes (one-hot or mixed, e.g. keras_kd.mixup): "
        f"every entry >= 0 and each row summing to 1 (within {_DENSE_SUM_TOLERANCE}). Some row has a negative "
        "entry or another sum (an all-zero row is not an unlabelled example: use sparse labels with "
        "keras_kd.NO_LABEL for those). Normalise the labels, e.g. y / tf.reduce_sum(y, -1, keepdims=True)."
    )
    return guards.nan_where_invalid(labels, valid[..., None], message)


def default_hard_loss(labels, student_logits):
    """Cross-entropy from logits: sparse class ids, dense labels, or binary.

    * A last dimension of 1 in the logits is one Bernoulli logit: binary
      cross-entropy from logits against 0/1 labels (`binary_hard_loss`).
    * Labels whose rank equals the logits' rank and whose last dimension equals
      the class count are dense labels, one-hot or mixed (mixup):
      categorical cross-entropy ``-sum_c y_c log softmax(s)_c``, as
      ``keras.losses.CategoricalCrossentropy(from_logits=True)``. Each row
      must be a distribution (entries >= 0, sum 1 within 1e-3; see
      `dense_labels`), which Keras's loss does not check.
    * Anything else is class ids of any integer (or whole float) dtype; a
      trailing axis of size 1 is squeezed. `keras_kd.NO_LABEL` (-1) marks an
      unlabelled example: its hard term is 0 and it still counts in the
      batch mean (its distillation term is what it contributes).

    Labels out of range (class ids outside ``[0, classes)`` other than -1,
    binary labels outside ``[0, 1]``, dense rows that are not distributions) raise ``InvalidArgumentError`` in eager
    and graph mode and give a NaN loss under XLA (``jit_compile=True``),
    which drops assertions: they never train silently.

    Args:
        labels: the labels, see above.
        student_logits: logits of shape ``batch + (classes,)``.

    Returns:
        Per-example values of shape ``batch``.

    Raises:
        ValueError: for labels whose last dimension matches neither the class
            count nor 1.
    """
    ops = _ops.namespace(student_logits)
    student_logits = ops.cast(student_logits, "float32")
    labels = ops.convert_to_tensor(labels)
    num_classes = student_logits.shape[-1]
    if num_classes == 1:
        return binary_hard_loss(labels, student_logits)
    check_label_shape(labels, student_logits)
    if _labels.is_dense(labels, num_classes, ops.ndim(student_logits)):
        return ops.softmax_cross_entropy(dense_labels(labels), student_logits)
    ids, labelled = sparse_ids(labels, student_logits)
    # Under XLA, which drops the assertion, the kernel itself gives NaN for out-of-range ids
    # (tests/test_bad_inputs.py checks it), so no extra op is spent on that here; the JAX kernel
    # (`keras_kd._ops`) does the same.
    return ops.sparse_softmax_cross_entropy(ids, student_logits) * labelled


def expects_probabilities(hard_loss):
    """Whether ``hard_loss`` is a Keras cross-entropy on probabilities (``from_logits=False``).

    Covers loss names, ``Loss`` instances of both flavours (``get_config()``
    holds ``from_logits``), Keras's loss functions (``from_logits`` defaults
    to False) and ``functools.partial`` of them.
    """
    if isinstance(hard_loss, str):
        return "crossentropy" in hard_loss
    if _compat.flavour_of(hard_loss) is not None and hasattr(hard_loss, "get_config"):
        try:
            return hard_loss.get_config().get("from_logits") is False
        except (NotImplementedError, TypeError):
            return False
    keywords = {}
    if isinstance(hard_loss, functools.partial):
        keywords, hard_loss = dict(hard_loss.keywords), hard_loss.func
    module = getattr(hard_loss, "__module__", "") or ""
    is_keras = module.split(".")[0] in ("keras", "tf_keras")
    name = getattr(hard_loss, "__name__", "")
    return is_keras and name.endswith("crossentropy") and not keywords.get("from_logits", False)


def resolve_hard_loss(hard_loss):
    if expects_probabilities(hard_loss):
        name = hard_loss if isinstance(hard_loss, str) else getattr(hard_loss, "name", None)
        name = name or getattr(getattr(hard_loss, "func", hard_loss), "__name__", type(hard_loss).__name__)
        warnings.warn(
            f"DistillationLoss gives `hard_loss` the student's logits, but hard_loss={name!r} is a "
            "cross-entropy on probabilities (from_logits=False), so the hard-label loss would be wrong. "
            "Use hard_loss=None (cross-entropy from logits) or a loss with from_logits=True, e.g. "
            "keras.losses.SparseCategoricalCrossentropy(from_logits=True).",
            stacklevel=3,
        )
    if hard_loss is None:
        return default_hard_loss
    if isinstance(hard_loss, str):
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



