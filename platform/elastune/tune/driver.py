"""`elastune tune JOB`: population-based search over schedules on Ray Tune.

Lays out the search directory (or finds the unfinished one to resume), checks the search space,
joins or starts Ray, and runs a Tuner: for pbt, one trial per member for the whole search (a run
that stays up, train.member) and the population actor they meet at each boundary
(tune.coordinator); for wsd_branches, the trunk's and branches' stretches (tune.branches).
Results, in <output_dir>/<job>/tune-<id>/:

  spec.yaml      the job as searched (paths resolved)
  lineage.json   every interval of every member (values, fitness, run directories, checkpoint
                 pointer) and every exploit (donor -> recipient, samples, state hashes, diff),
                 with the population's state a resumed search goes on from
  best.yaml      the best member's whole schedule as a job spec: `elastune run best.yaml`
                 trains it from scratch to the end (its changes are `phases`)
  runs/          the members' run directories; checkpoints/ their roots; ray/ Tune's own
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console

import ray
from elastune.checkpoint.lease import Holder, process_alive, this_process
from elastune.cluster import connect_ray
from elastune.data.prepare import ensure_prepared
from elastune.errors import SpecError
from elastune.events import Exploit, Population
from elastune.metrics.exporter import RunExporter
from elastune.recipes import load_recipe
from elastune.spec.load import validate_spec
from elastune.spec.models import JobSpec
from elastune.train.driver import resolve_paths
from elastune.train.run_dir import new_run_id
from elastune.tune.branches import BRANCHES, BranchSearcher, fork_points
from elastune.tune.coordinator import coordinator_name, start_coordinator
from elastune.tune.population import check_search
from elastune.tune.search import LINEAGE, PopulationSearcher, SearchPlan, read_json, write_json
from elastune.tune.segment import train_member, train_segment

DRIVER = "driver.json"  # the process driving the search: a search is resumed only once it is gone
TRIAL_CPUS = 0.01  # a trial only waits for its Ray Train run, whose workers ask for their own CPUs (Tune wants > 0)


@dataclass
class TuneOutcome:
    tune_dir: Path
    status: str  # "succeeded" | "failed"
    best: dict[str, Any] | None
    seconds: float
    error: str | None = None


def run_tune(
    spec: JobSpec,
    spec_dir: str,
    *,
    address: str | None = None,
    console: Console | None = None,
    verbose: bool = False,
    fresh: bool = False,
) -> TuneOutcome:
    """Run the search; a population search whose driver died (an unfinished search directory of
    the same spec) is resumed unless `fresh`."""
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
    raw = spec.to_dict()
    resumed = None if fresh or t.mode != "pbt" else unfinished_search(spec)
    if resumed is not None:
        tune_dir = resumed
        console.print(
            f"Resuming the unfinished search {tune_dir} (its driver stopped); its members resume from their checkpoints. "
            f"To start over instead: --fresh",
            highlight=False,
        )
    else:
        tune_dir = Path(spec.output_dir) / spec.name / f"tune-{new_run_id()}"
        tune_dir.mkdir(parents=True)
        (tune_dir / "spec.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        console.print(f"Search directory: {tune_dir}", highlight=False)
    write_json(tune_dir / DRIVER, asdict(this_process(tune_dir.name, spec.name)))  # who drives it now (unfinished_search)
    per_member = spec.scaling.max_workers * spec.scaling.cpus_per_worker
    side_by_side = t.population if t.mode == "pbt" else 2  # wsd_branches: the trunk and the branch it just forked
    started_ray = connect_ray(spec, address, console, verbose, cpus=side_by_side * (per_member + TRIAL_CPUS) + 1)
    started = time.time()
    exporter = None
    try:
        prior = (read_json(tune_dir / LINEAGE) or {}) if resumed is not None else {}
        exporter = search_exporter(spec, tune_dir.name, console, [e["recipient"] for e in prior.get("exploits", [])])
        plan = SearchPlan(raw, str(tune_dir), None if exporter is None else exporter.name)
        room = ray.cluster_resources().get("CPU", 1) - side_by_side * TRIAL_CPUS
        concurrent = t.max_concurrent_trials or max(1, min(side_by_side, int(room // per_member)))
        if t.mode == "pbt":
            if room // per_member < t.population:
                raise SpecError(
                    f"tune.population is {t.population}, whose members all train at once ({per_member:g} CPUs each: "
                    f"scaling.max_workers x scaling.cpus_per_worker), but the cluster holds {int(room // per_member)}; "
                    f"lower tune.population or scaling.max_workers, or add nodes"
                )
            console.print(
                f"Population {t.population}, {len(plan.boundaries())} intervals of {t.interval_samples:,} samples, "
                f"every member one run for the whole search.",
                highlight=False,
            )
        else:
            assert t.budgets is not None  # TuneSpec requires them of wsd_branches
            console.print(
                f"WSD branches for budgets {', '.join(f'{b:,}' for b in t.budgets)} samples from one constant-lr trunk.",
                highlight=False,
            )
        error = _fit(plan, spec_dir, concurrent, console, verbose, resumed is not None)
    finally:
        if exporter is not None:
            exporter.close(tune_dir / "metrics.prom")
        if started_ray:
            ray.shutdown()
    if t.mode == "wsd_branches":
        return _branches_outcome(tune_dir, console, round(time.time() - started, 3), error)
    lineage = read_json(tune_dir / LINEAGE) or {}
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


def search_exporter(spec: JobSpec, search_id: str, console: Console, exploited: Sequence[str] = ()) -> RunExporter | None:
    """The search's Prometheus exporter (`metrics:` in the spec; run label: the search's id):
    population size, each trial's loss and lr as it trains, exploits per trial (`exploited`: the
    recipients of a resumed search's exploits so far, so its counts go on). Trials find it by
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
        for i in range(t.population):  # every trial's exploit count starts at 0, or where a resumed search's stood
            before = [Exploit(time=time.time(), recipient=f"m{i}", donor="") for m in exploited if m == f"m{i}"]
            exporter.actor.observe_trial.remote(f"m{i}", [], before)
    else:
        assert t.budgets is not None  # TuneSpec requires them of wsd_branches
        trunk_and_branches = Population(time=time.time(), size=len(t.budgets) + 1)
        exporter.observe([], [trunk_and_branches])
    console.print(f"Metrics: http://{exporter.address}/metrics (Prometheus file_sd target {exporter.target}).", highlight=False)
    return exporter


def unfinished_search(spec: JobSpec) -> Path | None:
    """The newest search directory of this very spec that has a population's state but no
    result and whose driver is not running on this host (it died mid-search), if any."""
    raw = spec.to_dict()
    for folder in sorted((Path(spec.output_dir) / spec.name).glob("tune-*"), reverse=True):
        lineage, driver = read_json(folder / LINEAGE), read_json(folder / DRIVER)
        if (folder / "result.json").exists() or lineage is None or "state" not in lineage:
            continue
        if driver is not None and process_alive(Holder(**driver)):  # another `elastune tune` drives it now
            continue
        try:
            same = validate_spec(yaml.safe_load((folder / "spec.yaml").read_text())).to_dict() == raw
        except (OSError, yaml.YAMLError, SpecError):
            same = False
        if same:
            return folder
    return None


def _fit(plan: SearchPlan, spec_dir: str, concurrent: int, console: Console, verbose: bool, resume: bool) -> str | None:
    from ray import tune

    if not verbose:
        # Tune's default console output prints its banner and paths even at verbose=0; its older
        # reporter honours verbose=0. The search prints its own lines (search.say).
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    spec = plan.spec
    t = spec.tune
    assert t is not None  # the searched job (run_tune)
    log_dir = str(Path(plan.tune_dir) / "logs")
    searcher: PopulationSearcher | BranchSearcher
    if t.mode == "pbt":
        name = coordinator_name(Path(plan.tune_dir).name)
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        coordinator = start_coordinator(plan, Path(plan.tune_dir).name, resume, here)
        searcher = PopulationSearcher(plan, name, ray.get(coordinator.configs.remote()))
        trainable: Any = functools.partial(
            train_member,
            spec_dir=spec_dir,
            log_dir=log_dir,
            coordinator=name,
            boundaries=tuple(plan.boundaries()),
            held_out=spec.search_fitness == "eval_loss",
        )
        concurrent = t.population  # every member stays up (run_tune checked the cluster holds them)
    else:
        searcher = BranchSearcher(plan)
        trainable = functools.partial(
            train_segment, spec_dir=spec_dir, fitness_samples=plan.window, log_dir=log_dir, fitness_of=spec.search_fitness
        )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": TRIAL_CPUS}),
        tune_config=tune.TuneConfig(
            # Tune pickles the search algorithm with its own state: it prints with print().
            search_alg=searcher,
            num_samples=-1,
            max_concurrent_trials=concurrent,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=f"{Path(plan.tune_dir).name}-{new_run_id()}" if resume else Path(plan.tune_dir).name,
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
    if "generation" in trial.config:  # a wsd_branches stretch
        return f"{trial.config['member']}-interval{trial.config['generation'] + 1}-{trial.trial_id}"
    return f"{trial.config['member']}-{trial.trial_id}"
