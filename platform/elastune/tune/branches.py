"""WSD decay branches (`tune.mode: wsd_branches`): one constant-lr trunk, a decay branch forked
for each budget, a loss-vs-budget table from one trunk.

A WSD schedule is constant (after warmup) until its last `decay_fraction` of the span, whatever
the span, so the stable part of every budget's WSD run is the same run. The trunk trains it once
(a constant schedule with the job's warmup); at each budget's fork point (the last step boundary
before its decay starts) the branch clones the trunk's checkpoint (no byte copied) and trains the
decay: a WSD schedule whose horizon is that budget. Each branch, joined to the trunk before its
fork, is exactly the WSD run of that budget (tests/ray/test_tune_branches.py). Cost: the trunk to
the last fork plus every decay, about (1 - f) + f * sum(budgets) / max(budgets) times a single
run of the largest budget (decay fraction f).

Trials: trunk intervals (start -> fork 1 -> fork 2 ...) and branches, each a Tune trial running an
Elastune run (segment.py); a branch starts as soon as the trunk reaches its fork, alongside the
trunk's next interval.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.errors import CheckpointError, SpecError
from elastune.spec.models import JobSpec
from elastune.spec.schedule import WSDSchedule
from elastune.tune.search import SearchPlan, say, trial_spec, write_json

BRANCHES = "branches.json"


def fork_points(spec: JobSpec) -> list[tuple[int, int]]:
    """(fork, budget) for each budget: the last step boundary at or before the budget's WSD decay
    starts (warmup + (1 - decay_fraction) * (budget - warmup) samples)."""
    s, batch = spec.schedule, spec.batch.global_batch_size
    # a wsd_branches job: JobSpec holds it to a WSD schedule, TuneSpec to a list of budgets
    assert isinstance(s, WSDSchedule) and spec.tune is not None and spec.tune.budgets is not None
    out = []
    for budget in spec.tune.budgets:
        decay_start = s.warmup_samples + (1 - s.decay_fraction) * (budget - s.warmup_samples)
        fork = int(decay_start // batch) * batch
        if fork <= s.warmup_samples:
            raise SpecError(
                f"tune.budgets: budget {budget} decays from sample {decay_start:.0f}, within the warmup "
                f"({s.warmup_samples}); raise the budget or lower schedule.warmup_samples"
            )
        out.append((fork, budget))
    return out


def branch_spec(plan: SearchPlan, name: str, root: str, end: int, schedule: dict[str, Any]) -> dict[str, Any]:
    """The trunk's or a branch's trial: the job with this schedule."""
    return trial_spec(plan, {**plan.raw, "schedule": schedule}, name, root, end)


class BranchSearcher(Searcher):
    def __init__(self, plan: SearchPlan):
        super().__init__(metric="fitness", mode="min")
        self.plan = plan
        spec = plan.spec
        self.forks = fork_points(spec)
        self.roots = Path(plan.tune_dir) / "checkpoints"
        wsd = spec.to_dict()["schedule"]
        self.trunk_schedule = {"name": "constant", "warmup_samples": wsd.get("warmup_samples", 0)}
        self.branch_schedule = {k: v for k, v in wsd.items() if k != "horizon_samples"}
        self.queue: list[dict[str, Any]] = []
        self.running: dict[str, dict[str, Any]] = {}
        self.record: dict[str, Any] = {"job": spec.name, "forks": self.forks, "trunk": [], "branches": [], "error": None}
        self.done = False
        self._queue_trunk(0)

    # Ray annotates suggest() as Optional[Dict], yet documents Searcher.FINISHED (a str) as its way to end a search.
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
        if self.queue:
            config = self.queue.pop(0)
            self.running[trial_id] = config
            return config
        return Searcher.FINISHED if self.done and not self.running else None

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        config = self.running.pop(trial_id, None)
        if config is None:
            return
        entry = {
            "from_samples": config["from_samples"],
            "to_samples": config["to_samples"],
            "run_dir": (result or {}).get("run_dir"),
            "loss": (result or {}).get("loss"),
            "fitness": (result or {}).get("fitness"),
            "error": error,
        }
        if config["member"] == "trunk":
            self.record["trunk"].append(entry)
            if error:
                self.record["error"] = f"the trunk failed on its way to {config['to_samples']} samples (see logs/)"
                self.done, self.queue = True, []
            else:
                self._forked(config["generation"])
        else:
            self.record["branches"].append({"budget": config["to_samples"], "fork": config["from_samples"], **entry})
            say(f"Branch {config['to_samples']:,} samples: " + ("failed" if error else f"loss {entry['fitness']:.4f}"))
        self.done = self.done or len(self.record["branches"]) == len(self.forks)
        self._write()

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self.record))

    def restore(self, checkpoint_path: str) -> None:
        raise NotImplementedError("a search resumes from its tune directory, not from Tune's experiment state")

    def _queue_trunk(self, k: int) -> None:
        start = self.forks[k - 1][0] if k else 0
        fork, _ = self.forks[k]
        if fork == start:  # two budgets fork at the same step
            self._forked(k)
            return
        spec = branch_spec(self.plan, "trunk", str(self.roots / "trunk"), fork, self.trunk_schedule)
        self.queue.append(
            {
                "member": "trunk",
                "generation": k,
                "from_samples": start,
                "to_samples": fork,
                "spec": spec,
                "fitness_samples": max(1, (fork - start) // 4),
                "metrics_actor": self.plan.metrics_actor,
            }
        )

    def _forked(self, k: int) -> None:
        """The trunk is at fork k: clone its checkpoint for branch k, queue the branch and the
        trunk's next interval."""
        fork, budget = self.forks[k]
        trunk = Checkpointer(str(self.roots / "trunk"))
        manifest = trunk.latest()
        if manifest is None or manifest.samples_seen != fork:
            raise CheckpointError(
                f"the trunk has no checkpoint at {fork} samples in {trunk.uri}; a trunk interval must end durable"
            )
        started = time.perf_counter()
        root = str(self.roots / f"branch-{budget}")
        trunk.clone(manifest.step, Checkpointer(root))
        cloned_s = time.perf_counter() - started
        schedule = {**self.branch_schedule, "horizon_samples": budget}
        spec = branch_spec(self.plan, f"b{budget}", root, budget, schedule)
        decay = budget - fork
        self.queue.append(
            {
                "member": f"b{budget}",
                "generation": k,
                "from_samples": fork,
                "to_samples": budget,
                "spec": spec,
                "fitness_samples": max(1, decay // 4),
                "metrics_actor": self.plan.metrics_actor,
                "clone_seconds": round(cloned_s, 6),
                "content_hash": trunk.content_hash(manifest),
            }
        )
        say(f"Trunk at {fork:,} samples: branch for {budget:,} forked (clone, {cloned_s * 1000:.1f} ms)")
        if k + 1 < len(self.forks):
            self._queue_trunk(k + 1)

    def _write(self) -> None:
        trained = sum(e["to_samples"] - e["from_samples"] for e in self.record["trunk"] + self.record["branches"])
        self.record["samples_trained"] = trained
        self.record["cost_vs_one_run"] = round(trained / self.forks[-1][1], 4)  # one run of the largest budget
        write_json(Path(self.plan.tune_dir) / BRANCHES, self.record)
