"""`DistillationHyperModel`: compiles your student with the searched choices."""

from __future__ import annotations

import inspect
import warnings
from typing import Callable

import keras_tuner

from keras_kd import _compat
from keras_kd.metrics import teacher_agreement
from keras_kd.tuning import _keras_tuner_private as kt_private
from keras_kd.tuning.hyperparameters import _distillation_choices

class DistillationHyperModel(keras_tuner.HyperModel):
    """Compiles your student with the searched distillation hyperparameters.

    ``build(hp)`` calls ``build_student(hp)`` (which returns an uncompiled
    Keras 3 or tf_keras student that outputs logits), declares the
    distillation hyperparameters and compiles the student with Adam and a
    `DistillationLoss`. ``fit`` adds the `DistillationScheduler` of the
    chosen schedule and attaches the reweighting callback when the search
    chose one (the training dataset then needs example ids: the teacher-logit
    cache provides them).

    With ``alpha`` a list that contains 1.0, plain training (the student from
    scratch) is one of the candidates; see `distillation_hyperparameters`.

    **Rank the trials by a metric, not by the loss.** When the search varies
    alpha, temperature, divergence (or the DKD weight, schedule, final
    temperature or final alpha), each trial trains on a different loss, and
    their values are not comparable (a KL trial, a plain-training trial and a
    DKD trial differ in scale, not in quality). Use ``"val_accuracy"`` or
    another metric you define as the tuner's objective. ``fit`` warns
    (``UserWarning``, once per hypermodel) when the objective is ``"loss"``,
    ``"val_loss"`` or the compiled loss's name (``"distillation_loss"``,
    ``"val_distillation_loss"``) while such a hyperparameter has several values.

    Args:
        build_student: ``fn(hp) -> model``.
        metrics: metrics to compile with. Defaults to
            ``["accuracy", keras_kd.teacher_agreement]``.
        **ranges: the ranges of `distillation_hyperparameters`, plus
            ``schedule`` (``"constant"``, ``"linear"``, ``"cosine"`` or a list
            of them: the temperature goes from ``kd_temperature`` at epoch 0
            to ``kd_final_temperature`` at epoch ``schedule_epochs - 1``, and
            alpha likewise to ``kd_final_alpha`` when ``final_alpha`` is
            given), ``schedule_epochs`` (a positive int, needed by a schedule
            other than constant), ``final_temperature`` (range, > 0; defaults
            to 1.0), ``final_alpha`` (range in [0, 1] or None: alpha stays
            constant), ``reweighting_signal`` (a signal or a list to choose
            from, ``"none"`` allowed), ``reweighting_strength``,
            ``reweighting_warmup_epochs`` and ``reweighting_num_examples``
            (the number of training examples, needed when the training
            dataset is batched before ``fit``).

    Raises:
        ValueError: for a bad range (see `distillation_hyperparameters`), an
            unknown schedule, or a schedule without ``schedule_epochs``.
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
        self._warned_loss_objective = False
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
        self._warn_if_ranked_by_loss(model, callbacks)
        if choices.scheduler is not None:
            # First, so that later callbacks (and History) see this epoch's values in `logs`.
            callbacks.insert(0, choices.scheduler)
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

    def _warn_if_ranked_by_loss(self, model, callbacks):
        """Warns once when the tuner's objective (read from its per-epoch
        callback) is a loss and the search varies the loss itself."""
        if self._warned_loss_objective:
            return
        varied = [name for name in _LOSS_SHAPING if _varies(self.ranges.get(name, _DEFAULTS.get(name)))]
        if not varied:
            return
        loss_name = getattr(getattr(model, "loss", None), "name", None)
        loss_names = {"loss", "val_loss"} | ({loss_name, f"val_{loss_name}"} if loss_name else set())
        for callback in callbacks:
            objective = getattr(callback, "objective", None)
            if not isinstance(objective, keras_tuner.Objective):
                continue
            names = [o.name for o in kt_private.objective_list(objective)]
            ranked_by_loss = [n for n in names if n in loss_names]
            if ranked_by_loss:
                self._warned_loss_objective = True
                warnings.warn(
                    f"The tuner ranks trials by {ranked_by_loss[0]!r} while the search varies "
                    f"{', '.join(varied)}: each trial then trains on a different loss, whose values are "
                    "not comparable (the best trial is the numerically smallest loss, not the best "
                    "student, and may be worse than plain training). Use objective=\"val_accuracy\" "
                    "(or another metric you define) instead.",
                    UserWarning,
                    stacklevel=2,
                )
                return


# The ranges that change the loss's definition, so its value, from trial to trial.
_LOSS_SHAPING = ("alpha", "temperature", "divergence", "dkd_non_target_weight", "schedule",
                 "final_temperature", "final_alpha")
_DEFAULTS = {
    name: p.default for name, p in inspect.signature(_distillation_choices).parameters.items()
    if p.default is not inspect.Parameter.empty
}


def _varies(value) -> bool:
    """Whether a range of `distillation_hyperparameters` holds several values."""
    if isinstance(value, tuple):  # a (low, high) float range
        return len(value) == 2 and value[0] != value[1]
    if isinstance(value, list):  # a choice
        return len(set(value)) > 1
    return False


def _check_model(model):
    if not _compat.is_model(model):
        raise keras_tuner.errors.FatalTypeError(
            "Expected the model-building function, or HyperModel.build(), to return a Keras 3 "
            f"or tf_keras Model. Received: {model!r} of type {type(model).__name__}."
        )
