"""Learning-rate schedules as pure functions of samples seen.

`lr_multiplier(schedule, samples, horizon)` returns the factor applied to the optimizer's peak
`lr` for the step that starts after `samples` samples. A schedule never looks at steps or world
size, so it does not bend when either changes. Every family starts with an optional linear warmup
(0 -> 1 over `warmup_samples`); the shapes below apply to the remaining span up to `horizon`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from elastune.spec.schedule import (
    ConstantSchedule,
    CosineSchedule,
    CyclicalSchedule,
    InverseSqrtSchedule,
    LinearSchedule,
    RexSchedule,
    WSDSchedule,
)


@dataclass(frozen=True)
class StepValues:
    """What the step that starts after some samples trains with."""

    lr: float
    weight_decay: float
    global_batch_size: int


def step_values(spec, samples: int) -> StepValues:
    """The job's peak lr times its schedule's multiplier, its weight decay and global batch, each
    as the newest `phases` entry starting at or before `samples` set it (JobSpec.phases)."""
    lr, weight_decay, schedule = spec.optimizer.lr, spec.optimizer.weight_decay, spec.schedule
    for phase in spec.phases:
        if phase.from_samples > samples:
            break
        lr = phase.lr if phase.lr is not None else lr
        weight_decay = phase.weight_decay if phase.weight_decay is not None else weight_decay
        schedule = phase.schedule or schedule
    return StepValues(lr * lr_multiplier(schedule, samples, spec.horizon_samples), weight_decay, spec.batches.at(samples))


def lr_multiplier(schedule, samples: int, horizon: int) -> float:
    warmup = schedule.warmup_samples
    if samples < warmup:
        return samples / warmup
    # t: progress through the post-warmup span, clamped to [0, 1] (training past the horizon holds the end value)
    span = max(horizon - warmup, 1)
    t = min(max((samples - warmup) / span, 0.0), 1.0)
    return _SHAPES[type(schedule)](schedule, samples, t)


def _constant(s: ConstantSchedule, samples: int, t: float) -> float:
    return 1.0


def _cosine(s: CosineSchedule, samples: int, t: float) -> float:
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def _linear(s: LinearSchedule, samples: int, t: float) -> float:
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * (1 - t)


def _wsd(s: WSDSchedule, samples: int, t: float) -> float:
    # Warmup-stable-decay: constant until the last `decay_fraction` of the span, then decay.
    stable = 1 - s.decay_fraction
    if t <= stable:
        return 1.0
    d = (t - stable) / s.decay_fraction
    if s.decay_shape == "linear":
        shape = 1 - d
    elif s.decay_shape == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * d))
    else:  # "sqrt": 1 - sqrt(d), the shape Hägele et al. found to beat linear cooldowns
        shape = 1 - math.sqrt(d)
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * shape


def _inverse_sqrt(s: InverseSqrtSchedule, samples: int, t: float) -> float:
    timescale = s.timescale_samples or s.warmup_samples or 1
    return math.sqrt(timescale / max(samples, timescale))


def _cyclical(s: CyclicalSchedule, samples: int, t: float) -> float:
    # Triangular cycles (Smith 2017): min -> peak at half a cycle -> min, repeating.
    phase = ((samples - s.warmup_samples) % s.cycle_samples) / s.cycle_samples
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * (1 - abs(2 * phase - 1))


def _rex(s: RexSchedule, samples: int, t: float) -> float:
    # REX (Chen et al. 2022): (1 - t) / (1/2 + (1 - t)/2), decaying slowly first, fast at the end.
    shape = (1 - t) / (0.5 + 0.5 * (1 - t))
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * shape


_SHAPES: dict[type, Callable[[Any, int, float], float]] = {
    ConstantSchedule: _constant,
    CosineSchedule: _cosine,
    LinearSchedule: _linear,
    WSDSchedule: _wsd,
    InverseSqrtSchedule: _inverse_sqrt,
    CyclicalSchedule: _cyclical,
    RexSchedule: _rex,
}
