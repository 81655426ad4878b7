"""Callbacks for distillation inside the user's own ``fit``.

* `HardSampleReweighting`: per-example sample weights from a difficulty
  signal, read from values the training step already computes.
* `DistillationScheduler`: changes `DistillationLoss`'s temperature and alpha
  over epochs without recompiling; `constant`, `linear`, `cosine` and `step`
  schedules.

Both are tf_keras callbacks, which run in Keras 3 ``fit`` and tf_keras ``fit``
alike (a ``keras.callbacks.Callback`` crashes tf_keras ``fit``).
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import warnings
from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from keras_kd import _compat
from keras_kd.callbacks import backup as _reweighting_backup
from keras_kd import targets as targets_lib

BackupCorruptedError = _reweighting_backup.BackupCorruptedError

# ---------------------------------------------------------------------------
# Difficulty signals: per-example values from labels and logits (pure TF).
# Arguments: labels (class ids or one-hot), teacher logits, student logits,
# and `soft`, the loss's per-example distillation term. A last dimension of 1
# is one Bernoulli logit (binary model, 0/1 labels): cross-entropy is binary
# cross-entropy, the predicted class is ``logit > 0``, the entropy is the
# Bernoulli entropy. Each returns one
# value per example (time steps are averaged).
# ---------------------------------------------------------------------------


def _per_example(values):
    values = tf.cast(values, tf.float32)
    if values.shape.rank is not None and values.shape.rank > 1:
        values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
    return values


def _binary_labels(labels, logits):
    """0/1 (or soft) labels of a one-logit model as float32 of the logits' shape."""
    labels = tf.cast(labels, tf.float32)
    if labels.shape.rank == logits.shape.rank - 1:
        labels = labels[..., None]
    return labels


def _cross_entropy(labels, logits):
    logits = tf.cast(logits, tf.float32)
    labels = tf.convert_to_tensor(labels)
    if logits.shape[-1] == 1:  # one Bernoulli logit: binary cross-entropy
        ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=_binary_labels(labels, logits), logits=logits)
        return tf.squeeze(ce, -1)
    if labels.shape.rank == logits.shape.rank and labels.shape[-1] == logits.shape[-1]:
        return tf.nn.softmax_cross_entropy_with_logits(tf.cast(labels, tf.float32), logits)
    if labels.shape.rank == logits.shape.rank:
        labels = tf.squeeze(labels, -1)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(labels, tf.int64), logits)


def _class_ids(labels, logits):
    labels, logits = tf.convert_to_tensor(labels), tf.convert_to_tensor(logits)
    if logits.shape[-1] == 1:  # binary 0/1 labels
        return tf.cast(tf.squeeze(_binary_labels(labels, logits), -1) > 0.5, tf.int64)
    if labels.shape.rank == logits.shape.rank and labels.shape[-1] == logits.shape[-1]:
        return tf.argmax(labels, -1)
    if labels.shape.rank == logits.shape.rank:
        labels = tf.squeeze(labels, -1)
    return tf.cast(labels, tf.int64)


def _predicted_class(logits):
    """argmax, or ``logit > 0`` for one (Bernoulli) logit."""
    if logits.shape[-1] == 1:
        return tf.cast(tf.squeeze(logits, -1) > 0, tf.int64)
    return tf.argmax(logits, -1)


def signal_kl(labels, teacher_logits, student_logits, soft):
    """The loss's own teacher-student divergence term (``T^2 * D``): where the
    student is furthest from the teacher. Emphasised (online hard example
    mining, Shrivastava et al. 2016, applied to the distillation term)."""
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
    return _per_example(1.0 - tf.exp(-ce_s / (ce_t + 1e-7)))


def signal_teacher_wrong(labels, teacher_logits, student_logits, soft):
    """1 where the teacher's argmax differs from the label, else 0.
    De-emphasised: the teacher is an unreliable guide there, or the label is
    wrong (label-noise cleaning by a trained model, e.g. Northcutt et al.,
    "Confident Learning", 2021)."""
    teacher_logits = tf.convert_to_tensor(teacher_logits)
    wrong = tf.not_equal(_predicted_class(teacher_logits), _class_ids(labels, teacher_logits))
    return _per_example(tf.cast(wrong, tf.float32))


def signal_teacher_entropy(labels, teacher_logits, student_logits, soft):
    """Entropy of the teacher's softmax: ambiguous examples. Emphasised
    (uncertainty sampling, Settles 2009); no labels needed."""
    logits = tf.cast(teacher_logits, tf.float32)
    if logits.shape[-1] == 1:  # Bernoulli entropy: the softmax of the two-class logits [0, z]
        logits = tf.concat([tf.zeros_like(logits), logits], axis=-1)
    log_p = tf.nn.log_softmax(logits, -1)
    return _per_example(-tf.reduce_sum(tf.math.multiply_no_nan(log_p, tf.exp(log_p)), -1))


SIGNALS = {
    "kl": signal_kl,
    "student_ce": signal_student_ce,
    "teacher_ce": signal_teacher_ce,
    "wsld": signal_wsld,
    "teacher_wrong": signal_teacher_wrong,
    "teacher_entropy": signal_teacher_entropy,
}
_NEEDS_LABELS = {"student_ce", "teacher_ce", "wsld", "teacher_wrong"}


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


class _Table:
    """Per-example state shared by the callback and its dataset hook.

    ``weights`` (read by the dataset hook) and ``stats``: one row per example
    of (smoothed difficulty, smoothed teacher-wrong share), NaN until the
    example is first seen, so a step reads and writes it with one gather and
    one scatter.
    """

    def __init__(self, num_examples: int):
        self.num_examples = num_examples
        with tf.init_scope():
            self.weights = tf.Variable(tf.ones([num_examples]), trainable=False, name="kd_example_weights")
            self.stats = tf.Variable(tf.fill([num_examples, 2], np.nan), trainable=False, name="kd_example_stats")
            self.recording = tf.Variable(False, trainable=False, name="kd_recording")

    @property
    def seen(self) -> np.ndarray:
        return ~np.isnan(self.stats.numpy()[:, 0])

    @property
    def difficulty(self) -> np.ndarray:
        return np.nan_to_num(self.stats.numpy()[:, 0])

    @property
    def teacher_wrong(self) -> np.ndarray:
        return np.nan_to_num(self.stats.numpy()[:, 1])


@_compat.register_serializable()
class HardSampleReweighting(_compat.callback_base()):
    """Difficult-sample mining for distillation, in any ``model.fit``.

    Keeps a per-example weight table indexed by example id. During training
    the `DistillationLoss` of the model reports each batch's per-example
    values (no extra pass over the data); the callback turns them into a
    difficulty signal, smooths it per example with an exponential moving
    average, and at the end of each epoch (after ``warmup_epochs``) sets the
    weights to a function of the difficulty, normalised to mean 1 and
    clipped. The weights reach the loss one of two ways:

    * `attach` (the dataset hook) multiplies each example's weight into the
      dataset's ``sample_weight`` (times any weight the user already had), so
      ``weighted_metrics`` see it too;
    * without `attach` (pass ``num_examples=``), the loss multiplies them in
      inside the training step: no extra pipeline work, the fastest path.

    Validation steps are never weighted and never change the table.

    Signals (see the ``signal_*`` functions for formulas and sources):
    ``"kl"``, ``"student_ce"``, ``"teacher_ce"``, ``"wsld"``,
    ``"teacher_wrong"`` (down-weights), ``"teacher_entropy"``, or a callable
    ``fn(labels, teacher_logits, student_logits, soft) -> per-example values``.

    Logs per epoch (into ``logs``, so History and TensorBoard placed after
    this callback see them): ``kd_weight_mean``, ``kd_weight_max``,
    ``kd_weight_share_above_2``, ``kd_teacher_wrong_share``.

    Args:
        signal: difficulty signal, see above. Defaults to "kl".
        strength: exponent of the difficulty-to-weight map; 0 gives uniform
            weights, negative values de-emphasise hard examples.
            Defaults to 1.0.
        warmup_epochs: epochs with uniform weights before reweighting starts
            (the signal is still recorded). Defaults to 2.
        clip: ``(low, high)`` bounds of the weights after normalisation.
            Defaults to (0.2, 5.0).
        momentum: EMA factor of the per-example difficulty, in [0, 1).
            Defaults to 0.9.
        num_examples: size of the table; defaults to the cardinality of the
            dataset given to `attach`.
        scoring_data: optional dataset (batched, with teacher targets and
            example ids) scored with the student after every epoch instead of
            recording values from the training step.
        backup_dir: optional directory for crash recovery next to Keras's
            ``BackupAndRestore`` (on a filesystem every worker sees, like
            its own). After every epoch the chief worker writes the table,
            the epoch and the run's identity (these settings, the table size
            and a digest of the model's weights) to
            ``hard_sample_reweighting.npz`` there, atomically. The table is
            restored only when a ``fit`` resumes (its first epoch is not 0,
            as after ``BackupAndRestore`` restored the model) from exactly
            the epoch and model state that wrote the file (a resumed fit
            whose backup does not match warns and restores nothing; a fit
            that starts at epoch 0 never reads the file). A damaged
            file, one for another table size, or one with non-finite or
            out-of-``clip`` weights raises `BackupCorruptedError` naming the
            path. The file is removed at the end of a successful ``fit``,
            as ``BackupAndRestore`` removes its own.
        histogram_dir: optional directory for a PNG histogram of the weights
            per epoch (needs matplotlib).
        verbose: print a line per epoch. Defaults to 0.

    Example:

    ```python
    rew = keras_kd.HardSampleReweighting(signal="kl", warmup_epochs=2)
    train = rew.attach(keras_kd.add_example_ids(raw_ds)).shuffle(10_000).batch(64)
    student.compile("adam", loss=keras_kd.DistillationLoss(), metrics=["accuracy"])
    student.fit(keras_kd.with_teacher(train, teacher), epochs=30, callbacks=[rew])
    ```
    """

    def __init__(
        self,
        signal: Union[str, Callable] = "kl",
        strength: float = 1.0,
        warmup_epochs: int = 2,
        clip: Tuple[float, float] = (0.2, 5.0),
        momentum: float = 0.9,
        num_examples: Optional[int] = None,
        scoring_data: Optional[tf.data.Dataset] = None,
        backup_dir: Optional[str] = None,
        histogram_dir: Optional[str] = None,
        verbose: int = 0,
    ):
        super().__init__()
        if not callable(signal) and signal not in SIGNALS:
            raise ValueError(
                f"Unknown signal {signal!r}. Expected one of {sorted(SIGNALS)} or a callable "
                "`fn(labels, teacher_logits, student_logits, soft) -> per-example values`."
            )
        if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not math.isfinite(strength):
            raise ValueError(f"Expected `strength` to be a finite number. Received: strength={strength!r}")
        if not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"Expected `warmup_epochs` >= 0. Received: warmup_epochs={warmup_epochs!r}")
        if (
            not isinstance(clip, (tuple, list))
            or len(clip) != 2
            or not 0 <= clip[0] <= 1 <= clip[1]
            or not math.isfinite(clip[1])
        ):
            raise ValueError(f"Expected `clip` = (low, high) with 0 <= low <= 1 <= high. Received: clip={clip!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Expected `momentum` in [0, 1). Received: momentum={momentum!r}")
        if num_examples is not None and (not isinstance(num_examples, int) or num_examples < 1):
            raise ValueError(f"Expected `num_examples` to be a positive int. Received: num_examples={num_examples!r}")
        self.signal = signal
        self.strength = float(strength)
        self.warmup_epochs = warmup_epochs
        self.clip = (float(clip[0]), float(clip[1]))
        self.momentum = float(momentum)
        self.num_examples = num_examples
        self.scoring_data = scoring_data
        self.backup_dir = backup_dir
        # Checks the path (a directory, valid UTF-8) before any training.
        self._backup = _reweighting_backup.ReweightingBackup(backup_dir) if backup_dir else None
        self._resume_checked = True  # reset by on_train_begin
        self.histogram_dir = histogram_dir
        self.verbose = verbose
        self._signal_fn = signal if callable(signal) else SIGNALS[signal]
        self._table: Optional[_Table] = None
        self._attached = False
        self._loss = None

    def get_config(self):
        return {
            "signal": self.signal if isinstance(self.signal, str) else _compat.serialize(self.signal),
            "strength": self.strength,
            "warmup_epochs": self.warmup_epochs,
            "clip": list(self.clip),
            "momentum": self.momentum,
            "num_examples": self.num_examples,
            "backup_dir": self.backup_dir,
            "histogram_dir": self.histogram_dir,
            "verbose": self.verbose,
        }

    def __deepcopy__(self, memo):
        # keras-tuner deep-copies callbacks for every trial: the copy must keep
        # updating the table that the attached dataset reads.
        clone = copy.copy(self)
        clone.model = None
        memo[id(self)] = clone
        return clone

    # -- the dataset hook ---------------------------------------------------

    @property
    def table(self) -> _Table:
        if self._table is None:
            if self.num_examples is None:
                raise ValueError(
                    "HardSampleReweighting has no weight table yet: call `rew.attach(dataset)` "
                    "on the training dataset before `fit`, or pass `num_examples=` to apply the "
                    "weights inside the training step."
                )
            self._table = _Table(self.num_examples)
        return self._table

    def attach(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        """Adds each example's current weight as its ``sample_weight``.

        Args:
            dataset: elements ``(x, TeacherTargets[, sample_weight])`` with
                example ids (from `keras_kd.cache_teacher_logits` or
                `keras_kd.add_example_ids`), batched or not.

        Returns:
            The dataset with ``sample_weight = table[id] * user_weight``.

        Raises:
            ValueError: for elements without example ids, a table size that
                does not match the dataset's example count, or a signal that
                needs labels on unlabelled data.
        """
        if not isinstance(dataset, tf.data.Dataset):
            raise TypeError(f"Expected `dataset` to be a tf.data.Dataset. Received: {type(dataset).__name__}.")
        spec = dataset.element_spec
        targets_spec = spec[1] if isinstance(spec, tuple) and len(spec) in (2, 3) else None
        if not isinstance(targets_spec, targets_lib.TeacherTargets.Spec) or targets_spec.example_id is None:
            raise ValueError(
                "HardSampleReweighting.attach needs example ids in the dataset's targets. "
                "Number the unbatched examples first with `keras_kd.add_example_ids(ds)`, "
                "or use `keras_kd.cache_teacher_logits`, which adds them. "
                f"Received element_spec={spec}."
            )
        if not targets_spec.has_labels and self.signal in _NEEDS_LABELS:
            raise ValueError(
                f"signal={self.signal!r} needs labels, but the dataset is unlabelled. "
                "Use signal='kl' or 'teacher_entropy', or label the data."
            )
        cardinality = int(dataset.cardinality())
        batched = targets_spec.example_id.shape.rank == 1
        size = self.num_examples
        if cardinality == tf.data.INFINITE_CARDINALITY:
            raise ValueError("HardSampleReweighting.attach received an infinite dataset; attach before `.repeat()`.")
        if cardinality >= 0 and not batched:
            if size is not None and size != cardinality:
                raise ValueError(
                    f"The weight table has num_examples={size} but the dataset has {cardinality} examples."
                )
            size = cardinality
        if size is None:
            raise ValueError(
                "Cannot tell how many examples the dataset has (unknown cardinality or batched). "
                "Pass `num_examples=` to HardSampleReweighting."
            )
        if self._table is None or self._table.num_examples != size:
            self._table = _Table(size)
        self.num_examples = size
        self._attached = True
        weights = self._table.weights

        def hook(x, targets, *sample_weight):
            ids = tf.cast(targets.example_id, tf.int64)
            check = tf.debugging.assert_less(
                ids,
                tf.constant(size, tf.int64),
                message=f"keras_kd: example ids outside the weight table of {size} examples",
            )
            with tf.control_dependencies([check]):
                w = tf.gather(weights, ids)
            if sample_weight:
                w = w * tf.cast(sample_weight[0], tf.float32)
            return x, targets, w

        return dataset.map(hook)

    # -- recording from the training step ------------------------------------

    def _record(self, targets, student_logits, hard, soft):
        if targets.example_id is None:
            return
        table = self._table
        teacher_logits = tf.cast(targets.logits, tf.float32)
        student_logits = tf.cast(student_logits, tf.float32)

        # No branch in the step: when not recording (validation), the same rows
        # are written back unchanged; ids are clipped so validation ids beyond
        # the table cannot fail.
        ids = tf.clip_by_value(tf.reshape(tf.cast(targets.example_id, tf.int64), [-1]), 0, table.num_examples - 1)
        d = tf.reshape(self._signal_fn(targets.labels, teacher_logits, student_logits, soft), [-1])
        if targets.has_labels:
            wrong = tf.reshape(signal_teacher_wrong(targets.labels, teacher_logits, student_logits, soft), [-1])
        else:
            wrong = tf.zeros_like(d)
        fresh = tf.stack([d, wrong], axis=1)
        # tf.gather (ResourceGather) compiles under XLA; gather_nd on a variable does not.
        old = tf.gather(table.stats, ids)
        momenta = tf.constant([[self.momentum, 0.5]])
        new = tf.where(tf.math.is_nan(old), fresh, momenta * old + (1.0 - momenta) * fresh)
        table.stats.scatter_update(tf.IndexedSlices(tf.where(table.recording, new, old), ids))

    def score(self, dataset: tf.data.Dataset):
        """Scores every example of ``dataset`` with the current student and
        updates the smoothed difficulties (the optional scoring pass)."""
        loss = self._distillation_loss()
        was_recording = bool(self.table.recording.numpy())
        self.table.recording.assign(True)
        for x, targets, *_ in dataset:
            targets = targets_lib.materialize(targets)
            student = self.model(x, training=False)
            terms = loss.terms(targets, student)  # dense teacher logits, whatever the targets' form
            if terms.targets is not None:
                self._record(terms.targets, student, terms.hard, terms.soft)
        self.table.recording.assign(was_recording)

    def _distillation_loss(self):
        loss = getattr(self.model, "loss", None)
        if not hasattr(loss, "add_observer"):
            raise ValueError(
                "HardSampleReweighting needs the model compiled with keras_kd.DistillationLoss "
                f"(model.loss is {loss!r})."
            )
        return loss

    # -- callback hooks -------------------------------------------------------

    def on_train_begin(self, logs=None):
        table = self.table
        self._loss = self._distillation_loss()
        self._resume_checked = False
        self._synced = table.stats.numpy()
        table.recording.assign(True)  # "in a training step"
        if self.scoring_data is None:
            self._loss.add_observer(self._record)
        if not self._attached:
            # No dataset hook: the weights are applied inside the training step.
            self._loss.add_weighting(self._weigh)
        # Steps traced before the hooks were added would not see them.
        self.model.make_train_function(force=True)

    def _weigh(self, targets):
        size = self.table.num_examples
        raw = tf.cast(targets.example_id, tf.int64)
        ids = tf.clip_by_value(raw, 0, size - 1)  # validation ids may lie beyond the table
        w = tf.gather(self.table.weights, ids)
        training = self.table.recording
        # A training id outside the table means a wrong `num_examples` (or other data):
        # never weigh it with another example's row. An error without XLA; under XLA,
        # where assertions vanish, the weight (and so the loss) is NaN.
        bad = tf.logical_and(training, tf.logical_or(raw < 0, raw >= size))
        check = tf.debugging.Assert(
            tf.logical_not(tf.reduce_any(bad)),
            [f"keras_kd: training example ids outside the HardSampleReweighting table of {size} examples. "
             "Pass the size of the training dataset as `num_examples=`, or use `rew.attach(train_ds)`."],
        )
        with tf.control_dependencies([check]):
            w = tf.where(training, w, tf.ones_like(w))  # validation steps: unweighted
            return tf.where(bad, tf.constant(float("nan"), w.dtype), w)

    def on_epoch_begin(self, epoch, logs=None):
        if not self._resume_checked:
            self._resume_checked = True
            if self._backup is not None and epoch > 0:
                self._restore(epoch)

    def on_train_end(self, logs=None):
        # Only reached after a successful fit (an exception skips it): the
        # backup has served its purpose, as BackupAndRestore's own.
        if self._backup is not None and self._is_chief():
            self._backup.remove()
        if self._loss is not None:
            self._loss.remove_observer(self._record)
            self._loss.remove_weighting(self._weigh)
            self.model.make_train_function(force=True)
        self.table.recording.assign(False)

    def on_test_begin(self, logs=None):
        self.table.recording.assign(False)

    def on_test_end(self, logs=None):
        self.table.recording.assign(self._loss is not None)

    def _sync_workers(self):
        """Merges the tables of all workers (MultiWorkerMirroredStrategy).

        Each worker records the examples of its own shard of every batch. At
        the end of an epoch, the rows a worker changed since the last merge
        are combined across workers (mean of the changes, for rows more than
        one worker changed), so every worker continues from the same table.
        Single-process strategies share one table: nothing to do.
        """
        strategy = getattr(self.model, "distribute_strategy", None)
        if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return
        base = self._synced
        local = self.table.stats.numpy()
        changed = ~np.isnan(local) & ~((local == base) | (np.isnan(local) & np.isnan(base)))
        delta = np.where(changed, np.nan_to_num(local) - np.nan_to_num(base), 0.0).astype(np.float32)
        changed = changed.astype(np.float32)

        local_values = strategy.run(lambda: (tf.constant(delta), tf.constant(changed)))
        total, count = (strategy.reduce("sum", v, axis=None).numpy() for v in local_values)
        merged = np.where(count > 0, np.nan_to_num(base) + total / np.maximum(count, 1.0), base)
        self.table.stats.assign(merged.astype(np.float32))
        self._synced = merged.astype(np.float32)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        table = self.table
        if self.scoring_data is not None:
            self.score(self.scoring_data)
        self._sync_workers()
        stats = table.stats.numpy()  # one read of the table per epoch
        seen = ~np.isnan(stats[:, 0])
        any_seen = bool(seen.any())
        if epoch + 1 >= self.warmup_epochs and any_seen:
            weights = np.ones(table.num_examples, np.float32)
            weights[seen] = normalise(raw_weights(self.signal, stats[seen, 0], self.strength), self.clip)
            table.weights.assign(weights)
        else:
            weights = table.weights.numpy()
        logs["kd_weight_mean"] = float(weights.mean())
        logs["kd_weight_max"] = float(weights.max())
        logs["kd_weight_share_above_2"] = float((weights > 2.0).mean())
        logs["kd_teacher_wrong_share"] = float((stats[seen, 1] >= 0.5).mean()) if any_seen else 0.0
        if self.verbose:
            print(
                f"HardSampleReweighting epoch {epoch + 1}: mean {logs['kd_weight_mean']:.3f} "
                f"max {logs['kd_weight_max']:.3f} >2 {logs['kd_weight_share_above_2']:.3f}"
            )
        if self.histogram_dir:
            self._save_histogram(epoch, weights)
        if self.backup_dir:
            self._save_state(epoch)

    # -- state ------------------------------------------------------------------

    def get_state(self) -> dict:
        """The table as NumPy arrays: ``weights`` and ``stats`` (per example:
        smoothed difficulty and teacher-wrong share, NaN if never seen)."""
        return {"weights": self.table.weights.numpy(), "stats": self.table.stats.numpy()}

    def set_state(self, state: dict):
        """Restores a table saved with `get_state`.

        Raises:
            ValueError: for arrays that do not fit this table (``weights`` of
                shape ``(num_examples,)``, ``stats`` of ``(num_examples, 2)``)
                or non-finite weights.
        """
        t = self.table
        weights, stats = np.asarray(state["weights"]), np.asarray(state["stats"])
        if weights.shape != (t.num_examples,) or stats.shape != (t.num_examples, 2):
            raise ValueError(
                f"Expected a saved table with weights of shape ({t.num_examples},) and stats of shape "
                f"({t.num_examples}, 2). Received: weights {weights.shape}, stats {stats.shape}."
            )
        if not np.isfinite(weights).all():
            raise ValueError("Expected finite weights in the saved table. Received NaN or Inf.")
        t.weights.assign(weights.astype(np.float32))
        t.stats.assign(stats.astype(np.float32))

    # -- the backup (backup_dir) ---------------------------------------------------

    def _identity(self) -> str:
        config = {
            "signal": self.signal if isinstance(self.signal, str) else getattr(self.signal, "__qualname__", "custom"),
            "strength": self.strength,
            "warmup_epochs": self.warmup_epochs,
            "clip": list(self.clip),
            "momentum": self.momentum,
        }
        return _reweighting_backup.run_identity(config, self.table.num_examples, self.model)

    def _is_chief(self) -> bool:
        strategy = getattr(self.model, "distribute_strategy", None) or tf.distribute.get_strategy()
        return bool(getattr(strategy.extended, "should_checkpoint", True))

    def _save_state(self, epoch):
        if self._is_chief():
            state = self.get_state()
            self._backup.save(epoch, self._identity(), state["weights"], state["stats"])

    def _restore(self, epoch):
        """Restores the backup iff it was written after epoch ``epoch - 1`` of this run."""
        saved = self._backup.load(self.table.num_examples, self.clip)
        if saved is None:
            return
        if saved["epoch"] != epoch - 1 or saved["run_identity"] != self._identity():
            reason = (
                f"it was written after epoch {saved['epoch'] + 1}"
                if saved["epoch"] != epoch - 1
                else "it was written by another run (other settings, table size or model weights)"
            )
            warnings.warn(
                f"HardSampleReweighting does not restore the backup {self._backup.path!r}: this fit resumes "
                f"at epoch {epoch + 1} but {reason}. The table keeps its current values (uniform weights in a new process).",
                stacklevel=2,
            )
            return
        self.set_state(saved)
        self._synced = self.table.stats.numpy()
        if self.verbose:
            print(f"HardSampleReweighting: restored the table of epoch {epoch} from {self._backup.path}")

    def _save_histogram(self, epoch, weights):
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("`histogram_dir` needs matplotlib: `pip install matplotlib`.") from e
        os.makedirs(self.histogram_dir, exist_ok=True)
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.hist(weights, bins=40, range=self.clip)
        ax.set_xlabel("example weight")
        ax.set_ylabel("examples")
        ax.set_title(f"{self.signal if isinstance(self.signal, str) else 'custom'} weights, epoch {epoch + 1}")
        fig.tight_layout()
        fig.savefig(os.path.join(self.histogram_dir, f"weights_epoch_{epoch + 1:03d}.png"))
        plt.close(fig)


# ---------------------------------------------------------------------------
# Schedules for temperature and alpha
# ---------------------------------------------------------------------------

Schedule = Callable[[int], float]


def constant(value: float) -> Schedule:
    """``epoch -> value``."""
    return lambda epoch: float(value)


def linear(start: float, end: float, epochs: int) -> Schedule:
    """Linear from ``start`` (epoch 0) to ``end`` (epoch ``epochs - 1`` and later)."""
    _check_epochs(epochs)
    return lambda epoch: float(start + (end - start) * min(epoch, epochs - 1) / max(epochs - 1, 1))


def cosine(start: float, end: float, epochs: int) -> Schedule:
    """Half-cosine from ``start`` to ``end`` over ``epochs`` epochs."""
    _check_epochs(epochs)

    def schedule(epoch):
        t = min(epoch, epochs - 1) / max(epochs - 1, 1)
        return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t)))

    return schedule


def step(boundaries: Sequence[int], values: Sequence[float]) -> Schedule:
    """``values[i]`` from epoch ``boundaries[i - 1]`` on (``values[0]`` before
    the first boundary); ``len(values) == len(boundaries) + 1``."""
    if len(values) != len(boundaries) + 1 or list(boundaries) != sorted(boundaries):
        raise ValueError(
            "Expected sorted `boundaries` and len(values) == len(boundaries) + 1. "
            f"Received: boundaries={list(boundaries)}, values={list(values)}"
        )
    return lambda epoch: float(values[sum(epoch >= b for b in boundaries)])


def _check_epochs(epochs):
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"Expected `epochs` to be a positive int. Received: epochs={epochs!r}")


class DistillationScheduler(_compat.callback_base()):
    """Sets a `DistillationLoss`'s temperature and alpha at the start of each epoch.

    The loss keeps them in variables, so no recompiling is needed. The values
    used in the epoch are written to ``logs["kd_temperature"]`` and
    ``logs["kd_alpha"]``.

    Args:
        temperature: ``None`` (leave as is), a number, or a schedule
            ``epoch -> value`` (`constant`, `linear`, `cosine`, `step`, or any
            callable).
        alpha: same, for alpha.
        loss: the `DistillationLoss`; defaults to the model's compiled loss.

    Example:

    ```python
    sched = keras_kd.DistillationScheduler(temperature=keras_kd.linear(8.0, 2.0, epochs=20),
                                           alpha=keras_kd.step([10], [0.0, 0.3]))
    student.fit(train, epochs=20, callbacks=[sched])
    ```
    """

    def __init__(self, temperature=None, alpha=None, loss=None):
        super().__init__()
        self.temperature = self._as_schedule(temperature, "temperature")
        self.alpha = self._as_schedule(alpha, "alpha")
        if self.temperature is None and self.alpha is None:
            raise ValueError("DistillationScheduler needs a `temperature` or an `alpha` schedule.")
        self.loss = loss

    @staticmethod
    def _as_schedule(value, argument):
        if value is None or callable(value):
            return value
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return constant(value)
        raise ValueError(f"Expected `{argument}` to be None, a number or a callable schedule. Received: {value!r}")

    def _target(self):
        loss = self.loss if self.loss is not None else getattr(self.model, "loss", None)
        if not hasattr(loss, "temperature_variable"):
            raise ValueError(
                "DistillationScheduler needs a keras_kd.DistillationLoss: compile the model with one "
                f"or pass `loss=`. Found {loss!r}."
            )
        return loss

    def on_epoch_begin(self, epoch, logs=None):
        loss = self._target()
        if self.temperature is not None:
            loss.temperature = self.temperature(epoch)  # validated by the setter
        if self.alpha is not None:
            loss.alpha = self.alpha(epoch)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            loss = self._target()
            logs["kd_temperature"] = loss.temperature
            logs["kd_alpha"] = loss.alpha
