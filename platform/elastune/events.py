"""The run's vocabulary: every event a run records and its metrics row, as frozen records with one
JSON form (docs/run-directory.md).

Producers (workers, the run's sink and checkpoint service, the driver, the tuner) build these
records; consumers (the console, the exporter, the report, `runs ls`, the recovery account) read
them; the run directory holds their JSON form, one record per line. Nothing changes a record once
made: a later fact is a new record (`dataclasses.replace`).

The run directory's format is versioned (`FORMAT`, written to format.json). Version 1 (runs
written before the records were typed) has the same keys with fewer fields: a field it lacks
reads as its default here, and the driver's notes (lease, fresh, data_prepared, resume) read with
an empty message.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

FORMAT = 2
FORMAT_FILE = "format.json"


@dataclass(frozen=True, kw_only=True)
class Event:
    """One thing that happened to a run, at `time` (Unix seconds)."""

    kind: ClassVar[str]
    time: float


KINDS: dict[str, type[Event]] = {}
E = TypeVar("E", bound=type[Event])


def _kind(cls: E) -> E:
    KINDS[cls.kind] = cls
    return cls


@_kind
@dataclass(frozen=True, kw_only=True)
class Start(Event):
    """A worker group came up: its plan, and what it restored (resumed_from_step None: nothing)."""

    kind: ClassVar[str] = "start"
    world_size: int
    plan: str
    micro_batches: tuple[int, ...]
    resumed_from_step: int | None = None
    resumed_samples_seen: int | None = None
    resumed_from_tier: int | None = None  # 0: an in-memory snapshot, 1: a durable checkpoint
    saved_world_size: int | None = None
    saved_layout: str | None = None
    lost_steps: int = 0  # steps the run had handed over past the resumed one (lost with their group)
    last_staged_at: float | None = None  # when the newest snapshot was handed over
    load_seconds: float | None = None
    load_bytes: int | None = None


@_kind
@dataclass(frozen=True, kw_only=True)
class Join(Event):
    """A worker restored its state and joined the group (live: the next quorum takes it in)."""

    kind: ClassVar[str] = "join"
    replica: int
    node: str
    step: int
    samples_seen: int
    resumed_from_tier: int | None = None
    load_seconds: float | None = None


@_kind
@dataclass(frozen=True, kw_only=True)
class Memory(Event):
    """The training state a worker holds after its first step in a group (train.memory): bytes of
    parameters, gradients and optimizer state, as `layout` divides them over `world_size` ranks."""

    kind: ClassVar[str] = "memory"
    replica: int
    step: int
    world_size: int
    layout: str
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int


@_kind
@dataclass(frozen=True, kw_only=True)
class Leave(Event):
    """A worker of a live group left at a step boundary (its node is draining)."""

    kind: ClassVar[str] = "leave"
    replica: int
    node: str
    step: int
    reason: str


@_kind
@dataclass(frozen=True, kw_only=True)
class Finish(Event):
    """The run trained its whole budget."""

    kind: ClassVar[str] = "finish"
    step: int
    samples_seen: int


@_kind
@dataclass(frozen=True, kw_only=True)
class CollectiveFailed(Event):
    """A rank of a static group saw `step`'s reduction fail (a peer was lost)."""

    kind: ClassVar[str] = "collective_failed"
    rank: int
    step: int
    error: str


@_kind
@dataclass(frozen=True, kw_only=True)
class Fault(Event):
    """An injected fault (spec faults[index]) fired, or was `skipped` with the reason."""

    kind: ClassVar[str] = "fault"
    index: int
    action: str  # kill_rank, kill_node, delay_rank
    rank: int
    step: int
    at_step: int
    point: str = "start"
    seconds: float | None = None  # delay_rank
    until_join: bool | None = None  # delay_rank
    skipped: str | None = None

    @property
    def kills(self) -> bool:
        return self.action in ("kill_rank", "kill_node") and not self.skipped


@dataclass(frozen=True, kw_only=True)
class Change(Event):
    """The world size changed at `step`: from `world_size_before` to `world_size_after` workers.

    When Ray Train restarted the group for it, the restart's figures: the step and tier resumed
    from, steps and samples lost, when the old group failed, how long detection, the restart and
    the whole recovery (MTTR: to the first step completed after) took."""

    step: int | None  # None: a restarted group that found nothing to resume
    world_size_before: int | None
    world_size_after: int
    micro_batches: tuple[int, ...] | None
    global_batch_size: int | None = None
    cause: str | None = None
    resumed_from_step: int | None = None
    resumed_from_tier: int | None = None
    lost_steps: int = 0
    lost_samples: int = 0
    failed_at: float | None = None
    detection_seconds: float | None = None
    restart_seconds: float | None = None
    mttr_seconds: float | None = None


@_kind
@dataclass(frozen=True, kw_only=True)
class Recovery(Change):
    """A failure the run recovered from. `recovery`: live (the survivors carried on) or restart
    (Ray Train started a new group, which resumed a snapshot). `failed_after`: a live survivor's
    last commit, which bounds when the failure happened."""

    kind: ClassVar[str] = "recovery"
    recovery: str = "restart"
    failed_after: float | None = None


@_kind
@dataclass(frozen=True, kw_only=True)
class Resize(Change):
    """The group grew (a worker joined, or Ray Train found capacity) or resumed a checkpoint saved
    at another world size."""

    kind: ClassVar[str] = "resize"


@_kind
@dataclass(frozen=True, kw_only=True)
class Checkpoint(Event):
    """A durable checkpoint was committed."""

    kind: ClassVar[str] = "checkpoint"
    step: int
    uri: str
    bytes: int
    seconds: float  # from the write's start until durable
    stall_seconds: tuple[float, ...]  # each rank's in-memory snapshot stall
    rank_bytes: tuple[int, ...] = ()
    reason: str = "every_steps"
    write_seconds: float | None = None
    commit_seconds: float | None = None
    prune_seconds: float | None = None


@_kind
@dataclass(frozen=True, kw_only=True)
class FailurePolicy(Event):
    """A live run's decision after a failure: retry, or give up (`message` says why)."""

    kind: ClassVar[str] = "failure_policy"
    retry: bool
    in_a_row: int
    step: int | None
    message: str


@_kind
@dataclass(frozen=True, kw_only=True)
class Preemption(Event):
    """Ray reported nodes as draining; the service made `persisted_step` durable at once."""

    kind: ClassVar[str] = "preemption"
    nodes: tuple[str, ...]
    deadline: float | None = None
    persisted_step: int | None = None


@_kind
@dataclass(frozen=True, kw_only=True)
class RunWarning(Event):
    """Something the user should know that did not stop the run."""

    kind: ClassVar[str] = "warning"
    message: str


@_kind
@dataclass(frozen=True, kw_only=True)
class LeaseTakenOver(Event):
    """The run took over the checkpoint root from a holder that is gone."""

    kind: ClassVar[str] = "lease"
    message: str = ""


@_kind
@dataclass(frozen=True, kw_only=True)
class Fresh(Event):
    """--fresh deleted the checkpoints at the root."""

    kind: ClassVar[str] = "fresh"
    deleted: int
    message: str = ""


@_kind
@dataclass(frozen=True, kw_only=True)
class DataPrepared(Event):
    """The driver prepared the job's token windows before training."""

    kind: ClassVar[str] = "data_prepared"
    count: int
    content_hash: str
    message: str = ""


@_kind
@dataclass(frozen=True, kw_only=True)
class Resume(Event):
    """The run resumes a checkpoint; `changes`: spec fields that differ from the saving run's."""

    kind: ClassVar[str] = "resume"
    step: int
    samples_seen: int
    changes: tuple[str, ...] = ()
    message: str = ""


@_kind
@dataclass(frozen=True, kw_only=True)
class End(Event):
    """The run ended: its status, error and newest durable step."""

    kind: ClassVar[str] = "end"
    status: str
    error: str | None = None
    durable_step: int | None = None


@_kind
@dataclass(frozen=True, kw_only=True)
class Population(Event):
    """A search started with `size` members (the tuner's exporter)."""

    kind: ClassVar[str] = "population"
    size: int


@_kind
@dataclass(frozen=True, kw_only=True)
class Exploit(Event):
    """A search member took a donor's state (the tuner's exporter)."""

    kind: ClassVar[str] = "exploit"
    recipient: str
    donor: str


@_kind
@dataclass(frozen=True, kw_only=True)
class Boundary(Event):
    """A search member's workers met the population at an interval boundary (train.member):
    `waited_seconds` from handing the boundary's state over to the decision; `donor`, the member
    whose state it took there (None: it went on with its own), loaded from `tier` (0: the donor's
    checkpoint service's memory, 1: the clone in its own root) in `load_seconds`; `stop`: the
    search ended without it."""

    kind: ClassVar[str] = "boundary"
    member: str
    samples_seen: int
    step: int
    waited_seconds: float
    donor: str | None = None
    tier: int | None = None
    load_seconds: float | None = None
    stop: bool = False


@_kind
@dataclass(frozen=True, kw_only=True)
class BatchChange(Event):
    """An adaptive batch moved (train.adaptive): from the step after `step` (`samples_seen`
    samples) on, global batch `global_batch_size` (was `previous`) and the peak lr times
    `lr_factor`, where the smoothed noise scale was `b_simple`; by the goodput rule, the step
    figures it chose by (`overhead_seconds` every step pays, `micro_batch_seconds` per micro-batch
    on a rank). `history`: every change of the run so far, (from_samples, global batch, lr factor,
    b_simple), as its replay.yaml holds them."""

    kind: ClassVar[str] = "batch_change"
    step: int
    samples_seen: int
    previous: int
    global_batch_size: int
    lr_factor: float
    b_simple: float
    history: tuple[tuple[int, int, float, float], ...]
    overhead_seconds: float | None = None
    micro_batch_seconds: float | None = None


@dataclass(frozen=True, kw_only=True)
class Row:
    """One committed step, as every rank computed it (the timings are the sending rank's)."""

    time: float
    step: int
    samples_seen: int
    loss: float
    lr: float
    world_size: int
    global_batch_size: int
    micro_batches: tuple[int, ...]
    step_seconds: float
    samples_per_s: float | None = None
    grad_norm: float | None = None  # None: an fp16 step whose reduced gradient held an inf or nan, applied nowhere
    loss_scale: float | None = None  # fp16 only
    snapshot_stall_seconds: float | None = None  # of the rank that sent the row (every rank's: checkpoint events)
    sample_tally: tuple[int, ...] = ()  # data.sampler.tally of what all ranks read: proves each sample once
    noise: tuple[float, float] | None = None  # (tr(Sigma), |G|^2) of this step: metrics.noise
    eval_loss: float | None = None  # held-out loss of the parameters the step started from, if it evaluated


# ---------------------------------------------------------------------- the JSON form


def to_json(record: Event | Row) -> dict[str, Any]:
    """The record's JSON object: its fields (tuples as lists), and an event's `kind`."""
    out: dict[str, Any] = {"kind": record.kind} if isinstance(record, Event) else {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def event_from_json(obj: Mapping[str, Any], format: int = FORMAT) -> Event:
    """The event a JSON object holds; ValueError for an unknown kind or, in the current format, a
    missing field. Keys the record does not know are ignored (a newer writer's additions)."""
    cls = KINDS.get(obj.get("kind", ""))
    if cls is None:
        raise ValueError(f"unknown event kind {obj.get('kind')!r}")
    return _build(cls, obj, format)


def row_from_json(obj: Mapping[str, Any], format: int = FORMAT) -> Row:
    return _build(Row, obj, format)


R = TypeVar("R")


def _build(cls: type[R], obj: Mapping[str, Any], format: int) -> R:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # cls is one of the dataclasses above
        if f.name in obj:
            value = obj[f.name]
            values[f.name] = _tuples(value)
        elif format < FORMAT and f.default is dataclasses.MISSING:
            values[f.name] = None  # a field version 1 did not write
    try:
        return cls(**values)
    except TypeError as exc:
        raise ValueError(f"{getattr(cls, 'kind', 'row')} record {dict(obj)}: {exc}") from None


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples records hold, nested ones too (BatchChange.history)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


# ---------------------------------------------------------------------- the run directory's files


def run_format(run_dir: Path) -> int:
    """The run directory's format version (1: written before format.json existed)."""
    path = run_dir / FORMAT_FILE
    return json.loads(path.read_text())["format"] if path.is_file() else 1


def write_format(run_dir: Path) -> None:
    (run_dir / FORMAT_FILE).write_text(json.dumps({"format": FORMAT}) + "\n")


def append_jsonl(path: Path, records: Iterable[Event | Row]) -> None:
    lines = [json.dumps(to_json(r), sort_keys=True) + "\n" for r in records]
    if lines:
        with path.open("a") as f:
            f.writelines(lines)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file, one per non-empty line ([] when there is no file)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_events(run_dir: Path) -> list[Event]:
    """A run directory's events; a line of a kind this version does not know is passed over."""
    format = run_format(run_dir)
    out = []
    for obj in read_lines(run_dir / "events.jsonl"):
        if obj.get("kind") in KINDS:
            out.append(event_from_json(obj, format))
    return out


def read_rows(run_dir: Path) -> list[Row]:
    """A run directory's metrics rows, in step order."""
    format = run_format(run_dir)
    return [row_from_json(obj, format) for obj in read_lines(run_dir / "metrics.jsonl")]
