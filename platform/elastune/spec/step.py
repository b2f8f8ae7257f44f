"""How each step computes: precision, gradient reduction, compilation."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator

from elastune.spec.base import MAX_COUNT, Strict


class LossScaleSpec(Strict):
    """fp16's dynamic loss scale (train.precision)."""

    initial: float = Field(65536.0, gt=0, le=2.0**64, description="Scale of the first step; a power of two keeps scaling exact.")
    growth_interval: int = Field(
        2000, ge=1, le=MAX_COUNT, description="Steps without an inf or nan after which the scale doubles."
    )

    @field_validator("initial")
    @classmethod
    def _power_of_two(cls, initial: float) -> float:
        if math.frexp(initial)[0] != 0.5:
            raise ValueError(
                f"step.loss_scale.initial ({initial}) is not a power of two, so scaling would round gradients; use e.g. 65536"
            )
        return initial


class StepSpec(Strict):
    """How each step computes: precision, gradient reduction, compilation (docs/performance.md)."""

    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description=(
            "Forward and backward under autocast in bf16 or fp16 (parameters, gradients and optimizer state stay fp32); "
            "fp16 adds a dynamic loss scale."
        ),
    )
    reduce_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="Dtype gradients travel in when summed over workers; bf16 halves the bytes (error bound in the docs)."
    )
    bucket_mb: float = Field(
        25.0,
        gt=0,
        le=65_536,
        description="Gradients are summed in buckets of about this many MiB, each launched as backward finishes it.",
    )
    compile: bool = Field(False, description="torch.compile the model (each new world size may recompile).")
    loss_scale: LossScaleSpec = Field(default_factory=LossScaleSpec)
