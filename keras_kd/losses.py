"""Distillation losses: divergences between temperature-scaled logits, and
`DistillationLoss`, the loss a user passes to their own ``compile``.

Everything here is TensorFlow math in float32, whatever the model's dtype
policy. Divergence functions return per-position values (one per example, or
per example and time step); reduction, sample weights and masks are applied in
one place, `DistillationLoss.__call__`.
"""

from __future__ import annotations

import functools
import math
import numbers
import typing
import warnings
from typing import Callable, Union

import keras
import tensorflow as tf

from keras_kd import _compat
from keras_kd import targets as targets_lib

Divergence = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


# ---------------------------------------------------------------------------
# Divergences. Arguments are logits already divided by the temperature; the
# teacher comes first, as in D(teacher || student). Each returns the
# divergence over the last (class) axis.
# ---------------------------------------------------------------------------


def _xlogy_ratio(probs, log_probs, other_log_probs):
    """sum p * (log p - log q) with 0 * log 0 = 0 (p may be exactly 0).

    ``multiply_no_nan`` drops only exact zeros of ``p``: NaN probabilities
    (from NaN or Inf logits) propagate, so a broken teacher never yields a
    finite loss, with or without the eager checks (XLA drops ``tf.debugging``
    assertions). One op, where three ``tf.where`` used to be.
    """
    return tf.reduce_sum(tf.math.multiply_no_nan(log_probs - other_log_probs, probs), axis=-1)


def forward_kl(teacher_logits, student_logits):
    """KL(teacher || student) between the softmaxes of the logits.

    Formula: ``sum_c p_t[c] * (log p_t[c] - log p_s[c])``, with
    ``p = softmax(logits)`` and ``0 * log 0 = 0`` (teacher logits may be
    ``-inf`` for classes it gives no mass).

    Reference: Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
    Network", 2015.
    """
    t_log = tf.nn.log_softmax(teacher_logits, axis=-1)
    s_log = tf.nn.log_softmax(student_logits, axis=-1)
    return _xlogy_ratio(tf.exp(t_log), t_log, s_log)


def reverse_kl(teacher_logits, student_logits):
    """KL(student || teacher), the mode-seeking direction.

    Reference: Gu et al., "MiniLLM: Knowledge Distillation of Large Language
    Models", 2024.
    """
    t_log = tf.nn.log_softmax(teacher_logits, axis=-1)
    s_log = tf.nn.log_softmax(student_logits, axis=-1)
    return _xlogy_ratio(tf.exp(s_log), s_log, t_log)


def jensen_shannon(teacher_logits, student_logits):
    """Jensen-Shannon divergence: ``(KL(p_t || m) + KL(p_s || m)) / 2``,
    ``m = (p_t + p_s) / 2``. Symmetric and bounded by ``log 2``.
    """
    t_log = tf.nn.log_softmax(teacher_logits, axis=-1)
    s_log = tf.nn.log_softmax(student_logits, axis=-1)
    m_log = tf.reduce_logsumexp(tf.stack([t_log, s_log]), axis=0) - math.log(2.0)
    return 0.5 * (_xlogy_ratio(tf.exp(t_log), t_log, m_log) + _xlogy_ratio(tf.exp(s_log), s_log, m_log))


def soft_cross_entropy(teacher_logits, student_logits):
    """Cross-entropy of the student's softmax against the teacher's:
    ``-sum_c p_t[c] log p_s[c]``. Equals `forward_kl` plus the teacher's
    entropy, which has no gradient for the student.
    """
    t_probs = tf.nn.softmax(teacher_logits, axis=-1)
    s_log = tf.nn.log_softmax(student_logits, axis=-1)
    return -tf.reduce_sum(tf.math.multiply_no_nan(s_log, t_probs), axis=-1)


def logit_mse(teacher_logits, student_logits):
    """Mean squared difference of the (temperature-scaled) logits over classes.

    With the T^2 factor the result does not depend on the temperature:
    ``T^2 * mean((s/T - t/T)^2) = mean((s - t)^2)``.

    Reference: Ba & Caruana, "Do Deep Nets Really Need to be Deep?", 2014.
    """
    return tf.reduce_mean(tf.square(student_logits - teacher_logits), axis=-1)


def logit_huber(teacher_logits, student_logits, delta: float = 1.0):
    """Huber loss (``delta=1``) of the logit differences, mean over classes."""
    err = tf.abs(student_logits - teacher_logits)
    quad = tf.minimum(err, delta)
    return tf.reduce_mean(0.5 * tf.square(quad) + delta * (err - quad), axis=-1)


DIVERGENCES = {
    "kl": forward_kl,
    "reverse_kl": reverse_kl,
    "js": jensen_shannon,
    "soft_cross_entropy": soft_cross_entropy,
    "mse": logit_mse,
    "huber": logit_huber,
}
# The name of each built-in divergence function (so that passing the function
# serialises and is checked exactly like passing its name).
_DIVERGENCE_NAMES = {fn: name for name, fn in DIVERGENCES.items()}
# Divergences that stay finite when the teacher gives a class no mass.
_ZERO_MASS_SAFE = {"kl", "js", "soft_cross_entropy"}

_REDUCTIONS = ("sum_over_batch_size", "sum", "mean", "mean_with_sample_weight", "none", None)


def _divergence_name(divergence):
    """The name of a built-in divergence (given by name or as the function), else None."""
    if isinstance(divergence, str):
        return divergence
    try:
        return _DIVERGENCE_NAMES.get(divergence)
    except TypeError:  # unhashable callable
        return None


def get_divergence(identifier: Union[str, Divergence]) -> Divergence:
    """Resolves a divergence name (see `DIVERGENCES`) or passes a callable through."""
    if callable(identifier):
        return identifier
    if identifier in DIVERGENCES:
        return DIVERGENCES[identifier]
    raise ValueError(
        f"Unknown divergence {identifier!r}. Expected one of "
        f"{sorted(DIVERGENCES)} or a callable "
        "`fn(teacher_logits, student_logits) -> per-example values`."
    )


# ---------------------------------------------------------------------------
# Checks that hold in every execution mode
# ---------------------------------------------------------------------------

_NAN = float("nan")


def nan_where_invalid(values, valid, message):
    """``values`` where ``valid``, NaN elsewhere; raises in eager and graph mode.

    This is how the loss refuses bad per-example input (non-finite teacher
    logits, labels out of range) in every setting: without XLA the
    ``tf.debugging.Assert`` raises ``InvalidArgumentError`` with ``message``;
    with ``jit_compile=True`` XLA drops the assertion, but the affected
    examples' loss is NaN, so training visibly fails (loss ``nan``) instead of
    silently training on wrong values.

    The NaN is added as a term that depends on ``valid`` only, so the
    gradient of ``values`` is unchanged and no extra gradient ops are built.

    Args:
        values: per-example values.
        valid: boolean tensor of the same shape, computed from the inputs
            (labels, teacher logits), not from trainable values.
        message: the error message (start it with ``"keras_kd: "``).

    Returns:
        ``values`` with NaN where ``valid`` is False.
    """
    check = tf.debugging.Assert(tf.reduce_all(valid), [message])
    with tf.control_dependencies([check] if check is not None else []):
        penalty = _nan_penalty(valid, values.dtype)
    return values + penalty


def _nan_penalty(valid, dtype=tf.float32):
    """0 where ``valid``, NaN elsewhere, as ``0 / valid``: two element-wise ops, cheaper
    on CPU than a broadcasting ``tf.where``; it depends on inputs only (no gradient)."""
    return tf.constant(0.0, dtype) / tf.cast(valid, dtype)


def _nan_rows(values):
    """Per row (all but the last axis): 0 when every value is finite, else NaN.

    ``sum(values * 0)``: two ops, and NaN for any NaN or +-Inf in the row.
    """
    return tf.reduce_sum(values * 0.0, axis=-1)


# ---------------------------------------------------------------------------
# Hard-label losses
# ---------------------------------------------------------------------------


def _class_ids(labels):
    """Class ids as int64 from any integer or float dtype (uint8 from keras.datasets, too)."""
    return labels if labels.dtype == tf.int64 else tf.cast(labels, tf.int64)


def binary_hard_loss(labels, student_logits):
    """Binary cross-entropy from a one-logit (Bernoulli) student.

    Formula: ``-(y log sigmoid(s) + (1 - y) log sigmoid(-s))`` per example.

    Args:
        labels: 0/1 (or soft) labels in ``[0, 1]``, any numeric dtype, shape
            ``batch`` or ``batch + (1,)``.
        student_logits: logits of shape ``batch + (1,)``.

    Returns:
        Per-example values of shape ``batch``. Labels outside ``[0, 1]`` raise
        (eager and graph mode) or give NaN (under XLA).

    Raises:
        ValueError: for labels with a last dimension other than 1 at the
            logits' rank (e.g. one-hot labels for a one-logit student).
    """
    logits = tf.cast(student_logits, tf.float32)
    labels = tf.convert_to_tensor(labels)
    rank = logits.shape.rank
    if labels.shape.rank == rank and labels.shape[-1] not in (1, None):
        raise ValueError(
            f"The student has one logit (binary classification) but the labels have shape {labels.shape}. "
            "Pass 0/1 labels of shape (batch,) or (batch, 1), or give the student one logit per class."
        )
    labels = tf.cast(labels, tf.float32)
    if labels.shape.rank == rank - 1:
        labels = labels[..., None]
    valid = (labels >= 0.0) & (labels <= 1.0)
    values = nan_where_invalid(
        tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits),
        valid,
        "keras_kd: binary labels out of range: a one-logit student needs labels in [0, 1] "
        "(0/1 class labels or probabilities).",
    )
    return tf.squeeze(values, axis=-1)


def default_hard_loss(labels, student_logits):
    """Cross-entropy from logits: sparse class ids, one-hot labels, or binary.

    * A last dimension of 1 in the logits is one Bernoulli logit: binary
      cross-entropy from logits against 0/1 labels (`binary_hard_loss`).
    * Labels whose rank equals the logits' rank and whose last dimension equals
      the class count are one-hot (or soft) labels.
    * Anything else is class ids of any integer (or float) dtype; a trailing
      axis of size 1 is squeezed.

    Labels out of range (class ids outside ``[0, classes)``, binary labels
    outside ``[0, 1]``) raise ``InvalidArgumentError`` in eager and graph mode
    and give a NaN loss under XLA (``jit_compile=True``), which drops
    assertions: they never train silently.

    Args:
        labels: the labels, see above.
        student_logits: logits of shape ``batch + (classes,)``.

    Returns:
        Per-example values of shape ``batch``.

    Raises:
        ValueError: for labels whose last dimension matches neither the class
            count nor 1.
    """
    student_logits = tf.cast(student_logits, tf.float32)
    labels = tf.convert_to_tensor(labels)
    num_classes = student_logits.shape[-1]
    if num_classes == 1:
        return binary_hard_loss(labels, student_logits)
    same_rank = labels.shape.rank == student_logits.shape.rank
    if same_rank and labels.shape[-1] == num_classes:
        return tf.nn.softmax_cross_entropy_with_logits(tf.cast(labels, tf.float32), student_logits)
    if same_rank and labels.shape[-1] == 1:
        labels = tf.squeeze(labels, axis=-1)
    elif same_rank and labels.shape[-1] is not None:
        raise ValueError(
            f"Labels of shape {labels.shape} do not fit the student's logits of shape {student_logits.shape}: "
            f"pass class ids of shape (batch,) or one-hot labels with {num_classes} columns."
        )
    ids = _class_ids(labels)
    limit = num_classes if num_classes is not None else tf.cast(tf.shape(student_logits)[-1], tf.int64)
    valid = (ids >= 0) & (ids < limit)
    message = (
        f"keras_kd: labels out of range: the student has {num_classes} classes, so class ids must be in "
        f"[0, {num_classes}). Fix the labels, or the number of output units of the student."
    )
    # The kernel must not see bad ids before the check has run (it would raise its own, vaguer error).
    with tf.control_dependencies([tf.debugging.Assert(tf.reduce_all(valid), [message])]):
        ids = tf.identity(ids)
    # Under XLA, which drops the assertion, the kernel itself gives NaN for out-of-range ids
    # (tests/test_bad_inputs.py checks it), so no extra op is spent on that here.
    return tf.nn.sparse_softmax_cross_entropy_with_logits(ids, student_logits)


def _expects_probabilities(hard_loss):
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


def _resolve_hard_loss(hard_loss):
    if _expects_probabilities(hard_loss):
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


# ---------------------------------------------------------------------------
# Hyperparameter values: numbers or variables, checked the same way
# ---------------------------------------------------------------------------


def _is_variable(value):
    return isinstance(value, (tf.Variable, keras.Variable))


def _scalar_value(value, argument):
    """The float value of a number, a scalar tensor/array or a variable; a clear error otherwise."""
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise ValueError(f"Expected `{argument}` to be a number or a float tf.Variable. Received: {argument}={value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    dtype = getattr(value, "dtype", None)
    shape = getattr(value, "shape", None)
    try:
        dtype = tf.as_dtype(dtype) if dtype is not None else None
    except TypeError:
        dtype = None
    if dtype is None or not (dtype.is_floating or dtype.is_integer) or shape is None or len(shape) != 0:
        raise ValueError(
            f"Expected `{argument}` to be a number or a scalar float tf.Variable. Received: {argument}={value!r}"
        )
    return float(tf.convert_to_tensor(value).numpy())


def _check_range(value, argument, low, high, low_open):
    bad = not math.isfinite(value) or (value <= low if low_open else value < low) or value > high
    if bad:
        bound = f"> {low}" if low_open else f"in [{low}, {high}]"
        raise ValueError(f"Expected `{argument}` {bound} and finite. Received: {argument}={value}")


def _as_variable(value, argument, low, high, low_open):
    """A float32 variable holding ``value``, after checking its range.

    A user's variable (tf.Variable or keras.Variable) is kept as is, so that
    the user may change it, but its current value is checked like a number.
    """
    checked = _scalar_value(value, argument)
    _check_range(checked, argument, low, high, low_open)
    if _is_variable(value):
        if not tf.as_dtype(value.dtype).is_floating:
            raise ValueError(
                f"Expected `{argument}` to be a number or a scalar float tf.Variable (it is assigned "
                f"fractional values). Received a variable of dtype {tf.as_dtype(value.dtype).name}: "
                f"{argument}={value!r}"
            )
        return value
    return tf.Variable(checked, trainable=False, dtype=tf.float32, name=f"kd_{argument}")


# ---------------------------------------------------------------------------
# What the step sees: probabilities instead of logits, training without teacher
# ---------------------------------------------------------------------------

_PROBABILITY_OPS = ("Softmax", "Sigmoid")


def _producing_activation(tensor):
    """``"Softmax"``/``"Sigmoid"`` when ``tensor`` comes out of that activation, else None.

    Uses what Keras itself uses for its own losses' warning: the
    ``_keras_logits`` attribute Keras activations set, or (in a traced graph)
    the producing op, looking through casts and identities.
    """
    if hasattr(tensor, "_keras_logits"):
        op = getattr(tensor, "op", None)
        return getattr(op, "type", None) if getattr(op, "type", None) in _PROBABILITY_OPS else "Softmax or Sigmoid"
    op = getattr(tensor, "op", None) if not isinstance(tensor, (tf.__internal__.EagerTensor, tf.Variable)) else None
    for _ in range(4):
        if op is None:
            return None
        if op.type in _PROBABILITY_OPS:
            return op.type
        if op.type not in ("Cast", "Identity") or not op.inputs:
            return None
        op = op.inputs[0].op
    return None


def _in_training_step():
    """Whether a gradient tape is recording, i.e. this is a training step (not evaluate/predict)."""
    try:
        from tensorflow.python.eager import record  # noqa: PLC0415 - private, guarded
    except ImportError:  # pragma: no cover - TF moved it
        return False
    return bool(record.could_possibly_record())


def _graph_key():
    graph = tf.compat.v1.get_default_graph()
    return getattr(graph, "name", None) or id(graph)


class Observer(typing.Protocol):
    """The observer hook: ``observer(targets, student_logits, hard, soft) -> None``.

    Called by `DistillationLoss` exactly once per step (training and
    validation steps alike), inside the traced step, for batches that carry a
    teacher. ``targets`` is the batch's `TeacherTargets` with the teacher's
    **dense** float32 logits in ``targets.logits`` (top-k targets are expanded
    with the loss's ``topk_fill``; in-step teachers have run), ``labels`` and
    ``example_id`` as in the dataset. ``hard`` and ``soft`` are the
    per-example terms the loss computed (``soft = T^2 * D``, before alpha).
    It may create TF ops (e.g. variable updates).
    """

    def __call__(self, targets, student_logits, hard, soft) -> None: ...


class Weighting(typing.Protocol):
    """The weighting hook: ``weighting(targets) -> per-example weights``.

    Called by `DistillationLoss` exactly once per step for batches whose
    targets carry ``example_id``; the result is multiplied into the sample
    weights before reduction.
    """

    def __call__(self, targets) -> tf.Tensor: ...


class StepTerms(typing.NamedTuple):
    """What `DistillationLoss.terms` computes for one batch, and what observers receive.

    Attributes:
        targets: the batch's `TeacherTargets` with the dense float32 teacher
            logits the loss used in ``logits`` (top-k fields cleared, in-step
            teacher run), or None when the batch carries no teacher.
        hard: per-example hard-label loss.
        soft: per-example ``T^2 * D`` (before alpha), or None without teacher.
    """

    targets: typing.Any
    hard: tf.Tensor
    soft: typing.Optional[tf.Tensor]


# ---------------------------------------------------------------------------
# DistillationLoss
# ---------------------------------------------------------------------------


@_compat.register_serializable()
class DistillationLoss(_compat.loss_base()):
    """Hinton-style distillation loss for a plain ``compile``/``fit``.

    Use it as the ``loss`` of the student's own ``compile`` and feed ``fit`` a
    dataset whose targets carry the teacher's outputs (`keras_kd.with_teacher`
    or the teacher-logit cache). The student outputs logits.

    Formula:

    ```
    loss = alpha * hard_loss(labels, s)
         + (1 - alpha) * T^2 * D(teacher(x) / T || s / T)
    ```

    computed per example (and per time step for ``(batch, time, classes)``
    logits), then weighted by ``sample_weight`` and masks and reduced like any
    Keras loss. With targets that carry no teacher (plain labels, e.g. a
    validation set without `with_teacher`) the loss is ``hard_loss`` alone;
    a *training* step without teacher warns (nothing is distilled). The
    warning is given while Keras traces the training step, once per traced
    step: at the first ``fit`` after ``compile`` and whenever Keras retraces
    (a new ``compile``, ``make_train_function(force=True)``, a new input
    signature). A second ``fit`` of the same compiled model reuses the traced
    step and does not warn again: the step itself cannot warn (a Python
    warning from inside a compiled step would not run under XLA), and a loss
    has no hook at the start of a ``fit``.

    A student with **one logit** (last dimension 1) is a binary classifier:
    the logit is a Bernoulli logit, the distillation term is
    ``T^2 * KL(Bernoulli(sigmoid(t / T)) || Bernoulli(sigmoid(s / T)))``
    (every softmax divergence sees the two-class logits ``[0, z / T]``;
    ``"mse"``/``"huber"`` compare the single logits) and the default hard
    loss is binary cross-entropy from logits against 0/1 labels.

    Labels may have any integer dtype (``uint8`` as ``keras.datasets``
    returns them). The student must output logits: a student ending in
    softmax or sigmoid gets a warning, once.

    Bad input never trains silently, in every setting: teacher logits with
    NaN or Inf and labels out of range raise ``InvalidArgumentError`` in eager
    and graph mode; under XLA (``jit_compile=True``, Keras 3's default on
    GPUs), which drops assertions, the affected examples' loss is NaN.

    Per-example hooks (`add_observer`, `add_weighting`; protocols `Observer`
    and `Weighting`) run exactly once per step, from ``__call__``;
    `components` and `terms` are pure, so metrics such as
    `keras_kd.loss_components` never re-run them.

    Args:
        temperature: softening temperature ``T > 0``. A number, or a float
            ``tf.Variable``/``keras.Variable`` (its value is checked here)
            that callbacks or keras-tuner may change between epochs without
            recompiling. Defaults to 4.0.
        alpha: weight of the hard-label loss, in ``[0, 1]``; ``1 - alpha``
            weighs the distillation term. A number or a ``tf.Variable``.
            Defaults to 0.1.
        divergence: ``"kl"`` (teacher-to-student forward KL, default),
            ``"reverse_kl"``, ``"js"``, ``"soft_cross_entropy"``, ``"mse"`` on
            logits, ``"huber"`` on logits, or a callable
            ``fn(teacher_logits / T, student_logits / T)`` returning
            per-example values.
        hard_loss: loss on the hard labels: ``None`` for cross-entropy from
            logits (class ids or one-hot labels), a Keras loss name, a Keras 3
            or tf_keras ``Loss`` instance, or a callable
            ``fn(labels, logits) -> per-example values``.
        scale_by_temperature_squared: multiply the distillation term by
            ``T^2`` so its gradients keep their size across temperatures
            (Hinton et al. 2015). Defaults to True.
        topk_fill: how top-k teacher targets fill the classes outside the top
            k: ``"uniform"`` or ``"renormalize"`` (see
            `keras_kd.targets.dense_teacher_logits`). Defaults to "uniform".
        reduction: as for any Keras loss. Defaults to "sum_over_batch_size";
            masked positions are left out of the mean.
        name: name of the loss. Defaults to "distillation_loss".

    Raises:
        ValueError: for ``temperature <= 0`` or non-finite, ``alpha`` outside
            ``[0, 1]`` (numbers, ``tf.Variable``/``keras.Variable`` values and
            values given to the setters alike), a non-number, or an unknown
            divergence; while tracing the step, for teacher logits whose class
            count differs from the student's, or labels whose shape fits
            neither class ids nor one-hot labels.
        tf.errors.InvalidArgumentError: without XLA, at the first batch with
            teacher logits containing NaN or Inf or labels out of range
            (with XLA the loss is NaN instead).

    Example:

    ```python
    student.compile(optimizer="adam",
                    loss=keras_kd.DistillationLoss(temperature=4.0, alpha=0.1),
                    metrics=["accuracy"])
    student.fit(keras_kd.with_teacher(train_ds, teacher), epochs=10)
    ```

    References:
        Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
        Network", 2015.
    """

    def __init__(
        self,
        temperature=4.0,
        alpha=0.1,
        divergence="kl",
        hard_loss=None,
        scale_by_temperature_squared=True,
        topk_fill="uniform",
        reduction="sum_over_batch_size",
        name="distillation_loss",
    ):
        if reduction not in _REDUCTIONS:
            raise ValueError(f"Expected `reduction` in {_REDUCTIONS}. Received: reduction={reduction!r}")
        super().__init__(name=name, reduction=reduction, dtype="float32")
        self._temperature = _as_variable(temperature, "temperature", 0.0, math.inf, True)
        self._alpha = _as_variable(alpha, "alpha", 0.0, 1.0, False)
        self.divergence = divergence
        self._divergence_fn = get_divergence(divergence)
        if topk_fill not in ("uniform", "renormalize"):
            raise ValueError(
                f"Expected `topk_fill` to be 'uniform' or 'renormalize'. Received: topk_fill={topk_fill!r}"
            )
        divergence_name = _divergence_name(divergence)
        if topk_fill == "renormalize" and divergence_name is not None and divergence_name not in _ZERO_MASS_SAFE:
            raise ValueError(
                f"divergence={divergence_name!r} is infinite or undefined where the teacher "
                "gives a class no mass, which topk_fill='renormalize' does. Use "
                f"topk_fill='uniform' or one of {sorted(_ZERO_MASS_SAFE)}."
            )
        self.topk_fill = topk_fill
        self.hard_loss = hard_loss
        self._hard_loss_fn = _resolve_hard_loss(hard_loss)
        self.scale_by_temperature_squared = bool(scale_by_temperature_squared)
        # Built-in logit divergences see a one-logit (binary) student's logit
        # as it is; every other divergence sees the two-class logits [0, z].
        self._binary_raw = self._divergence_fn in (logit_mse, logit_huber)
        self._observers = []
        self._weightings = []
        self._warned = set()

    # -- hyperparameters, changeable between epochs --------------------------

    @property
    def temperature(self) -> float:
        return float(tf.convert_to_tensor(self._temperature).numpy())

    @temperature.setter
    def temperature(self, value):
        value = _scalar_value(value, "temperature")
        _check_range(value, "temperature", 0.0, math.inf, True)
        self._temperature.assign(value)

    @property
    def alpha(self) -> float:
        return float(tf.convert_to_tensor(self._alpha).numpy())

    @alpha.setter
    def alpha(self, value):
        value = _scalar_value(value, "alpha")
        _check_range(value, "alpha", 0.0, 1.0, False)
        self._alpha.assign(value)

    @property
    def temperature_variable(self):
        """The variable that holds the temperature (for schedules)."""
        return self._temperature

    @property
    def alpha_variable(self):
        """The variable that holds alpha (for schedules)."""
        return self._alpha

    # -- per-example hooks (see `Observer` and `Weighting`) ------------------

    def add_observer(self, observer: Observer):
        """Registers an `Observer`: ``observer(targets, student_logits, hard, soft)``.

        The loss calls it exactly once per step (from ``__call__``, never from
        `components`), for batches that carry a teacher, with the dense
        teacher logits the loss used in ``targets.logits`` whatever form the
        targets had (dense, top-k, in-step teacher). This is how callbacks
        such as `keras_kd.HardSampleReweighting` read per-example values from
        the training step without an extra pass. Only steps traced after it is
        added see it (call ``model.make_train_function(force=True)``).
        """
        if observer not in self._observers:
            self._observers.append(observer)

    def remove_observer(self, observer: Observer):
        """Removes an observer added with `add_observer` (no-op if absent)."""
        if observer in self._observers:
            self._observers.remove(observer)

    def add_weighting(self, weighting: Weighting):
        """Registers a `Weighting`: ``weighting(targets) -> per-example weights``,
        multiplied into the sample weights of batches whose targets carry
        example ids, once per step. Like observers, seen only by steps traced
        after it is added."""
        if weighting not in self._weightings:
            self._weightings.append(weighting)

    def remove_weighting(self, weighting: Weighting):
        """Removes a weighting added with `add_weighting` (no-op if absent)."""
        if weighting in self._weightings:
            self._weightings.remove(weighting)

    # -- per-example terms (pure) ----------------------------------------------

    def _teacher_logits(self, targets, student_logits):
        """Dense float32 teacher logits (NaN rows where the teacher's values are not finite), or None."""
        num_classes = student_logits.shape[-1]
        raw = targets.logits if targets.logits is not None else targets.topk_values
        if raw is None:
            return None
        _check_teacher_positions(raw.shape, student_logits.shape)
        if targets.logits is not None:
            t_classes = raw.shape[-1]
            if t_classes is not None and num_classes is not None and t_classes != num_classes:
                hint = (
                    " A one-logit student is a binary classifier: give the teacher one logit too."
                    if 1 in (t_classes, num_classes)
                    else ""
                )
                raise ValueError(
                    f"Teacher logits have shape {raw.shape} but the student's "
                    f"logits have shape {student_logits.shape}: the class counts "
                    f"differ ({t_classes} vs {num_classes}).{hint}"
                )
            dense = tf.cast(raw, tf.float32)
            nan_rows = _nan_rows(dense)
        else:
            dense = targets_lib.dense_teacher_logits(targets, num_classes, self.topk_fill)
            nan_rows = _nan_rows(tf.cast(raw, tf.float32))
            if targets.topk_logsumexp is not None and self.topk_fill == "uniform":
                lse = tf.cast(targets.topk_logsumexp, tf.float32)
                lse_k = tf.reduce_logsumexp(tf.cast(raw, tf.float32), axis=-1)
                # log-sum-exp over all classes is at least that over the top k, up to the
                # rounding of float16-stored values (relative 2^-11, 4x margin); rows with
                # NaN/Inf values are left to the NaN check, which names them.
                inconsistent = tf.equal(nan_rows, 0.0) & (lse < lse_k - 2e-3 * (1.0 + tf.abs(lse_k)))
                nan_rows = nan_where_invalid(
                    nan_rows + lse * 0.0,
                    tf.logical_not(inconsistent),
                    "keras_kd: top-k targets have `topk_logsumexp` smaller than the log-sum-exp of their own "
                    "top-k logits, which is impossible for the log-sum-exp of all the teacher's logits (was it "
                    "computed from other logits, e.g. divided by a temperature, or from probabilities?). "
                    "Store tf.reduce_logsumexp(teacher_logits, -1) of the raw logits.",
                )
        return dense, nan_rows

    def distillation_term(self, teacher_logits, student_logits):
        """``T^2 * D(teacher / T || student / T)`` per example (no alpha).

        A last dimension of 1 is one Bernoulli logit (binary classifier): the
        softmax divergences then compare ``Bernoulli(sigmoid(t / T))`` with
        ``Bernoulli(sigmoid(s / T))`` (they receive the two-class logits
        ``[0, z / T]``, whose softmax is ``[1 - sigmoid, sigmoid]``); ``"mse"``
        and ``"huber"`` compare the single logits.
        """
        temperature = tf.cast(tf.convert_to_tensor(self._temperature), tf.float32)
        teacher_logits = tf.cast(teacher_logits, tf.float32) / temperature
        student_logits = tf.cast(student_logits, tf.float32) / temperature
        if student_logits.shape[-1] == 1 and not self._binary_raw:
            teacher_logits = tf.concat([tf.zeros_like(teacher_logits), teacher_logits], axis=-1)
            student_logits = tf.concat([tf.zeros_like(student_logits), student_logits], axis=-1)
        value = tf.cast(self._divergence_fn(teacher_logits, student_logits), tf.float32)
        if self.scale_by_temperature_squared:
            value = value * tf.square(temperature)
        return value

    def hard_term(self, labels, student_logits):
        """The hard-label loss per example."""
        return tf.cast(self._hard_loss_fn(labels, tf.cast(student_logits, tf.float32)), tf.float32)

    def terms(self, y_true, y_pred) -> StepTerms:
        """The per-example terms of one batch, with the dense teacher logits (pure: runs no hook).

        Returns:
            A `StepTerms` ``(targets, hard, soft)``, as observers receive them.
        """
        y_pred = tf.cast(y_pred, tf.float32)
        if not targets_lib.is_targets(y_true):
            return StepTerms(None, self.hard_term(y_true, y_pred), None)
        y_true = targets_lib.materialize(y_true)
        if y_true.has_labels:
            hard = self.hard_term(y_true.labels, y_pred)
        else:  # unlabelled data: no hard-label term
            hard = tf.zeros(tf.shape(y_pred)[:-1], tf.float32)
        teacher = self._teacher_logits(y_true, y_pred)
        if teacher is None:
            return StepTerms(None, hard, None)
        dense, nan_rows = teacher
        # Any NaN/Inf in a teacher row makes that row's term NaN, which XLA keeps; without XLA,
        # CheckNumerics raises with the message. (-inf would otherwise read as "no mass".)
        nan_rows = tf.debugging.check_numerics(
            nan_rows,
            "keras_kd: teacher logits contain NaN or Inf. Check the teacher (its weights, inputs and "
            "final layer) or the cached logits.",
        )
        soft = self.distillation_term(dense, y_pred) + nan_rows
        targets = y_true.replace(logits=dense, topk_indices=None, topk_values=None, topk_logsumexp=None)
        return StepTerms(targets, hard, soft)

    def components(self, y_true, y_pred):
        """Per-example ``(hard, distillation)`` terms; ``distillation`` is None
        when ``y_true`` carries no teacher. Pure: runs no observer."""
        terms = self.terms(y_true, y_pred)
        return terms.hard, terms.soft

    def _combine(self, hard, soft):
        if soft is None:
            return hard
        alpha = tf.cast(tf.convert_to_tensor(self._alpha), tf.float32)
        return alpha * hard + (1.0 - alpha) * soft

    def call(self, y_true, y_pred):
        """Per-example loss values (before weights, masks and reduction). Pure."""
        return self._combine(*self.components(y_true, y_pred))

    # -- the step --------------------------------------------------------------

    def _warn_once(self, key, message):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    def _check_step_inputs(self, y_true, y_pred, terms):
        activation = _producing_activation(y_pred)
        if activation is not None:
            self._warn_once(
                "probabilities",
                f"DistillationLoss received `y_pred` produced by a {activation} activation, but it expects "
                "the student's logits: it applies the temperature-scaled softmax itself, so probabilities "
                "are squashed twice and the student learns from a nearly uniform target. Remove the "
                "student's final activation (e.g. `Dense(classes)` without `activation='softmax'`) and "
                "apply it at inference time.",
            )
        if terms.soft is None and _in_training_step():
            self._warn_once(
                ("no teacher", _graph_key()),
                "DistillationLoss is training on batches that carry no teacher (plain `(x, y)` or targets "
                "without teacher logits): the loss is the hard-label loss alone and nothing is distilled. "
                "Wrap the training data with `keras_kd.with_teacher(ds, teacher)` or "
                "`ds.apply(keras_kd.cache_teacher_logits(teacher, directory))`.",
            )

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Keras's base __call__ converts y_true to a tensor, which would keep
        # only the labels of a TeacherTargets; reduce here instead, with the
        # same semantics. The hooks run here, once per step.
        mask = _compat.get_keras_mask(y_pred)
        with tf.name_scope(self.name):
            terms = self.terms(y_true, y_pred)
            self._check_step_inputs(y_true, y_pred, terms)
            if terms.targets is not None:
                for observer in self._observers:
                    observer(terms.targets, tf.cast(y_pred, tf.float32), terms.hard, terms.soft)
            if self._weightings and targets_lib.is_targets(y_true) and y_true.example_id is not None:
                for weighting in self._weightings:
                    w = weighting(y_true)
                    sample_weight = w if sample_weight is None else tf.cast(sample_weight, tf.float32) * w
            return reduce_values(
                self._combine(terms.hard, terms.soft),
                sample_weight,
                mask,
                self.reduction,
                scale_for_replicas=not self.caller_scales_for_replicas(),
            )

    def get_config(self):
        return {
            "temperature": self.temperature,
            "alpha": self.alpha,
            "divergence": _divergence_name(self.divergence) or _compat.serialize(self.divergence),
            "hard_loss": _compat.serialize(self.hard_loss),
            "scale_by_temperature_squared": self.scale_by_temperature_squared,
            "topk_fill": self.topk_fill,
            "reduction": self.reduction,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["divergence"] = _compat.deserialize(config.get("divergence", "kl"))
        config["hard_loss"] = _compat.deserialize(config.get("hard_loss"))
        return cls(**config)


def _check_teacher_positions(teacher_shape, student_shape):
    """Teacher and student logits must agree on every axis but the last (the classes, or k).

    TensorFlow would broadcast a teacher of shape ``(batch, classes)`` against a
    sequence student ``(batch, time, classes)`` (or a size-1 axis against any
    size) and silently compare the wrong positions, so this is checked while
    tracing, wherever the shapes are known.

    Raises:
        ValueError: naming both shapes, for a different rank or a known
            non-class axis that differs.
    """
    t_rank, s_rank = teacher_shape.rank, student_shape.rank
    if t_rank is None or s_rank is None:
        return
    differs = t_rank != s_rank or any(
        a is not None and b is not None and a != b for a, b in zip(teacher_shape[:-1], student_shape[:-1])
    )
    if differs:
        raise ValueError(
            f"Teacher logits have shape {teacher_shape} but the student's logits have shape {student_shape}: "
            "they must agree on every axis but the last (batch, and time steps for sequence models), one "
            "teacher row per student position. Give the teacher the same inputs and output positions as the "
            "student (e.g. both per time step, or both per sequence)."
        )


def _broadcast_like(weights, values):
    """Casts ``weights`` to float32 and broadcasts it to the shape of ``values``.

    Weights of shape ``(batch,)`` spread over trailing (time) axes; a trailing
    axis of size 1 is dropped.
    """
    weights = tf.cast(weights, tf.float32)
    rank = values.shape.rank
    if weights.shape.rank is not None and rank is not None:
        if weights.shape.rank == rank + 1 and weights.shape[-1] == 1:
            weights = tf.squeeze(weights, -1)
        while weights.shape.rank < rank:
            weights = weights[..., None]
    return tf.broadcast_to(weights, tf.shape(values))


def reduce_values(values, sample_weight=None, mask=None, reduction="sum_over_batch_size", scale_for_replicas=True):
    """Weights, masks and reduces per-position loss values like a Keras loss.

    ``sample_weight`` has shape ``(batch,)`` or the shape of ``values``
    (e.g. ``(batch, time)``). Masked positions get weight 0 and, for the mean
    reductions, are left out of the count. Under a `tf.distribute` strategy
    the means are divided by the number of replicas (unless
    ``scale_for_replicas=False``, for training loops that do it themselves),
    as Keras does, so the replicas' summed gradients equal one device's.
    """
    values = tf.cast(values, tf.float32)
    weights = None if sample_weight is None else _broadcast_like(sample_weight, values)
    count = tf.cast(tf.size(values), tf.float32)
    if mask is not None:
        mask = _broadcast_like(mask, values)
        weights = mask if weights is None else weights * mask
        count = tf.reduce_sum(mask)
    if weights is not None:
        values = values * weights
    if reduction in (None, "none"):
        return values
    total = tf.reduce_sum(values)
    if reduction == "sum":
        return total
    if reduction == "mean_with_sample_weight" and weights is not None:
        count = tf.reduce_sum(weights)
    loss = tf.math.divide_no_nan(total, count)
    replicas = _compat.num_replicas_in_sync()
    if scale_for_replicas and replicas > 1:
        loss = loss / replicas
    return loss
