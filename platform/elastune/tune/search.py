"""The population (`Population`) and Ray Tune's search algorithm over it: one Tune trial per member
for the whole search.

Ray Tune runs the trials (placement, retries, its experiment records); each is one Elastune run
that stays up from the first sample to the budget (train.member). At every interval boundary the
member's workers stop at the same sample count and report to the population actor
(tune.coordinator), which holds a `Population`: once every member has reported, the bottom
quantile exploits the top one and explores, the rest go on, and each member's workers get their
`Decision` and carry it out in place. The generations are synchronous, so the search replays
exactly from its seed whatever the order members arrive in; every member must be up at once
(the driver refuses a cluster too small for that).

Before anyone is told, each member that goes on makes its state at the boundary durable and
pins it in its checkpoint service's memory (tier 0), and each recipient's root gets a clone of
its donor's checkpoint there (a manifest pointing at the donor's payloads; no byte copied), so a
restart from then on resumes from the donor's state. The recipient's workers load the donor's
pinned state straight from the object store; pins are released at the next boundary, by when
every recipient has loaded (a recipient loads before its next step). Retention keeps the donor's
checkpoint while the clone exists (a marker beside it).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

import ray
from elastune.events import Exploit as ExploitEvent
from elastune.spec.models import JobSpec
from elastune.spec.tune import TuneSpec
from elastune.train.schedules import step_values
from elastune.tune.annealing import predicted_final_losses
from elastune.tune.lineage import stitched
from elastune.tune.population import Decision, Exploit, Member, decide, initial_values, member_spec, replay_spec

LINEAGE = "lineage.json"


@dataclass(frozen=True)
class SearchPlan:
    raw: dict[str, Any]  # the resolved job spec
    tune_dir: str
    metrics_actor: str | None = None  # name of the search's MetricsExporter (trial metrics), if it serves any

    @property
    def spec(self) -> JobSpec:
        return JobSpec.model_validate(self.raw)

    @property
    def tune(self) -> TuneSpec:
        """The job's tune section: a searched job has one (population.check_search)."""
        tune = self.spec.tune
        assert tune is not None
        return tune

    @property
    def window(self) -> int:
        """The samples a "loss" fitness averages over: the last quarter of an interval by default."""
        return self.tune.fitness_samples or max(1, (self.tune.interval_samples or 4) // 4)

    def boundaries(self) -> list[int]:
        """Samples at the end of each interval; the last is the job's budget."""
        budget, step = self.spec.budget_samples, self.tune.interval_samples
        assert step is not None  # a population search (mode pbt), which TuneSpec gives an interval
        return [min(k * step, budget) for k in range(1, math.ceil(budget / step) + 1)]


def trial_spec(plan: SearchPlan, job: dict[str, Any], name: str, root: str, end: int) -> dict[str, Any]:
    """`job` (a spec dict) as one trial of the search: named `<job>-<name>`, training into the
    checkpoint root `root` until `end` samples, its run directory under the search's `runs/`, no
    exporter of its own (the search exports trial metrics) and no injected faults (they would fire
    in every trial)."""
    out = copy.deepcopy(job)
    out.pop("tune", None)
    out["name"] = f"{plan.raw['name']}-{name}"
    out["stop"] = {"max_samples": end}
    out["checkpoint"] = {**out["checkpoint"], "path": root}
    out["metrics"] = {**out.get("metrics", {}), "enabled": False}
    out["output_dir"] = str(Path(plan.tune_dir) / "runs")
    out["faults"] = []
    return out


def member_trial_spec(plan: SearchPlan, member: Member, values: dict[str, Any] | None = None) -> dict[str, Any]:
    """A member's run for the whole search, trained with `values` (default: its first): its own
    root, the job's budget and schedule horizon. At each boundary its workers are handed the spec
    with its values from there (train.member)."""
    values = member.history[0]["values"] if values is None else values
    out = trial_spec(plan, member_spec(plan.raw, values), member.id, member.root, plan.spec.budget_samples)
    out["schedule"]["horizon_samples"] = plan.spec.horizon_samples
    return out


class Population:
    """A population search's synchronous generations, apart from who runs the members: each member
    reports how it reached the current boundary (`report`); once all have, `close` ranks them and
    decides: the bottom quantile exploits the top one and explores, the rest go on (or the search
    ends with its best member). The caller carries out what durability needs (the members' states
    at the boundary, the recipients' clones: `exploited`) and hands out the decisions. The lineage
    (lineage.json) records all of it, with the state a search resumes from (`resume`)."""

    def __init__(self, plan: SearchPlan):
        self.plan = plan
        spec = plan.spec
        self.rng = random.Random(spec.seed)
        roots = Path(plan.tune_dir) / "checkpoints"
        self.members = {
            f"m{i}": Member(f"m{i}", v, str(roots / f"m{i}"), [{"from_samples": 0, "values": v}])
            for i, v in enumerate(initial_values(spec, self.rng))
        }
        self.ends = plan.boundaries()
        self.generation = 0
        self.done = False
        self.pending: dict[str, dict[str, Any]] = {}  # member -> its segment of the current interval, as reported
        self.decisions: dict[int, dict[str, Decision]] = {}  # boundary -> member -> decision
        self.scores: dict[str, float] = {}  # the last closed interval's ranking
        self.lineage: dict[str, Any] = {"job": spec.name, "boundaries": self.ends, "segments": [], "exploits": [], "best": None}

    @classmethod
    def resume(cls, plan: SearchPlan, lineage: dict[str, Any]) -> Population:
        """The population as its lineage.json left it (a search whose driver died): every closed
        interval, the members' values, roots and histories, and the random state its next
        decisions draw from, so they are those the uninterrupted search would have made."""
        out = cls(plan)
        state = lineage["state"]
        out.lineage = {k: v for k, v in lineage.items() if k != "state"}
        out.generation, out.done = state["generation"], bool(lineage.get("best") or lineage.get("error"))
        version, internal, gauss = state["rng"]
        out.rng.setstate((version, tuple(internal), gauss))
        out.members = {m: Member(**fields) for m, fields in state["members"].items()}
        out.decisions = {int(b): {m: Decision(**d) for m, d in by_member.items()} for b, by_member in state["decisions"].items()}
        return out

    @property
    def boundary(self) -> int:
        return self.ends[min(self.generation, len(self.ends) - 1)]

    def span(self) -> tuple[int, int]:
        """The current interval, in samples."""
        return (self.ends[self.generation - 1] if self.generation else 0), self.boundary

    def configs(self) -> list[dict[str, Any]]:
        """Each member's trial: one run for the whole search."""
        return [
            {"member": m.id, "spec": member_trial_spec(self.plan, m), "metrics_actor": self.plan.metrics_actor}
            for m in self.members.values()
        ]

    def report(self, member: str, result: dict[str, Any] | None) -> bool:
        """`member` reached the current boundary with `result` (fitness, loss, eval_loss, service,
        run_dir, arrived_at), or failed (None) and ranks last. The first report counts, but a real
        one replaces a failure (the member's trial, started again, got there after all). True:
        every member has reported, and the interval can `close`."""
        start, end = self.span()
        m = self.members[member]
        if member not in self.pending or (self.pending[member]["error"] and result):
            result = result or {}
            if result.get("service"):
                m.service = result["service"]
            if result.get("run_dir") and result["run_dir"] not in m.runs:
                m.runs.append(result["run_dir"])
            score = result.get("fitness", math.inf)
            self.pending[member] = {
                "member": member,
                "generation": self.generation,
                "from_samples": start,
                "to_samples": end,
                "values": m.values,
                "root": m.root,
                "fitness": score if score is not None and math.isfinite(score) else math.inf,
                "loss": result.get("loss"),
                "eval_loss": result.get("eval_loss"),
                "batch_history": result.get("batch_history"),  # batch.adaptive: its decisions so far
                "run_dirs": list(m.runs),
                "error": not result,
                "arrived_at": result.get("arrived_at"),
                "checkpoint": None,  # the member's state at `end`, once durable (`durable`)
            }
        return len(self.pending) == len(self.members)

    def retire(self, member: str) -> bool:
        """`member` failed for good (twice at one boundary): the search goes on without it. True:
        every remaining member has reported, and the interval can `close`."""
        self.members.pop(member, None)
        self.pending.pop(member, None)
        self.lineage.setdefault("retired", []).append({"member": member, "boundary": self.boundary})
        say(f"  {member} failed twice before {self.boundary:,} samples; the search goes on without it")
        return bool(self.members) and len(self.pending) == len(self.members)

    def close(self) -> list[Exploit]:
        """Rank the members at the boundary and decide; returns the exploits, whose clones the
        caller makes (`exploited`) before anyone is told (`decision`)."""
        start, end = self.span()
        scores = {m: s["fitness"] for m, s in self.pending.items()}
        if self.plan.tune.rank_by == "predicted_final_loss" and end < self.ends[-1]:
            scores = self._predicted(end, scores)
        order = sorted(scores, key=lambda m: (scores[m], m))
        say(
            f"Interval {self.generation + 1}/{len(self.ends)} ({start:,} -> {end:,} samples): "
            + ", ".join(f"{m} {scores[m]:.4f}" for m in order)
        )
        self.lineage["segments"] += [self.pending[m] for m in sorted(self.pending)]
        self.pending = {}
        exploits: list[Exploit] = []
        if all(math.isinf(score) for score in scores.values()):
            self.lineage["error"] = (
                f"every member failed interval {self.generation + 1} (see the logs/ folder); nothing to continue from"
            )
            self.done = True
        elif self.generation == len(self.ends) - 1:
            best, self.done = self.members[order[0]], True
            last = next(s for s in reversed(self.lineage["segments"]) if s["member"] == best.id)
            self.lineage["best"] = {
                "member": best.id,
                "fitness": scores[best.id],
                "history": best.history,
                "spec": replay_spec(self.plan.raw, best.history, last.get("batch_history") or ()),
            }
        else:
            exploits = decide(self.members, scores, end, self.plan.tune, self.rng)
        taken = {e.recipient: e for e in exploits}
        self.decisions[end] = {
            m.id: Decision(m.values, stop=self.done)
            if m.id not in taken
            else Decision(taken[m.id].values, taken[m.id].donor, self.members[taken[m.id].donor].service)
            for m in self.members.values()
        }
        for e in exploits:  # after every decision read the donors' histories as they were
            recipient = self.members[e.recipient]
            recipient.history = [*self.members[e.donor].history, {"from_samples": e.samples, "values": e.values}]
            recipient.values = e.values
        self.scores = scores
        self.generation += 0 if self.done else 1
        return exploits

    def durable(self, member: str, pointer: dict[str, Any]) -> None:
        """`member`'s state at the boundary just closed is durable at `pointer` {uri, step, content_hash}."""
        closed = self.generation - (0 if self.done else 1)
        segment = next(s for s in self.lineage["segments"] if (s["member"], s["generation"]) == (member, closed))
        segment["checkpoint"] = pointer

    def exploited(self, exploit: Exploit, donor: dict[str, Any], recipient: dict[str, Any], seconds: float) -> None:
        """The recipient's root now holds a clone of the donor's checkpoint at the boundary."""
        written = recipient.get("bytes")  # the clone's manifest: no payload byte
        recipient = {k: v for k, v in recipient.items() if k != "bytes"}
        self.lineage["exploits"].append(
            {
                "generation": self.generation - 1,
                "samples": exploit.samples,
                "recipient": exploit.recipient,
                "donor": exploit.donor,
                # Both read through their own fragments: equal only if the clone really reads the donor's bytes.
                "donor_checkpoint": donor,
                "recipient_checkpoint": recipient,
                "diff": {k: list(v) for k, v in exploit.diff.items()},
                "values": exploit.values,
                "donor_fitness": self.scores[exploit.donor],
                "recipient_fitness": self.scores[exploit.recipient],
                "clone_seconds": round(seconds, 6),
                "clone_bytes": written,
                "time": time.time(),
            }
        )
        if self.plan.metrics_actor:
            event = ExploitEvent(time=time.time(), recipient=exploit.recipient, donor=exploit.donor)
            ray.get_actor(self.plan.metrics_actor).observe_trial.remote(exploit.recipient, [], [event])
        changes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in exploit.diff.items()) or "no change"
        say(f"  exploit: {exploit.recipient} takes {exploit.donor}'s state at {exploit.samples:,} samples; {changes}")

    def decision(self, member: str, boundary: int) -> Decision | None:
        return self.decisions.get(boundary, {}).get(member)

    def _predicted(self, end: int, scores: dict[str, float]) -> dict[str, float]:
        """Each member's end-of-budget loss as the annealing law predicts it (tune.annealing),
        from every member's curve along its lineage and its schedule's lrs from here on."""
        spec = self.plan.spec
        curves, futures = {}, {}
        lineage = {**self.lineage, "segments": [*self.lineage["segments"], *self.pending.values()]}
        for m, member in self.members.items():
            try:
                rows = stitched(lineage, m)
            except (OSError, KeyError, TypeError, ValueError):  # an interval that failed has no run directory: it ranks last
                rows = []
            lrs = [r.lr for r in rows]
            curves[m] = (lrs[:-1], [r.loss for r in rows[1:]])  # a row's loss is measured after the step before it
            plan = JobSpec.model_validate(member_spec(self.plan.raw, member.values))
            future = [v.lr for v in (step_values(plan, s) for s in range(end, spec.budget_samples, plan.batch.global_batch_size))]
            futures[m] = lrs[-1:] + future
        warmup = math.ceil(spec.schedule.warmup_samples / spec.batch.global_batch_size)
        predicted = predicted_final_losses(curves, futures, skip=warmup)
        for segment in self.pending.values():
            segment["predicted_final_loss"] = predicted[segment["member"]]
        return {m: p if math.isfinite(scores[m]) else math.inf for m, p in predicted.items()}

    def write(self) -> None:
        """lineage.json, with the state a search resumes from (`resume`)."""
        state = {
            "generation": self.generation,
            "rng": self.rng.getstate(),
            "members": {m: asdict(member) for m, member in self.members.items()},
            "decisions": {b: {m: asdict(d) for m, d in by.items()} for b, by in self.decisions.items()},
        }
        write_json(Path(self.plan.tune_dir) / LINEAGE, {**self.lineage, "state": state})


class PopulationSearcher(Searcher):
    """The population's members as Ray Tune trials: one trial per member for the whole search
    (Tune places it, runs it and retries it, max_failures); the population actor
    (tune.coordinator) decides at each boundary. A member whose trial fails for good ranks last at
    its boundary and is started again (it resumes from its root), once per boundary."""

    def __init__(self, plan: SearchPlan, coordinator: str, configs: list[dict[str, Any]]):
        super().__init__(metric="fitness", mode="min")
        self.plan, self.coordinator = plan, coordinator
        self.queue = list(configs)
        self.configs = {c["member"]: c for c in configs}
        self.running: dict[str, str] = {}  # trial id -> member
        self.restarted: dict[str, int] = {}  # member -> the boundary it was last started again for

    # Ray annotates suggest() as Optional[Dict], yet documents Searcher.FINISHED (a str) as its way to end a search.
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        if self.queue:
            config = self.queue.pop(0)
            self.running[trial_id] = config["member"]
            return config
        if not self.running:
            return Searcher.FINISHED
        return None  # members still train

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        member = self.running.pop(trial_id, None)
        if member is None or not error:
            return
        coordinator = ray.get_actor(self.coordinator)
        boundary: int
        done: bool
        boundary, done = ray.get(coordinator.failed.remote(member))
        if not done and self.restarted.get(member) != boundary:
            self.restarted[member] = boundary
            self.queue.append(self.configs[member])
            say(f"  {member}'s trial failed; it starts again from its last durable boundary")
        elif not done:
            ray.get(coordinator.retire.remote(member))

    def save(self, checkpoint_path: str) -> None:
        # Tune records its searcher with each experiment checkpoint; the lineage is the search's record (no pickle).
        Path(checkpoint_path).write_text(json.dumps({"coordinator": self.coordinator}))

    def restore(self, checkpoint_path: str) -> None:
        raise NotImplementedError("a search resumes from its tune directory, not from Tune's experiment state")


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A search's record (None: not written yet)."""
    return json.loads(Path(path).read_text()) if Path(path).exists() else None


def write_json(path: Path, record: dict[str, Any]) -> None:
    """A search's record, replaced whole: a reader never sees half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def say(line: str) -> None:
    print(line, flush=True)
