"""`DistillationLoss`, the loss a user passes to their own ``compile``.

Everything here is float32 math, whatever the model's dtype policy, on the
backend of the student's logits (`keras_kd._ops`: TensorFlow tensors get raw
TensorFlow ops, JAX arrays ``jax.numpy``). The pieces: divergences (`divergences`, `label_aware`), hard-label
losses (`hard`), the teacher's dense logits (`teacher`), input guards
(`guards`), hooks (`hooks`), reduction (`reduction`) and the fused gradient
of the common case (`fused`).
"""

from __future__ import annotations

import math
import warnings

import tensorflow as tf

from keras_kd import _compat
from keras_kd import _labels
from keras_kd import _ops
from keras_kd import targets as targets_lib
from keras_kd.losses import divergences
from keras_kd.losses import fused
from keras_kd.losses import guards
from keras_kd.losses import hard as hard_lib
from keras_kd.losses import label_aware
from keras_kd.losses import reduction as reduction_lib
from keras_kd.losses import teacher as teacher_lib
from keras_kd.losses import values as values_lib
from keras_kd.losses.hooks import Hooks
from keras_kd.losses.hooks import Observer
from keras_kd.losses.hooks import StepTerms
from keras_kd.losses.hooks import Weighting


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

    Labels (decoded in one place, `keras_kd._labels`): class ids of any
    integer dtype (``uint8`` as ``keras.datasets`` returns them) or whole
    floats; dense ``(batch, classes)`` labels, one-hot or mixed
    (`keras_kd.mixup`), for which the hard term is categorical cross-entropy
    from logits (as ``keras.losses.CategoricalCrossentropy(from_logits=True)``);
    and `keras_kd.NO_LABEL` (-1) for an unlabelled example (a transfer set),
    whose hard term is 0. Unlabelled examples still count in the mean over the
    batch: each contributes ``(1 - alpha) * soft``, a labelled one
    ``alpha * hard + (1 - alpha) * soft``, and the sum is divided by the
    batch size (as for any per-example loss; use ``sample_weight`` to weigh
    them differently). Other negative ids, ids >= classes and fractional
    float ids are out of range. ``NO_LABEL`` is understood by the default
    hard loss (``hard_loss=None``); a custom ``hard_loss`` receives the labels
    as they are. The student must output logits: a student ending in softmax
    or sigmoid gets a warning, once.

    Label-aware divergences (`keras_kd.DecoupledKD`, ``divergence="dkd"``;
    see `keras_kd.losses.label_aware`) also read each example's class: they
    need labels on every example, and raise otherwise (see `DecoupledKD`).

    Bad input never trains silently, in every setting: teacher logits with
    NaN or Inf and labels out of range raise ``InvalidArgumentError`` in eager
    and graph mode; under XLA (``jit_compile=True``, Keras 3's default on
    GPUs), which drops assertions, the affected examples' loss is NaN.

    Keras 3 on JAX (``KERAS_BACKEND=jax``): the same loss, computed with
    ``jax.numpy`` on the JAX arrays the step receives (the math follows the
    tensors' type, `keras_kd._ops`; tf_keras students keep TensorFlow). As
    under XLA, nothing can raise inside ``jax.jit``: NaN/Inf teacher logits,
    labels out of range and dense labels that are not distributions give a
    NaN loss (only the shape errors above raise, while tracing). The fused
    gradient is TensorFlow-only (``jax.jit`` fuses autodiff). Not given on
    JAX: the warnings for probabilities as ``y_pred`` and for training
    without teacher (both read TensorFlow graph state).

    Hyperparameters changed mid-fit take effect on every backend: set
    ``loss.temperature``, ``loss.alpha`` or a `keras_kd.DecoupledKD`'s
    weights in any callback (see `keras_kd.losses.values.Hyperparameter` for
    how JAX, whose jitted step treats untracked variables as constants, is
    made to see the change).

    Per-example hooks (`add_observer`, `add_weighting`; the protocol is in
    `keras_kd.losses.hooks`) run exactly once per step, from ``__call__``;
    `components`, `terms` and `call` are pure, so metrics such as
    `keras_kd.loss_components` never re-run them.

    Speed: in the common case (``divergence="kl"``, the default hard loss,
    ``(batch, classes)`` logits, a teacher and labels) ``__call__`` computes
    the loss with one analytic gradient (`keras_kd.losses.fused`) instead of
    autodiff through every op; the values are the same (the gradient equal
    to float32 rounding).

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
            logits, ``"huber"`` on logits, ``"dkd"`` (`keras_kd.DecoupledKD`
            with its defaults), a `keras_kd.losses.LabelAwareDivergence`
            instance such as ``keras_kd.DecoupledKD(1.0, 8.0)``, or a
            callable ``fn(teacher_logits / T, student_logits / T)``
            returning per-example values.
        hard_loss: loss on the hard labels: ``None`` for cross-entropy from
            logits (class ids, dense one-hot/mixup labels, NO_LABEL), a Keras loss name, a Keras 3
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
            count differs from the student's, labels whose shape fits
            neither class ids nor dense labels (a dense label with another
            class count), or a label-aware divergence on targets without
            labels.
        tf.errors.InvalidArgumentError: without XLA, at the first batch with
            teacher logits containing NaN or Inf, labels out of range, or
            `NO_LABEL` examples under a label-aware divergence (with XLA the
            loss is NaN instead).

    Example:

    ```python
    student.compile(optimizer="adam",
                    loss=keras_kd.DistillationLoss(temperature=4.0, alpha=0.1),
                    metrics=["accuracy"])
    student.fit(keras_kd.with_teacher(train_ds, teacher), epochs=10)
    ```


    References:
        Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
        Network", 2015. Zhao et al., "Decoupled Knowledge Distillation",
        CVPR 2022 (``divergence="dkd"``).
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
        if reduction not in reduction_lib.REDUCTIONS:
            raise ValueError(f"Expected `reduction` in {reduction_lib.REDUCTIONS}. Received: reduction={reduction!r}")
        super().__init__(name=name, reduction=reduction, dtype="float32")
        self._temperature = values_lib.Hyperparameter(temperature, "temperature", 0.0, math.inf, True)
        self._alpha = values_lib.Hyperparameter(alpha, "alpha", 0.0, 1.0, False)
        self.divergence = divergence
        self._divergence_fn = divergences.get_divergence(divergence)
        values_lib.materialize(self._divergence_fn)
        self._label_aware = label_aware.is_label_aware(self._divergence_fn)
        if topk_fill not in ("uniform", "renormalize"):
            raise ValueError(
                f"Expected `topk_fill` to be 'uniform' or 'renormalize'. Received: topk_fill={topk_fill!r}"
            )
        name_of = divergences.divergence_name(divergence)
        if self._label_aware:
            name_of = self._divergence_fn.name
            zero_mass_safe = self._divergence_fn.zero_mass_safe
        else:
            zero_mass_safe = name_of is None or name_of in divergences.ZERO_MASS_SAFE
        if topk_fill == "renormalize" and not zero_mass_safe:
            raise ValueError(
                f"divergence={name_of!r} is infinite or undefined where the teacher "
                "gives a class no mass, which topk_fill='renormalize' does. Use "
                f"topk_fill='uniform' or one of {sorted(divergences.ZERO_MASS_SAFE)}."
            )
        self.topk_fill = topk_fill
        self.hard_loss = hard_loss
        self._hard_loss_fn = hard_lib.resolve_hard_loss(hard_loss)
        self.scale_by_temperature_squared = bool(scale_by_temperature_squared)
        # Built-in logit divergences see a one-logit (binary) student's logit
        # as it is; every other divergence sees the two-class logits [0, z].
        self._binary_raw = self._divergence_fn in (divergences.logit_mse, divergences.logit_huber)
        # The fused gradient (keras_kd.losses.fused) covers forward KL with the default hard loss.
        self._fused = self._divergence_fn is divergences.forward_kl and self._hard_loss_fn is hard_lib.default_hard_loss
        self._hooks = Hooks()
        self._warned = set()

    # -- hyperparameters, changeable between epochs --------------------------

    # The setters are the way to change them mid-fit, on every backend (a callback's
    # `loss.alpha = x` between epochs): on TensorFlow the step reads the variables; on JAX
    # see `keras_kd.losses.values.Hyperparameter`.

    @property
    def temperature(self) -> float:
        return self._temperature.get()

    @temperature.setter
    def temperature(self, value):
        self._temperature.set(value)

    @property
    def alpha(self) -> float:
        return self._alpha.get()

    @alpha.setter
    def alpha(self, value):
        self._alpha.set(value)

    @property
    def temperature_variable(self):
        """The variable that holds the temperature (for schedules that ``assign`` it).

        On JAX, prefer ``loss.temperature = x``: once this variable has been
        taken, JAX steps read it from the host at every step.
        """
        return self._temperature.variable

    @property
    def alpha_variable(self):
        """The variable that holds alpha (for schedules); on JAX see `temperature_variable`."""
        return self._alpha.variable

    @property
    def step_states(self):
        """The `keras_kd._step_state.StepState`s of this loss's hyperparameters (JAX processes;
        empty on TensorFlow), for keras_kd callbacks to bind to the model (see `Hyperparameter`)."""
        holders = [self._temperature, self._alpha]
        holders += [h for h in vars(self._divergence_fn).values() if isinstance(h, values_lib.Hyperparameter)] \
            if self._label_aware else []
        return tuple(h.state for h in holders if h.state is not None)

    # -- per-example hooks (the protocol: keras_kd.losses.hooks) ---------------

    @property
    def observers(self):
        """The registered observers, in order (a tuple; use `add_observer`/`remove_observer`)."""
        return tuple(self._hooks.observers)

    @property
    def weightings(self):
        """The registered weightings, in order (a tuple; use `add_weighting`/`remove_weighting`)."""
        return tuple(self._hooks.weightings)

    @property
    def _observers(self):  # read by older callers; the hooks live in self._hooks
        return self._hooks.observers

    @property
    def _weightings(self):
        return self._hooks.weightings

    def add_observer(self, observer: Observer):
        """Registers an `Observer`: ``observer(targets, student_logits, hard, soft)``.

        The loss calls it exactly once per step (from ``__call__``, never from
        `components`), for batches that carry a teacher, with the dense
        teacher logits the loss used in ``targets.logits`` whatever form the
        targets had (dense, top-k, in-step teacher). This is how callbacks
        such as `keras_kd.HardSampleReweighting` read per-example values from
        the training step without an extra pass. Only steps traced after it is
        added see it: add it before the first ``fit``, or retrace with
        ``model.make_train_function(force=True)`` (see `keras_kd.losses.hooks`).
        """
        self._hooks.add_observer(observer)

    def remove_observer(self, observer: Observer):
        """Removes an observer added with `add_observer` (no-op if absent)."""
        self._hooks.remove_observer(observer)

    def add_weighting(self, weighting: Weighting):
        """Registers a `Weighting`: ``weighting(targets) -> per-example weights``,
        multiplied into the sample weights of batches whose targets carry
        example ids, once per step. Like observers, seen only by steps traced
        after it is added."""
        self._hooks.add_weighting(weighting)

    def remove_weighting(self, weighting: Weighting):
        """Removes a weighting added with `add_weighting` (no-op if absent)."""
        self._hooks.remove_weighting(weighting)

    # -- per-example terms (pure) ----------------------------------------------

    def _scaled(self, ops=_ops.TF):
        """The temperature as a float32 scalar (read from its variable at every step on TF)."""
        return self._temperature.read(ops)

    def distillation_term(self, teacher_logits, student_logits, labels=None):
        """``T^2 * D(teacher / T || student / T)`` per example (no alpha).

        A last dimension of 1 is one Bernoulli logit (binary classifier): the
        softmax divergences then compare ``Bernoulli(sigmoid(t / T))`` with
        ``Bernoulli(sigmoid(s / T))`` (they receive the two-class logits
        ``[0, z / T]``, whose softmax is ``[1 - sigmoid, sigmoid]``); ``"mse"``
        and ``"huber"`` compare the single logits.

        Args:
            teacher_logits: dense teacher logits.
            student_logits: the student's logits.
            labels: the labels, for label-aware divergences (``"dkd"``);
                ignored by the others.

        Raises:
            ValueError: for a label-aware divergence without ``labels``.
        """
        ops = _ops.namespace(student_logits, teacher_logits)
        temperature = self._scaled(ops)
        teacher_logits = ops.cast(ops.convert_to_tensor(teacher_logits), "float32") / temperature
        scaled_student = ops.cast(student_logits, "float32") / temperature
        if scaled_student.shape[-1] == 1 and not self._binary_raw:
            teacher_logits = _labels.two_class_logits(teacher_logits)
            scaled_student = _labels.two_class_logits(scaled_student)
        if self._label_aware:
            value = label_aware.call_with_labels(self._divergence_fn, teacher_logits, scaled_student, labels,
                                                 student_logits)
        else:
            value = ops.cast(self._divergence_fn(teacher_logits, scaled_student), "float32")
        if self.scale_by_temperature_squared:
            value = value * ops.square(temperature)
        return value

    def hard_term(self, labels, student_logits):
        """The hard-label loss per example."""
        ops = _ops.namespace(student_logits)
        return ops.cast(self._hard_loss_fn(labels, ops.cast(student_logits, "float32")), "float32")

    def terms(self, y_true, y_pred) -> StepTerms:
        """The per-example terms of one batch, with the dense teacher logits (pure: runs no hook).

        Returns:
            A `StepTerms` ``(targets, hard, soft)``, as observers receive them.
        """
        ops = _ops.namespace(y_pred, y_true)  # NumPy logits follow the targets' backend
        y_pred = ops.cast(ops.convert_to_tensor(y_pred), "float32")
        if not targets_lib.is_targets(y_true):
            return StepTerms(None, self.hard_term(ops.convert_to_tensor(y_true), y_pred), None)
        y_true = targets_lib.materialize(y_true)
        labels = ops.convert_to_tensor(y_true.labels) if y_true.has_labels else None
        if labels is not None:
            hard = self.hard_term(labels, y_pred)
        else:  # unlabelled data: no hard-label term
            hard = ops.zeros(ops.dynamic_shape(y_pred)[:-1] if ops.is_tf else y_pred.shape[:-1], "float32")
        teacher = teacher_lib.dense_teacher(y_true, y_pred, self.topk_fill)
        if teacher is None:
            return StepTerms(None, hard, None)
        dense, nan_rows = teacher
        soft = self.distillation_term(dense, y_pred, labels) + nan_rows
        return StepTerms(_dense_targets(y_true, dense), hard, soft)

    def components(self, y_true, y_pred):
        """Per-example ``(hard, distillation)`` terms; ``distillation`` is None
        when ``y_true`` carries no teacher. Pure: runs no observer."""
        terms = self.terms(y_true, y_pred)
        return terms.hard, terms.soft

    def _combine(self, hard, soft):
        if soft is None:
            return hard
        alpha = self._alpha.read(_ops.namespace(hard))
        return alpha * hard + (1.0 - alpha) * soft

    def call(self, y_true, y_pred):
        """Per-example loss values (before weights, masks and reduction). Pure."""
        return self._combine(*self.components(y_true, y_pred))

    # -- the step --------------------------------------------------------------

    def _warn_once(self, key, message):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    def _check_step_inputs(self, y_pred, has_teacher):
        activation = guards.producing_activation(y_pred)
        if activation is not None:
            self._warn_once(
                "probabilities",
                f"DistillationLoss received `y_pred` produced by a {activation} activation, but it expects "
                "the student's logits: it applies the temperature-scaled softmax itself, so probabilities "
                "are squashed twice and the student learns from a nearly uniform target. Remove the "
                "student's final activation (e.g. `Dense(classes)` without `activation='softmax'`) and "
                "apply it at inference time.",
            )
        if not has_teacher and guards.in_training_step():
            self._warn_once(
                ("no teacher", guards.graph_key()),
                "DistillationLoss is training on batches that carry no teacher (plain `(x, y)` or targets "
                "without teacher logits): the loss is the hard-label loss alone and nothing is distilled. "
                "Wrap the training data with `keras_kd.with_teacher(ds, teacher)` or "
                "`ds.apply(keras_kd.cache_teacher_logits(teacher, directory))`.",
            )

    def _fusable(self, y_true, y_pred):
        """Whether this batch takes the fused gradient (decided from static shapes while tracing).

        TensorFlow only: on JAX, autodiff of the plain formula is fused by ``jax.jit``.
        """
        return (
            self._fused
            and isinstance(y_pred, tf.Tensor)
            and targets_lib.is_targets(y_true)
            and y_true.has_labels
            and y_true.kind in ("dense", "topk", "inputs")
            and y_pred.shape.rank == 2
            and y_pred.shape[-1] is not None
            and y_pred.shape[-1] >= 2
        )

    def _fused_step(self, y_true, y_pred, sample_weight, mask):
        """The common case with one analytic gradient (`keras_kd.losses.fused`); None if no teacher."""
        y_true = targets_lib.materialize(y_true)
        teacher = teacher_lib.dense_teacher(y_true, y_pred, self.topk_fill)
        if teacher is None:
            return None
        dense, nan_rows = teacher
        labels = tf.convert_to_tensor(y_true.labels)
        hard_lib.check_label_shape(labels, y_pred)
        if _labels.is_dense(labels, y_pred.shape[-1], 2):
            labels, labelled = hard_lib.dense_labels(labels), None
        else:
            labels, labelled = hard_lib.sparse_ids(labels, y_pred)
        sample_weight = self._hooks.weigh(y_true, sample_weight)
        per_example = self.reduction in (None, "none")
        coefficients = None if per_example else reduction_lib.reduction_coefficients(
            nan_rows, sample_weight, mask, self.reduction, scale_for_replicas=not self.caller_scales_for_replicas()
        )
        alpha = self._alpha.read(_ops.TF)
        observed = bool(self._hooks.observers)
        loss, hard, soft = fused.fused_kd_loss(
            y_pred, dense, nan_rows, labels, labelled, self._scaled(), alpha,
            self.scale_by_temperature_squared, coefficients, per_example_terms=observed,
        )
        if observed:
            self._hooks.observe(StepTerms(_dense_targets(y_true, dense), hard, soft), y_pred)
        if per_example:
            loss = reduction_lib.reduce_values(loss, sample_weight, mask, self.reduction)
        return loss

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Keras's base __call__ converts y_true to a tensor, which would keep
        # only the labels of a TeacherTargets; reduce here instead, with the
        # same semantics. The hooks run here, once per step.
        mask = _compat.get_keras_mask(y_pred)
        ops = _ops.namespace(y_pred, y_true)
        if not ops.is_tf:
            # JAX arrays: the general path (``jax.jit`` fuses its gradient).
            return self._general_step(ops.cast(ops.convert_to_tensor(y_pred), "float32"), y_true, y_pred,
                                      sample_weight, mask)
        with tf.name_scope(self.name):
            logits = tf.cast(y_pred, tf.float32)
            if self._fusable(y_true, logits):
                loss = self._fused_step(y_true, logits, sample_weight, mask)
                if loss is not None:
                    self._check_step_inputs(y_pred, has_teacher=True)
                    return loss
            return self._general_step(logits, y_true, y_pred, sample_weight, mask)

    def _general_step(self, logits, y_true, y_pred, sample_weight, mask):
        """Terms, hooks (once per step) and reduction, on either backend's float32 logits."""
        terms = self.terms(y_true, logits)
        self._check_step_inputs(y_pred, has_teacher=terms.soft is not None)
        self._hooks.observe(terms, logits)
        if targets_lib.is_targets(y_true):
            sample_weight = self._hooks.weigh(y_true, sample_weight)
        return reduction_lib.reduce_values(
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
            "divergence": divergences.divergence_name(self.divergence) or _compat.serialize(self.divergence),
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


def _dense_targets(targets, dense):
    """The targets as observers see them: dense teacher logits, top-k fields cleared."""
    return targets.replace(logits=dense, topk_indices=None, topk_values=None, topk_logsumexp=None)
