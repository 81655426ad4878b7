"""`distillation_hyperparameters`: the distillation search space on a ``HyperParameters``."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional, Sequence, Union

import keras_tuner

from keras_kd import _checks
from keras_kd import _compat
from keras_kd.callbacks import SIGNALS
from keras_kd.callbacks import DistillationScheduler
from keras_kd.callbacks import HardSampleReweighting
from keras_kd.callbacks import schedules
from keras_kd.losses import DIVERGENCES
from keras_kd.losses import DecoupledKD
from keras_kd.losses import DistillationLoss

SCHEDULES = ("constant", "linear", "cosine")
"""The schedules of temperature (and alpha) a search can choose (``kd_schedule``)."""

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
        scheduler: a `DistillationScheduler` for the chosen schedule, acting
            on the compiled loss of the model it is given to (``fit``'s
            callbacks; `DistillationHyperModel` does that), or ``None`` for a
            constant schedule and for plain training.
        plain_training: True when the chosen alpha is 1 (the hard-label loss
            alone: training from scratch).
    """

    loss: DistillationLoss
    learning_rate: float
    reweighting: Optional[HardSampleReweighting] = None
    alignment_weight: Optional[float] = None
    scheduler: Optional[DistillationScheduler] = None
    plain_training: bool = False

    @property
    def callbacks(self) -> list:
        """The callbacks ``fit`` needs for these choices (the scheduler and the reweighting)."""
        return [c for c in (self.scheduler, self.reweighting) if c is not None]

    def optimizer(self, flavour: str = "keras"):
        """An Adam optimizer with the chosen learning rate, for a model of
        ``flavour`` (``"keras"`` or ``"tf_keras"``, see ``_compat.flavour_of``)."""
        return _compat.module(flavour).optimizers.Adam(self.learning_rate)


def _declare(hp, name, value, *, low=None, high=None, log=False, argument=None):
    """A Fixed for a number, a Float for a (low, high) range, a Choice for a list."""
    argument = argument or name

    def check(v):
        try:
            _checks.number(v, argument, low=low, high=high, low_open=log)
        except ValueError:
            bound = f"> {low}" if log else f"in [{low}, {high if high is not None else 'inf'}]"
            raise ValueError(f"Expected `{argument}` values {bound}. Received: {argument}={value!r}") from None

    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(f"Expected `{argument}` = (low, high) with low < high. Received: {argument}={value!r}")
        check(value[0])
        check(value[1])
        if value[0] >= value[1]:
            raise ValueError(f"Expected `{argument}` = (low, high) with low < high. Received: {argument}={value!r}")
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
    dkd_non_target_weight: Range = None,
    schedule: Union[None, str, Sequence[str]] = None,
    schedule_epochs: Optional[int] = None,
    final_temperature: Range = 1.0,
    final_alpha: Range = None,
    reweighting_signal: Union[None, str, Sequence[str]] = None,
    reweighting_strength: Range = None,
    reweighting_warmup_epochs: Optional[int] = None,
    alignment_weight: Range = None,
) -> DistillationChoices:
    """Declares the distillation hyperparameters and returns keras_kd objects.

    Each range is a number (fixed), a ``(low, high)`` tuple (a float range;
    temperature and learning rate are sampled on a log scale) or a list (a
    choice). Names: ``kd_temperature``, ``kd_alpha``, ``kd_divergence``,
    ``kd_dkd_non_target_weight``, ``kd_schedule`` (with
    ``kd_final_temperature``, ``kd_final_alpha``), ``learning_rate``,
    ``kd_alignment_weight`` (and, through `DistillationHyperModel`,
    ``kd_reweighting``: ``"none"`` or a signal, and ``kd_reweighting_strength``).

    **Plain training is a candidate.** ``alpha = 1`` is the hard-label loss
    alone: the student trained from scratch (the soft term has weight 0).
    List it among the choices, e.g. ``alpha=[0.0, 0.5, 1.0]``: the
    temperature, divergence and schedule are then declared only for the other
    alphas (keras-tuner conditions), so a grid tries plain training once. A
    search that tries every choice (``keras_tuner.GridSearch``, or a random
    search whose ``max_trials`` covers the space) therefore includes the
    scratch student, and its best trial is never worse than scratch on the
    objective it ranks by: make that a validation metric that does not depend
    on the searched loss, e.g. ``"val_accuracy"``, never the test set. Never
    rank by ``"loss"``/``"val_loss"`` when alpha, temperature or divergence
    have several values: each trial trains on a different loss, and their
    values are not comparable (`DistillationHyperModel` warns).
    A ``(low, high)`` float range for alpha does not contain 1 as a sample.

    Args:
        hp: a ``keras_tuner.HyperParameters``.
        temperature: range of the temperature, > 0. Defaults to (1.0, 10.0).
        alpha: range of the hard-label weight, in [0, 1] (1: plain training).
            Defaults to (0.0, 1.0).
        divergence: a divergence name (see ``keras_kd.losses.DIVERGENCES``,
            including the label-aware ``"dkd"``, decoupled KD) or a list to
            choose from. Defaults to "kl".
        learning_rate: range of the learning rate, > 0. Defaults to (1e-4, 1e-2).
        dkd_non_target_weight: ``None`` (`keras_kd.DecoupledKD`'s default,
            8.0) or the range of its ``non_target_weight`` (>= 0), searched
            when ``"dkd"`` is chosen.
        schedule: ``None`` or ``"constant"`` here (see below); the
            `DistillationHyperModel` argument of the same name searches
            ``"linear"`` and ``"cosine"`` too.
        schedule_epochs, final_temperature, final_alpha: refused here with a
            schedule other than constant, like ``schedule``.
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

    A schedule (a `DistillationScheduler` callback) and a reweighting only act
    where ``fit`` receives them, which a build function cannot arrange: this
    function refuses them rather than let the choice be silently ignored.
    `DistillationHyperModel` searches both and applies them in ``fit``.

    Returns:
        A `DistillationChoices`.

    Raises:
        ValueError: for a temperature <= 0, alpha outside [0, 1], a learning
            rate <= 0, an empty or inverted range, or an unknown name.
        keras_tuner.errors.FatalValueError: (a ``ValueError``) for a
            reweighting or a schedule other than constant, which this call
            could not apply; the message says how to search it.

    Example:

    ```python
    def build(hp):
        kd = keras_kd.tuning.distillation_hyperparameters(
            hp, temperature=[1.0, 4.0], alpha=[0.0, 0.5, 1.0], divergence=["kl", "dkd"])
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
    names = schedule if isinstance(schedule, (list, tuple)) else [schedule]
    if any(n not in (None, "constant") for n in names) or schedule_epochs is not None or final_alpha is not None:
        _choice(keras_tuner.HyperParameters(), "kd_schedule", [n for n in names if n is not None] or ["constant"],
                set(SCHEDULES), "schedule")
        raise keras_tuner.errors.FatalValueError(
            f"`distillation_hyperparameters` cannot apply a schedule (received schedule={schedule!r}, "
            f"schedule_epochs={schedule_epochs!r}, final_alpha={final_alpha!r}): the schedule is a "
            "`DistillationScheduler` callback that must be given to `fit`, which a build function (or "
            "`HyperModel.build`) cannot do, so the choice would be silently ignored. Search it with "
            "`keras_kd.tuning.DistillationHyperModel(build_student, schedule=[...], schedule_epochs=N)`, "
            "which applies the scheduler in `fit`; or drop the schedule arguments."
        )
    return _distillation_choices(
        hp, temperature=temperature, alpha=alpha, divergence=divergence, learning_rate=learning_rate,
        dkd_non_target_weight=dkd_non_target_weight, alignment_weight=alignment_weight,
    )


def _inactive_when_plain(hp, alpha):
    """A keras-tuner condition: the distillation hyperparameters exist only for
    alphas below 1 when 1 (plain training) is one of the choices; else no condition."""
    if isinstance(alpha, list) and any(a == 1.0 for a in alpha):
        distilling = [a for a in alpha if a != 1.0]
        if distilling:
            return hp.conditional_scope("kd_alpha", distilling)
    return contextlib.nullcontext()


def _schedule_values(kind, start, end, epochs):
    return {"linear": schedules.linear, "cosine": schedules.cosine}[kind](start, end, epochs)


def _distillation_choices(
    hp,
    *,
    temperature: Range = (1.0, 10.0),
    alpha: Range = (0.0, 1.0),
    divergence: Union[str, Sequence[str]] = "kl",
    learning_rate: Range = (1e-4, 1e-2),
    dkd_non_target_weight: Range = None,
    schedule: Union[None, str, Sequence[str]] = None,
    schedule_epochs: Optional[int] = None,
    final_temperature: Range = 1.0,
    final_alpha: Range = None,
    reweighting_signal: Union[None, str, Sequence[str]] = None,
    reweighting_strength: Range = (0.5, 3.0),
    reweighting_warmup_epochs: int = 1,
    reweighting_num_examples: Optional[int] = None,
    alignment_weight: Range = None,
) -> DistillationChoices:
    """`distillation_hyperparameters` with the schedule and the reweighting too:
    only for callers that apply them in ``fit`` (`DistillationHyperModel`)."""
    try:
        _checks.positive_int(reweighting_num_examples, "reweighting_num_examples", allow_none=True)
    except ValueError:
        raise ValueError(
            "Expected `reweighting_num_examples` to be a positive int (the number of training "
            f"examples). Received: reweighting_num_examples={reweighting_num_examples!r}"
        ) from None
    schedule_names = list(schedule) if isinstance(schedule, (list, tuple)) else [schedule or "constant"]
    _checks.positive_int(schedule_epochs, "schedule_epochs", allow_none=True)
    if schedule_epochs is None and any(n != "constant" for n in schedule_names):
        raise ValueError(
            f"A schedule other than constant needs `schedule_epochs` (the epochs over which the temperature "
            f"goes from `kd_temperature` to `final_temperature`). Received: schedule={schedule!r}, "
            "schedule_epochs=None"
        )
    a = _declare(hp, "kd_alpha", alpha, low=0.0, high=1.0, argument="alpha")
    lr = _declare(hp, "learning_rate", learning_rate, low=0.0, log=True, argument="learning_rate")
    with _inactive_when_plain(hp, alpha):
        # None when inactive (alpha = 1): plain training has no distillation hyperparameters.
        t = _declare(hp, "kd_temperature", temperature, low=0.0, log=True, argument="temperature")
        d = _choice(hp, "kd_divergence", list(divergence) if not isinstance(divergence, str) else divergence,
                    set(DIVERGENCES), "divergence")
        kind = _choice(hp, "kd_schedule", schedule_names, set(SCHEDULES), "schedule")
        if dkd_non_target_weight is not None:
            with hp.conditional_scope("kd_divergence", ["dkd"]):
                w = _declare(hp, "kd_dkd_non_target_weight", dkd_non_target_weight, low=0.0,
                             argument="dkd_non_target_weight")
            if d == "dkd":
                d = DecoupledKD(non_target_weight=float(w))
        if any(n != "constant" for n in schedule_names):
            with hp.conditional_scope("kd_schedule", [n for n in schedule_names if n != "constant"]):
                final_t = _declare(hp, "kd_final_temperature", final_temperature, low=0.0, log=True,
                                   argument="final_temperature")
                final_a = None
                if final_alpha is not None:
                    final_a = _declare(hp, "kd_final_alpha", final_alpha, low=0.0, high=1.0, argument="final_alpha")
    plain = a == 1.0
    if plain:  # the distillation choices do not apply; the loss is the hard term alone
        t, d, kind = 1.0, "kl", "constant"
    choices = DistillationChoices(
        loss=DistillationLoss(temperature=t, alpha=a, divergence=d), learning_rate=float(lr), plain_training=plain
    )
    if kind != "constant":
        choices.scheduler = DistillationScheduler(
            temperature=_schedule_values(kind, float(t), float(final_t), schedule_epochs),
            alpha=_schedule_values(kind, float(a), float(final_a), schedule_epochs) if final_a is not None else None,
        )  # acts on the model's compiled loss
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
