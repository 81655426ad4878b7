"""The per-example table of `HardSampleReweighting`: its variables, the rows a
step reads and writes, the per-epoch smoothing, the merge across workers, the
weight histogram.

A training step reads the weights of its rows (one gather) and writes each
row's fresh values (difficulty, teacher wrong) into ``pending`` (one scatter):
no read-modify-write in the step. At the end of every epoch `Table.flush`
smooths the pending values into ``stats`` on the host.

The step's arrays have one spare row past the examples' (`Table.stray_row`):
an example id outside the table (a wrong ``num_examples``) reads and writes
that row, never another example's. Its weight is NaN (the step's loss turns
NaN: under XLA and on JAX, where nothing can raise inside the step, training
still cannot go on silently), and `Table.flush` reports that it was written,
so the callback names the cause at the end of the epoch on every backend.
``weights`` and ``pending`` read and assign the examples' rows only.

On TensorFlow the step's arrays (``step_weights``, ``step_pending``) and the
recording flag are ``tf.Variable``s. For a Keras 3 student on JAX
(`Table.use_jax`) they live in a `keras_kd._step_state.StepState` that the
model threads through its jitted step, and read and assign that state (the
weights also the ``tf.Variable`` that `attach`'s tf.data hook reads).
"""

from __future__ import annotations

import os
import threading

import numpy as np
import tensorflow as tf

from keras_kd import _ops

# Smoothing rate of the teacher-wrong share per epoch (the difficulty's is 1 - momentum).
TEACHER_WRONG_RATE = 0.5


def smooth(stats: np.ndarray, fresh: np.ndarray, momentum: float) -> np.ndarray:
    """One epoch of smoothing: ``stats`` updated by ``fresh`` (both ``(N, 2)``, NaN = no value).

    A first value is taken as is, later ones by an exponential moving average
    (the difficulty with ``1 - momentum``, the teacher-wrong share with 0.5);
    rows without a fresh value keep theirs.
    """
    rate = np.array([[1.0 - momentum, TEACHER_WRONG_RATE]], np.float32)
    stats, fresh = np.asarray(stats, np.float32), np.asarray(fresh, np.float32)
    new = fresh - stats  # NaN where either is NaN: both cases are set below
    new *= rate
    new += stats
    np.copyto(new, fresh, where=np.isnan(stats))
    np.copyto(new, stats, where=np.isnan(fresh))
    return new


def read(variable) -> np.ndarray:
    """The value of a table variable as NumPy.

    The epoch-end reads and writes lie on the critical path of every epoch
    (a small student's epoch is tens of milliseconds): the raw ops skip
    ``tf.Variable``'s Python layers, half the cost in ``fit``. The table's
    variables are plain ones, created outside any strategy.
    """
    if isinstance(variable, tf.Variable):
        return tf.raw_ops.ReadVariableOp(resource=variable.handle, dtype=variable.dtype).numpy()
    return variable.numpy()


def assign(variable, value):
    """Assigns ``value`` (of the variable's shape) to a table variable; see `read`."""
    if not isinstance(variable, tf.Variable):
        variable.assign(value)
        return
    value = np.asarray(value, variable.dtype.as_numpy_dtype)
    if value.shape != tuple(variable.shape):
        raise ValueError(f"Expected a value of shape {tuple(variable.shape)}. Received: {value.shape}.")
    tf.raw_ops.AssignVariableOp(resource=variable.handle, value=value)


class Table:
    """Per-example state shared by the callback and its dataset hook.

    ``weights`` (read by the step or the dataset hook); ``pending``: the
    latest values of this epoch per example (difficulty, teacher wrong), NaN
    where the example was not seen yet; ``stats``: the smoothed values of the
    epochs before, NaN until the example is first seen (host memory: no step
    reads it). ``stats.numpy()`` includes the pending values, so the table
    reads the same at any moment of an epoch.
    """

    def __init__(self, num_examples: int, momentum: float = 0.9):
        self.num_examples = num_examples
        self.momentum = momentum
        self.strays = False  # whether the last `flush` found the spare row written

        def create():
            with tf.init_scope():
                return (
                    tf.Variable(_step_weights(np.ones(num_examples, np.float32)), trainable=False,
                                name="kd_example_weights"),
                    tf.Variable(tf.fill([num_examples + 1, 2], np.nan), trainable=False, name="kd_example_pending"),
                    tf.Variable(False, trainable=False, name="kd_recording"),
                )

        # The step's arrays (with the spare row): variables here, JAX state after `use_jax`.
        self.step_weights, self.step_pending, self.recording = _outside_any_strategy(create)
        self.tf_weights = self.step_weights  # what the dataset hook of `attach` reads, on every backend
        self.step_state = None  # JAX: the state the jitted step threads (`use_jax`)
        self.weights = _ExampleRows(self, "step_weights", pad=_step_weights)
        self.pending = _ExampleRows(self, "step_pending", pad=_step_pending, columns=(2,))
        self._smoothed = np.full([num_examples, 2], np.nan, np.float32)
        self.stats = _Smoothed(self)

    @property
    def stray_row(self) -> int:
        """The spare row that ids outside the table read and write (module docstring)."""
        return self.num_examples

    def use_jax(self):
        """Moves the step's copy of the table into a `StepState` (Keras 3 on JAX; idempotent)."""
        if self.step_state is not None:
            return self.step_state
        from keras_kd import _step_state  # noqa: PLC0415 - JAX only

        self.step_state = _step_state.StepState(
            {
                "weights": read(self.step_weights),
                "pending": read(self.step_pending),
                "recording": float(self.recording.numpy()),
            },
            name="kd_reweighting",
        )
        self.step_weights = _StateArray(self.step_state, "weights", mirror=self.tf_weights)
        self.step_pending = _StateArray(self.step_state, "pending")
        self.recording = _StateArray(self.step_state, "recording")
        return self.step_state

    def flush(self) -> np.ndarray:
        """Smooths this epoch's pending values into ``stats`` and clears them; returns the stats.

        Sets ``strays``: whether an id outside the table reached a step since the last flush.
        """
        fresh = read(self.step_pending)
        self.strays = not np.isnan(fresh[self.stray_row]).all()
        if not np.isnan(fresh).all():  # also when only the spare row was written
            self._smoothed = smooth(self._smoothed, fresh[: self.num_examples], self.momentum)
            self.clear_pending()
        return self._smoothed

    def clear_pending(self):
        assign(self.step_pending, np.full([self.num_examples + 1, 2], np.nan, np.float32))

    @property
    def seen(self) -> np.ndarray:
        return ~np.isnan(self.stats.numpy()[:, 0])

    @property
    def difficulty(self) -> np.ndarray:
        return np.nan_to_num(self.stats.numpy()[:, 0])

    @property
    def teacher_wrong(self) -> np.ndarray:
        return np.nan_to_num(self.stats.numpy()[:, 1])


class _Smoothed:
    """``Table.stats``: ``numpy()`` gives the smoothed values with this epoch's pending ones
    applied (nothing is committed), ``assign()`` replaces them and clears the pending ones."""

    def __init__(self, table: Table):
        self._table = table

    @property
    def shape(self):
        return self._table._smoothed.shape

    def numpy(self) -> np.ndarray:
        t = self._table
        return smooth(t._smoothed, t.pending.numpy(), t.momentum)

    def assign(self, value):
        t = self._table
        t._smoothed = np.array(value, np.float32).reshape(t._smoothed.shape)
        t.clear_pending()


def _step_weights(weights):
    """The step's weights: ``weights`` and the spare row's NaN."""
    return np.append(np.asarray(weights, np.float32), np.float32(np.nan))


def _step_pending(pending):
    """The step's pending values: ``pending`` and the spare row's (none: NaN)."""
    return np.concatenate([np.asarray(pending, np.float32), np.full([1, 2], np.nan, np.float32)])


class _ExampleRows:
    """``Table.weights`` / ``Table.pending``: the examples' rows of a step array, without its
    spare row; ``numpy()`` and ``assign()`` like a ``tf.Variable`` of shape `shape`."""

    def __init__(self, table: Table, attribute: str, pad, columns=()):
        self._table, self._attribute, self._pad, self._columns = table, attribute, pad, columns

    @property
    def shape(self):
        return (self._table.num_examples, *self._columns)

    def numpy(self) -> np.ndarray:
        return read(getattr(self._table, self._attribute))[: self._table.num_examples]

    def assign(self, value):
        value = np.asarray(value, np.float32)
        if value.shape != self.shape:
            raise ValueError(f"Expected a value of shape {self.shape}. Received: {value.shape}.")
        assign(getattr(self._table, self._attribute), self._pad(value))


def _outside_any_strategy(create):
    """Runs ``create()`` where no ``tf.distribute`` strategy is in scope.

    The table is one set of variables that every replica of a step reads and
    scatters into. Created inside a strategy's scope (a table made by
    ``on_train_begin``, within ``fit``'s scope), they would be mirrored: each
    replica would write its own copy, and the callback, reading the first,
    would see the examples of one replica only. A strategy's scope is
    thread-local, so a short-lived thread creates them outside it.
    """
    if not tf.distribute.has_strategy():
        return create()
    result = {}

    def run():
        try:
            result["value"] = create()
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    thread = threading.Thread(target=run, name="keras_kd_table")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


class _StateArray:
    """One array of a JAX `Table`: ``numpy()`` and ``assign()`` like a ``tf.Variable``."""

    def __init__(self, state, key, mirror=None):
        self._state, self._key, self._mirror = state, key, mirror

    @property
    def shape(self):
        return tuple(self._state.variables[self._key].shape)

    def numpy(self) -> np.ndarray:
        return self._state.value(self._key)

    def assign(self, value):
        value = np.asarray(value, np.float32)
        self._state.assign(self._key, value)
        if self._mirror is not None:
            self._mirror.assign(value)


def flat(values):
    ops = _ops.namespace(values)
    return values if ops.ndim(values) == 1 else ops.reshape(values, [-1])


def table_rows(example_id, size: int):
    """The int64 table rows of a batch's ids: the id, or the spare row ``size`` where
    an id lies outside ``[0, size)`` (one unsigned comparison finds negative ids too)."""
    ids = flat(tf.cast(example_id, tf.int64))
    return tf.where(tf.cast(ids, tf.uint64) >= size, np.int64(size), ids)


def jax_rows(example_id, size: int):
    """`table_rows` for JAX arrays."""
    ops = _ops.namespace(example_id)
    ids = ops.reshape(ops.cast(example_id, ops.int_dtype), [-1])
    return ops.where((ids < 0) | (ids >= size), ops.zeros_like(ids) + size, ids)


def jax_record(state, rows, fresh):
    """Writes ``fresh`` (per row: difficulty, teacher wrong; NaN = no value) into the JAX table's
    pending values, as the TF step does; validation steps leave them unchanged. Runs inside the
    jitted step: the new values are a result of the step (`keras_kd._step_state`)."""
    import jax.numpy as jnp  # noqa: PLC0415 - JAX only

    pending = state.current("pending")
    keep = state.current("recording") < 0.5
    state.variables["pending"].assign(pending.at[rows].set(jnp.where(keep, pending[rows], fresh)))


def jax_weights(state, rows):
    """The weights of a JAX step's rows: 1 in validation steps, NaN for training ids outside the
    table (the spare row's weight)."""
    import jax.numpy as jnp  # noqa: PLC0415 - JAX only

    training = state.current("recording") > 0.5
    return jnp.where(training, state.current("weights")[rows], jnp.float32(1.0))


class StepRows:
    """`table_rows` computed once per traced step for both hooks (the loss
    passes the weighting and the observer the same ``example_id`` tensor)."""

    def __init__(self):
        self._last = None

    def __call__(self, example_id, size: int):
        last = self._last
        if last is not None and last[0] is example_id and last[1] == size:
            return last[2]
        rows = table_rows(example_id, size)
        # Symbolic tensors only: an eager call (the scoring pass) recomputes.
        self._last = (example_id, size, rows) if not tf.executing_eagerly() else None
        return rows


def merge_workers(strategy, table: Table, base: np.ndarray, local: np.ndarray) -> np.ndarray:
    """Merges the tables of all workers (MultiWorkerMirroredStrategy).

    Each worker records the examples of its own shard of every batch. At the
    end of an epoch, the rows a worker changed since the last merge (``base``)
    are combined across workers (mean of the changes, for rows more than one
    worker changed), so every worker continues from the same table.

    ``local`` is this worker's table after `Table.flush`.

    Returns:
        The merged statistics, also assigned to ``table.stats``.
    """
    changed = ~np.isnan(local) & ~((local == base) | (np.isnan(local) & np.isnan(base)))
    delta = np.where(changed, np.nan_to_num(local) - np.nan_to_num(base), 0.0).astype(np.float32)
    changed = changed.astype(np.float32)

    local_values = strategy.run(lambda: (tf.constant(delta), tf.constant(changed)))
    total, count = (strategy.reduce("sum", v, axis=None).numpy() for v in local_values)
    merged = np.where(count > 0, np.nan_to_num(base) + total / np.maximum(count, 1.0), base).astype(np.float32)
    table.stats.assign(merged)
    return merged


def save_histogram(directory: str, epoch: int, weights: np.ndarray, clip, signal_name: str):
    """Writes ``weights_epoch_<epoch + 1>.png`` (a histogram of the weights) to ``directory``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("`histogram_dir` needs matplotlib: `pip install matplotlib`.") from e
    os.makedirs(directory, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(weights, bins=40, range=clip)
    ax.set_xlabel("example weight")
    ax.set_ylabel("examples")
    ax.set_title(f"{signal_name} weights, epoch {epoch + 1}")
    fig.tight_layout()
    fig.savefig(os.path.join(directory, f"weights_epoch_{epoch + 1:03d}.png"))
    plt.close(fig)
