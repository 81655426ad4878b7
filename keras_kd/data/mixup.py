"""Consistent mixup and cutmix: a batch transform applied before the teacher.

Beyer et al. (2022) distil with the teacher and the student looking at
exactly the same augmented view, mixup between examples included. Applied
with ``dataset.map`` before `keras_kd.with_teacher`, `mixup` mixes a batch
once, and both the teacher and the student see the mixed inputs.
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from keras_kd import _checks
from keras_kd import _labels
from keras_kd import targets as targets_lib

KINDS = ("mixup", "cutmix")


def mixup(alpha: float = 0.2, *, num_classes: Optional[int] = None, kind: str = "mixup",
          seed: Optional[int] = None):
    """A function for ``dataset.map`` that mixes the examples of each batch.

    For a batch ``(x, y[, sample_weight])`` of ``B`` examples, a partner
    ``j = perm(i)`` is drawn for every example (a random permutation of the
    batch) and a weight ``lam_i ~ Beta(alpha, alpha)`` (Zhang et al. 2018):

    * ``kind="mixup"``: ``x_i <- lam_i * x_i + (1 - lam_i) * x_j`` (every
      input of a multi-input ``x``, which must be floating point);
    * ``kind="cutmix"`` (Yun et al. 2019): a contiguous span of
      ``round((1 - lam_i) * L)`` positions along the first spatial axis
      (axis 1, of length ``L``) of a 1-D ``(B, L[, C])`` or 2-D
      ``(B, H, W[, C])`` input is replaced by the partner's, the span's start
      uniform over the positions where it fits; ``lam_i`` then becomes the
      share kept, ``1 - span / L``.

    Labels become dense mixed labels ``lam_i * y_i + (1 - lam_i) * y_j`` of
    shape ``(B, num_classes)``, float32 (sparse class ids are one-hot encoded
    first, which needs ``num_classes``; dense one-hot or soft labels are used
    as they are; for a one-logit binary model, ``num_classes=1``, 0/1 labels
    mix into soft binary labels of the same shape). Sample weights mix the
    same way. `keras_kd.DistillationLoss`'s hard term accepts such labels.

    Apply it to the **batched** dataset and before `with_teacher`, so that the
    teacher sees the mixed batch (consistent teaching). With ``seed`` the draws
    are reproducible: they come from one ``tf.random.Generator`` in order, so
    use a sequential map (no ``num_parallel_calls``); every epoch draws anew.

    Args:
        alpha: the Beta distribution's parameter, > 0. Small values keep most
            examples nearly unmixed. Defaults to 0.2 (as ``keras.layers.MixUp``).
        num_classes: the number of classes, needed for sparse class-id labels.
            Defaults to None.
        kind: ``"mixup"`` or ``"cutmix"``. Defaults to "mixup".
        seed: an integer for reproducible draws, or None. Defaults to None.

    Returns:
        A function ``(x, y[, sample_weight]) -> (x, y[, sample_weight])``.

    Raises:
        ValueError: at construction for a bad argument; when mapped, for labels
            that already carry teacher targets, sparse labels without
            ``num_classes``, dense labels with another class count, unbatched
            elements, non-float inputs, or (cutmix) inputs that are not one
            tensor of rank 2 to 4.
        tf.errors.InvalidArgumentError: while iterating, for sparse class ids
            outside ``[0, num_classes)`` (`keras_kd.NO_LABEL` included:
            an unlabelled example has no label to mix) and float labels that
            are not whole numbers (``2.5``, NaN, Inf), as the loss refuses.

    Example:

    ```python
    ds = train_ds.shuffle(4_000).batch(64)
    ds = ds.map(keras_kd.mixup(0.4, num_classes=10, seed=0))
    student.fit(keras_kd.with_teacher(ds, teacher), epochs=200)
    ```

    References:
        Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018.
        Yun et al., "CutMix", ICCV 2019. Beyer et al., "Knowledge
        distillation: A good teacher is patient and consistent", CVPR 2022.
    """
    alpha = _checks.number(alpha, "alpha", low=0, low_open=True)
    num_classes = _checks.positive_int(num_classes, "num_classes", allow_none=True)
    kind = _checks.one_of(kind, "kind", KINDS)
    seed = _checks.integer(seed, "seed", allow_none=True)
    # tf.data runs on the host: keep the generator's state there.
    with tf.device("/cpu:0"):
        generator = (tf.random.Generator.from_seed(seed) if seed is not None
                     else tf.random.Generator.from_non_deterministic_state())
    return _Mix(alpha, num_classes, kind, generator)


class _Mix:
    """The mapped function; see `mixup`."""

    def __init__(self, alpha, num_classes, kind, generator):
        self.alpha, self.num_classes, self.kind, self.generator = alpha, num_classes, kind, generator

    def __repr__(self):
        return f"keras_kd.mixup(alpha={self.alpha}, num_classes={self.num_classes}, kind={self.kind!r})"

    def __call__(self, x, y, *sample_weight):
        if targets_lib.is_targets(y):
            raise ValueError(
                "`mixup` received labels that already carry teacher targets or example ids. Mixed "
                "examples have no single id and the teacher must see the mixed inputs: map `mixup` "
                "over the batched (x, y) dataset first, then apply `with_teacher` (no example ids)."
            )
        leaves = tf.nest.flatten(x)
        y = tf.convert_to_tensor(y)
        if y.shape.rank == 0 or any(leaf.shape.rank == 0 for leaf in leaves):
            raise ValueError(
                "`mixup` mixes the examples of a batch but received unbatched elements (labels of "
                f"shape {y.shape}). Apply it after `.batch(...)`."
            )
        batch = tf.shape(leaves[0])[0]
        seeds = self.generator.make_seeds(4)
        lam = _beta(batch, self.alpha, seeds[:, 0], seeds[:, 1])
        perm = tf.argsort(tf.random.stateless_uniform([batch], seed=seeds[:, 2]))
        if self.kind == "mixup":
            x = tf.nest.map_structure(lambda v: _blend(v, perm, lam), x)
        else:
            x, lam = _cutmix(x, perm, lam, seeds[:, 3])
        y = _blend(self._dense_labels(y), perm, lam)
        sample_weight = [_blend(tf.cast(w, tf.float32) if not w.dtype.is_floating else w, perm, lam)
                         for w in sample_weight]
        return (x, y, *sample_weight)

    def _dense_labels(self, y):
        k = self.num_classes
        last = y.shape[-1] if y.shape.rank >= 2 else None
        if k == 1:  # one Bernoulli logit: 0/1 or soft labels mix as they are
            return tf.cast(y, tf.float32)
        if last not in (None, 1):
            if k is not None and last != k:
                raise ValueError(
                    f"`mixup` received dense labels with {last} classes but num_classes={k}."
                )
            return tf.cast(y, tf.float32)
        if k is None:
            raise ValueError(
                "`mixup` needs `num_classes` to mix sparse class-id labels (it one-hot encodes them), "
                f"e.g. keras_kd.mixup(alpha, num_classes=10). Received labels of shape {y.shape}."
            )
        # The loss's decoder: fractional, NaN or Inf float labels become INVALID_ID, refused below.
        ids = _labels.class_ids(y, k, logits_rank=2)
        check = tf.debugging.Assert(
            tf.reduce_all(_labels.valid_class_ids(ids, k, allow_unlabelled=False)),
            [f"keras_kd.mixup: class ids must be in [0, {k}) and float labels must be whole numbers "
             f"(unlabelled examples, NO_LABEL = -1, cannot be mixed: mix the labelled data only; "
             f"{_labels.INVALID_ID} marks a fractional, NaN or Inf label). Received ids:", ids, "labels:", y],
            summarize=16,
        )
        with tf.control_dependencies([check]):
            return tf.one_hot(ids, k, dtype=tf.float32)


def _beta(batch, alpha, seed_a, seed_b):
    """``(batch,)`` float32 draws from Beta(alpha, alpha), as G_a / (G_a + G_b) of Gamma draws.

    float64 Gamma draws: for small alpha, float32 ones underflow to 0 (0 / 0).
    """
    g_a = tf.random.stateless_gamma([batch], seed=seed_a, alpha=alpha, dtype=tf.float64)
    g_b = tf.random.stateless_gamma([batch], seed=seed_b, alpha=alpha, dtype=tf.float64)
    total = g_a + g_b
    lam = tf.where(total > 0, g_a / tf.where(total > 0, total, 1.0), 0.5)
    return tf.cast(lam, tf.float32)


def _blend(value, perm, lam):
    """``lam * value + (1 - lam) * value[perm]``, with ``lam`` per example."""
    if not value.dtype.is_floating:
        raise ValueError(
            f"`mixup` mixes floating-point inputs; received an input of dtype {value.dtype.name}. "
            "Cast it to float first, or mix only the float inputs."
        )
    weight = tf.reshape(tf.cast(lam, value.dtype), [-1] + [1] * (value.shape.rank - 1))
    return weight * value + (1 - weight) * tf.gather(value, perm)


def _cutmix(x, perm, lam, seed):
    """Replaces a span along axis 1 by the partner's; returns the inputs and the share kept."""
    if tf.nest.is_nested(x) or x.shape.rank not in (2, 3, 4):
        shapes = [str(v.shape) for v in tf.nest.flatten(x)]
        raise ValueError(
            "`mixup(kind='cutmix')` cuts a span along the first spatial axis of one input tensor "
            f"of shape (B, L[, C]) or (B, H, W[, C]). Received inputs of shapes {shapes}. "
            "Use kind='mixup' for other inputs."
        )
    length = tf.shape(x)[1]
    length_f = tf.cast(length, tf.float32)
    span = tf.cast(tf.round((1.0 - lam) * length_f), tf.int32)
    u = tf.random.stateless_uniform(tf.shape(lam), seed=seed)
    start = tf.minimum(tf.cast(tf.floor(u * tf.cast(length - span + 1, tf.float32)), tf.int32), length - span)
    positions = tf.range(length)[None, :]
    inside = (positions >= start[:, None]) & (positions < (start + span)[:, None])
    mask = tf.reshape(inside, tf.concat([tf.shape(inside), tf.ones([x.shape.rank - 2], tf.int32)], 0))
    mixed = tf.where(mask, tf.gather(x, perm), x)
    return mixed, 1.0 - tf.cast(span, tf.float32) / length_f
