"""A search member's side of its boundaries, in its workers (the worker loop calls it).

A member of a population search is one Elastune run for the whole search. Its steps follow the
job as the population has it train (the member's values applied, `spec_at`), not the spec it was
started with; at each interval boundary every worker stops at the same sample count, works out
the member's report (the interval's training losses, and the held-out loss of the parameters
there when the search ranks by it), hands the boundary's state to its checkpoint service with
the report inside it (so a worker restarted there reports the same), and asks the population
actor (tune.coordinator, by name: this module knows only its calls) what to do: go on as told,
or first load a donor's state, from the donor's checkpoint service (tier 0, the object store) or,
when that is gone, from the clone of it in the member's own root.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

import ray
from elastune.events import Boundary, Row
from elastune.spec.models import JobSpec
from elastune.train.state import Progress
from elastune.train.step import StepContext


@dataclass(frozen=True)
class MemberLink:
    """What a member's workers need of the search (plain data: it crosses processes)."""

    coordinator: str  # the population actor's name
    member: str
    boundaries: tuple[int, ...]  # samples at each interval's end; the last is the budget
    held_out: bool  # whether the search ranks by held-out loss (tune.fitness eval_loss)


@dataclass(frozen=True)
class Instruction:
    """What a member's workers do at a boundary (the population's decision, for them): train on
    as `spec` (the job with its values from here), after loading `donor`'s state there (from its
    checkpoint service `donor_service`, or the clone in its own root) if `donor`; or, `stop`, end
    its run (the search ended without it)."""

    spec: dict[str, Any]
    donor: str | None = None
    donor_service: str | None = None
    stop: bool = False


class MemberWorker:
    """One worker's link to the population."""

    def __init__(self, link: MemberLink, service: str, run_dir: str):
        self.link, self.service, self.run_dir = link, service, run_dir
        self.actor: Any = ray.get_actor(link.coordinator)
        self.rows: list[Row] = []  # this interval's, for the loss fitness

    def spec_at(self, samples: int) -> JobSpec:
        """The job as this member trains it from `samples` on."""
        return JobSpec.model_validate(ray.get(self.actor.spec_at.remote(self.link.member, samples)))

    def due(self, samples: int) -> bool:
        return samples in self.link.boundaries

    def after(
        self,
        row: Row,
        step: StepContext,
        rank: int,
        world: int,
        sharded: bool,
        batches: Callable[[], list[Any]] | None = None,
    ) -> dict[str, Any] | None:
        """After each step (its metrics `row`): at a boundary, this member's report there (the
        same on every rank): the interval's steps as [samples_seen, global batch, loss], the
        held-out loss if the search ranks by it, where its checkpoint service and run directory
        are, and an adaptive batch's history to here (`batches()`, asked there only); else None."""
        self.rows.append(row)
        if not self.due(row.samples_seen):
            return None
        losses = [[r.samples_seen, r.global_batch_size, r.loss] for r in self.rows]
        self.rows = []
        return {
            "losses": losses,
            "eval_loss": held_out_loss(step, rank, world, sharded) if self.link.held_out else None,
            "service": self.service,
            "run_dir": self.run_dir,
            "batch_history": batches() if batches is not None else None,
        }

    def meet(
        self,
        progress: Progress,
        report: dict[str, Any] | None,
        load: Callable[[dict[str, Any] | None], tuple[Progress, int | None]],
    ) -> tuple[JobSpec | None, Progress, Boundary]:
        """At the boundary `progress`: wait until every member has reported there (`report`: this
        member's; None from a worker restarted there whose snapshot held none) and the population
        has decided, then carry the decision out: load the donor's state if it exploits one
        (`load(handle)`: the donor's pinned in-memory snapshot, or None: what this member's own
        checkpoint service and root hold now, the clone), returning the job as trained from here
        (None: the run stops here), the progress (a donor's steps may number otherwise) and what
        happened."""
        started = time.perf_counter()
        decision: Instruction = ray.get(self.actor.arrive.remote(self.link.member, progress.samples_seen, report))
        waited = time.perf_counter() - started
        tier = seconds = None
        if decision.donor is not None:
            handle: dict[str, Any] | None = None
            if decision.donor_service is not None:
                try:
                    donor: Any = ray.get_actor(decision.donor_service)
                    handle = ray.get(donor.pinned.remote(progress.samples_seen))
                except (ValueError, ray.exceptions.RayActorError):  # the donor's run is down: its clone is in our root
                    handle = None
            progress, tier = load(handle)
            seconds = time.perf_counter() - started - waited
        event = Boundary(
            time=time.time(),
            member=self.link.member,
            samples_seen=progress.samples_seen,
            step=progress.step,
            waited_seconds=round(waited, 6),
            donor=decision.donor,
            tier=tier,
            load_seconds=None if seconds is None else round(seconds, 6),
            stop=decision.stop,
        )
        return (JobSpec.model_validate(decision.spec) if decision.spec else None), progress, event


def held_out_loss(step: StepContext, rank: int, world: int, sharded: bool) -> float:
    """The held-out loss of the parameters at a boundary, exactly as a run's evaluation takes it.
    A sharded model's ranks read their shares of the windows together (their forward passes gather
    the parameters) and add their float64 sums; a whole model is read by each rank alone (no
    collective: a live group's ranks have no process group of their own)."""
    evaluation = step.evaluation
    assert evaluation is not None  # tune.fitness eval_loss needs the job's eval: section (TuneSpec)
    if not sharded:
        total, count = evaluation.share(step.forward, step.recipe, 0, 1, step.precision)
        return float(total) / count
    total, count = evaluation.share(step.forward, step.recipe, rank, world, step.precision, together=True)
    sums = torch.stack([total, torch.tensor(float(count), dtype=torch.float64, device=total.device)])
    dist.all_reduce(sums)
    return float(sums[0] / sums[1])
