"""Failures on purpose: the spec's `faults:` happen at the rank, step and point they name, once per run.

Used by tests, benchmarks and users rehearsing failures; nothing here runs unless the spec lists a
fault. "Once" is per run, not per worker group: the run's sink grants each fault to the first
worker that claims it, so a restarted group that redoes the step does not fail again.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace

from elastune.events import Fault as Fired
from elastune.spec.scaling import DelayRank, Fault, KillNode

POLL_S = 0.05  # how often a stall that ends at a join asks the run's sink


def due(faults: list[Fault], rank: int, step: int, point: str) -> list[int]:
    """Indexes of the faults that fire on `rank` during `step` at `point` ("start" or "mid")."""
    return [
        i
        for i, f in enumerate(faults)
        if f.rank == rank and f.at_step == step and (f.point if hasattr(f, "point") else "start") == point
    ]


class FaultInjector:
    """`on_driver_node`: whether this worker shares the driver's node (a node kill is skipped there)."""

    def __init__(
        self,
        faults: list[Fault],
        rank: int,
        claim: Callable[[str], bool],
        record: Callable[[Fired], None],
        on_driver_node: bool = False,
        rejoined: Callable[[], bool] = lambda: False,
    ):
        self.faults, self.rank, self.claim, self.record = faults, rank, claim, record
        self.on_driver_node, self.rejoined = on_driver_node, rejoined

    def at(self, step: int, point: str) -> None:
        for i in due(self.faults, self.rank, step, point):
            if not self.claim(f"fault-{i}"):
                continue  # already happened in this run
            fault = self.faults[i]
            event = Fired(time=time.time(), index=i, step=step, point=point, **fault.model_dump(exclude={"point"}))
            if isinstance(fault, DelayRank):
                self.record(event)
                self.stall(fault)
                continue
            raylet = None
            if isinstance(fault, KillNode):
                raylet = None if self.on_driver_node else node_process()
                if raylet is None:
                    skipped = "the worker runs on the driver's node" if self.on_driver_node else "no raylet above this worker"
                    event = replace(event, skipped=skipped)
                    self.record(event)
                    continue
            self.record(event)  # before acting: a killed worker says nothing afterwards
            if raylet is not None:
                os.kill(raylet, signal.SIGKILL)  # the node: its workers follow their raylet
            os.kill(os.getpid(), signal.SIGKILL)

    def stall(self, fault: DelayRank) -> None:
        if not fault.until_join:
            time.sleep(fault.seconds)
            return
        deadline = time.monotonic() + fault.seconds
        while time.monotonic() < deadline and not self.rejoined():
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))


def node_process() -> int | None:
    """PID of the raylet this worker process was started by (Ray workers are its children)."""
    try:
        ppid = os.getppid()
        with open(f"/proc/{ppid}/comm") as f:
            return ppid if f.read().strip() == "raylet" else None
    except OSError:
        return None
