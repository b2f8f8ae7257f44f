"""The worker group a step runs in, and the account of who trained each step.

`StaticGroup` is the group Ray Train made (`recovery: restart`); `train.live.LiveGroup` is a
torchft quorum per step (`recovery: live`). Both give the loop (progress, rank, world size) at
the start of a step and reduce its gradients.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from elastune.events import Recovery, Resize
from elastune.train.state import Progress
from elastune.train.step import StepStats


def first_line(error: BaseException) -> str:
    """An error as an event carries it: its first line, at most 300 characters."""
    return (str(error).splitlines() or [""])[0][:300]


class Group(Protocol):
    """What the worker loop asks of its group, static or live."""

    def begin(self, progress: Progress) -> tuple[Progress, int, int]:
        """At a step boundary: (progress, this worker's rank, world size) for the next step. A live
        group's quorum may heal this worker first, so progress may move."""
        ...

    def reduce(self, grads: StepStats) -> bool:
        """Complete the step's SUM over its participants; False: a peer was lost, apply nothing."""
        ...

    def error(self) -> str | None:
        """Why the last reduction did not go through, for the event (None: it did)."""
        ...

    def close(self) -> None: ...


class StaticGroup:
    """The worker group as Ray Train made it (`recovery: restart`): fixed rank and size; a failure
    ends the group and Ray Train restarts it.

    `noticed(error)` is called when a reduction fails (a lost peer closes its connections, so the
    survivors see it here first): the moment the group detected the failure."""

    def __init__(self, rank: int, world_size: int, noticed: Callable[[str], None]):
        self.rank, self.world_size, self.noticed = rank, world_size, noticed

    def begin(self, progress: Progress) -> tuple[Progress, int, int]:
        return progress, self.rank, self.world_size

    def reduce(self, grads: StepStats) -> bool:
        try:
            return grads.all_reduce()
        except Exception as exc:
            self.noticed(first_line(exc))
            raise

    def error(self) -> str | None:
        return None

    def close(self) -> None:
        pass


class Membership:
    """Who trained each step, as events: a step that failed, or a quorum smaller than the last,
    is a `Recovery` once a step commits again; a larger quorum is a `Resize` (a worker joined).

    Every participant keeps one and reports what it saw; the run's sink keeps the first report of
    each event (the worker that would have been the one to report may be the one that died).
    The failure time is the failed step's start, or the last commit when a worker left between
    steps: the crash came after it, so MTTR here is an upper bound (the driver narrows it to the
    injected fault's time when there is one). `failed_after` is this worker's last commit: the
    peer's crash came after it, but not necessarily after this worker's step start (ranks start a
    step at slightly different moments), so it bounds the window in which a fault explains it.
    `clock`: Unix seconds (tests give their own).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.world: int | None = None
        self.last_commit = clock()
        self.failure: _Failure | None = None

    def failed(self, step: int, world: int, started_at: float, error: str | None) -> None:
        if self.failure is None:
            self.failure = _Failure(step, world, started_at, self.last_commit, self.clock(), error)

    def committed(self, step: int, world: int, micro_batches: tuple[int, ...], global_batch_size: int) -> list[Recovery | Resize]:
        """Events for `step` committed by `world` workers (its plan's split and global batch)."""
        now, before = self.clock(), self.world
        events: list[Recovery | Resize] = []
        if self.failure is not None or (before is not None and world < before):
            f = self.failure or _Failure(step, before, self.last_commit, self.last_commit, None, None)
            cause = f"worker lost during step {f.step}" if self.failure else f"worker left before step {step}"
            events.append(
                Recovery(
                    time=now,
                    step=step,
                    recovery="live",
                    cause=cause + (f" ({f.error})" if f.error else ""),
                    world_size_before=f.world,
                    world_size_after=world,
                    micro_batches=micro_batches,
                    global_batch_size=global_batch_size,
                    resumed_from_step=step - 1,
                    failed_at=f.at,
                    failed_after=f.after,
                    detection_seconds=None if f.detected is None else round(f.detected - f.at, 3),
                    mttr_seconds=round(now - f.at, 3),
                )
            )
        elif before is not None and world > before:
            events.append(
                Resize(
                    time=now,
                    step=step - 1,
                    world_size_before=before,
                    world_size_after=world,
                    micro_batches=micro_batches,
                    global_batch_size=global_batch_size,
                )
            )
        self.world, self.last_commit, self.failure = world, now, None
        return events


@dataclass(frozen=True)
class _Failure:
    """A step that failed on this worker: when it started, this worker's last commit before it,
    and when the failure was seen (None: a worker left between steps)."""

    step: int
    world: int | None
    at: float
    after: float
    detected: float | None
    error: str | None
