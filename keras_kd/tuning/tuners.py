"""keras-tuner's tuners, made to accept tf_keras students, with TFLite objectives.

keras-tuner 1.4 refuses tf_keras models (so quantization-aware students could
not be tuned). These tuners differ from keras-tuner's only where a model is
tf_keras: the model check, the tuner's own per-epoch callbacks (re-expressed
as callbacks that run in both flavours) and the trial results (a dict of the
best epoch's metrics). Every keras-tuner internal they use is read in
``_keras_tuner_private.py``.
"""

from __future__ import annotations

import math

import keras
import keras_tuner

from keras_kd import _compat
from keras_kd.callbacks import Callback
from keras_kd.tuning import _keras_tuner_private as kt_private
from keras_kd.tuning.hypermodel import _check_model

TFLITE_INT8_ACCURACY = "tflite_int8_accuracy"
TFLITE_SIZE_KIB = "tflite_size_kib"
SIZE_ACCURACY = "size_accuracy"
_TFLITE_OBJECTIVES = {TFLITE_INT8_ACCURACY, TFLITE_SIZE_KIB, SIZE_ACCURACY}

# Directions of the objectives keras-tuner cannot infer from their names.
OBJECTIVE_DIRECTIONS = {
    TFLITE_INT8_ACCURACY: "max",
    SIZE_ACCURACY: "max",
    TFLITE_SIZE_KIB: "min",
    "teacher_agreement": "max",
    "val_teacher_agreement": "max",
}


class _BestEpoch(Callback):
    """keras-tuner's SaveBestEpoch rule, as a callback that runs in both flavours.

    An epoch is kept when the objective improves on the best value so far, or
    when the logs lack the objective (every epoch). With ``filepath`` the kept
    weights are saved there and the best value persists across ``fit`` calls
    (keras-tuner passes one SaveBestEpoch to all executions of a trial, so its
    checkpoint holds the best epoch of all of them); without, they are kept in
    memory as ``weights``, per ``fit``.
    """

    def __init__(self, objective, filepath=None):
        super().__init__()
        self.objective = objective
        self.filepath = filepath
        self.best_value = self._worst()
        self.weights = None

    def _worst(self):
        return -math.inf if self.objective.direction == "max" else math.inf

    def on_train_begin(self, logs=None):
        if self.filepath is None:
            self.best_value, self.weights = self._worst(), None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.objective.has_value(logs):
            value = self.objective.get_value(logs)
            if not self.objective.better_than(value, self.best_value):
                return
            self.best_value = value
        if self.filepath is None:
            self.weights = self.model.get_weights()
        else:
            self.model.save_weights(self.filepath)


class _TunerCallback(Callback):
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


def _for_tf_keras(callback, trial_state: dict):
    """The callback as one that runs in tf_keras ``fit``.

    keras-tuner passes one SaveBestEpoch to every execution of a trial, so
    that the checkpoint holds the best epoch of all of them: its twin is one
    object too (kept in ``trial_state``), keeping the best value across
    executions.
    """
    if isinstance(callback, kt_private.SaveBestEpoch):
        if trial_state.get("twin") is None:
            trial_state["twin"] = _BestEpoch(*kt_private.save_best_epoch_settings(callback))
        return trial_state["twin"]
    if isinstance(callback, kt_private.TunerCallback):
        return _TunerCallback(*kt_private.tuner_callback_settings(callback))
    if _compat.flavour_of(callback) == _compat.KERAS3:
        # A Fatal error: keras-tuner would otherwise count it as a failed trial.
        raise keras_tuner.errors.FatalValueError(
            f"{type(callback).__name__} is a Keras 3 callback, which crashes tf_keras `fit`. "
            "For a tf_keras student pass tf_keras callbacks (e.g. tf_keras.callbacks.EarlyStopping) "
            "or keras_kd callbacks, which run in both."
        )
    return callback


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


def _with_directions(objective):
    """String objectives keras_kd defines, as ``keras_tuner.Objective`` with their direction."""
    if isinstance(objective, str) and objective in OBJECTIVE_DIRECTIONS:
        return keras_tuner.Objective(objective, OBJECTIVE_DIRECTIONS[objective])
    if isinstance(objective, (list, tuple)):
        return [_with_directions(o) for o in objective]
    return objective


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
        self._trial_state = {"saver": None}
        if tflite_data is None and self._tflite_objective():
            raise ValueError(f"The objective {self._objective_names()} is measured on a TFLite model: "
                             "pass `tflite_data=`.")

    def _objective_names(self):
        return [o.name for o in kt_private.objective_list(self.oracle.objective)]

    def _tflite_objective(self) -> bool:
        return bool(set(self._objective_names()) & _TFLITE_OBJECTIVES)

    def _state_of(self, saver) -> dict:
        """State shared by the executions of one trial: keras-tuner gives them
        one SaveBestEpoch object (held here, so it is the current trial's)."""
        if saver is None or self._trial_state["saver"] is not saver:
            self._trial_state = {"saver": saver, "twin": None, "best_execution": None}
        return self._trial_state

    def _try_build(self, hp):
        # What keras-tuner's own _try_build does first: drop the previous
        # trials' models and graph state, in both flavours. tf_keras's first:
        # Keras's then runs the one full garbage collection for both (each
        # costs ~0.3 s in a process that imported TensorFlow, Keras and tfmot).
        _compat.tf_keras().backend.clear_session()
        keras.backend.clear_session(free_memory=True)
        model = kt_private.build_hypermodel(self, hp)
        _check_model(model)
        size = model.count_params() if model.built else 0
        if self.max_model_size and size > self.max_model_size:
            raise keras_tuner.errors.FailedTrialError(f"Oversized model: {size} parameters. Skip model.")
        return model

    def _build_and_fit_model(self, trial, *args, **kwargs):
        hp = trial.hyperparameters
        callbacks = list(kwargs.get("callbacks", []))
        saver = next((c for c in callbacks if isinstance(c, kt_private.SaveBestEpoch)), None)
        state = self._state_of(saver)
        model = self._try_build(hp)
        tf_keras_model = _compat.flavour_of(model) == _compat.TF_KERAS
        if tf_keras_model:
            callbacks = [_for_tf_keras(c, state) for c in callbacks]
        best_epoch = None
        if self.tflite_data is not None:
            best_epoch = _BestEpoch(self.oracle.objective)
            callbacks.append(best_epoch)
        kwargs["callbacks"] = callbacks
        results = self.hypermodel.fit(hp, model, *args, **kwargs)
        if tf_keras_model and hasattr(results, "history"):
            results = _best_epoch_metrics(results, self.oracle.objective)
        if self.tflite_data is not None:
            if best_epoch.weights is not None:
                model.set_weights(best_epoch.weights)  # the epoch SaveBestEpoch saved
            results = self._add_tflite_objectives(model, results)
            self._keep_best_execution(model, results, saver, state)
        if hasattr(model, "get_build_config"):
            kt_private.save_build_config(self, trial.trial_id, model)
        kt_private.validate_trial_results(results, self.oracle.objective, "HyperModel.fit()")
        return results

    def _keep_best_execution(self, model, results, saver, state):
        """With a TFLite objective, which no epoch logs, the trial's checkpoint
        holds the weights of its best execution (by that objective), not of
        the last one to run."""
        if saver is None or not self._tflite_objective():
            return
        filepath = kt_private.save_best_epoch_settings(saver)[1]
        value = self.oracle.objective.get_value(results)
        best = state["best_execution"]
        if best is None or self.oracle.objective.better_than(value, best[0]):
            state["best_execution"] = (value, model.get_weights())
        else:
            model.set_weights(best[1])
        model.save_weights(filepath)

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


class RandomSearch(_AnyKerasTuner, keras_tuner.RandomSearch):
    """``keras_tuner.RandomSearch`` that also tunes tf_keras students (see `_AnyKerasTuner`)."""


class BayesianOptimization(_AnyKerasTuner, keras_tuner.BayesianOptimization):
    """``keras_tuner.BayesianOptimization`` that also tunes tf_keras students."""


class Hyperband(_AnyKerasTuner, keras_tuner.Hyperband):
    """``keras_tuner.Hyperband`` that also tunes tf_keras students."""
