"""Schedules ``epoch -> value`` for `DistillationScheduler` (temperature, alpha)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

from keras_kd import _checks

Schedule = Callable[[int], float]


def constant(value: float) -> Schedule:
    """``epoch -> value``."""
    value = _checks.number(value, "value")
    return lambda epoch: value


def linear(start: float, end: float, epochs: int) -> Schedule:
    """Linear from ``start`` (epoch 0) to ``end`` (epoch ``epochs - 1`` and later)."""
    start, end, epochs = _check(start, end, epochs)
    return lambda epoch: float(start + (end - start) * min(epoch, epochs - 1) / max(epochs - 1, 1))


def cosine(start: float, end: float, epochs: int) -> Schedule:
    """Half-cosine from ``start`` to ``end`` over ``epochs`` epochs."""
    start, end, epochs = _check(start, end, epochs)

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


def _check(start, end, epochs):
    return _checks.number(start, "start"), _checks.number(end, "end"), _checks.positive_int(epochs, "epochs")
