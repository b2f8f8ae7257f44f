"""The learning-rate schedule and the phases that change values at sample counts."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field

from elastune.spec.base import MAX_BATCH, MAX_SAMPLES, Strict


class _Schedule(Strict):
    warmup_samples: int = Field(0, ge=0, le=MAX_SAMPLES, description="Linear warmup from 0 to the peak over this many samples.")
    horizon_samples: int | None = Field(
        None,
        ge=1,
        le=MAX_SAMPLES,
        description="Samples the schedule spans; default: the stop budget. Set it to stop early without bending the schedule.",
    )


class ConstantSchedule(_Schedule):
    name: Literal["constant"]


class CosineSchedule(_Schedule):
    name: Literal["cosine"]
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class LinearSchedule(_Schedule):
    name: Literal["linear"]
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class WSDSchedule(_Schedule):
    name: Literal["wsd"]
    decay_fraction: float = Field(0.2, gt=0, le=1, description="Share of the horizon spent decaying, at its end.")
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


class InverseSqrtSchedule(_Schedule):
    name: Literal["inverse_sqrt"]
    timescale_samples: int | None = Field(
        None, ge=1, le=MAX_SAMPLES, description="Decay as sqrt(timescale / samples); default: warmup_samples."
    )


class CyclicalSchedule(_Schedule):
    name: Literal["cyclical"]
    cycle_samples: int = Field(ge=2, le=MAX_SAMPLES, description="Samples in one triangle (up and back down).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


class RexSchedule(_Schedule):
    name: Literal["rex"]
    min_lr_ratio: float = Field(0.0, ge=0, le=1)


SCHEDULES = {
    get_args(cls.model_fields["name"].annotation)[0]: cls
    for cls in (ConstantSchedule, CosineSchedule, LinearSchedule, WSDSchedule, InverseSqrtSchedule, CyclicalSchedule, RexSchedule)
}  # family name -> model

ScheduleSpec = Annotated[
    ConstantSchedule | CosineSchedule | LinearSchedule | WSDSchedule | InverseSqrtSchedule | CyclicalSchedule | RexSchedule,
    Field(discriminator="name"),
]


# --------------------------------------------------------------------------- phases


class Phase(Strict):
    """From `from_samples` on, train with these values instead of the job's. A phase names only
    what changes; what it leaves out stays what the job or an earlier phase set. This is how a
    schedule found by search (`elastune tune`) replays: peak lr, weight decay, schedule and global
    batch may each change at a sample count."""

    from_samples: int = Field(ge=1, le=MAX_SAMPLES, description="Samples seen when this phase starts.")
    lr: float | None = Field(None, gt=0, description="Peak learning rate from here on (the schedule multiplies it).")
    weight_decay: float | None = Field(None, ge=0)
    global_batch_size: int | None = Field(None, ge=1, le=MAX_BATCH)
    schedule: ScheduleSpec | None = Field(None, description="Schedule from here on; its horizon is the job's.")
