"""`distillation_hyperparameters`: the distillation search space on a ``HyperParameters``."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional, Sequence, Union

import keras_tuner

from keras_kd import _compat
from keras_kd.callbacks import SIGNALS
from keras_kd.callbacks import HardSampleReweighting
from keras_kd.losses import DIVERGENCES
from keras_kd.losses import DistillationLoss

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
