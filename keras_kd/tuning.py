"""keras-tuner searches over distillation, for Keras 3 and tf_keras students.

* `distillation_hyperparameters(hp, ...)` declares temperature, alpha,
  divergence, alignment weight and learning rate on a ``HyperParameters``
  object and returns ready-to-use keras_kd objects; your own build function
  calls it. It refuses a reweighting, which a build function cannot apply.
* `DistillationHyperModel(build_student, ...)`: a ``keras_tuner.HyperModel``
  that compiles your student with those choices and also searches the
  reweighting signal and strength: in ``fit`` it attaches the reweighting
  callback.
* `RandomSearch`, `BayesianOptimization`, `Hyperband`: keras-tuner's own
  tuners, made to accept tf_keras models too (keras-tuner 1.4 refuses them,
  so quantization-aware students could not be tuned). They differ from
  keras-tuner's only where a model is tf_keras: the model check, the tuner's
  own per-epoch callbacks (re-expressed as tf_keras callbacks) and the trial
  results (a dict of the best epoch's metrics). Optional post-training
  objectives: the int8 TFLite accuracy and a size/accuracy trade-off.

Teacher targets should come from the cache (`cache_teacher_logits`) so a
search of N trials runs the teacher over the data once.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import numbers
from typing import Callable, Optional, Sequence, Union

import keras
import keras_tuner
from keras_tuner.src.engine import tuner_utils

from keras_kd import _compat
from keras_kd.callbacks import SIGNALS
from keras_kd.callbacks import HardSampleReweighting
from keras_kd.losses import DIVERGENCES
from keras_kd.losses import DistillationLoss
from keras_kd.metrics import teacher_agreement

Range = Union[float, Sequence, None]


@dataclasses.dataclass
class DistillationChoices:
    """What `distillation_hyperparameters` chose for one trial.

    Attributes:
        loss: a `DistillationLoss` with the chosen temperature, alpha and
            divergence.
        learning_rate: the chosen learning rate.
        reweighting: a `HardSampleReweighting` or ``None``.
        alignment_weight: the chosen feature-alignment weight or ``None``.
    """

    loss: DistillationLoss
    learning_rate: float
    reweighting: Optional[HardSampleReweighting] = None
    alignment_weight: Optional[float] = None

    def optimizer(self, flavour: str = "keras"):
        """An Adam optimizer with the chosen learning rate, for a model of
        ``flavour`` (``"keras"`` or ``"tf_keras"``, see ``_compat.flavour_of``)."""
        return _compat.module(flavour).optimizers.Adam(self.learning_rate)


def _declare(hp, name, value, *, low=None, high=None, log=False, argument=None):
    """A Fixed for a number, a Float for a (low, high) range, a Choice for a list."""
    argument = argument or name

    def check(v):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"Expected numbers in `{argument}`. Received: {argument}={value!r}")
        if (low is not None and (v <= low if log else v < low)) or (high is not None and v > high):
            bound = f"> {low}" if log else f"in [{low}, {high if high is not None else 'inf'}]"
            raise ValueError(f"Expected `{argument}` values {bound}. Received: {argument}={value!r}")

    if isinstance(value, tuple):
        if len(value) != 2 or value[0] >= value[1]:
            raise ValueError(f"Expected `{argument}` = (low, high) with low < high. Received: {argument}={value!r}")
        check(value[0])
        check(value[1])
        return hp.Float(name, value[0], value[1], sampling="log" if log else "linear")
    if isinstance(value, list):
        if not value:
            raise ValueError(f"Expected a non-empty list for `{argument}`.")
        for v in value:
            check(v)
        return hp.Choice(name, value)
    check(value)
    return hp.Fixed(name, float(value))


def _choice(hp, name, value, allowed, argument):
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v not in allowed:
            raise ValueError(f"Unknown {argument} {v!r}. Expected one of {sorted(allowed)}.")
    return hp.Choice(name, values) if len(values) > 1 else hp.Fixed(name, values[0])


def distillation_hyperparameters(
    hp,
    *,
    temperature: Range = (1.0, 10.0),
    alpha: Range = (0.0, 1.0),
    divergence: Union[str, Sequence[str]] = "kl",
    learning_rate: Range = (1e-4, 1e-2),
    reweighting_signal: Union[None, str, Sequence[str]] = None,
    reweighting_strength: Range = None,
    reweighting_warmup_epochs: Optional[int] = None,
    alignment_weight: Range = None,
) -> DistillationChoices:
    """Declares the distillation hyperparameters and returns keras_kd objects.

    Each range is a number (fixed), a ``(low, high)`` tuple (a float range;
    temperature and learning rate are sampled on a log scale) or a list (a
    choice). Names: ``kd_temperature``, ``kd_alpha``, ``kd_divergence``,
    ``learning_rate``, ``kd_alignment_weight`` (and, through
    `DistillationHyperModel`, ``kd_reweighting``: ``"none"`` or a signal, and
    ``kd_reweighting_strength``).

    Args:
        hp: a ``keras_tuner.HyperParameters``.
        temperature: range of the temperature, > 0. Defaults to (1.0, 10.0).
        alpha: range of the hard-label weight, in [0, 1]. Defaults to (0.0, 1.0).
        divergence: a divergence name or a list to choose from. Defaults to "kl".
        learning_rate: range of the learning rate, > 0. Defaults to (1e-4, 1e-2).
        reweighting_signal: ``None`` or ``"none"`` (no reweighting) here.
            A reweighting is a `HardSampleReweighting` callback that only
            applies where ``fit`` receives it and its dataset is attached,
            which a build function cannot do: search it with
            ``DistillationHyperModel(build_student, reweighting_signal=...)``
            (subclass it and call ``super().fit`` to customise ``fit``).
        reweighting_strength: refused here like ``reweighting_signal`` (pass
            it to `DistillationHyperModel`); None.
        reweighting_warmup_epochs: likewise; None.
        alignment_weight: ``None`` or the range of the feature-alignment weight
            (for `keras_kd.align`), >= 0.

    Returns:
        A `DistillationChoices`.

    Raises:
        ValueError: for a temperature <= 0, alpha outside [0, 1], a learning
            rate <= 0, an empty or inverted range, or an unknown name.
        keras_tuner.errors.FatalValueError: (a ``ValueError``) for a
            reweighting signal other than ``"none"``, which this call could not
            apply; the message says how to search it.

    Example:

    ```python
    def build(hp):
        kd = keras_kd.tuning.distillation_hyperparameters(hp, temperature=(1.0, 8.0))
        student = make_student()
        student.compile(kd.optimizer(), loss=kd.loss, metrics=["accuracy"])
        return student
    ```
    """
    signals = reweighting_signal if isinstance(reweighting_signal, (list, tuple)) else [reweighting_signal]
    if any(s not in (None, "none") for s in signals) or reweighting_strength is not None or (
        reweighting_warmup_epochs is not None
    ):
        named = [s for s in signals if s is not None] or ["none"]
        # An unknown name first gets the unknown-name message.
        allowed = set(SIGNALS) | {"none"}
        _choice(keras_tuner.HyperParameters(), "kd_reweighting", named, allowed, "reweighting_signal")
        raise keras_tuner.errors.FatalValueError(
            "`distillation_hyperparameters` cannot apply a reweighting (received "
            f"reweighting_signal={reweighting_signal!r}, reweighting_strength={reweighting_strength!r}, "
            f"reweighting_warmup_epochs={reweighting_warmup_epochs!r}): "
            "the reweighting is a `HardSampleReweighting` callback that must be given to `fit` and "
            "attached to its dataset, which a build function (or `HyperModel.build`) cannot do, so "
            "the choice would be silently ignored. Search it with "
            "`keras_kd.tuning.DistillationHyperModel(build_student, reweighting_signal=...)`, which "
            "compiles the student and applies the reweighting in `fit` (subclass it and call "
            "`super().fit(hp, model, x, ...)` to customise `fit`); or drop the reweighting arguments."
        )
    return _distillation_choices(
        hp, temperature=temperature, alpha=alpha, divergence=divergence, learning_rate=learning_rate,
        alignment_weight=alignment_weight,
    )


def _distillation_choices(
    hp,
    *,
    temperature: Range = (1.0, 10.0),
    alpha: Range = (0.0, 1.0),
    divergence: Union[str, Sequence[str]] = "kl",
    learning_rate: Range = (1e-4, 1e-2),
    reweighting_signal: Union[None, str, Sequence[str]] = None,
    reweighting_strength: Range = (0.5, 3.0),
    reweighting_warmup_epochs: int = 1,
    reweighting_num_examples: Optional[int] = None,
    alignment_weight: Range = None,
) -> DistillationChoices:
    """`distillation_hyperparameters` with the reweighting too: only for
    callers that apply it in ``fit`` (`DistillationHyperModel`)."""
    if reweighting_num_examples is not None and (
        isinstance(reweighting_num_examples, bool) or not isinstance(reweighting_num_examples, int)
        or reweighting_num_examples <= 0
    ):
        raise ValueError(
            "Expected `reweighting_num_examples` to be a positive int (the number of training "
            f"examples). Received: reweighting_num_examples={reweighting_num_examples!r}"
        )
    t = _declare(hp, "kd_temperature", temperature, low=0.0, log=True, argument="temperature")
    a = _declare(hp, "kd_alpha", alpha, low=0.0, high=1.0, argument="alpha")
    d = _choice(hp, "kd_divergence", list(divergence) if not isinstance(divergence, str) else divergence,
                set(DIVERGENCES), "divergence")
    lr = _declare(hp, "learning_rate", learning_rate, low=0.0, log=True, argument="learning_rate")
    choices = DistillationChoices(
        loss=DistillationLoss(temperature=t, alpha=a, divergence=d), learning_rate=float(lr)
    )
    if reweighting_signal is not None:
        signals = reweighting_signal if isinstance(reweighting_signal, (list, tuple)) else [reweighting_signal]
        signal = _choice(hp, "kd_reweighting", list(signals), set(SIGNALS) | {"none"}, "reweighting_signal")
        if signal != "none":
            strength = _declare(hp, "kd_reweighting_strength", reweighting_strength, argument="reweighting_strength")
            choices.reweighting = HardSampleReweighting(
                signal=signal, strength=float(strength), warmup_epochs=reweighting_warmup_epochs,
                num_examples=reweighting_num_examples,
            )
    if alignment_weight is not None:
        choices.alignment_weight = float(
            _declare(hp, "kd_alignment_weight", alignment_weight, low=0.0, argument="alignment_weight")
        )
    return choices


class DistillationHyperModel(keras_tuner.HyperModel):
    """Compiles your student with the searched distillation hyperparameters.

    ``build(hp)`` calls ``build_student(hp)`` (which returns an uncompiled
    Keras 3 or tf_keras student that outputs logits), declares the
    distillation hyperparameters and compiles the student with Adam and a
    `DistillationLoss`. ``fit`` attaches the reweighting callback when the
    search chose one (the training dataset then needs example ids: the
    teacher-logit cache provides them).

    Args:
        build_student: ``fn(hp) -> model``.
        metrics: metrics to compile with. Defaults to
            ``["accuracy", keras_kd.teacher_agreement]``.
        **ranges: the ranges of `distillation_hyperparameters`, plus
            ``reweighting_signal`` (a signal or a list to choose from, ``"none"``
            allowed), ``reweighting_strength``, ``reweighting_warmup_epochs``
            and ``reweighting_num_examples`` (the number of training examples,
            needed when the training dataset is batched before ``fit``).

    Raises:
        ValueError: for a bad range (see `distillation_hyperparameters`).
        keras_tuner.errors.FatalValueError: in ``fit``, when a chosen
            reweighting cannot attach to the training data (no example ids,
            or a batched dataset without ``reweighting_num_examples``).
    """

    def __init__(self, build_student: Callable, metrics=None, **ranges):
        super().__init__()
        if not callable(build_student):
            raise ValueError(f"Expected `build_student` to be a callable. Received: {build_student!r}")
        self.build_student = build_student
        self.metrics = metrics
        self.ranges = ranges
        _distillation_choices(keras_tuner.HyperParameters(), **ranges)  # validate now

    def build(self, hp):
        choices = _distillation_choices(hp, **self.ranges)
        student = self.build_student(hp)
        _check_model(student)
        metrics = list(self.metrics) if self.metrics is not None else ["accuracy", teacher_agreement]
        student.compile(optimizer=choices.optimizer(_compat.flavour_of(student)), loss=choices.loss, metrics=metrics)
        return student

    def fit(self, hp, model, x=None, *args, callbacks=None, **kwargs):
        choices = _distillation_choices(hp, **self.ranges)
        callbacks = list(callbacks or [])
        if choices.reweighting is not None:
            try:
                x = choices.reweighting.attach(x)
            except ValueError as error:
                hint = ""
                if choices.reweighting.num_examples is None:
                    hint = (" With DistillationHyperModel, pass the number of training examples as "
                            "`DistillationHyperModel(..., reweighting_num_examples=N)`.")
                # Fatal: every trial would fail the same way.
                raise keras_tuner.errors.FatalValueError(f"{error}{hint}") from error
            callbacks.append(choices.reweighting)
        return model.fit(x, *args, callbacks=callbacks, **kwargs)


def _check_model(model):
    if not _compat.is_model(model):
        raise keras_tuner.errors.FatalTypeError(
            "Expected the model-building function, or HyperModel.build(), to return a Keras 3 "
            f"or tf_keras Model. Received: {model!r} of type {type(model).__name__}."
        )


# ---------------------------------------------------------------------------
# Tuners that accept tf_keras models
# ---------------------------------------------------------------------------

TFLITE_INT8_ACCURACY = "tflite_int8_accuracy"
TFLITE_SIZE_KIB = "tflite_size_kib"
SIZE_ACCURACY = "size_accuracy"


class _SaveBestEpoch(_compat.callback_base()):
    """keras-tuner's SaveBestEpoch, as a callback that runs in both flavours."""

    def __init__(self, objective, filepath):
        super().__init__()
        self.objective = objective
        self.filepath = filepath
        self.best_value = -math.inf if objective.direction == "max" else math.inf

    def on_epoch_end(self, epoch, logs=None):
        if not self.objective.has_value(logs):
            self.model.save_weights(self.filepath)
            return
        value = self.objective.get_value(logs)
        if self.objective.better_than(value, self.best_value):
            self.best_value = value
            self.model.save_weights(self.filepath)


class _TunerCallback(_compat.callback_base()):
    """keras-tuner's TunerCallback, as a callback that runs in both flavours."""

    def __init__(self, tuner, trial):
        super().__init__()
        self.tuner, self.trial = tuner, trial

    def on_epoch_begin(self, epoch, logs=None):
        self.tuner.on_epoch_begin(self.trial, self.model, epoch, logs=logs)

    def on_batch_begin(self, batch, logs=None):
        self.tuner.on_batch_begin(self.trial, self.model, batch, logs)

    def on_batch_end(self, batch, logs=None):
        self.tuner.on_batch_end(self.trial, self.model, batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self.tuner.on_epoch_end(self.trial, self.model, epoch, logs=logs)


def _for_tf_keras(callback):
    if isinstance(callback, tuner_utils.SaveBestEpoch):
        # keras-tuner passes one SaveBestEpoch to every execution of a trial,
        # so that the checkpoint holds the best epoch of all of them: its twin
        # must be one object too, keeping the best value across executions.
        twin = getattr(callback, "_keras_kd_tf_keras_twin", None)
        if twin is None:
            twin = _SaveBestEpoch(callback.objective, callback.filepath)
            callback._keras_kd_tf_keras_twin = twin
        return twin
    if isinstance(callback, tuner_utils.TunerCallback):
        return _TunerCallback(callback.tuner, callback.trial)
    if _compat.flavour_of(callback) == _compat.KERAS3:
        # A Fatal error: keras-tuner would otherwise count it as a failed trial.
        raise keras_tuner.errors.FatalValueError(
            f"{type(callback).__name__} is a Keras 3 callback, which crashes tf_keras `fit`. "
            "For a tf_keras student pass tf_keras callbacks (e.g. tf_keras.callbacks.EarlyStopping) "
            "or keras_kd callbacks, which run in both."
        )
    return callback


class _BestEpochWeights(_compat.callback_base()):
    """Keeps the weights of one execution's best epoch (as SaveBestEpoch picks
    it: the best value of the objective, or the last epoch without one), so
    that post-training objectives measure the weights that are saved."""

    def __init__(self, objective):
        super().__init__()
        self.objective = objective
        self.best_value = None
        self.weights = None

    def on_train_begin(self, logs=None):
        self.best_value, self.weights = None, None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if not self.objective.has_value(logs):
            self.weights = self.model.get_weights()
            return
        value = self.objective.get_value(logs)
        if self.best_value is None or self.objective.better_than(value, self.best_value):
            self.best_value = value
            self.weights = self.model.get_weights()


def _best_epoch_metrics(history, objective) -> dict:
    """A tf_keras History as keras-tuner's dict of one epoch's metrics: the
    best epoch for the objective (the last epoch without one)."""
    metrics = history.history
    epochs = len(next(iter(metrics.values()), []))
    best = epochs - 1
    if epochs and objective.has_value({k: v[0] for k, v in metrics.items()}):
        values = [objective.get_value({k: v[i] for k, v in metrics.items()}) for i in range(epochs)]
        best = max(range(epochs), key=values.__getitem__) if objective.direction == "max" else min(
            range(epochs), key=values.__getitem__
        )
    return {k: float(v[best]) for k, v in metrics.items()}


class _AnyKerasTuner:
    """Mixin for keras-tuner tuners: tf_keras models and post-training objectives.

    Extra tuner arguments:
        tflite_data: a batched dataset of ``(x, y)`` used, after each trial's
            training, to convert the student to int8 TFLite (representative
            data) and measure its accuracy, reported as
            ``"tflite_int8_accuracy"``, its size as ``"tflite_size_kib"``,
            and ``"size_accuracy"`` = accuracy - ``size_penalty`` * size in
            MiB. Use any of them as the objective, by name: their directions
            are known (`OBJECTIVE_DIRECTIONS`: max for the accuracies, min
            for the size; also ``"val_teacher_agreement"``, max). They are
            measured on the weights of the execution's best epoch for the
            objective (the epoch whose weights keras-tuner saves; the last
            epoch when the objective is one of these TFLite figures; then,
            with ``executions_per_trial > 1``, the checkpoint is the
            execution with the best figure). As keras-tuner does for every
            metric, a trial's figures are the mean over its executions.
        size_penalty: accuracy points per MiB for ``"size_accuracy"``.

    Like keras-tuner's own tuners, each trial starts with
    ``clear_session()`` (both flavours) and a garbage collection, so memory
    stays flat over trials; with ``executions_per_trial > 1`` the saved
    checkpoint is the best epoch of all the trial's executions, for tf_keras
    students too.

    """

    def __init__(self, *args, tflite_data=None, size_penalty: float = 0.01, **kwargs):
        self.tflite_data = tflite_data
        self.size_penalty = size_penalty
        if len(args) > 1:  # (hypermodel, objective, ...)
            args = (args[0], _with_directions(args[1]), *args[2:])
        elif "objective" in kwargs:
            kwargs["objective"] = _with_directions(kwargs["objective"])
        super().__init__(*args, **kwargs)
        names = [o.name for o in getattr(self.oracle.objective, "objectives", [self.oracle.objective])]
        if tflite_data is None and set(names) & {TFLITE_INT8_ACCURACY, TFLITE_SIZE_KIB, SIZE_ACCURACY}:
            raise ValueError(f"The objective {names} is measured on a TFLite model: pass `tflite_data=`.")

    def _try_build(self, hp):
        # What keras-tuner's own _try_build does first: drop the previous
        # trials' models and graph state, in both flavours.
        keras.backend.clear_session()
        _compat.tf_keras().backend.clear_session()
        gc.collect()
        model = self._build_hypermodel(hp)
        _check_model(model)
        size = model.count_params() if model.built else 0
        if self.max_model_size and size > self.max_model_size:
            raise keras_tuner.errors.FailedTrialError(f"Oversized model: {size} parameters. Skip model.")
        return model

    def _build_and_fit_model(self, trial, *args, **kwargs):
        hp = trial.hyperparameters
        callbacks = kwargs.get("callbacks", [])
        saver = next((c for c in callbacks if isinstance(c, tuner_utils.SaveBestEpoch)), None)
        model = self._try_build(hp)
        tf_keras_model = _compat.flavour_of(model) == _compat.TF_KERAS
        if tf_keras_model:
            kwargs["callbacks"] = [_for_tf_keras(c) for c in kwargs.get("callbacks", [])]
        best_weights = None
        if self.tflite_data is not None:
            best_weights = _BestEpochWeights(self.oracle.objective)
            kwargs["callbacks"] = list(kwargs.get("callbacks", [])) + [best_weights]
        results = self.hypermodel.fit(hp, model, *args, **kwargs)
        if tf_keras_model and hasattr(results, "history"):
            results = _best_epoch_metrics(results, self.oracle.objective)
        if self.tflite_data is not None:
            if best_weights.weights is not None:
                model.set_weights(best_weights.weights)  # the epoch SaveBestEpoch saved
            results = self._add_tflite_objectives(model, results)
            self._keep_best_execution(model, results, saver)
        if hasattr(model, "get_build_config"):
            from keras_tuner.src import utils

            utils.save_json(self._get_build_config_fname(trial.trial_id), model.get_build_config())
        tuner_utils.validate_trial_results(results, self.oracle.objective, "HyperModel.fit()")
        return results

    def _keep_best_execution(self, model, results, saver):
        """With a TFLite objective, which no epoch logs, the trial's checkpoint
        holds the weights of its best execution (by that objective), not of
        the last one to run."""
        names = [o.name for o in getattr(self.oracle.objective, "objectives", [self.oracle.objective])]
        if saver is None or not set(names) & {TFLITE_INT8_ACCURACY, TFLITE_SIZE_KIB, SIZE_ACCURACY}:
            return
        value = self.oracle.objective.get_value(results)
        best = getattr(saver, "_keras_kd_best_execution", None)
        if best is None or self.oracle.objective.better_than(value, best[0]):
            saver._keras_kd_best_execution = (value, model.get_weights())
        else:
            model.set_weights(best[1])
        model.save_weights(saver.filepath)

    def _add_tflite_objectives(self, model, results):
        from keras_kd import optimize

        if hasattr(results, "history"):
            results = _best_epoch_metrics(results, self.oracle.objective)
        results = dict(results or {})
        tflite = optimize.to_tflite(model, representative_data=self.tflite_data, int8=True)
        accuracy = optimize.evaluate_tflite(tflite, self.tflite_data)
        size_kib = len(tflite) / 1024
        results[TFLITE_INT8_ACCURACY] = float(accuracy)
        results[TFLITE_SIZE_KIB] = float(size_kib)
        results[SIZE_ACCURACY] = float(accuracy - self.size_penalty * size_kib / 1024)
        return results


# Directions of the objectives keras-tuner cannot infer from their names.
OBJECTIVE_DIRECTIONS = {
    TFLITE_INT8_ACCURACY: "max",
    SIZE_ACCURACY: "max",
    TFLITE_SIZE_KIB: "min",
    "teacher_agreement": "max",
    "val_teacher_agreement": "max",
}


def _with_directions(objective):
    """String objectives keras_kd defines, as ``keras_tuner.Objective`` with their direction."""
    if isinstance(objective, str) and objective in OBJECTIVE_DIRECTIONS:
        return keras_tuner.Objective(objective, OBJECTIVE_DIRECTIONS[objective])
    if isinstance(objective, (list, tuple)):
        return [_with_directions(o) for o in objective]
    return objective


class RandomSearch(_AnyKerasTuner, keras_tuner.RandomSearch):
    """``keras_tuner.RandomSearch`` that also tunes tf_keras students (see `_AnyKerasTuner`)."""


class BayesianOptimization(_AnyKerasTuner, keras_tuner.BayesianOptimization):
    """``keras_tuner.BayesianOptimization`` that also tunes tf_keras students."""


class Hyperband(_AnyKerasTuner, keras_tuner.Hyperband):
    """``keras_tuner.Hyperband`` that also tunes tf_keras students."""
