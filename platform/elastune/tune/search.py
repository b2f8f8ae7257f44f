"""The population (`Population`) and Ray Tune's search algorithm over it: one Tune trial per member
per interval.

Ray Tune runs the trials (placement, concurrency, retries, its experiment records); the searcher
hands them what the population decides each trains. Every member trains one interval (a
segment: an Elastune run from its checkpoint root to the interval's end, `segment.py`); once all
have, the bottom quantile exploits the top one and explores, and the next interval's trials are
suggested. The generations are synchronous, so the search replays exactly from its seed whatever
the order trials finish in, and it cannot deadlock on a cluster that runs fewer trials at once
than the population.

Exploit happens here, between intervals, never inside Tune's trial restore: the recipient gets a
fresh checkpoint root holding a clone of the donor's checkpoint at the interval's end (a manifest
pointing at the donor's payloads; no byte copied) and its next segment resumes from it.
Retention keeps the donor's checkpoint while that clone exists (a marker beside it); clones are
made before any trial of the next interval starts, so no prune can run between the decision and
the clone. The recipient's old root is pruned down to what clones elsewhere still read.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

import ray
from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.retention import RetentionPolicy
from elastune.errors import CheckpointError
from elastune.events import Exploit
from elastune.spec.models import JobSpec
from elastune.spec.tune import TuneSpec
from elastune.train.schedules import step_values
from elastune.tune.annealing import predicted_final_losses
from elastune.tune.lineage import stitched
from elastune.tune.population import Member, decide, initial_values, member_spec, replay_spec

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


def segment_spec(plan: SearchPlan, member: Member, end: int) -> dict[str, Any]:
    """A member's next interval: its values, its root, and the job's own schedule horizon
    (stopping early never bends the schedule)."""
    out = trial_spec(plan, member_spec(plan.raw, member.values), member.id, member.root, end)
    out["schedule"]["horizon_samples"] = plan.spec.horizon_samples
    return out


class Population:
    """A population search's synchronous generations, apart from who runs the trials: each member
    trains the interval (`configs`), reports how it ended (`finished`), and once all have, the
    bottom quantile exploits the top one by clone and explores, and the next interval begins (or
    the search ends with its best member). The lineage (lineage.json) records all of it."""

    def __init__(self, plan: SearchPlan):
        self.plan = plan
        spec = plan.spec
        self.rng = random.Random(spec.seed)
        roots = Path(plan.tune_dir) / "checkpoints"
        self.members = {
            f"m{i}": Member(f"m{i}", v, str(roots / f"m{i}-0"), [{"from_samples": 0, "values": v}])
            for i, v in enumerate(initial_values(spec, self.rng))
        }
        self.ends = plan.boundaries()
        self.generation = 0
        self.done = False
        self.scores: dict[str, float] = {}
        self.lineage: dict[str, Any] = {"job": spec.name, "boundaries": self.ends, "segments": [], "exploits": [], "best": None}

    def span(self) -> tuple[int, int]:
        """The current interval, in samples."""
        return (self.ends[self.generation - 1] if self.generation else 0), self.ends[self.generation]

    def configs(self) -> list[dict[str, Any]]:
        """What each member trains in the current interval (a trial's config)."""
        start, end = self.span()
        return [
            {
                "member": m.id,
                "generation": self.generation,
                "from_samples": start,
                "to_samples": end,
                "values": dict(m.values),
                "spec": segment_spec(self.plan, m, end),
                "metrics_actor": self.plan.metrics_actor,
            }
            for m in self.members.values()
        ]

    def finished(self, member: str, result: dict[str, Any] | None, error: bool) -> None:
        """`member` ended the current interval with `result` (its trial's report), or failed. The
        last member to finish closes the interval."""
        start, end = self.span()
        # A member whose trial failed after Tune's retries ranks last: it takes over a donor's state.
        score = result["fitness"] if result and not error and "fitness" in result else math.inf
        self.scores[member] = score
        self.lineage["segments"].append(
            {
                "member": member,
                "generation": self.generation,
                "from_samples": start,
                "to_samples": end,
                "values": self.members[member].values,
                "root": self.members[member].root,
                "fitness": score,
                "loss": (result or {}).get("loss"),
                "eval_loss": (result or {}).get("eval_loss"),
                "run_dir": (result or {}).get("run_dir"),
                "error": error,
                "checkpoint": {k.split("/", 1)[1]: v for k, v in (result or {}).items() if k.startswith("elastune_checkpoint/")}
                or None,  # Tune flattens results
            }
        )
        if len(self.scores) == len(self.members):
            self._interval_done()

    def _interval_done(self) -> None:
        start, end = self.span()
        if self.plan.tune.rank_by == "predicted_final_loss" and end < self.ends[-1]:
            self.scores = self._predicted(end)
        order = sorted(self.scores, key=lambda m: (self.scores[m], m))
        say(
            f"Interval {self.generation + 1}/{len(self.ends)} ({start:,} -> {end:,} samples): "
            + ", ".join(f"{m} {self.scores[m]:.4f}" for m in order)
        )
        if all(math.isinf(score) for score in self.scores.values()):
            self.lineage["error"] = (
                f"every member failed interval {self.generation + 1} (see the logs/ folder); nothing to continue from"
            )
            self.done = True
        elif self.generation == len(self.ends) - 1:
            best, self.done = self.members[order[0]], True
            self.lineage["best"] = {
                "member": best.id,
                "fitness": self.scores[best.id],
                "history": best.history,
                "spec": replay_spec(self.plan.raw, best.history),
            }
        else:
            for exploit in decide(self.members, self.scores, end, self.plan.tune, self.rng):
                self._exploit(exploit, self.generation)
            self.generation += 1
            self.scores = {}
        self._write()

    def _predicted(self, end: int) -> dict[str, float]:
        """Each member's end-of-budget loss as the annealing law predicts it (tune.annealing),
        from every member's curve along its lineage and its schedule's lrs from here on."""
        spec = self.plan.spec
        curves, futures = {}, {}
        for m, member in self.members.items():
            try:
                rows = stitched(self.lineage, m)
            except (OSError, KeyError, TypeError):  # an interval that failed has no run directory: the member ranks last
                rows = []
            lrs = [r.lr for r in rows]
            curves[m] = (lrs[:-1], [r.loss for r in rows[1:]])  # a row's loss is measured after the step before it
            plan = JobSpec.model_validate(member_spec(self.plan.raw, member.values))
            future = [v.lr for v in (step_values(plan, s) for s in range(end, spec.budget_samples, plan.batch.global_batch_size))]
            futures[m] = lrs[-1:] + future
        warmup = math.ceil(spec.schedule.warmup_samples / spec.batch.global_batch_size)
        predicted = predicted_final_losses(curves, futures, skip=warmup)
        for segment in self.lineage["segments"]:
            if segment["generation"] == self.generation:
                segment["predicted_final_loss"] = predicted[segment["member"]]
        return {m: p if math.isfinite(self.scores[m]) else math.inf for m, p in predicted.items()}

    def _exploit(self, exploit, generation: int) -> None:
        """The recipient continues from the donor's checkpoint at the interval's end, cloned."""
        recipient, donor = self.members[exploit.recipient], self.members[exploit.donor]
        started = time.perf_counter()
        source = Checkpointer(donor.root)
        manifest = source.latest()
        if manifest is None or manifest.samples_seen != exploit.samples:
            raise CheckpointError(
                f"donor {donor.id} has no checkpoint at {exploit.samples} samples in {donor.root} "
                f"(newest: {None if manifest is None else manifest.samples_seen}); the interval's end must be durable"
            )
        incarnation = int(recipient.root.rsplit("-", 1)[1]) + 1
        old_root = recipient.root
        recipient.root = str(Path(self.plan.tune_dir) / "checkpoints" / f"{recipient.id}-{incarnation}")
        clone = source.clone(
            manifest.step, Checkpointer(recipient.root), meta={"exploit": {"donor": donor.id, "generation": generation}}
        )
        cloned_s = time.perf_counter() - started
        # What the recipient trained before is not its lineage any more: keep only what clones read.
        Checkpointer(old_root, policy=RetentionPolicy(keep_last=0)).prune()
        recipient.values = exploit.values
        recipient.history = [*donor.history, {"from_samples": exploit.samples, "values": exploit.values}]
        self.lineage["exploits"].append(
            {
                "generation": generation,
                "samples": exploit.samples,
                "recipient": recipient.id,
                "donor": donor.id,
                # Both read through their own fragments: equal only if the clone really reads the donor's bytes.
                "donor_checkpoint": {"uri": source.uri, "step": manifest.step, "content_hash": source.content_hash(manifest)},
                "recipient_checkpoint": {
                    "uri": recipient.root,
                    "step": clone.step,
                    "content_hash": Checkpointer(recipient.root).content_hash(clone),
                },
                "diff": {k: list(v) for k, v in exploit.diff.items()},
                "values": exploit.values,
                "donor_fitness": self.scores[donor.id],
                "recipient_fitness": self.scores[recipient.id],
                "clone_seconds": round(cloned_s, 6),
                "clone_bytes": len(clone.to_json()),
                "time": time.time(),
            }
        )
        if self.plan.metrics_actor:
            exploited = Exploit(time=time.time(), recipient=recipient.id, donor=donor.id)
            ray.get_actor(self.plan.metrics_actor).observe_trial.remote(recipient.id, [], [exploited])
        changes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in exploit.diff.items()) or "no change"
        say(f"  exploit: {recipient.id} takes {donor.id}'s step {manifest.step} (clone, {cloned_s * 1000:.1f} ms); {changes}")

    def _write(self) -> None:
        write_json(Path(self.plan.tune_dir) / LINEAGE, self.lineage)


class PopulationSearcher(Searcher):
    """The population as Ray Tune's search algorithm: Tune runs the trials (placement,
    concurrency, retries), the population decides what each trains, one interval at a time."""

    def __init__(self, plan: SearchPlan):
        super().__init__(metric="fitness", mode="min")
        self.population = Population(plan)
        self.queue: list[dict[str, Any]] = self.population.configs()
        self.running: dict[str, str] = {}  # trial id -> member

    # Ray annotates suggest() as Optional[Dict], yet documents Searcher.FINISHED (a str) as its way to end a search.
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        if self.queue:
            config = self.queue.pop(0)
            self.running[trial_id] = config["member"]
            return config
        if not self.running and self.population.done:
            return Searcher.FINISHED
        return None  # the interval's last trials still run; ask again later

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        member = self.running.pop(trial_id, None)
        if member is None:
            return
        generation = self.population.generation
        self.population.finished(member, result, error)
        if self.population.generation != generation:  # the interval closed and the next one begins
            self.queue = self.population.configs()

    def save(self, checkpoint_path: str) -> None:
        # Tune records its searcher with each experiment checkpoint; the lineage is that record (no pickle).
        Path(checkpoint_path).write_text(json.dumps(self.population.lineage))

    def restore(self, checkpoint_path: str) -> None:
        raise NotImplementedError("a search resumes from its tune directory, not from Tune's experiment state")


def write_json(path: Path, record: dict[str, Any]) -> None:
    """A search's record, replaced whole: a reader never sees half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def say(line: str) -> None:
    print(line, flush=True)
