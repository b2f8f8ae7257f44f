"""Job spec models: the typed, validated form of a job YAML.

Every model rejects unknown keys and is frozen once built. Counts are `num_*` or plain
integers with their unit in the name (`*_samples`, `*_steps`); sizes say their unit.
The JSON Schema of `JobSpec` is the single source of truth for tools built on the spec
(`elastune schema`, the Kubernetes CRD).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
import unicodedata
from typing import Annotated, Any, Literal, Union
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from elastune.batch_plan import BatchSchedule, micro_batch_count

NAME_RULE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"

# Upper bounds: each is where a value stops describing any real run, well before it could break
# the arithmetic downstream. Samples, steps and bytes stay at most 2**53, so they fit an int64 and
# stay exact as the floats metrics carry; a seed fits the int64 torch seeds from; workers, batch
# samples and micro-batches per step are far beyond any cluster, yet small enough that a batch plan
# is built at once (`validate` builds two); kept checkpoints and restarts, threads, CPUs and GPUs
# per worker and model sizes are beyond anything trained.
MAX_SAMPLES = 2**53  # samples, steps, bytes
MAX_SEED = 2**63 - 1
MAX_WORKERS = 4096
MAX_BATCH = 2**24  # samples in one global batch
MAX_MICRO_BATCHES = 2**16  # micro-batches in one optimizer step
MAX_COUNT = 10_000  # checkpoints kept, worker-group restarts


class Strict(BaseModel):
    # allow_inf_nan=False: every float field refuses NaN and +-infinity (YAML's .nan, .inf, 1e999).
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- storage locations

URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs")
"""Schemes a checkpoint URI may use: the pyarrow filesystems Elastune documents (gcs is gs's other
name, viewfs is federated HDFS). A location without '://' is a local path."""

_SCHEMES_SAID = "a local path or a " + ", ".join(f"{s}://" for s in URI_SCHEMES[:-1]) + f" or {URI_SCHEMES[-1]}:// URI"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_URI_CHARS = re.compile(r"[A-Za-z0-9\-._~:/?@!$&'()*+,;=%]*")  # RFC 3986 less '#', '[' and ']'
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_CREDENTIALS = ("access_key", "secret_key", "session_token")


def check_uri(uri: str) -> str | None:
    """What is wrong with `uri` as a storage location, as "<rule>; <fix>", or None when nothing is.

    A location is a local path or a URI whose scheme is one of URI_SCHEMES. Pure: it reads no
    filesystem and contacts nothing, so a malformed URI is refused before any run starts.
    """
    problem = _check_text(uri)
    if problem or "://" not in uri:
        return problem
    scheme = uri.partition("://")[0]
    if not _SCHEME.fullmatch(scheme):
        return f"the text before '://' is not a URI scheme; give {_SCHEMES_SAID}"
    if scheme not in URI_SCHEMES:
        if scheme.lower() in URI_SCHEMES:
            return f"URI scheme '{scheme}' is not lower-case; write {scheme.lower()}://"
        return f"URI scheme '{scheme}' is not supported; give {_SCHEMES_SAID}"
    problem = _check_uri_chars(uri)
    if problem:
        return problem
    parts = urlsplit(uri)
    if "@" in parts.netloc or any(key in _CREDENTIALS for key, _ in parse_qsl(parts.query)):
        return "the URI holds credentials; remove them: they come from the environment (AWS_ACCESS_KEY_ID, ...), never the spec"
    if scheme == "file":
        return _check_file_uri(parts.netloc, parts.path, parts.query)
    if scheme in ("hdfs", "viewfs"):
        return _check_port(scheme, parts)
    return _check_bucket_uri(scheme, parts.netloc, parts.path)


def check_local_path(path: str) -> str | None:
    """What is wrong with `path` as a local (or mounted) path, as "<rule>; <fix>", or None.

    Datasets and run folders are read and written through the local filesystem only, so a URI
    here is refused rather than mangled into a folder named 's3:'."""
    problem = _check_text(path)
    if problem is None and "://" in path:
        return "datasets and run folders take local paths (a mounted volume works), not URIs; copy the data there, give its path"
    return problem


def _checked(location: str, check: Any) -> str:
    """`location` if `check` (check_uri, check_local_path) finds nothing wrong; else ValueError."""
    problem = check(location)
    if problem:
        raise ValueError(problem)
    return location


def _check_text(location: str) -> str | None:
    if not location.strip():
        return "the location is empty; give a path"
    if location != location.strip():
        return "the location starts or ends with white space; remove it"
    control = next((c for c in location if unicodedata.category(c) == "Cc"), None)
    if control is not None:
        return f"the location holds a control character (U+{ord(control):04X}); remove it"
    typo = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):(?!//)", location)
    if typo and typo[1].lower() in URI_SCHEMES:
        return f"the location looks like a URI ({typo[1]}:) without '//'; write {typo[1].lower()}://..."
    return None


def _check_uri_chars(uri: str) -> str | None:
    bad = next((c for c in uri if not _URI_CHARS.fullmatch(c)), None)
    if bad == "#":
        return "the URI holds '#', which starts a fragment pyarrow drops; percent-encode it as %23"
    if bad == " ":
        return "the URI holds a space; percent-encode it as %20"
    if bad is not None:
        return f"the URI holds {bad!r}, which a URI cannot hold as it is; percent-encode it (%XX of its UTF-8 bytes)"
    if _BAD_ESCAPE.search(uri):
        return "the URI holds a '%' not followed by two hex digits; write a literal '%' as %25"
    return None


def _check_file_uri(host: str, path: str, query: str) -> str | None:
    if host:
        return "a file:// URI names no host; write file:///absolute/path (three slashes) or a plain local path"
    if not path.startswith("/"):
        return "the file:// URI names no path; write file:///absolute/path"
    if query:
        return "a file:// URI takes no query ('?...'); remove it, or percent-encode '?' as %3F"
    return None


def _check_bucket_uri(scheme: str, bucket: str, path: str) -> str | None:
    if not bucket:
        return f"the {scheme}:// URI names no bucket; write {scheme}://BUCKET/path"
    if not _BUCKET.fullmatch(bucket):
        return f"the {scheme}:// URI's bucket is not a bucket name (letters, digits, '.', '-', '_'); write {scheme}://BUCKET/path"
    if "//" in path:
        return f"the {scheme}:// URI has an empty path segment ('//'), which object stores refuse; remove the extra '/'"
    return None


def _check_port(scheme: str, parts: Any) -> str | None:
    try:
        parts.port
    except ValueError:
        return f"the URI's port is not a number in 0..65535; write {scheme}://HOST:PORT/path"
    return None


# --------------------------------------------------------------------------- model


class ByteGPTOptions(Strict):
    """Options of the built-in byte-level GPT recipe (`recipe: byte_gpt`)."""

    num_layers: int = Field(2, ge=1, le=96)
    width: int = Field(64, ge=8, le=65_536, description="Embedding width; a multiple of num_heads.")
    num_heads: int = Field(4, ge=1, le=1024)
    context: int = Field(64, ge=2, le=1_048_575, description="Tokens a sample predicts from; data.window must be context + 1.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    activation_checkpointing: bool = Field(
        False, description="Keep only each block's input for backward and recompute the rest (less memory, about 1/3 more compute)."
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ByteGPTOptions":
        if self.width % self.num_heads:
            raise ValueError(
                f"width ({self.width}) must be a multiple of num_heads ({self.num_heads}); "
                f"use width {self.num_heads * max(1, round(self.width / self.num_heads))} or change num_heads"
            )
        return self


FACTORY_RULE = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class RecipeModel(Strict):
    """A built-in recipe: `recipe: byte_gpt` with its typed options."""

    recipe: Literal["byte_gpt"]
    options: ByteGPTOptions = Field(default_factory=ByteGPTOptions)


class FactoryModel(Strict):
    """A user model: `factory: "pkg.module:function"` returning an elastune.recipes.Recipe (see jobs/custom-model)."""

    factory: str = Field(pattern=FACTORY_RULE, description="'pkg.module:function'; the spec's folder is importable.")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the factory.")


def _model_kind(value: Any) -> str:
    keys = value if isinstance(value, dict) else getattr(value, "__dict__", {})  # anything else fails as a recipe
    return "factory" if "factory" in keys and "recipe" not in keys else "recipe"


ModelSpec = Annotated[
    Union[Annotated[RecipeModel, Tag("recipe")], Annotated[FactoryModel, Tag("factory")]],
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

    @field_validator("path")
    @classmethod
    def _local_path(cls, path: str) -> str:
        return _checked(path, check_local_path)

    @field_validator("source")
    @classmethod
    def _local_sources(cls, source: str | list[str] | None) -> str | list[str] | None:
        for i, item in enumerate([source] if isinstance(source, str) else source or []):
            problem = check_local_path(item)
            if problem:
                raise ValueError(problem if isinstance(source, str) else f"item {i}: {problem}")
        return source


# --------------------------------------------------------------------------- batch


class BatchSpec(Strict):
    global_batch_size: int = Field(ge=1, le=MAX_BATCH, description="Samples per optimizer step, at every world size.")
    micro_batch_size: int = Field(ge=1, le=MAX_BATCH, description="Most samples in one forward/backward pass.")

    @property
    def num_micro_batches(self) -> int:
        return micro_batch_count(self.global_batch_size, self.micro_batch_size)

    @model_validator(mode="after")
    def _micro_fits(self) -> "BatchSpec":
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
        return self


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


OptimizerSpec = Annotated[Union[AdamWSpec, SGDSpec], Field(discriminator="name")]


# --------------------------------------------------------------------------- schedule


class _Schedule(Strict):
    warmup_samples: int = Field(0, ge=0, le=MAX_SAMPLES, description="Linear warmup from 0 to the peak over this many samples.")
    horizon_samples: int | None = Field(
        None, ge=1, le=MAX_SAMPLES,
        description="Samples the schedule spans; default: the stop budget. Set it to stop early without bending the schedule.",
    )  # fmt: skip


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
    cls.model_fields["name"].annotation.__args__[0]: cls
    for cls in (ConstantSchedule, CosineSchedule, LinearSchedule, WSDSchedule, InverseSqrtSchedule, CyclicalSchedule, RexSchedule)
}  # family name -> model

ScheduleSpec = Annotated[
    Union[ConstantSchedule, CosineSchedule, LinearSchedule, WSDSchedule, InverseSqrtSchedule, CyclicalSchedule, RexSchedule],
    Field(discriminator="name"),
]


# --------------------------------------------------------------------------- scaling, checkpoint, stop


class ScalingSpec(Strict):
    min_workers: int = Field(1, ge=1, le=MAX_WORKERS)
    max_workers: int = Field(1, ge=1, le=MAX_WORKERS)
    cpus_per_worker: float = Field(1.0, gt=0, le=1024)
    gpus_per_worker: float = Field(0.0, ge=0, le=64, description="0 trains on CPU with gloo; >0 on CUDA with NCCL.")
    torch_threads: int | None = Field(
        None, ge=1, le=1024, description="Intra-op threads per worker; default: cpus_per_worker."
    )
    max_failures: int = Field(
        3,
        ge=-1,
        le=MAX_COUNT,
        description=(
            "When the run gives up on failures. recovery restart: after this many worker-group restarts. recovery live: "
            "after more than this many failures in a row without a committed step between them. -1 never gives up."
        ),
    )
    layout: Literal["replicated", "zero1"] = Field(
        "replicated",
        description="replicated: every worker holds all optimizer state (DDP); zero1: each holds a 1/W slice of it (ZeRO-1).",
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
    def _ordered(self) -> "ScalingSpec":
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
    )  # fmt: skip
    keep_last: int = Field(3, ge=1, le=MAX_COUNT, description="Keep the newest this many checkpoints.")
    keep_best: int = Field(0, ge=0, le=MAX_COUNT, description="Also keep the best this many by best_metric.")
    best_metric: Literal["loss"] = Field("loss", description="Metric recorded with each checkpoint that ranks them.")
    best_mode: Literal["min", "max"] = "min"

    @field_validator("path")
    @classmethod
    def _a_location(cls, path: str | None) -> str | None:
        return None if path is None else _checked(path, check_uri)

    @field_validator("snapshot_every_steps", mode="before")
    @classmethod
    def _an_interval(cls, value: Any) -> Any:
        if value is None or value == "auto" or (type(value) is int and 1 <= value <= MAX_SAMPLES):
            return value
        raise ValueError(f"must be a whole number of steps from 1 to {MAX_SAMPLES}, auto, or null (no snapshots); "
                         f"write auto unless you need a fixed interval")  # fmt: skip


class StopSpec(Strict):
    max_steps: int | None = Field(None, ge=1, le=MAX_SAMPLES)
    max_samples: int | None = Field(None, ge=1, le=MAX_SAMPLES)

    @model_validator(mode="after")
    def _some_budget(self) -> "StopSpec":
        if self.max_steps is None and self.max_samples is None:
            raise ValueError("set stop.max_steps or stop.max_samples (or both: the run stops at the first reached)")
        return self


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


# --------------------------------------------------------------------------- faults


class KillRank(Strict):
    """SIGKILL the worker of `rank` during step `at_step` (once per run)."""

    action: Literal["kill_rank"]
    rank: int = Field(ge=0, lt=MAX_WORKERS)
    at_step: int = Field(ge=1, le=MAX_SAMPLES)
    point: Literal["start", "mid"] = Field(
        "mid", description="start: before the step's first micro-batch; mid: after its backward, with its gradient reduction launched but not complete."
    )


class KillNode(Strict):
    """Kill the Ray node the worker of `rank` runs on, with every worker there, during step
    `at_step` (once per run): its raylet is SIGKILLed, as when a machine disappears. Never the
    driver's node (the run itself lives there): the fault is then skipped, with an event."""

    action: Literal["kill_node"]
    rank: int = Field(ge=0, lt=MAX_WORKERS)
    at_step: int = Field(ge=1, le=MAX_SAMPLES)
    point: Literal["start", "mid"] = Field(
        "mid", description="start: before the step's first micro-batch; mid: after its backward, with its gradient reduction launched but not complete."
    )


class DelayRank(Strict):
    """Stall the worker of `rank` for `seconds` during step `at_step` (a straggler; once per run)."""

    action: Literal["delay_rank"]
    rank: int = Field(ge=0, lt=MAX_WORKERS)
    at_step: int = Field(ge=1, le=MAX_SAMPLES)
    seconds: float = Field(gt=0, le=3600)
    until_join: bool = Field(False, description="End the stall as soon as a worker has joined the run after its last kill fault "
                                                "(the killed worker's replacement is ready to train); `seconds` at most.")  # fmt: skip


Fault = Annotated[Union[KillRank, KillNode, DelayRank], Field(discriminator="action")]


# --------------------------------------------------------------------------- tune

SEARCHABLE = {
    "optimizer.lr": "peak learning rate",
    "optimizer.weight_decay": "weight decay",
    "schedule.name": "schedule family",
    "schedule.warmup_samples": "warmup",
    "schedule.decay_fraction": "WSD decay fraction (wsd only)",
    "schedule.min_lr_ratio": "final lr / peak lr (cosine, linear, wsd, rex)",
    "batch.global_batch_size": "global batch (choices; lr follows tune.lr_scaling)",
}


class SearchRange(Strict):
    """One searched value: a range (`low`, `high`) on a `linear`, `log` or `int` scale, or `choices`."""

    scale: Literal["linear", "log", "int", "choice"]
    low: float | None = None
    high: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _well_formed(self) -> "SearchRange":
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
    quantile: float = Field(0.25, gt=0, le=0.5, description="Share of trials at the bottom that take over a trial of the top share.")
    fitness_samples: int | None = Field(
        None, ge=1, le=MAX_SAMPLES,
        description="Fitness is the mean loss over this many last samples of each interval (default: a quarter of it).",
    )  # fmt: skip
    rank_by: Literal["loss", "predicted_final_loss"] = Field(
        "loss",
        description=(
            "loss: rank members by fitness (mean loss over the interval's end). predicted_final_loss: by the loss the annealing "
            "law (L = L0 + A*S1^-alpha - C*S2, fitted to all members' curves) predicts at the end of the budget under each "
            "member's schedule, so a member still at a high lr is not ranked below one that has already annealed."
        ),
    )
    resample_probability: float = Field(0.25, ge=0, le=1, description="Explore: chance each value is drawn afresh rather than perturbed.")
    perturb_factors: tuple[float, float] = Field((0.8, 1.2), description="Explore: a perturbed value is the donor's times one of these.")
    lr_scaling: Literal["linear", "sqrt", "none"] = Field(
        "sqrt", description="How the peak lr follows a changed global batch: linear (SGD), sqrt (Adam) or none."
    )
    max_concurrent_trials: int | None = Field(
        None, ge=1, le=256, description="Trials running at once; default: as many as the cluster's CPUs hold."
    )
    search: dict[str, SearchRange] = Field(default_factory=dict, description=f"Searched values by spec path (pbt): {', '.join(SEARCHABLE)}.")

    @model_validator(mode="after")
    def _mode_needs(self) -> "TuneSpec":
        if self.mode == "pbt":
            if self.interval_samples is None:
                raise ValueError("tune.mode pbt needs tune.interval_samples (samples between exploit decisions); e.g. interval_samples: 1600")
            if not self.search:
                raise ValueError(f"tune.search is empty; name at least one of {', '.join(SEARCHABLE)}")
        else:
            if not self.budgets:
                raise ValueError("tune.mode wsd_branches needs tune.budgets, the budgets (samples) to fork decay branches for; e.g. budgets: [3200, 6400, 9600]")
            if self.budgets != sorted(set(self.budgets)):
                raise ValueError(f"tune.budgets ({self.budgets}) must ascend without repeats; e.g. {sorted(set(self.budgets))}")
            if self.search:
                raise ValueError("tune.search is for mode pbt; wsd_branches searches the budget only: remove tune.search")
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


# --------------------------------------------------------------------------- job


class MetricsSpec(Strict):
    enabled: bool = Field(True, description="Serve the run's Prometheus metrics (docs/observability.md).")
    host: str = Field(
        "127.0.0.1",
        description="Address /metrics binds to: 127.0.0.1 keeps it on this machine; 0.0.0.0 lets a Prometheus elsewhere scrape it.",
    )
    port: int = Field(0, ge=0, le=65535, description="Port of /metrics; 0 picks a free one (the run prints it and writes a file_sd target).")
    noise_scale: bool = Field(
        True,
        description="Estimate the gradient noise scale from micro-batch gradient norms (one more gradient-sized buffer per worker).",
    )

    @field_validator("host")
    @classmethod
    def _an_address(cls, host: str) -> str:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise ValueError(f"metrics.host ({host!r}) is not an IP address; use 127.0.0.1 (this machine only) or 0.0.0.0 (all interfaces)")
        return host


class LossScaleSpec(Strict):
    """fp16's dynamic loss scale (train.precision)."""

    initial: float = Field(65536.0, gt=0, le=2.0**64, description="Scale of the first step; a power of two keeps scaling exact.")
    growth_interval: int = Field(2000, ge=1, le=MAX_COUNT, description="Steps without an inf or nan after which the scale doubles.")

    @field_validator("initial")
    @classmethod
    def _power_of_two(cls, initial: float) -> float:
        if math.frexp(initial)[0] != 0.5:
            raise ValueError(f"step.loss_scale.initial ({initial}) is not a power of two, so scaling would round gradients; use e.g. 65536")
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
        25.0, gt=0, le=65_536, description="Gradients are summed in buckets of about this many MiB, each launched as backward finishes it."
    )
    compile: bool = Field(False, description="torch.compile the model (each new world size may recompile).")
    loss_scale: LossScaleSpec = Field(default_factory=LossScaleSpec)


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

    @field_validator("output_dir")
    @classmethod
    def _local_output(cls, output_dir: str) -> str:
        return _checked(output_dir, check_local_path)

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
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
                    f"data.window ({self.data.window}) must be model.options.context + 1 ({ctx + 1}) for byte_gpt; "
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
        if self.tune is not None and self.tune.mode == "wsd_branches":
            if not isinstance(self.schedule, WSDSchedule):
                raise ValueError(f"tune.mode wsd_branches forks WSD decays, but schedule.name is {self.schedule.name}; set schedule.name: wsd")
            if self.tune.budgets[-1] > self.budget_samples:
                raise ValueError(f"tune.budgets reaches {self.tune.budgets[-1]} samples, beyond the job's stop ({self.budget_samples}); "
                                 f"raise stop.max_samples or lower the budgets")  # fmt: skip
        return self

    def _check_phases(self) -> None:
        previous = 0
        for i, phase in enumerate(self.phases):
            where = f"phases.{i}"
            if phase.from_samples <= previous:
                raise ValueError(f"{where}.from_samples ({phase.from_samples}) must be above the previous phase's ({previous}); list phases in order")
            previous = phase.from_samples
            if phase.global_batch_size is not None:
                if self.stop.max_steps is not None:
                    raise ValueError(f"{where}.global_batch_size changes the batch, so stop.max_steps no longer says how many samples "
                                     f"to train; set stop.max_samples instead")  # fmt: skip
                if phase.global_batch_size < self.batch.micro_batch_size:
                    raise ValueError(f"{where}.global_batch_size ({phase.global_batch_size}) is below batch.micro_batch_size "
                                     f"({self.batch.micro_batch_size}); raise it or lower micro_batch_size")  # fmt: skip
                k = micro_batch_count(phase.global_batch_size, self.batch.micro_batch_size)
                if k > MAX_MICRO_BATCHES:
                    raise ValueError(f"{where}.global_batch_size ({phase.global_batch_size}) makes {k:,} micro-batches of "
                                     f"batch.micro_batch_size {self.batch.micro_batch_size}, over {MAX_MICRO_BATCHES:,}; "
                                     f"lower it or raise micro_batch_size")  # fmt: skip
                if self.scaling.max_workers > k:
                    raise ValueError(f"{where}.global_batch_size ({phase.global_batch_size}) has {k} micro-batches, fewer than "
                                     f"scaling.max_workers ({self.scaling.max_workers}); raise it or lower max_workers")  # fmt: skip
            if phase.schedule is not None:
                if phase.schedule.horizon_samples is not None:
                    raise ValueError(f"{where}.schedule.horizon_samples is set; a phase's schedule spans the job's horizon "
                                     f"({self.horizon_samples} samples); remove it")  # fmt: skip
                if phase.schedule.warmup_samples >= self.horizon_samples:
                    raise ValueError(f"{where}.schedule.warmup_samples ({phase.schedule.warmup_samples}) must be below the "
                                     f"schedule horizon ({self.horizon_samples} samples)")  # fmt: skip

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

