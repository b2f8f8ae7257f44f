"""Population-based search over schedules (`elastune tune`)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from elastune.spec.base import MAX_SAMPLES, Strict

SEARCHABLE = {
    "optimizer.lr": "peak learning rate",
    "optimizer.weight_decay": "weight decay",
    "schedule.name": "schedule family",
    "schedule.warmup_samples": "warmup",
    "schedule.decay_fraction": "WSD decay fraction (wsd only)",
    "schedule.min_lr_ratio": "final lr / peak lr (cosine, linear, wsd, rex)",
    "batch.global_batch_size": "global batch (choices; lr follows tune.lr_scaling)",
    "batch.adaptive.fraction": "an adaptive batch's target, fraction x the noise scale (batch.adaptive)",
    "batch.adaptive.max": "an adaptive batch's largest batch (scale int or choice; batch.adaptive)",
}


class SearchRange(Strict):
    """One searched value: a range (`low`, `high`) on a `linear`, `log` or `int` scale, or `choices`."""

    scale: Literal["linear", "log", "int", "choice"]
    low: float | None = None
    high: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _well_formed(self) -> SearchRange:
        if self.scale == "choice":
            if not self.choices or self.low is not None or self.high is not None:
                raise ValueError("scale choice takes a non-empty `choices` list and no low/high; e.g. choices: [cosine, wsd]")
            if any(isinstance(c, float) and not math.isfinite(c) for c in self.choices):
                raise ValueError("choices holds NaN or infinity; give finite values")
            return self
        if self.low is None or self.high is None or self.choices is not None:
            raise ValueError(f"scale {self.scale} takes `low` and `high` (no choices); e.g. low: 1e-4, high: 1e-2")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high}); swap them or widen the range")
        if self.scale == "log" and self.low <= 0:
            raise ValueError(f"scale log needs low > 0 (got {self.low}); use scale linear for ranges that include 0")
        return self


class TuneSpec(Strict):
    """Search over schedules (`elastune tune`, docs/tuning.md): population-based training, or WSD
    decay branches forked from one constant-lr trunk."""

    mode: Literal["pbt", "wsd_branches"] = Field(
        "pbt",
        description=(
            "pbt: population-based training over `search`. wsd_branches: one constant-lr trunk with a WSD decay branch "
            "forked for each of `budgets` (the job's schedule must be wsd): a loss-vs-budget table from one trunk."
        ),
    )
    budgets: list[Annotated[int, Field(ge=1, le=MAX_SAMPLES)]] | None = Field(
        None, max_length=256, description="wsd_branches: the budgets (samples) to fork a decay branch for, ascending."
    )
    population: int = Field(4, ge=2, le=256, description="Trials trained side by side.")
    interval_samples: int | None = Field(
        None, ge=1, le=MAX_SAMPLES, description="Samples each trial trains between exploit decisions (pbt)."
    )
    quantile: float = Field(
        0.25, gt=0, le=0.5, description="Share of trials at the bottom that take over a trial of the top share."
    )
    fitness_samples: int | None = Field(
        None,
        ge=1,
        le=MAX_SAMPLES,
        description="Fitness is the mean loss over this many last samples of each interval (default: a quarter of it).",
    )
    fitness: Literal["loss", "eval_loss"] | None = Field(
        None,
        description=(
            "loss: the mean training loss over each interval's last fitness_samples (each step's loss is taken before "
            "its update, on samples not yet trained on this epoch). eval_loss: the held-out loss of the member's "
            "parameters at the interval's end, over the eval section's windows (needs `eval:` and a held-out split). "
            "Default: eval_loss where the job has an eval section (mode pbt, rank_by loss), else loss."
        ),
    )
    rank_by: Literal["loss", "predicted_final_loss"] = Field(
        "loss",
        description=(
            "loss: rank members by fitness (mean loss over the interval's end). predicted_final_loss: by the loss the annealing "
            "law (L = L0 + A*S1^-alpha - C*S2, fitted to all members' curves) predicts at the end of the budget under each "
            "member's schedule, so a member still at a high lr is not ranked below one that has already annealed."
        ),
    )
    resample_probability: float = Field(
        0.25, ge=0, le=1, description="Explore: chance each value is drawn afresh rather than perturbed."
    )
    perturb_factors: tuple[float, float] = Field(
        (0.8, 1.2), description="Explore: a perturbed value is the donor's times one of these."
    )
    lr_scaling: Literal["linear", "sqrt", "none"] = Field(
        "sqrt", description="How the peak lr follows a changed global batch: linear (SGD), sqrt (Adam) or none."
    )
    max_concurrent_trials: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Trials running at once (wsd_branches); default: as many as the cluster's CPUs hold. A pbt "
        "population's members all run at once.",
    )
    search: dict[str, SearchRange] = Field(
        default_factory=dict, description=f"Searched values by spec path (pbt): {', '.join(SEARCHABLE)}."
    )

    @model_validator(mode="after")
    def _mode_needs(self) -> TuneSpec:
        if self.mode == "pbt":
            if self.interval_samples is None:
                raise ValueError(
                    "tune.mode pbt needs tune.interval_samples (samples between exploit decisions); e.g. interval_samples: 1600"
                )
            if not self.search:
                raise ValueError(f"tune.search is empty; name at least one of {', '.join(SEARCHABLE)}")
            if self.max_concurrent_trials is not None and self.max_concurrent_trials < self.population:
                raise ValueError(
                    f"tune.max_concurrent_trials ({self.max_concurrent_trials}) is below tune.population "
                    f"({self.population}): a population's members all train at once and meet at every boundary; "
                    f"remove max_concurrent_trials or lower the population"
                )
        else:
            if not self.budgets:
                raise ValueError(
                    "tune.mode wsd_branches needs tune.budgets, the budgets (samples) to fork "
                    "decay branches for; e.g. budgets: [3200, 6400, 9600]"
                )
            if self.budgets != sorted(set(self.budgets)):
                raise ValueError(f"tune.budgets ({self.budgets}) must ascend without repeats; e.g. {sorted(set(self.budgets))}")
            if self.search:
                raise ValueError("tune.search is for mode pbt; wsd_branches searches the budget only: remove tune.search")
        return self

    @model_validator(mode="after")
    def _one_ranking(self) -> TuneSpec:
        if self.fitness == "eval_loss" and (self.mode != "pbt" or self.rank_by != "loss"):
            raise ValueError(
                f"tune.fitness eval_loss ranks pbt members by held-out loss; mode {self.mode} with rank_by {self.rank_by} "
                f"ranks otherwise: use mode pbt with rank_by loss, or fitness loss"
            )
        return self

    @field_validator("search")
    @classmethod
    def _known_paths(cls, search: dict[str, SearchRange]) -> dict[str, SearchRange]:
        for path, dim in search.items():
            if path not in SEARCHABLE:
                raise ValueError(f"tune.search.{path} cannot be searched; searchable: {', '.join(SEARCHABLE)}")
            if path in ("schedule.name", "batch.global_batch_size") and dim.scale != "choice":
                raise ValueError(f"tune.search.{path} takes scale: choice with a choices list")
        return search
