"""The `eval:` section: held-out evaluation during training (docs/evaluation.md)."""

from __future__ import annotations

from pydantic import Field

from elastune.spec.base import MAX_BATCH, MAX_SAMPLES, Strict


class EvalSpec(Strict):
    """The mean loss over the dataset's held-out windows, taken by the step whose samples include
    a multiple of `every_samples` (of the parameters it starts from), at any world size alike."""

    every_samples: int = Field(
        ge=1, le=MAX_SAMPLES, description="Evaluate once per this many samples trained (the step that reaches each multiple)."
    )
    samples: int | None = Field(
        None, ge=1, le=MAX_SAMPLES, description="Held-out windows per evaluation: the first this many (default: all)."
    )
    micro_batch_size: int | None = Field(
        None, ge=1, le=MAX_BATCH, description="Windows per forward pass while evaluating (default: batch.micro_batch_size)."
    )
