"""A population's bookkeeping, as pure functions: members' values, their specs, fitness, the
exploit decisions between intervals, and the schedule a lineage trained with.

Values are flat, by spec path ("optimizer.lr", "schedule.name", ...): every searched path, plus
the peak lr and global batch, which the lr scaling rule ties together. A member's `history` is
the list of (from_samples, values) it trained under along its lineage: a recipient takes its
donor's history and appends its own new values at the exploit, so the history of the best member
is a schedule `elastune run` replays from scratch (`replay_spec`).
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from elastune.errors import SpecError
from elastune.events import Row
from elastune.spec.load import validate_spec
from elastune.spec.models import JobSpec
from elastune.spec.schedule import SCHEDULES
from elastune.spec.tune import TuneSpec
from elastune.train.adaptive import Decision as BatchDecision
from elastune.train.adaptive import with_decisions
from elastune.tune.pbt import Dimension, exploit_pairs, explore, scaled_lr

ALWAYS = ("optimizer.lr", "batch.global_batch_size")  # tied by tune.lr_scaling, so always tracked


@dataclass
class Member:
    id: str
    values: dict[str, Any]
    root: str  # its checkpoint root, for the whole search
    history: list[dict[str, Any]] = field(default_factory=list)  # [{"from_samples", "values"}] along its lineage
    service: str | None = None  # its run's checkpoint service (the actor's name), once it has reported
    runs: list[str] = field(default_factory=list)  # its run directories, in order (a restarted trial adds one)

    def values_at(self, samples: int) -> dict[str, Any]:
        """What it trains with from `samples` on: the newest history entry that has begun."""
        return next(h["values"] for h in reversed(self.history) if h["from_samples"] <= samples)


@dataclass(frozen=True)
class Exploit:
    """`recipient` takes over `donor`'s state at `samples` and continues with `values`."""

    recipient: str
    donor: str
    samples: int
    values: dict[str, Any]
    diff: dict[str, tuple[Any, Any]]  # path -> (donor's value, recipient's new value)


@dataclass(frozen=True)
class Decision:
    """What a member does at a boundary: go on with `values`, after loading `donor`'s state there
    (from its checkpoint service `donor_service`, or the clone in its own root) if `donor`; or,
    `stop`, end its run (the search ended without it)."""

    values: dict[str, Any]
    donor: str | None = None
    donor_service: str | None = None
    stop: bool = False


def space_of(tune: TuneSpec) -> list[Dimension]:
    return [Dimension(path, r.scale, r.low, r.high, tuple(r.choices or ())) for path, r in tune.search.items()]


def base_values(spec: JobSpec) -> dict[str, Any]:
    """The job's own value of every path a member tracks (None where its schedule lacks the field)."""
    raw = spec.to_dict()
    paths = [*ALWAYS, *(spec.tune.search if spec.tune else ())]
    return {p: _get(raw, p) for p in dict.fromkeys(paths)}


def initial_values(spec: JobSpec, rng: random.Random) -> list[dict[str, Any]]:
    """Each member's first values: every searched one drawn from its range, the rest the job's."""
    assert spec.tune is not None  # a search's job: check_search refused one without tune:
    space = space_of(spec.tune)
    return [base_values(spec) | {d.name: _native(d.sample(rng)) for d in space} for _ in range(spec.tune.population)]


def check_search(spec: JobSpec) -> None:
    """What `elastune tune` refuses before it imports torch or Ray: a job without `tune:`, and a
    population search whose space reaches invalid jobs (check_space)."""
    if spec.tune is None:
        raise SpecError(
            "the job has no tune: section; add one (population, interval_samples, search) to search its schedule, "
            "see docs/tuning.md"
        )
    if spec.tune.mode == "pbt":
        check_space(spec)


def check_space(spec: JobSpec) -> None:
    """Refuse, before anything runs, a search whose ranges reach an invalid job (each range's
    ends and every choice are tried) or whose interval ends mid-step for some global batch."""
    tune = spec.tune
    assert tune is not None and tune.interval_samples is not None  # check_search's pbt job: TuneSpec requires its interval
    raw, base = spec.to_dict(), base_values(spec)
    for dim in space_of(tune):
        for raw_value in dim.choices or (dim.low, dim.high):
            value = int(raw_value) if dim.scale == "int" else raw_value
            try:
                validate_spec(member_spec(raw, base | {dim.name: value}))
            except SpecError as err:
                raise SpecError(
                    f"tune.search.{dim.name} reaches {value!r}, which makes the job invalid:\n{err.message}\n"
                    f"narrow the range or fix the job"
                ) from None
    searched_batch = tune.search.get("batch.global_batch_size")  # a choice range (TuneSpec), if searched
    batches = sorted({spec.batch.global_batch_size, *(searched_batch.choices or () if searched_batch else ())})
    if odd := [g for g in batches if tune.interval_samples % g]:
        raise SpecError(
            f"tune.interval_samples ({tune.interval_samples}) is not a multiple of global batch {odd}: an "
            f"interval must end at a step boundary; use a multiple of {math.lcm(*batches)}"
        )


def member_spec(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The job (a spec dict) with these values: a schedule family change keeps the job's warmup
    and the fields the new family has; fields it lacks are dropped."""
    out = copy.deepcopy(raw)
    out.pop("tune", None)
    family = values.get("schedule.name", out["schedule"]["name"])
    schedule = (
        out["schedule"]
        if family == out["schedule"]["name"]
        else {"name": family, "warmup_samples": out["schedule"].get("warmup_samples", 0)}
    )
    if "horizon_samples" in out["schedule"]:
        schedule["horizon_samples"] = out["schedule"]["horizon_samples"]
    for path, value in values.items():
        section, key = path.split(".", 1)
        if section == "schedule":
            if key in SCHEDULES[family].model_fields and value is not None:
                schedule[key] = value
        elif section == "batch" and key.startswith("adaptive."):  # batch.adaptive.fraction, ... (JobSpec: the section exists)
            out["batch"]["adaptive"][key.split(".", 1)[1]] = value
        else:
            out[section][key] = value
    out["schedule"] = schedule
    return out


def fitness(rows: Iterable[Row], end_samples: int, window_samples: int) -> float:
    """Mean loss of the steps that started within the last `window_samples` before `end_samples`.
    Each step's loss is measured before its update on samples the model has not yet trained on in
    this epoch, so it estimates held-out loss. A diverged member (no finite loss) is +inf."""
    return loss_fitness([(r.samples_seen, r.global_batch_size, r.loss) for r in rows], end_samples, window_samples)


def loss_fitness(steps: Iterable[Sequence[float]], end_samples: int, window_samples: int) -> float:
    """`fitness` of steps given as (samples_seen, global batch, loss), as a member reports them."""
    losses = [loss for samples, batch, loss in steps if samples - batch >= end_samples - window_samples]
    if not losses or not all(math.isfinite(x) for x in losses):
        return math.inf
    return sum(losses) / len(losses)


def decide(
    members: dict[str, Member], scores: dict[str, float], samples: int, tune: TuneSpec, rng: random.Random
) -> list[Exploit]:
    """Who exploits whom after an interval ending at `samples`, and the recipients' new values
    (explored from the donor's; the peak lr follows a changed global batch by tune.lr_scaling)."""
    out = []
    for recipient, donor in exploit_pairs(scores, tune.quantile, rng):
        old = members[donor].values
        new = {
            k: _native(v) for k, v in explore(old, space_of(tune), rng, tune.resample_probability, tune.perturb_factors).items()
        }
        if new["batch.global_batch_size"] != old["batch.global_batch_size"]:  # the rule first, the search's own step on top
            new["optimizer.lr"] = _native(
                scaled_lr(new["optimizer.lr"], old["batch.global_batch_size"], new["batch.global_batch_size"], tune.lr_scaling)
            )
        diff = {k: (old[k], new[k]) for k in new if new[k] != old[k]}
        out.append(Exploit(recipient, donor, samples, new, diff))
    return out


def replay_spec(raw: dict[str, Any], history: list[dict[str, Any]], batches: Sequence[Sequence[Any]] = ()) -> dict[str, Any]:
    """A job spec that trains a lineage's whole `history` from scratch: its first values as the
    job's own, each later change as a `phases` entry (JobSpec.phases). With batch.adaptive,
    `batches` is the lineage's batch history (train.adaptive decisions as BatchChange.history
    holds them, the best member's at the end): merged in as phases, the rule off."""
    adaptive = raw["batch"].get("adaptive") is not None
    out = member_spec(raw, history[0]["values"])
    out["name"] = f"{raw['name']}-best"
    out["checkpoint"].pop("path", None)  # its own checkpoints, under output_dir/<name>/
    phases = []
    for entry in history[1:]:
        spec = member_spec(raw, entry["values"])
        schedule = {k: v for k, v in spec["schedule"].items() if k != "horizon_samples"}
        phases.append(
            {
                "from_samples": entry["from_samples"],
                "lr": spec["optimizer"]["lr"],
                "weight_decay": spec["optimizer"].get("weight_decay", 0.0),
                "schedule": schedule,
                **({} if adaptive else {"global_batch_size": spec["batch"]["global_batch_size"]}),
            }
        )
    out["phases"] = phases
    if adaptive:  # the batch is the rule's: its decisions along the lineage, as phases
        merged = with_decisions(JobSpec.model_validate({**out, "phases": phases}), [BatchDecision(*b[:4]) for b in batches])
        return {**merged.to_dict(), "name": out["name"], "checkpoint": out["checkpoint"]}
    if (
        any(p.get("global_batch_size", out["batch"]["global_batch_size"]) != out["batch"]["global_batch_size"] for p in phases)
        and out["stop"].get("max_steps") is not None
    ):
        out["stop"] = {"max_samples": JobSpec.model_validate(raw).budget_samples}  # a changing batch needs a budget in samples
    return out


def _get(raw: dict[str, Any], path: str) -> Any:
    node: Any = raw
    for key in path.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _native(value: Any) -> Any:
    """Floats rounded to 6 significant digits: values stay readable in tables, specs and diffs."""
    return float(f"{value:.6g}") if isinstance(value, float) else value
