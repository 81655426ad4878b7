"""`HardSampleReweighting`: per-example sample weights from a difficulty signal.

The signals and the difficulty-to-weight map are in ``signals.py``; the
crash-recovery file (``backup_dir=``) in ``backup.py``.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Optional, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from keras_kd import _checks
from keras_kd import _compat
from keras_kd import _ops
from keras_kd import targets as targets_lib
from keras_kd.losses import guards
from keras_kd.callbacks import backup as backup_lib
from keras_kd.callbacks import steps as steps_lib
from keras_kd.callbacks import table as table_lib
from keras_kd.callbacks.base import Callback
from keras_kd.callbacks.signals import NEEDS_LABELS
from keras_kd.callbacks.signals import SIGNALS
from keras_kd.callbacks.signals import normalise
from keras_kd.callbacks.signals import raw_weights
from keras_kd.callbacks.signals import signal_teacher_wrong


def _clip_bounds(clip) -> Tuple[float, float]:
    message = f"Expected `clip` = (low, high) with 0 <= low <= 1 <= high, both finite. Received: clip={clip!r}"
    if not isinstance(clip, (tuple, list)) or len(clip) != 2:
        raise ValueError(message)
    try:
        return _checks.number(clip[0], "clip", low=0.0, high=1.0), _checks.number(clip[1], "clip", low=1.0)
    except ValueError:
        raise ValueError(message) from None


_NO_HISTORY = object()  # `_fit_running` for a loop whose model has no History


@_compat.register_serializable()
class HardSampleReweighting(Callback):
    """Difficult-sample mining for distillation, in any ``model.fit``.

    Keeps a per-example weight table indexed by example id. During training
    the `DistillationLoss` of the model reports each batch's per-example
    values (no extra pass over the data); the callback turns them into a
    difficulty signal and keeps each example's latest value of the epoch. At
    the end of each epoch it smooths these into the per-example difficulty
    with an exponential moving average over epochs (`Table.flush`; an example
    seen twice in one epoch counts with its last value) and, after
    ``warmup_epochs``, sets the weights to a function of the difficulty,
    normalised to mean 1 and clipped. The weights reach the loss one of two
    ways:

    * `attach` (the dataset hook) multiplies each example's weight into the
      dataset's ``sample_weight`` (times any weight the user already had), so
      ``weighted_metrics`` see it too;
    * without `attach` (pass ``num_examples=``), the loss multiplies them in
      inside the training step: no extra pipeline work, the fastest path.

    Validation steps are never weighted and never change the table. On
    TensorFlow that holds for any ``model.evaluate`` (the step is told apart
    while it is traced: no gradient tape), also one that another callback runs
    mid-``fit``; on JAX it holds for the validation of ``fit`` itself (this
    callback's ``on_test_begin``), not for an ``evaluate`` that another
    callback runs mid-``fit`` (the JAX step records it like a training step).

    On Keras 3 + JAX both ways work too: during ``fit`` the step's copy of
    the table is part of the model's state, which Keras threads through its
    jitted step (`keras_kd._step_state`), so it is read and written inside
    the step at no extra cost. Not on JAX: a built subclassed student (Keras
    locks its state), which raises a ``ValueError`` naming the alternative
    (a Functional or Sequential student).

    A training example id outside the table (a ``num_examples`` smaller than
    the data) is never weighed or recorded with another example's row: it
    raises ``InvalidArgumentError`` in the step on TensorFlow without XLA;
    under XLA (``jit_compile=True``) and on JAX, where nothing can raise
    inside the step, that step's loss is NaN and ``on_epoch_end`` raises
    ``ValueError`` naming the cause.

    Signals (see the ``signal_*`` functions for formulas and sources):
    ``"kl"``, ``"student_ce"``, ``"teacher_ce"``, ``"wsld"``,
    ``"teacher_wrong"`` (down-weights), ``"teacher_entropy"``, or a callable
    ``fn(labels, teacher_logits, student_logits, soft) -> per-example values``.
    Labels may be class ids or dense one-hot / mixed (mixup) labels (the
    cross-entropies use the mixed distribution, ``teacher_wrong`` its argmax).
    Examples labelled `keras_kd.NO_LABEL` (unlabelled, e.g. a transfer set)
    get no value from the label-based signals (``student_ce``,
    ``teacher_ce``, ``wsld``, ``teacher_wrong``; a callable may return NaN
    likewise): their rows are left untouched, so they keep weight 1, and
    ``kd_teacher_wrong_share`` counts labelled examples only.

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
        momentum: EMA factor of the per-example difficulty across epochs,
            in [0, 1): ``d = momentum * d + (1 - momentum) * d_epoch``; an
            example's first value is taken as is. Defaults to 0.9.
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
        strength = _checks.number(strength, "strength")
        warmup_epochs = _checks.non_negative_int(warmup_epochs, "warmup_epochs")
        clip = _clip_bounds(clip)
        momentum = _checks.number(momentum, "momentum", low=0.0, high=1.0, high_open=True)
        num_examples = _checks.positive_int(num_examples, "num_examples", allow_none=True)
        self.signal = signal
        self.strength = float(strength)
        self.warmup_epochs = warmup_epochs
        self.clip = (float(clip[0]), float(clip[1]))
        self.momentum = float(momentum)
        self.num_examples = num_examples
        self.scoring_data = scoring_data
        self.backup_dir = backup_dir
        # Checks the path (a directory, valid UTF-8) before any training.
        self._backup = backup_lib.ReweightingBackup(backup_dir) if backup_dir else None
        self._resume_checked = True  # reset by on_train_begin
        self.histogram_dir = histogram_dir
        self.verbose = verbose
        self._signal_fn = signal if callable(signal) else SIGNALS[signal]
        self._table: Optional[table_lib.Table] = None
        self._rows = table_lib.StepRows()
        self._step = steps_lib.HookedStep()
        self._attached = False
        self._loss = None
        self._in_fit = False  # TensorFlow steps: traced in a training phase of this fit
        self._fit_history = None  # the History of the fit in progress (`_fit_running`)
        self._scoring = False  # the eager scoring pass records

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
        clone._rows = table_lib.StepRows()
        clone._step = steps_lib.HookedStep()
        memo[id(self)] = clone
        return clone

    # -- the dataset hook ---------------------------------------------------

    @property
    def table(self) -> table_lib.Table:
        if self._table is None:
            if self.num_examples is None:
                raise ValueError(
                    "HardSampleReweighting has no weight table yet: call `rew.attach(dataset)` "
                    "on the training dataset before `fit`, or pass `num_examples=` to apply the "
                    "weights inside the training step."
                )
            self._table = table_lib.Table(self.num_examples, self.momentum)
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
        if not targets_spec.has_labels and self.signal in NEEDS_LABELS:
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
            self._table = table_lib.Table(size, self.momentum)
        self.num_examples = size
        self._attached = True
        weights = self._table.tf_weights  # a tf.Variable on every backend (tf.data runs TensorFlow)

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
        if not _ops.namespace(targets.example_id).is_tf:
            self._record_jax(targets, student_logits, soft)
            return
        if not self._training_step():
            return  # a validation step (decided while tracing): it never changes the table
        table = self._table
        teacher_logits = tf.cast(targets.logits, tf.float32)
        student_logits = tf.cast(student_logits, tf.float32)
        with tf.name_scope("kd_reweighting_record"):
            # Training ids outside the table write the table's spare row (`Table.flush` reports it).
            ids = self._rows(targets.example_id, table.num_examples)
            fresh = tf.stack(self._values(targets, teacher_logits, student_logits, soft), axis=1)
            # One scatter, no read: the smoothing runs once per epoch (`Table.flush`).
            table.step_pending.scatter_update(tf.IndexedSlices(fresh, ids))

    def _values(self, targets, teacher_logits, student_logits, soft):
        """Per example: (difficulty, teacher wrong), NaN where there is no value."""
        d = table_lib.flat(self._signal_fn(targets.labels, teacher_logits, student_logits, soft))
        if self.signal == "teacher_wrong":
            return d, d
        if targets.has_labels:
            wrong = signal_teacher_wrong(targets.labels, teacher_logits, student_logits, soft)
            return d, table_lib.flat(wrong)
        ops = _ops.namespace(d)
        return d, ops.full(ops.dynamic_shape(d), np.nan)  # unlabelled data: never judged

    def _record_jax(self, targets, student_logits, soft):
        """`_record` inside Keras 3's jitted JAX step: the table is state the step threads."""
        ops = _ops.namespace(student_logits)
        teacher_logits = ops.stop_gradient(ops.cast(targets.logits, "float32"))
        student_logits = ops.stop_gradient(ops.cast(student_logits, "float32"))
        soft = ops.stop_gradient(soft)
        rows = table_lib.jax_rows(targets.example_id, self._table.num_examples)
        fresh = ops.stack(self._values(targets, teacher_logits, student_logits, soft), axis=1)
        table_lib.jax_record(self._table.step_state, rows, ops.cast(fresh, "float32"))

    def _training_step(self) -> bool:
        """Whether the TensorFlow step being traced (or the eager scoring pass)
        records and weighs: decided once per trace, so validation steps carry
        none of the table's ops. A training step of this callback's ``fit``
        (between ``on_train_begin`` and ``on_train_end``, outside its
        validation) that computes its loss under a gradient tape; a
        ``model.evaluate`` that another callback runs mid-``fit`` has no tape."""
        if self._scoring:
            return True
        tape = guards.in_training_step()
        # A step traced in another fit (this one raised: no on_train_end) gets none of the ops.
        return self._in_fit and (tape is None or tape) and self._fit_running()

    def score(self, dataset: tf.data.Dataset):
        """Scores every example of ``dataset`` with the current student and
        updates the smoothed difficulties (the optional scoring pass)."""
        loss = self._distillation_loss()
        if self.table.step_state is not None:
            self._score_jax(dataset, loss)
            return
        self._scoring = True
        try:
            for x, targets, *_ in dataset:
                targets = targets_lib.materialize(targets)
                student = self.model(x, training=False)
                terms = loss.terms(targets, student)  # dense teacher logits, whatever the targets' form
                if terms.targets is not None:
                    self._record(terms.targets, student, terms.hard, terms.soft)
        finally:
            self._scoring = False

    def _score_jax(self, dataset, loss):
        """`score` for a Keras 3 student on JAX: batches as JAX arrays, the table updated eagerly."""
        import jax.numpy as jnp  # noqa: PLC0415 - JAX only

        def to_jax(structure):  # TF TeacherTargets become JaxTeacherTargets (keras.tree knows both on JAX)
            return keras.tree.map_structure(lambda v: v if v is None else jnp.asarray(np.asarray(v)), structure)

        recording = self.table.recording
        was_recording = float(recording.numpy())
        recording.assign(1.0)
        for x, targets, *_ in dataset:
            targets = to_jax(targets_lib.materialize(targets))
            student = self.model(to_jax(x), training=False)
            terms = loss.terms(targets, student)
            if terms.targets is not None:
                self._record(terms.targets, student, terms.hard, terms.soft)
        recording.assign(was_recording)

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
        if _compat.is_jax_backend() and _compat.flavour_of(self.model) == _compat.KERAS3:
            self._use_jax_table(table)
        elif table.step_state is not None:
            raise ValueError(
                "This HardSampleReweighting already trained a Keras 3 student on JAX, whose table lives in "
                "JAX state; a tf_keras student needs its own callback: create a new HardSampleReweighting."
            )
        self._resume_checked = False
        # This fit's History (see `_fit_running`); a loop without one (callbacks called by hand) is never
        # told apart from a later fit, as before.
        history = getattr(self.model, "history", None)
        self._fit_history = _NO_HISTORY if history is None else history
        table.momentum = self.momentum
        self._synced = table.flush()
        table_lib.assign(table.recording, True)  # "in a training step" (the JAX step reads it)
        self._in_fit = True  # the TensorFlow steps traced from now on record
        if self.scoring_data is None:
            self._loss.add_observer(self._record)
        if not self._attached:
            # No dataset hook: the weights are applied inside the training step.
            self._loss.add_weighting(self._weigh)
        # Steps traced before the hooks were added would not see them: the
        # step is traced with them, or the one traced for this callback's last fit reused.
        hooks = (self._loss, self._loss.observers, self._loss.weightings, table, self._signal_fn)
        self._step.reuse = self.table.step_state is None  # JAX: bound state, a new step per fit
        self._step.enter(self.model, hooks, running=self._fit_running, release=self._release)

    def _use_jax_table(self, table):
        """Keras 3 on JAX: the table becomes state that the model threads through its jitted step."""
        from keras_kd import _step_state  # noqa: PLC0415 - JAX only

        if not _step_state.bind(self.model, table.use_jax()):
            raise ValueError(
                "HardSampleReweighting on the JAX backend keeps its table in the model's state, but Keras "
                f"refuses new state on this built model ({type(self.model).__name__}, a subclassed model). "
                "Use a Functional or Sequential student (their state stays open), or train with "
                "KERAS_BACKEND=tensorflow."
            )

    def _weigh(self, targets):
        size = self.table.num_examples
        if not _ops.namespace(targets.example_id).is_tf:
            return table_lib.jax_weights(self.table.step_state, table_lib.jax_rows(targets.example_id, size))
        if not self._training_step():
            return None  # a validation step (decided while tracing): unweighted
        with tf.name_scope("kd_reweighting_weigh"):
            ids = self._rows(targets.example_id, size)
            # A training id outside the table means a wrong `num_examples` (or other
            # data): it reads the table's spare row, whose weight is NaN, and
            # CheckNumerics turns that into an error naming the cause (the
            # examples' weights are always finite); under XLA, where the check does
            # not run, the loss is NaN and `on_epoch_end` raises.
            return tf.debugging.check_numerics(tf.gather(self.table.step_weights, ids), self._stray_message())

    def _stray_message(self):
        return (
            f"keras_kd: training example ids outside the HardSampleReweighting table of "
            f"{self.table.num_examples} examples. Pass the size of the training dataset as `num_examples=`, "
            "or use `rew.attach(train_ds)`"
        )

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
        self._release()

    def _release(self):
        """The end of this callback's fit: its hooks leave the loss, the model gets a plain step.
        Also run by the hooked step itself when a later fit calls it (the fit that installed it
        raised, so Keras skipped ``on_train_end``)."""
        if self._loss is not None:
            self._loss.remove_observer(self._record)
            self._loss.remove_weighting(self._weigh)
            if self.table.step_state is not None:
                from keras_kd import _step_state  # noqa: PLC0415 - JAX only

                _step_state.unbind(self.model, self.table.step_state)
            self._step.exit(self.model)
        self._rows = table_lib.StepRows()  # drops the last traced step's tensors
        table_lib.assign(self.table.recording, False)
        self._in_fit = False
        self._fit_history = None

    def _fit_running(self) -> bool:
        """Whether the fit this callback began still runs: Keras gives every fit a new ``History``
        (``model.history``), and a fit that raised never reached ``on_train_end``."""
        history = self._fit_history
        return history is not None and (history is _NO_HISTORY or getattr(self.model, "history", None) is history)

    def on_test_begin(self, logs=None):
        table_lib.assign(self.table.recording, False)
        self._in_fit = False

    def on_test_end(self, logs=None):
        table_lib.assign(self.table.recording, self._loss is not None)
        self._in_fit = self._loss is not None

    def _sync_workers(self, stats):
        """The table merged across workers (see `table.merge_workers`), or ``stats`` with one worker."""
        strategy = getattr(self.model, "distribute_strategy", None)
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            self._synced = table_lib.merge_workers(strategy, self.table, self._synced, stats)
            return self._synced
        return stats

    def on_epoch_end(self, epoch, logs=None):
        logs = logs if logs is not None else {}
        table = self.table
        if self.scoring_data is not None:
            self.score(self.scoring_data)
        stats = table.flush()  # this epoch's values smoothed in: one read of the table per epoch
        stats = self._sync_workers(stats)
        if table.strays:  # under XLA or on JAX (elsewhere the step raised): the epoch's loss was NaN
            raise ValueError(
                f"{self._stray_message()}. They reached the training steps of epoch {epoch + 1} (under XLA "
                "and on JAX the step cannot raise: their weight is NaN, so the loss was NaN)."
            )
        seen = ~np.isnan(stats[:, 0])
        any_seen = bool(seen.any())
        if epoch + 1 >= self.warmup_epochs and any_seen:
            weights = np.ones(table.num_examples, np.float32)
            weights[seen] = normalise(raw_weights(self.signal, stats[seen, 0], self.strength), self.clip)
            table_lib.assign(table.weights, weights)
        else:
            weights = table_lib.read(table.weights)
        logs["kd_weight_mean"] = float(weights.mean())
        logs["kd_weight_max"] = float(weights.max())
        logs["kd_weight_share_above_2"] = float((weights > 2.0).mean())
        judged = stats[:, 1][~np.isnan(stats[:, 1])]  # labelled examples seen so far
        logs["kd_teacher_wrong_share"] = float((judged >= 0.5).mean()) if judged.size else 0.0
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
        return backup_lib.run_identity(config, self.table.num_examples, self.model)

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
        name = self.signal if isinstance(self.signal, str) else "custom"
        table_lib.save_histogram(self.histogram_dir, epoch, weights, self.clip, name)
