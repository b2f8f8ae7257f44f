"""Population-based training's rules, as pure functions (Jaderberg et al. 2017, "truncation
selection" with "perturb" explore).

At each perturbation point (every `perturbation_interval` samples of a trial), the trials are
ranked by fitness; each trial in the bottom `quantile` takes over the state of a trial drawn from
the top `quantile` (exploit) and then moves its hyperparameters a step away from the donor's
(explore). Everything random here draws from a `random.Random` the caller seeds, so a search
replays exactly.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from elastune.train.adaptive import lr_factor

Scale = Literal["linear", "log", "int", "choice"]


@dataclass(frozen=True)
class Dimension:
    """One searched hyperparameter. `low`/`high` bound linear, log and int dimensions (log: both
    > 0, perturbed multiplicatively); `choices` lists a choice dimension's values."""

    name: str
    scale: Scale
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] = ()  # the spec's values as YAML gave them (SearchRange.choices)

    def bounds(self) -> tuple[float, float]:
        """(low, high) of a linear, log or int dimension, which always has both (SearchRange checks)."""
        assert self.low is not None and self.high is not None, f"{self.name}: a {self.scale} dimension needs low and high"
        return self.low, self.high

    def sample(self, rng: random.Random) -> object:
        if self.scale == "choice":
            return rng.choice(self.choices)
        low, high = self.bounds()
        if self.scale == "log":
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        if self.scale == "int":
            return rng.randint(int(low), int(high))
        return rng.uniform(low, high)

    def perturb(self, value: object, rng: random.Random, factors: tuple[float, float]) -> object:
        """The donor's `value` moved one step: scaled by one of `factors` (log, linear: a step
        relative to the range; int: rounded), or, for a choice, a neighbouring choice."""
        if self.scale == "choice":
            i = self.choices.index(value)
            return self.choices[min(len(self.choices) - 1, max(0, i + rng.choice((-1, 1))))]
        # a linear, log or int value is a number: sample() drew it, or perturb() moved one
        assert isinstance(value, int | float), f"{self.name}: {value!r} is not a number"
        low, high = self.bounds()
        factor = rng.choice(factors)
        if self.scale == "log":
            moved = value * factor
        else:  # linear and int: the same relative step, of the range rather than the value (which may be 0)
            moved = value + (factor - 1.0) * (high - low)
        moved = min(high, max(low, moved))
        return round(moved) if self.scale == "int" else moved


def ranked(fitness: Mapping[str, float], mode: Literal["min", "max"] = "min") -> list[str]:
    """Trial ids, best first; ties broken by id so the order is the same on every call."""
    sign = 1.0 if mode == "min" else -1.0
    return sorted(fitness, key=lambda t: (sign * fitness[t], t))


def exploit_pairs(
    fitness: Mapping[str, float], quantile: float, rng: random.Random, mode: Literal["min", "max"] = "min"
) -> list[tuple[str, str]]:
    """(recipient, donor) pairs: every trial in the bottom `quantile` of the ranking takes a donor
    drawn from the top `quantile`. With fewer than 2 trials, or a quantile too small to hold one
    trial, nobody exploits."""
    if not 0 < quantile <= 0.5:
        raise ValueError(f"quantile {quantile} must be in (0, 0.5]: the top and bottom parts must not overlap")
    order = ranked(fitness, mode)
    k = int(len(order) * quantile)
    if k == 0:
        return []
    top, bottom = order[:k], order[-k:]
    return [(recipient, rng.choice(top)) for recipient in bottom]


def explore(
    donor: Mapping[str, object],
    space: Sequence[Dimension],
    rng: random.Random,
    resample_probability: float = 0.25,
    factors: tuple[float, float] = (0.8, 1.2),
) -> dict[str, object]:
    """The recipient's new hyperparameters: each searched one resampled from its range with
    `resample_probability`, else the donor's perturbed; anything not searched stays the donor's."""
    out = dict(donor)
    for dim in space:
        out[dim.name] = dim.sample(rng) if rng.random() < resample_probability else dim.perturb(donor[dim.name], rng, factors)
    return out


def scaled_lr(lr: float, old_batch: int, new_batch: int, rule: Literal["linear", "sqrt", "none"]) -> float:
    """The learning rate after the global batch changes from `old_batch` to `new_batch`: linear
    (SGD: lr grows with the batch), sqrt (Adam: with its square root) or none (train.adaptive's rules)."""
    return lr * lr_factor(rule, old_batch, new_batch)
