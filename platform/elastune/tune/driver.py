"""`elastune tune JOB`: population-based search over schedules on Ray Tune.

Lays out the search directory, checks the search space, joins or starts Ray, and runs a Tuner
whose search algorithm is the population (search.py) and whose trials are intervals of Elastune
runs (segment.py). Results, in <output_dir>/<job>/tune-<id>/:

  spec.yaml      the job as searched (paths resolved)
  lineage.json   every interval of every member (values, fitness, run directory, checkpoint
                 pointer) and every exploit (donor -> recipient, samples, state hashes, diff)
  best.yaml      the best member's whole schedule as a job spec: `elastune run best.yaml`
                 trains it from scratch to the end (its changes are `phases`)
  runs/          each interval's run directory; checkpoints/ the members' roots; ray/ Tune's own
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console

import ray
from elastune.cluster import connect_ray
from elastune.data.prepare import ensure_prepared
from elastune.events import Population
from elastune.metrics.exporter import RunExporter
from elastune.recipes import load_recipe
from elastune.spec.models import JobSpec
from elastune.train.driver import resolve_paths
from elastune.train.run_dir import new_run_id
from elastune.tune.branches import BRANCHES, BranchSearcher, fork_points
from elastune.tune.population import check_search
from elastune.tune.search import LINEAGE, PopulationSearcher, SearchPlan
from elastune.tune.segment import train_segment

TRIAL_CPUS = 0.01  # a trial only waits for its Ray Train run, whose workers ask for their own CPUs (Tune wants > 0)


@dataclass
class TuneOutcome:
    tune_dir: Path
    status: str  # "succeeded" | "failed"
    best: dict[str, Any] | None
    seconds: float
    error: str | None = None


def run_tune(
    spec: JobSpec, spec_dir: str, *, address: str | None = None, console: Console | None = None, verbose: bool = False
) -> TuneOutcome:
    console = console or Console()
    check_search(spec)
    spec = resolve_paths(spec)
    t = spec.tune
    assert t is not None  # check_search refused a job without a tune: section
    if t.mode == "wsd_branches":
        fork_points(spec)  # refuses budgets that fork inside the warmup
    recipe = load_recipe(spec.model, spec_dir, spec.data.path)
    if recipe.dataset is None:
        ensure_prepared(spec.data)  # once, before members start side by side
    tune_dir = Path(spec.output_dir) / spec.name / f"tune-{new_run_id()}"
    tune_dir.mkdir(parents=True)
    raw = spec.to_dict()
    (tune_dir / "spec.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    console.print(f"Search directory: {tune_dir}", highlight=False)
    per_member = spec.scaling.max_workers * spec.scaling.cpus_per_worker
    side_by_side = t.population if t.mode == "pbt" else 2  # wsd_branches: the trunk and the branch it just forked
    started_ray = connect_ray(spec, address, console, verbose, cpus=side_by_side * (per_member + TRIAL_CPUS) + 1)
    started = time.time()
    exporter = None
    try:
        exporter = search_exporter(spec, tune_dir.name, console)
        plan = SearchPlan(raw, str(tune_dir), None if exporter is None else exporter.name)
        room = ray.cluster_resources().get("CPU", 1) - side_by_side * TRIAL_CPUS
        concurrent = t.max_concurrent_trials or max(1, min(side_by_side, int(room // per_member)))
        if t.mode == "pbt":
            console.print(
                f"Population {t.population}, {len(plan.boundaries())} intervals of {t.interval_samples:,} samples, "
                f"{concurrent} member(s) at a time.",
                highlight=False,
            )
        else:
            assert t.budgets is not None  # TuneSpec requires them of wsd_branches
            console.print(
                f"WSD branches for budgets {', '.join(f'{b:,}' for b in t.budgets)} samples from one constant-lr trunk.",
                highlight=False,
            )
        error = _fit(plan, spec_dir, concurrent, console, verbose)
    finally:
        if exporter is not None:
            exporter.close(tune_dir / "metrics.prom")
        if started_ray:
            ray.shutdown()
    if t.mode == "wsd_branches":
        return _branches_outcome(tune_dir, console, round(time.time() - started, 3), error)
    lineage = json.loads((tune_dir / LINEAGE).read_text()) if (tune_dir / LINEAGE).exists() else {}
    best = lineage.get("best")
    if best:
        (tune_dir / "best.yaml").write_text(yaml.safe_dump(best["spec"], sort_keys=False))
        console.print(
            f"Best: {best['member']} (fitness {best['fitness']:.4f}), {len(lineage['exploits'])} exploit(s). "
            f"Replay its schedule: elastune run {tune_dir / 'best.yaml'}",
            highlight=False,
        )
    # A member whose interval failed (after Tune's retries) ranked last and was replaced; the search still stands.
    return _finished(
        TuneOutcome(
            tune_dir, "succeeded" if best else "failed", best, round(time.time() - started, 3), lineage.get("error") or error
        )
    )


def _finished(outcome: TuneOutcome) -> TuneOutcome:
    """The outcome, recorded as the search directory's result.json."""
    (outcome.tune_dir / "result.json").write_text(
        json.dumps({**outcome.__dict__, "tune_dir": str(outcome.tune_dir)}, indent=2, default=str) + "\n"
    )
    return outcome


def _branches_outcome(tune_dir: Path, console: Console, seconds: float, error: str | None) -> TuneOutcome:
    """The loss-vs-budget table of a wsd_branches search."""
    record: dict[str, Any] = (
        json.loads((tune_dir / BRANCHES).read_text()) if (tune_dir / BRANCHES).exists() else {"branches": [], "forks": [None]}
    )
    done = sorted((b for b in record["branches"] if not b["error"]), key=lambda b: b["budget"])
    for b in done:
        console.print(f"  budget {b['budget']:>10,} samples (forked at {b['fork']:,}): loss {b['fitness']:.4f}", highlight=False)
    ok = len(done) == len(record["forks"]) and not record.get("error")
    if ok:
        console.print(
            f"Cost: {record['samples_trained']:,} samples trained, "
            f"{record['cost_vs_one_run']:.2f}x one run of the largest budget.",
            highlight=False,
        )
    return _finished(TuneOutcome(tune_dir, "succeeded" if ok else "failed", None, seconds, record.get("error") or error))


def search_exporter(spec: JobSpec, search_id: str, console: Console) -> RunExporter | None:
    """The search's Prometheus exporter (`metrics:` in the spec; run label: the search's id):
    population size, each trial's loss and lr as it trains, exploits per trial. Trials find it by
    name; their own runs serve no exporter."""
    m, t = spec.metrics, spec.tune
    if not m.enabled:
        return None
    assert t is not None  # the searched job (run_tune)
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    name = f"elastune-search-metrics-{search_id}"
    exporter = RunExporter(
        spec.name, search_id, m.host, m.port, None, Path(spec.output_dir) / "prometheus-targets", here, name=name
    )
    if t.mode == "pbt":
        exporter.observe([], [Population(time=time.time(), size=t.population)])
        for i in range(t.population):
            exporter.actor.observe_trial.remote(f"m{i}", [], [])  # every trial's exploit count starts at 0
    else:
        assert t.budgets is not None  # TuneSpec requires them of wsd_branches
        trunk_and_branches = Population(time=time.time(), size=len(t.budgets) + 1)
        exporter.observe([], [trunk_and_branches])
    console.print(f"Metrics: http://{exporter.address}/metrics (Prometheus file_sd target {exporter.target}).", highlight=False)
    return exporter


def _fit(plan: SearchPlan, spec_dir: str, concurrent: int, console: Console, verbose: bool) -> str | None:
    from ray import tune

    if not verbose:
        # Tune's default console output prints its banner and paths even at verbose=0; its older
        # reporter honours verbose=0. The search prints its own lines (search.say).
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    spec = plan.spec
    t = spec.tune
    assert t is not None  # the searched job (run_tune)
    window = t.fitness_samples or max(1, (t.interval_samples or 4) // 4)  # wsd_branches: each trial says its own
    trainable = functools.partial(
        train_segment,
        spec_dir=spec_dir,
        fitness_samples=window,
        log_dir=str(Path(plan.tune_dir) / "logs"),
        fitness_of=spec.search_fitness,
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": TRIAL_CPUS}),
        tune_config=tune.TuneConfig(
            # Tune pickles the search algorithm with its own state: it prints with print().
            search_alg=PopulationSearcher(plan) if t.mode == "pbt" else BranchSearcher(plan),
            num_samples=-1,
            max_concurrent_trials=concurrent,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=Path(plan.tune_dir).name,
            storage_path=str(Path(plan.tune_dir) / "ray"),
            verbose=1 if verbose else 0,
            failure_config=tune.FailureConfig(max_failures=spec.scaling.max_failures if spec.scaling.max_failures >= 0 else -1),
        ),
    )
    results = tuner.fit()
    # ResultGrid iterates (by __getitem__ and __len__), though Ray's annotations do not declare it iterable.
    errors = [str(r.error) for r in results if r.error is not None]  # type: ignore[attr-defined]
    return "; ".join(errors) or None


def _trial_name(trial) -> str:
    return f"{trial.config['member']}-interval{trial.config['generation'] + 1}-{trial.trial_id}"
