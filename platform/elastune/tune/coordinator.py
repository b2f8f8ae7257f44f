"""The population actor: where a search's members meet at every interval boundary.

An async Ray actor holding the search's `Population` (tune.search). Every worker of every
member calls `arrive` at a boundary; the call returns once every member has reported and the
interval is closed, with that member's `Instruction` (its decision, as its workers carry it
out). Closing carries out what the decisions need to be durable before anyone acts on them:
each member that goes on makes its boundary state durable and pins it in its checkpoint service
(`CheckpointService.persist`), then each recipient's root gets the clone of its donor's
checkpoint (`CheckpointService.adopt`, or here for a member whose run is down). A call that
comes again for a boundary already closed (a worker restarted, a trial retried) gets the same
decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Any

import ray
from elastune.checkpoint.checkpointer import Checkpointer
from elastune.errors import CheckpointError
from elastune.train.member import Instruction
from elastune.tune.population import Decision, loss_fitness
from elastune.tune.search import LINEAGE, Population, SearchPlan, member_trial_spec, read_json, say

PERSIST_TIMEOUT_S = 300.0  # a member's boundary snapshot is complete once its slowest rank handed it over


def coordinator_name(search_id: str) -> str:
    return f"elastune-population-{search_id}"


class Coordinator:
    def __init__(self, population: Population):
        self.population = population
        self.closed: dict[int, asyncio.Event] = {}
        self.population.write()

    def configs(self) -> list[dict[str, Any]]:
        return self.population.configs()

    def spec_at(self, member: str, samples: int) -> dict[str, Any]:
        """The job as `member` trains it from `samples` (a run starting or restarting there)."""
        m = self.population.members[member]
        return member_trial_spec(self.population.plan, m, m.values_at(samples))

    async def arrive(self, member: str, boundary: int, report: dict[str, Any] | None) -> Instruction:
        """`member` is at `boundary` with `report` (train.member.MemberWorker.after; None: its
        worker restarted there and found none). Returns once every member has reported there
        and the interval is closed."""
        pop = self.population
        if (decided := pop.decision(member, boundary)) is None:
            if pop.done or member not in pop.members:
                return Instruction({}, stop=True)
            if boundary != pop.boundary:
                raise CheckpointError(f"{member} arrived at {boundary} samples, but the population is at {pop.boundary}")
            closed = self.closed.setdefault(boundary, asyncio.Event())
            if report is not None and pop.report(member, self._scored(report, boundary)):
                await self._close(boundary)
            await closed.wait()
            decided = pop.decision(member, boundary)
        if decided is None or member not in pop.members:
            return Instruction({}, stop=True)
        spec = member_trial_spec(pop.plan, pop.members[member], decided.values)
        return Instruction(spec, decided.donor, decided.donor_service, decided.stop)

    def _scored(self, report: dict[str, Any], boundary: int) -> dict[str, Any]:
        """A member's report with its fitness (tune.fitness): the held-out loss there, or the
        mean training loss over the interval's last `window` samples."""
        plan = self.population.plan
        held_out = report.get("eval_loss")
        if plan.spec.search_fitness == "eval_loss" and held_out is not None:
            score = held_out if math.isfinite(held_out) else math.inf  # a diverged member ranks last
        else:
            score = loss_fitness(report["losses"], boundary, plan.window)
        losses = report.get("losses") or []
        return {**report, "fitness": score, "loss": losses[-1][2] if losses else None, "arrived_at": time.time()}

    async def failed(self, member: str) -> tuple[int, bool]:
        """`member`'s trial failed for good: it ranks last at its boundary. Returns (the
        boundary, whether the search is done)."""
        pop = self.population
        boundary = pop.boundary
        if not pop.done and member in pop.members and pop.decision(member, boundary) is None:
            if pop.report(member, None):
                await self._close(boundary)
        return boundary, pop.done

    async def retire(self, member: str) -> None:
        pop = self.population
        if pop.retire(member):
            await self._close(pop.boundary)
        pop.write()

    def lineage(self) -> dict[str, Any]:
        return self.population.lineage

    async def _close(self, boundary: int) -> None:
        """Close the interval at `boundary` and wake every member waiting there. If what the
        decisions need cannot be made durable, the search ends with that error (every member stops)."""
        pop = self.population
        try:
            await self._decide(boundary)
        except Exception as exc:  # every member waits on this close: none may be left waiting
            pop.lineage["error"] = f"the population could not close the interval ending at {boundary:,} samples: {exc}"
            pop.done = True
            pop.decisions[boundary] = {m: Decision(member.values, stop=True) for m, member in pop.members.items()}
            say(pop.lineage["error"])
        pop.write()
        self.closed.setdefault(boundary, asyncio.Event()).set()

    async def _decide(self, boundary: int) -> None:
        pop = self.population
        started = time.time()
        exploits = pop.close()
        recipients = {e.recipient for e in exploits}
        pointers: dict[str, dict[str, Any]] = {}
        goes_on = [m for m in pop.members.values() if m.id not in recipients]
        answers = await asyncio.gather(*(persist(m.service, boundary) for m in goes_on), return_exceptions=True)
        for m, answer in zip(goes_on, answers):
            # A run that went down meanwhile: its last durable checkpoint at the boundary, if any.
            pointers[m.id] = answer if isinstance(answer, dict) and "content_hash" in answer else durable_at(m.root, boundary)
            if pointers[m.id]:
                pop.durable(m.id, pointers[m.id])
        for e in exploits:
            donor, recipient = pop.members[e.donor], pop.members[e.recipient]
            if "content_hash" not in pointers.get(donor.id, {}):
                raise CheckpointError(f"donor {donor.id} has no durable checkpoint at {boundary} samples in {donor.root}")
            meta = {"exploit": {"donor": donor.id, "generation": pop.generation - 1}}
            cloned = time.perf_counter()
            try:
                clone = await service(recipient.service).adopt.remote(donor.root, pointers[donor.id]["step"], meta)
            except (ValueError, ray.exceptions.RayActorError):  # its run is down: the clone is made here
                made = Checkpointer(recipient.root).adopt(donor.root, pointers[donor.id]["step"], meta)
                clone = {
                    "uri": recipient.root,
                    "step": made.step,
                    "content_hash": Checkpointer(recipient.root).content_hash(made),
                    "bytes": len(made.to_json()),
                }
            pop.exploited(e, pointers[donor.id], clone, time.perf_counter() - cloned)
        pop.lineage.setdefault("closes", []).append({"boundary": boundary, "started": started, "decided": time.time()})
        previous = max((b for b in pop.ends if b < boundary), default=None)
        for m in pop.members.values():  # the boundary before's pins: every recipient loaded them before its next step
            if m.service and previous is not None:
                with contextlib.suppress(ValueError):  # that run is gone, and its pins with it
                    ray.get_actor(m.service).unpin.remote(previous)


def service(name: str | None) -> Any:
    """A member's checkpoint service (ValueError: its run is gone)."""
    if name is None:
        raise ValueError("the member has not reported a checkpoint service")
    return ray.get_actor(name)


async def persist(name: str | None, boundary: int) -> dict[str, Any]:
    """A member's state at `boundary` made durable and pinned by its checkpoint service."""
    return await service(name).persist.remote(boundary, PERSIST_TIMEOUT_S)


def durable_at(root: str, boundary: int) -> dict[str, Any]:
    """A member's checkpoint at `boundary` samples in its root, as a pointer (empty: none)."""
    ckpt = Checkpointer(root)
    for step in reversed(ckpt.committed_steps()):
        manifest = ckpt.read_manifest(step)
        if manifest.samples_seen == boundary:
            return {"uri": root, "step": step, "content_hash": ckpt.content_hash(manifest)}
    return {}


def start_coordinator(plan: SearchPlan, search_id: str, resume: bool, scheduling_strategy) -> Any:
    """The search's population actor, on the driver's node (it writes lineage.json there): a new
    population, or (`resume`) the one its lineage.json left."""
    lineage = read_json(f"{plan.tune_dir}/{LINEAGE}") if resume else None
    population = Population.resume(plan, lineage) if lineage else Population(plan)
    actor = ray.remote(num_cpus=0, max_concurrency=1000)(Coordinator)  # type: ignore[call-overload]  # actor options Ray's stubs omit
    return actor.options(name=coordinator_name(search_id), scheduling_strategy=scheduling_strategy).remote(population)
