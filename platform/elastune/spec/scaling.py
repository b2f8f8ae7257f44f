"""Workers, recovery and layout; checkpoints; when to stop; faults to rehearse."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from elastune.spec.base import MAX_COUNT, MAX_SAMPLES, MAX_WORKERS, URI_SCHEMES, Strict, check_uri, checked


class ScalingSpec(Strict):
    min_workers: int = Field(1, ge=1, le=MAX_WORKERS)
    max_workers: int = Field(1, ge=1, le=MAX_WORKERS)
    cpus_per_worker: float = Field(1.0, gt=0, le=1024)
    gpus_per_worker: float = Field(0.0, ge=0, le=64, description="0 trains on CPU with gloo; >0 on CUDA with NCCL.")
    torch_threads: int | None = Field(None, ge=1, le=1024, description="Intra-op threads per worker; default: cpus_per_worker.")
    max_failures: int = Field(
        3,
        ge=-1,
        le=MAX_COUNT,
        description=(
            "When the run gives up on failures. recovery restart: after this many worker-group restarts. recovery live: "
            "after more than this many failures in a row without a committed step between them. -1 never gives up."
        ),
    )
    layout: Literal["replicated", "zero1", "fsdp"] = Field(
        "replicated",
        description=(
            "replicated: every worker holds all optimizer state (DDP); zero1: each holds a 1/W slice of it (ZeRO-1); "
            "fsdp: each holds its rows of every parameter, gradient and optimizer state tensor (FSDP2): about 1/W of the "
            "model's training state (recovery restart; fp32 or bf16)."
        ),
    )
    recovery: Literal["restart", "live"] = Field(
        "restart",
        description=(
            "restart: a failed worker restarts the worker group (Ray Train), which resumes from the in-memory snapshot; "
            "resizes between min_workers and max_workers as capacity comes and goes. live: the survivors carry on at "
            "once with the same global batch while Ray Train replaces the failed worker, which rejoins at a step "
            "boundary (torchft replica groups; max_workers are started, training continues while >= min_workers live)."
        ),
    )

    resize_check_seconds: float = Field(
        10.0,
        gt=0,
        le=86_400,
        description=(
            "recovery restart with min_workers < max_workers: how often Ray Train's elastic policy looks for capacity "
            "for more workers while training (it restarts the group at the larger size, resuming from the in-memory "
            "snapshot). Ray Train's own default is 60."
        ),
    )

    @model_validator(mode="after")
    def _ordered(self) -> ScalingSpec:
        if self.max_workers < self.min_workers:
            raise ValueError(
                f"max_workers ({self.max_workers}) is below min_workers ({self.min_workers}); "
                f"set max_workers >= {self.min_workers}"
            )
        if self.recovery == "live" and self.layout != "replicated":
            raise ValueError(
                f"recovery live needs layout replicated (got layout {self.layout}): survivors take over a lost "
                f"worker's share only if each holds the whole optimizer state; set layout: replicated or recovery: restart"
            )
        return self


class CheckpointSpec(Strict):
    path: str | None = Field(
        None, description=f"Directory or URI ({', '.join(f'{s}://' for s in URI_SCHEMES)}); default runs/<name>/checkpoints."
    )
    every_steps: int = Field(
        100, ge=1, le=MAX_SAMPLES, description="Steps between durable checkpoints (tier 1, written in the background)."
    )
    snapshot_every_steps: Annotated[int, Field(ge=1, le=MAX_SAMPLES)] | Literal["auto"] | None = Field(
        "auto",
        description="Steps between in-memory snapshots (tier 0) a restart resumes from; auto: spaced so a snapshot "
        "costs at most 2% of the training time between two (powers of two, at most every_steps); null turns them off.",
    )
    keep_last: int = Field(3, ge=1, le=MAX_COUNT, description="Keep the newest this many checkpoints.")
    keep_best: int = Field(0, ge=0, le=MAX_COUNT, description="Also keep the best this many by best_metric.")
    best_metric: Literal["loss"] = Field("loss", description="Metric recorded with each checkpoint that ranks them.")
    best_mode: Literal["min", "max"] = "min"

    @field_validator("path")
    @classmethod
    def _a_location(cls, path: str | None) -> str | None:
        return None if path is None else checked(path, check_uri)

    @field_validator("snapshot_every_steps", mode="before")
    @classmethod
    def _an_interval(cls, value: Any) -> Any:
        if value is None or value == "auto" or (type(value) is int and 1 <= value <= MAX_SAMPLES):
            return value
        raise ValueError(
            f"must be a whole number of steps from 1 to {MAX_SAMPLES}, auto, or null (no snapshots); "
            f"write auto unless you need a fixed interval"
        )


class StopSpec(Strict):
    max_steps: int | None = Field(None, ge=1, le=MAX_SAMPLES)
    max_samples: int | None = Field(None, ge=1, le=MAX_SAMPLES)

    @model_validator(mode="after")
    def _some_budget(self) -> StopSpec:
        if self.max_steps is None and self.max_samples is None:
            raise ValueError("set stop.max_steps or stop.max_samples (or both: the run stops at the first reached)")
        return self


# --------------------------------------------------------------------------- faults


class _Kill(Strict):
    rank: int = Field(ge=0, lt=MAX_WORKERS)
    at_step: int = Field(ge=1, le=MAX_SAMPLES)
    point: Literal["start", "mid"] = Field(
        "mid",
        description=(
            "start: before the step's first micro-batch; mid: after its backward, "
            "with its gradient reduction launched but not complete."
        ),
    )


class KillRank(_Kill):
    """SIGKILL the worker of `rank` during step `at_step` (once per run)."""

    action: Literal["kill_rank"]


class KillNode(_Kill):
    """Kill the Ray node the worker of `rank` runs on, with every worker there, during step
    `at_step` (once per run): its raylet is SIGKILLed, as when a machine disappears. Never the
    driver's node (the run itself lives there): the fault is then skipped, with an event."""

    action: Literal["kill_node"]


class DelayRank(Strict):
    """Stall the worker of `rank` for `seconds` during step `at_step` (a straggler; once per run)."""

    action: Literal["delay_rank"]
    rank: int = Field(ge=0, lt=MAX_WORKERS)
    at_step: int = Field(ge=1, le=MAX_SAMPLES)
    seconds: float = Field(gt=0, le=3600)
    until_join: bool = Field(
        False,
        description="End the stall as soon as a worker has joined the run after its last kill fault "
        "(the killed worker's replacement is ready to train); `seconds` at most.",
    )


Fault = Annotated[KillRank | KillNode | DelayRank, Field(discriminator="action")]
