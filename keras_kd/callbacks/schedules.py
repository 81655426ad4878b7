"""Schedules ``epoch -> value`` for `DistillationScheduler` (temperature, alpha)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

Schedule = Callable[[int], float]


def constant(value: float) -> Schedule:
    """``epoch -> value``."""
    return lambda epoch: float(value)


def linear(start: float, end: float, epochs: int) -> Schedule:
    """Linear from ``start`` (epoch 0) to ``end`` (epoch ``epochs - 1`` and later)."""
    _check_epochs(epochs)
    return lambda epoch: float(start + (end - start) * min(epoch, epochs - 1) / max(epochs - 1, 1))


def cosine(start: float, end: float, epochs: int) -> Schedule:
    """Half-cosine from ``start`` to ``end`` over ``epochs`` epochs."""
    _check_epochs(epochs)

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


def _check_epochs(epochs):
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"Expected `epochs` to be a positive int. Received: epochs={epochs!r}")

