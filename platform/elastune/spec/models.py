"""Job spec models: the typed, validated form of a job YAML. `JobSpec` and the sections it checks
together (model, data, batch, optimizer) are here; the others have modules of their own: base
(the Strict model, limits, storage locations), schedule (and phases), scaling (workers,
checkpoints, stop, faults), step, metrics, tune.

Every model rejects unknown keys and is frozen once built. Counts are `num_*` or plain
integers with their unit in the name (`*_samples`, `*_steps`); sizes say their unit.
The JSON Schema of `JobSpec` is the single source of truth for tools built on the spec
(`elastune schema`, the Kubernetes CRD).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, field_validator, model_validator

from elastune.batch_plan import BatchSchedule, micro_batch_count
from elastune.spec.base import MAX_BATCH, MAX_MICRO_BATCHES, MAX_SAMPLES, MAX_SEED, NAME_RULE, Strict, check_local_path, checked
from elastune.spec.evaluation import EvalSpec
from elastune.spec.metrics import MetricsSpec
from elastune.spec.scaling import CheckpointSpec, Fault, ScalingSpec, StopSpec
from elastune.spec.schedule import ConstantSchedule, Phase, ScheduleSpec, WSDSchedule
from elastune.spec.step import StepSpec
from elastune.spec.tune import TuneSpec

# --------------------------------------------------------------------------- model


GPT_PRESETS: dict[str, dict[str, int]] = {
    "quickstart": {"num_layers": 2, "width": 64, "num_heads": 4, "context": 64},
    "8m": {"num_layers": 6, "width": 256, "num_heads": 8, "context": 256},
    "gpt2-124m": {"num_layers": 12, "width": 768, "num_heads": 12, "context": 1024},  # GPT-2 small's shape
}


class ByteGPTOptions(Strict):
    """Options of the built-in GPT recipes (`recipe: byte_gpt`, `recipe: gpt`). A `preset` gives
    num_layers, width, num_heads and context; options given next to it win."""

    preset: Literal["quickstart", "8m", "gpt2-124m"] | None = Field(
        None, description="quickstart (2x64, context 64), 8m (6x256, context 256) or gpt2-124m (12x768, 12 heads, context 1024)."
    )

    num_layers: int = Field(2, ge=1, le=96)
    width: int = Field(64, ge=8, le=65_536, description="Embedding width; a multiple of num_heads.")
    num_heads: int = Field(4, ge=1, le=1024)
    context: int = Field(64, ge=2, le=1_048_575, description="Tokens a sample predicts from; data.window must be context + 1.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    activation_checkpointing: bool = Field(
        False,
        description="Keep only each block's input for backward and recompute the rest (less memory, about 1/3 more compute).",
    )

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("preset") in GPT_PRESETS:
            return {**GPT_PRESETS[raw["preset"]], **raw}
        return raw

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ByteGPTOptions:
        if self.width % self.num_heads:
            raise ValueError(
                f"width ({self.width}) must be a multiple of num_heads ({self.num_heads}); "
                f"use width {self.num_heads * max(1, round(self.width / self.num_heads))} or change num_heads"
            )
        return self


FACTORY_RULE = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class RecipeModel(Strict):
    """A built-in recipe: `recipe: byte_gpt` or `gpt`, with its typed options."""

    recipe: Literal["byte_gpt", "gpt"] = Field(
        description="byte_gpt: byte tokens (vocabulary 256); gpt: the vocabulary of the dataset's tokenizer (docs/data.md)."
    )
    options: ByteGPTOptions = Field(default_factory=ByteGPTOptions)


class FactoryModel(Strict):
    """A user model: `factory: "pkg.module:function"` returning an elastune.recipes.Recipe (see jobs/custom-model)."""

    factory: str = Field(pattern=FACTORY_RULE, description="'pkg.module:function'; the spec's folder is importable.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the factory.")


def _model_kind(value: Any) -> str:
    keys = value if isinstance(value, dict) else getattr(value, "__dict__", {})  # anything else fails as a recipe
    return "factory" if "factory" in keys and "recipe" not in keys else "recipe"


ModelSpec = Annotated[
    Annotated[RecipeModel, Tag("recipe")] | Annotated[FactoryModel, Tag("factory")],
    Discriminator(_model_kind),
]


# --------------------------------------------------------------------------- data


class DataSpec(Strict):
    """A prepared token-window dataset at `path`, prepared from `source` on first use when given."""

    path: str = Field(description="Folder of the prepared dataset (Arrow file + manifest.json).")
    source: str | list[str] | None = Field(
        None, description="'stdlib' (this Python's standard library sources) or file paths/globs of .txt, .jsonl, .parquet."
    )
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    text_field: str = Field("text", description="Field holding the text in JSONL records or Parquet columns.")
    window: int = Field(65, ge=2, le=1_048_576, description="Tokens per sample (context + 1 for next-token models).")
    max_bytes: int | None = Field(None, ge=1, le=MAX_SAMPLES, description="Stop reading the source after this many bytes.")
    tokenizer: str = Field(
        "bytes",
        min_length=1,
        max_length=4096,
        description="bytes (vocabulary 256), bpe (a byte-level BPE trained on the source: data.vocab_size) or tokenizer.json.",
    )
    vocab_size: int | None = Field(
        None, ge=257, le=2**32, description="Token ids a `bpe` tokenizer trains (at least 256 bytes and the separator)."
    )
    eval_fraction: float | None = Field(
        None,
        gt=0,
        le=0.5,
        description="Share of the source's documents held out for evaluation (whole documents, chosen by their content).",
    )

    @field_validator("path")
    @classmethod
    def _local_path(cls, path: str) -> str:
        return checked(path, check_local_path)

    @model_validator(mode="after")
    def _vocab_for_bpe(self) -> DataSpec:
        if self.tokenizer == "bpe" and self.vocab_size is None:
            raise ValueError("data.tokenizer bpe trains a vocabulary: set data.vocab_size (e.g. 4096)")
        if self.tokenizer != "bpe" and self.vocab_size is not None:
            raise ValueError(
                f"data.vocab_size ({self.vocab_size}) is for data.tokenizer bpe (a trained tokenizer); remove it, or set "
                f"data.tokenizer: bpe"
            )
        return self

    @field_validator("source")
    @classmethod
    def _local_sources(cls, source: str | list[str] | None) -> str | list[str] | None:
        for i, item in enumerate([source] if isinstance(source, str) else source or []):
            problem = check_local_path(item)
            if problem:
                raise ValueError(problem if isinstance(source, str) else f"item {i}: {problem}")
        return source


# --------------------------------------------------------------------------- batch


class AdaptiveBatchSpec(Strict):
    """`batch.adaptive`: the global batch follows the gradient noise scale (docs/adaptive-batch.md).
    At most once every `every_samples` samples the batch moves to `fraction` x the smoothed
    B_simple, in whole micro-batches within [min, max] (only upward unless `decrease`), and the
    peak lr follows it by `lr_scaling`. Each change is a phase of the run (replay.yaml)."""

    max: int = Field(ge=1, le=MAX_BATCH, description="Largest global batch; a multiple of batch.micro_batch_size.")
    min: int | None = Field(
        None,
        ge=1,
        le=MAX_BATCH,
        description="Smallest global batch (a multiple of micro_batch_size); default: batch.global_batch_size.",
    )
    fraction: float | None = Field(
        None,
        gt=0,
        le=1024,
        description="The noise-scale rule (required unless goodput): the target batch is fraction x B_simple, the "
        "smoothed simple gradient noise scale (McCandlish et al. take the critical batch to be about B_simple: fraction 1).",
    )
    goodput: bool = Field(
        False,
        description="The goodput rule instead (Pollux): the batch with the most progress per second at the current world "
        "size, measured throughput x statistical efficiency (B_simple + B0) / (B_simple + B).",
    )
    every_samples: int = Field(
        ge=1, le=MAX_SAMPLES, description="At most one change per this many samples; none before the first such span."
    )
    smoothing_samples: int | None = Field(
        None,
        ge=1,
        le=MAX_SAMPLES,
        description="Time constant, in samples, of the moving averages of tr(Sigma) and |G|^2; default every_samples.",
    )
    decrease: bool = Field(False, description="Also move down when the target falls below the batch (default: only up).")
    lr_scaling: Literal["linear", "sqrt", "adascale", "none"] | None = Field(
        None,
        description="How the peak lr follows the batch B against the job's first batch B0: linear (B/B0), sqrt, adascale "
        "(the gain (b/B0 + 1) / (b/B + 1), b the noise scale at the change) or none; default sqrt for adamw, linear for sgd.",
    )

    @property
    def smoothing(self) -> int:
        return self.smoothing_samples or self.every_samples

    @model_validator(mode="after")
    def _one_rule(self) -> AdaptiveBatchSpec:
        if self.goodput and self.fraction is not None:
            raise ValueError(
                f"fraction ({self.fraction}) is the noise-scale rule's and goodput (true) chooses by goodput; remove "
                f"fraction, or goodput"
            )
        if not self.goodput and self.fraction is None:
            raise ValueError(
                "fraction (missing) sets the noise-scale rule's target, fraction x B_simple; add fraction (e.g. 1.0), or "
                "set goodput: true"
            )
        return self


class BatchSpec(Strict):
    global_batch_size: int = Field(
        ge=1, le=MAX_BATCH, description="Samples per optimizer step, at every world size (with adaptive: the first)."
    )
    micro_batch_size: int = Field(ge=1, le=MAX_BATCH, description="Most samples in one forward/backward pass.")
    adaptive: AdaptiveBatchSpec | None = Field(
        None, description="A global batch that follows the gradient noise scale (off unless given)."
    )

    @property
    def num_micro_batches(self) -> int:
        return micro_batch_count(self.global_batch_size, self.micro_batch_size)

    @model_validator(mode="after")
    def _micro_fits(self) -> BatchSpec:
        if self.micro_batch_size > self.global_batch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) exceeds global_batch_size ({self.global_batch_size}); "
                f"set micro_batch_size <= {self.global_batch_size}"
            )
        if self.num_micro_batches > MAX_MICRO_BATCHES:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) splits global_batch_size {self.global_batch_size} into "
                f"{self.num_micro_batches:,} micro-batches, over {MAX_MICRO_BATCHES:,} per step; "
                f"set micro_batch_size >= {math.ceil(self.global_batch_size / MAX_MICRO_BATCHES)}"
            )
        if self.adaptive is not None:
            self._check_adaptive(self.adaptive)
        return self

    def _check_adaptive(self, a: AdaptiveBatchSpec) -> None:
        # Messages start with the field they blame, relative to `batch` (spec.load names it in full).
        m = self.micro_batch_size
        lowest = self.global_batch_size if a.min is None else a.min
        for field, value in (("global_batch_size", self.global_batch_size), ("adaptive.min", a.min), ("adaptive.max", a.max)):
            if value is not None and value % m:
                raise ValueError(
                    f"{field} ({value}) is not a multiple of micro_batch_size ({m}): an adaptive batch moves in whole "
                    f"micro-batches; use {max(m, value // m * m)} or {(value // m + 1) * m}"
                )
        if lowest > a.max:
            blamed = "adaptive.min" if a.min is not None else "global_batch_size"
            raise ValueError(f"{blamed} ({lowest}) is above adaptive.max ({a.max}); raise adaptive.max or lower {blamed}")
        if not lowest <= self.global_batch_size <= a.max:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) is the first batch, outside adaptive's [min {lowest}, "
                f"max {a.max}]; start at adaptive.min or lower it, or raise adaptive.max"
            )
        if a.max // m > MAX_MICRO_BATCHES:
            raise ValueError(
                f"adaptive.max ({a.max}) makes {a.max // m:,} micro-batches of {m}, over {MAX_MICRO_BATCHES:,}; "
                f"lower it or raise micro_batch_size"
            )


# --------------------------------------------------------------------------- optimizer


class AdamWSpec(Strict):
    name: Literal["adamw"]
    lr: float = Field(gt=0, description="Peak learning rate; the schedule multiplies it.")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip_norm: float | None = Field(None, gt=0)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1); got {list(v)}; use e.g. [0.9, 0.95]")
        return v


class SGDSpec(Strict):
    name: Literal["sgd"]
    lr: float = Field(gt=0, description="Peak learning rate; the schedule multiplies it.")
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    grad_clip_norm: float | None = Field(None, gt=0)


OptimizerSpec = Annotated[AdamWSpec | SGDSpec, Field(discriminator="name")]


# --------------------------------------------------------------------------- job


class JobSpec(Strict):
    """A training job: what to train, on what, with which batch, optimizer and schedule."""

    name: str = Field(pattern=NAME_RULE, description="Lower-case letters, digits and '-', at most 63 characters.")
    seed: int = Field(0, ge=0, le=MAX_SEED)
    model: ModelSpec
    data: DataSpec
    batch: BatchSpec
    optimizer: OptimizerSpec
    schedule: ScheduleSpec = Field(default_factory=lambda: ConstantSchedule(name="constant"))
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    stop: StopSpec
    output_dir: str = Field("runs", description="Run directories go to <output_dir>/<name>/<run-id>/.")
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    step: StepSpec = Field(default_factory=StepSpec)
    faults: list[Fault] = Field(
        default_factory=list, description="Failures to rehearse (tests, benchmarks, drills); none unless listed."
    )
    phases: list[Phase] = Field(
        default_factory=list, description="Changes of peak lr, weight decay, schedule or global batch at given sample counts."
    )
    tune: TuneSpec | None = Field(None, description="Population-based search (`elastune tune`); `elastune run` ignores it.")
    eval: EvalSpec | None = Field(
        None, description="Held-out evaluation during training (needs a dataset with a held-out split)."
    )

    @field_validator("output_dir")
    @classmethod
    def _local_output(cls, output_dir: str) -> str:
        return checked(output_dir, check_local_path)

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.budget_samples > MAX_SAMPLES:  # only max_steps can get there: max_samples is bounded itself
            raise ValueError(
                f"stop.max_steps ({self.stop.max_steps}) times batch.global_batch_size ({self.batch.global_batch_size}) is "
                f"{self.budget_samples:,} samples, over the {MAX_SAMPLES:,} a run may train; lower max_steps"
            )
        k = self.batch.num_micro_batches
        if self.scaling.max_workers > k:
            raise ValueError(
                f"scaling.max_workers ({self.scaling.max_workers}) exceeds the number of micro-batches ({k} = "
                f"ceil(global_batch_size {self.batch.global_batch_size} / micro_batch_size {self.batch.micro_batch_size})); "
                f"set max_workers <= {k} or lower batch.micro_batch_size"
            )
        if isinstance(self.model, RecipeModel):
            ctx = self.model.options.context
            if self.data.window != ctx + 1:
                raise ValueError(
                    f"data.window ({self.data.window}) must be model.options.context + 1 ({ctx + 1}) for {self.model.recipe}; "
                    f"set data.window: {ctx + 1}"
                )
        for i, fault in enumerate(self.faults):
            if fault.rank >= self.scaling.max_workers:
                raise ValueError(
                    f"faults.{i}.rank ({fault.rank}) names no worker: ranks run 0..{self.scaling.max_workers - 1} "
                    f"(scaling.max_workers {self.scaling.max_workers}); pick a rank in that range"
                )
        horizon = self.horizon_samples
        if self.schedule.warmup_samples >= horizon:
            raise ValueError(
                f"schedule.warmup_samples ({self.schedule.warmup_samples}) must be below the schedule horizon "
                f"({horizon} samples); lower warmup_samples or raise the horizon"
            )
        self._check_phases()
        self._check_fsdp()
        self._check_adaptive()
        if (
            self.tune is not None
            and self.batch.adaptive is None
            and (searched := [p for p in self.tune.search if p.startswith("batch.adaptive.")])
        ):
            raise ValueError(
                f"tune.search.{searched[0]} (searched) is a setting of batch.adaptive, which this job does not have; add "
                f"batch.adaptive (docs/adaptive-batch.md) or remove it from the search"
            )
        if self.eval is not None and self.data.source is not None and self.data.eval_fraction is None:
            raise ValueError(
                "eval needs held-out documents, but data.eval_fraction is not set, so the dataset prepared from data.source "
                "holds none; set data.eval_fraction (e.g. 0.05) or remove the eval section"
            )
        if self.tune is not None and self.tune.fitness == "eval_loss" and self.eval is None:
            raise ValueError(
                "tune.fitness eval_loss evaluates each member on the held-out windows the eval section names, but the job "
                "has no eval section; add one (e.g. eval: {every_samples: 1600, samples: 256}) or set tune.fitness: loss"
            )
        if self.tune is not None and self.tune.mode == "wsd_branches":
            if not isinstance(self.schedule, WSDSchedule):
                raise ValueError(
                    f"tune.mode wsd_branches forks WSD decays, but schedule.name is {self.schedule.name}; set schedule.name: wsd"
                )
            assert self.tune.budgets is not None  # TuneSpec refuses wsd_branches without budgets
            if self.tune.budgets[-1] > self.budget_samples:
                raise ValueError(
                    f"tune.budgets reaches {self.tune.budgets[-1]} samples, beyond the job's stop ({self.budget_samples}); "
                    f"raise stop.max_samples or lower the budgets"
                )
        return self

    @property
    def search_fitness(self) -> str:
        """What ranks a population's members (tune.fitness): as set, else the held-out loss where
        the job evaluates and the search ranks by fitness, else the training loss."""
        t = self.tune
        assert t is not None  # a searched job
        if t.fitness is not None:
            return t.fitness
        return "eval_loss" if self.eval is not None and t.mode == "pbt" and t.rank_by == "loss" else "loss"

    @property
    def noise_scale(self) -> bool:
        """Whether workers estimate the gradient noise scale: metrics.noise_scale, by default on
        except in the fsdp layout."""
        if self.metrics.noise_scale is not None:
            return self.metrics.noise_scale
        return self.scaling.layout != "fsdp"

    def _check_fsdp(self) -> None:
        """What the fully sharded layout does not do (yet): each with the setting to change."""
        if self.scaling.layout != "fsdp":
            return
        if self.step.precision == "fp16":
            raise ValueError(
                "scaling.layout fsdp trains in fp32 or bf16 (FSDP2 keeps fp32 masters and reduces in fp32); "
                "fp16's loss scale is not carried over to shards: set step.precision: bf16, or layout: replicated"
            )
        if self.step.reduce_dtype != "fp32":
            raise ValueError(
                f"scaling.layout fsdp reduces gradients in fp32 (FSDP2's reduce-scatter), not step.reduce_dtype "
                f"{self.step.reduce_dtype}; set step.reduce_dtype: fp32, or layout: replicated"
            )
        if self.metrics.noise_scale:  # on by default in other layouts, off here unless asked for
            raise ValueError(
                "metrics.noise_scale needs each micro-batch's gradient norm, which the fsdp layout does not take (gradients "
                "are reduced in shards); remove metrics.noise_scale (off by default in fsdp), or set layout: replicated"
            )

    def _check_adaptive(self) -> None:
        """What an adaptive batch needs of the rest of the job: a budget in samples, the batch its
        own (no phase sets one), the noise scale measured, and every batch it may choose splittable
        over every worker."""
        a = self.batch.adaptive
        if a is None:
            return
        if self.stop.max_steps is not None:
            raise ValueError(
                f"stop.max_steps ({self.stop.max_steps}) does not say how many samples to train when batch.adaptive "
                f"changes the global batch; set stop.max_samples instead"
            )
        for i, phase in enumerate(self.phases):
            if phase.global_batch_size is not None:
                raise ValueError(
                    f"phases.{i}.global_batch_size ({phase.global_batch_size}) sets the batch, which batch.adaptive "
                    f"chooses; remove one of the two (a phase may still change lr, weight_decay or schedule)"
                )
        if self.scaling.layout == "fsdp":
            raise ValueError(
                "scaling.layout (fsdp) reduces gradients in shards and measures no gradient noise scale, which "
                "batch.adaptive follows; set scaling.layout: replicated or zero1, or remove batch.adaptive"
            )
        if not self.noise_scale:
            raise ValueError(
                "metrics.noise_scale (false) turns off the gradient noise scale, which batch.adaptive follows; "
                "remove metrics.noise_scale: false"
            )
        m = self.batch.micro_batch_size
        lowest = (a.min or self.batch.global_batch_size) // m
        if lowest < max(2, self.scaling.max_workers):
            blamed = "batch.adaptive.min" if a.min is not None else "batch.global_batch_size"
            raise ValueError(
                f"{blamed} ({lowest * m}) is the smallest adaptive batch, {lowest} micro-batch(es) of {m}, and the noise "
                f"scale needs at least 2 per step and each of scaling.max_workers ({self.scaling.max_workers}) at least "
                f"one; raise {blamed} to {max(2, self.scaling.max_workers) * m}"
            )
        if self.tune is not None and self.tune.mode == "wsd_branches":
            raise ValueError(
                "tune.mode (wsd_branches) forks decay branches of one fixed-batch trunk; remove batch.adaptive, or use "
                "tune.mode: pbt"
            )
        if self.tune is not None and "batch.global_batch_size" in self.tune.search:
            raise ValueError(
                "tune.search.batch.global_batch_size (searched) sets the batch, which batch.adaptive chooses; search "
                "batch.adaptive.fraction or batch.adaptive.max instead"
            )

    def _check_phases(self) -> None:
        previous = 0
        for i, phase in enumerate(self.phases):
            where = f"phases.{i}"
            if phase.from_samples <= previous:
                raise ValueError(
                    f"{where}.from_samples ({phase.from_samples}) must be above the "
                    f"previous phase's ({previous}); list phases in order"
                )
            previous = phase.from_samples
            if phase.global_batch_size is not None:
                if self.stop.max_steps is not None:
                    raise ValueError(
                        f"{where}.global_batch_size changes the batch, so stop.max_steps no longer says how many samples "
                        f"to train; set stop.max_samples instead"
                    )
                if phase.global_batch_size < self.batch.micro_batch_size:
                    raise ValueError(
                        f"{where}.global_batch_size ({phase.global_batch_size}) is below batch.micro_batch_size "
                        f"({self.batch.micro_batch_size}); raise it or lower micro_batch_size"
                    )
                k = micro_batch_count(phase.global_batch_size, self.batch.micro_batch_size)
                if k > MAX_MICRO_BATCHES:
                    raise ValueError(
                        f"{where}.global_batch_size ({phase.global_batch_size}) makes {k:,} micro-batches of "
                        f"batch.micro_batch_size {self.batch.micro_batch_size}, over {MAX_MICRO_BATCHES:,}; "
                        f"lower it or raise micro_batch_size"
                    )
                if self.scaling.max_workers > k:
                    raise ValueError(
                        f"{where}.global_batch_size ({phase.global_batch_size}) has {k} micro-batches, fewer than "
                        f"scaling.max_workers ({self.scaling.max_workers}); raise it or lower max_workers"
                    )
            if phase.schedule is not None:
                if phase.schedule.horizon_samples is not None:
                    raise ValueError(
                        f"{where}.schedule.horizon_samples is set; a phase's schedule spans the job's horizon "
                        f"({self.horizon_samples} samples); remove it"
                    )
                if phase.schedule.warmup_samples >= self.horizon_samples:
                    raise ValueError(
                        f"{where}.schedule.warmup_samples ({phase.schedule.warmup_samples}) must be below the "
                        f"schedule horizon ({self.horizon_samples} samples)"
                    )

    @property
    def budget_samples(self) -> int:
        """Samples the run trains before it stops."""
        limits = []
        if self.stop.max_steps is not None:
            limits.append(self.stop.max_steps * self.batch.global_batch_size)
        if self.stop.max_samples is not None:
            limits.append(self.stop.max_samples)
        return min(limits)

    @property
    def batches(self) -> BatchSchedule:
        """The global batch over samples: the job's, changed by `phases`."""
        changes = tuple((p.from_samples, p.global_batch_size) for p in self.phases if p.global_batch_size is not None)
        return BatchSchedule(self.batch.global_batch_size, changes)

    @property
    def max_steps(self) -> int:
        """Steps to the budget, each at the global batch in force when it starts."""
        return self.batches.steps_to(self.budget_samples)

    @property
    def horizon_samples(self) -> int:
        return self.schedule.horizon_samples or self.budget_samples

    @property
    def checkpoint_path(self) -> str:
        return self.checkpoint.path or f"{self.output_dir.rstrip('/')}/{self.name}/checkpoints"

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data that loads back to this same spec (workers get it this way)."""
        return _plain(self)

    def fingerprint(self, *sections: str) -> str:
        """Short sha256 of the named sections (all when none), canonical JSON."""
        data = self.to_dict()
        if sections:
            data = {k: data.get(k) for k in sections}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _plain(model: BaseModel) -> dict[str, Any]:
    """model_dump without the Nones that only repeat a default of None. A None chosen over
    another default says something (`snapshot_every_steps: null` turns snapshots off) and stays,
    so the dict loads back to the same model."""
    data = model.model_dump(mode="json", exclude_none=True)
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if value is None and field.default is not None:
            data[name] = None
        elif isinstance(value, BaseModel):
            data[name] = _plain(value)
        elif isinstance(value, list) and any(isinstance(v, BaseModel) for v in value):
            data[name] = [_plain(v) if isinstance(v, BaseModel) else d for v, d in zip(value, data[name])]
    return data


def json_schema() -> dict[str, Any]:
    schema = JobSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Elastune JobSpec"
    return schema
