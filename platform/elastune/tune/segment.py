"""Tune trials. `train_member` (pbt): a member's run for the whole search, meeting its population
at every boundary (train.member). `train_segment` (wsd_branches): a trunk or branch trains one
stretch as an ordinary Elastune run (Ray Train workers, exact global batch, resumable at any
world size) and reports its fitness.

The run resumes from the member's checkpoint root (its own last interval's end, or the clone of
a donor's) and stops at the interval's end, which it makes durable. Tune is handed a pointer to
that checkpoint (a small JSON file: root, step, content hash), never the tensors: the checkpoint
service's checkpoints are the only copy.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.format import Manifest
from elastune.errors import ElastuneError
from elastune.events import Event, Row, read_rows
from elastune.spec.load import validate_spec
from elastune.train.driver import run_job
from elastune.train.evaluate import checkpoint_eval_loss
from elastune.train.member import MemberLink
from elastune.tune.population import fitness

POINTER = "elastune-checkpoint.json"


def train_segment(config: dict[str, Any], *, spec_dir: str, fitness_samples: int, log_dir: str, fitness_of: str = "loss") -> None:
    """`fitness_of` (tune.fitness): "loss", the mean training loss over the interval's last
    `fitness_samples`, or "eval_loss", the held-out loss of the parameters it ends with."""
    spec = validate_spec(config["spec"])
    log = Path(log_dir) / f"{config['member']}-g{config['generation']}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    observe = trial_observer(config["metrics_actor"], config["member"]) if config.get("metrics_actor") else None
    with log.open("a") as out:
        outcome = run_job(spec, spec_dir, console=Console(file=out, width=160, soft_wrap=True), observe=observe)
    if outcome.status != "succeeded":
        raise ElastuneError(f"member {config['member']} interval {config['generation'] + 1} failed: {outcome.error} (log: {log})")
    assert outcome.run_dir is not None  # a run that succeeded has its run directory
    rows = read_rows(outcome.run_dir)
    ckpt = Checkpointer(spec.checkpoint_path)
    end = ckpt.latest()
    assert end is not None  # a run that succeeded made its final step durable
    pointer = pointer_of(ckpt, end)
    eval_loss = checkpoint_eval_loss(spec, spec_dir, ckpt, end) if fitness_of == "eval_loss" else None
    if eval_loss is not None:
        score = eval_loss if math.isfinite(eval_loss) else math.inf  # a diverged member ranks last
    else:
        score = fitness(rows, config["to_samples"], config.get("fitness_samples", fitness_samples))
    metrics = {
        "fitness": score,
        "eval_loss": eval_loss,
        "loss": rows[-1].loss if rows else None,
        "samples_seen": outcome.samples_seen,
        "member": config["member"],
        "generation": config["generation"],
        "run_dir": str(outcome.run_dir),
        "elastune_checkpoint": pointer,  # ("checkpoint" is a key Tune keeps for itself)
    }
    report_pointer(metrics, pointer)


def train_member(
    config: dict[str, Any], *, spec_dir: str, log_dir: str, coordinator: str, boundaries: tuple[int, ...], held_out: bool
) -> None:
    """A member's trial: its run from wherever its root stands to the budget. A trial Tune retries
    resumes from the root (the last durable boundary, or a step after it)."""
    import ray

    member = config["member"]
    spec = validate_spec(config["spec"])
    link = MemberLink(coordinator, member, tuple(boundaries), held_out)
    log = Path(log_dir) / f"{member}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    observe = trial_observer(config["metrics_actor"], member) if config.get("metrics_actor") else None
    with log.open("a") as out:
        outcome = run_job(spec, spec_dir, console=Console(file=out, width=160, soft_wrap=True), observe=observe, member=link)
    ckpt = Checkpointer(spec.checkpoint_path)
    end = ckpt.latest()
    if outcome.status == "complete" and end is not None:  # ended at the budget before it reported there
        ray.get(ray.get_actor(coordinator).arrive.remote(member, end.samples_seen, end.meta.get("boundary_report")))
    elif outcome.status != "succeeded":
        raise ElastuneError(f"member {member} failed: {outcome.error} (log: {log})")
    assert end is not None  # a run that succeeded made its final step durable
    pointer = pointer_of(ckpt, end)
    lineage: Any = ray.get(ray.get_actor(coordinator).lineage.remote())
    ended = next(s for s in reversed(lineage["segments"]) if s["member"] == member)
    metrics = {
        "fitness": ended["fitness"],
        "eval_loss": ended["eval_loss"],
        "loss": ended["loss"],
        "samples_seen": end.samples_seen,
        "member": member,
        "run_dir": None if outcome.run_dir is None else str(outcome.run_dir),
        "elastune_checkpoint": pointer,  # ("checkpoint" is a key Tune keeps for itself)
    }
    report_pointer(metrics, pointer)


def pointer_of(ckpt: Checkpointer, manifest: Manifest) -> dict[str, Any]:
    """What Tune is told of a trial's checkpoint: where it is and what it holds, no tensor."""
    return {
        "uri": ckpt.uri,
        "step": manifest.step,
        "samples_seen": manifest.samples_seen,
        "content_hash": ckpt.content_hash(manifest),
    }


def report_pointer(metrics: dict[str, Any], pointer: dict[str, Any]) -> None:
    """Report a trial's metrics to Tune with a checkpoint folder that holds only `pointer`."""
    from ray import tune

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / POINTER).write_text(json.dumps(pointer))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def trial_observer(actor_name: str, member: str):
    """Forwards a member's metrics rows, as its run drains them, to the search's exporter."""
    import ray

    exporter = ray.get_actor(actor_name)

    def observe(rows: list[Row], events: list[Event]) -> None:
        if rows:
            exporter.observe_trial.remote(member, rows, [])

    return observe
