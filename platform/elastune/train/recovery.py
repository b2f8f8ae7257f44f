"""The driver's account of a run's worker groups: what each (re)start means (a recovery or a
resize, its cause, cost and lost steps), folded from the run's events and rows as they drain.
Pure: no Ray, unit-tested with made-up events (tests/unit/test_faults.py, test_live_rules.py).
"""

from __future__ import annotations

import time
from dataclasses import replace

from elastune.batch_plan import BatchSchedule
from elastune.events import BatchChange, Change, CollectiveFailed, Event, Fault, Join, Leave, Recovery, Resize, Row, Start

FINISH_GRACE_S = 5.0  # after the last step, how long a live group's Ray Train run may take to end before it is ended


def stranded(recovery: str, finished_at: float | None, now: float | None = None) -> bool:
    """Whether a live run whose workers finished training has waited long enough for Ray Train.

    Ray Train ends a run when every replica group is done; a live group that lost a node and got
    no capacity back has one group Ray Train cannot place, and would wait for it forever (one
    still starting when the others finish would train no step either)."""
    if recovery != "live" or finished_at is None:
        return False
    return (time.monotonic() if now is None else now) - finished_at >= FINISH_GRACE_S


class RecoveryTracker:
    """What each start of a worker group means, as one event once its first step completes.

    The run's first start: a `resize` if it resumed a checkpoint saved at another world size.
    A later start (Ray Train restarted the group): a `resize` when the group grew and no fault
    was injected (Ray Train's elastic policy found capacity), else a `recovery`. Both carry the
    cause, world size before and after, lost steps and samples, detection seconds (to the first
    worker whose reduction failed, if one did), restart seconds (end of the old group to the new
    group's start: Ray Train notices a dead worker within its health check, every HEALTH_CHECK_S; the rest is
    tearing down and starting the group) and MTTR (to the first step completed after). Lost
    steps are those the run knows the old group completed past the resumed step (snapshots handed
    over, steps before one that failed or was killed): exact when a survivor saw its reduction
    fail, a lower bound when every worker went at once between spaced snapshots.
    The old group's end is the injected fault's time when there is one, else the last snapshot
    any rank handed over (so both figures are upper bounds).

    A live group reports its own recoveries (the survivors' view, narrowed here to the fault's
    time). What no survivor can report is the loss of every worker at once, after which Ray Train
    starts a whole new group: a step all of whose participants joined after the step before it
    committed is that loss (`live=True`)."""

    def __init__(self, batches: BatchSchedule, live: bool = False):
        self.batches, self.live = batches, live
        self.last_start: Start | None = None
        self.last_fault: Fault | None = None
        self.pending: Change | None = None
        self.last_leave: Leave | None = None
        self.last_row: Row | None = None
        self.since_row: list[Join | Fault] = []  # joins and kills after the last row (live)
        self.noticed: list[float] = []  # when workers of the current group saw a reduction fail
        self.completed = 0  # the newest step the current group is known to have completed

    def observe(self, events: list[Event], rows: list[Row]) -> list[Event]:
        """The events to record for this drain: those given (a live group's recoveries narrowed
        to the injected fault or the leave that explains them), then what the starts and rows
        given mean. The inputs are left as they are."""
        out: list[Event] = []
        derived: list[Event] = []
        for event in events:
            if isinstance(event, Fault) and event.kills:
                self.last_fault = event
                self.since_row.append(event)
                self.completed = max(self.completed, event.step - 1)
            elif isinstance(event, Join):
                self.since_row.append(event)
            elif isinstance(event, CollectiveFailed):
                self.noticed.append(event.time)
                self.completed = max(self.completed, event.step - 1)
            elif isinstance(event, Leave):
                self.last_leave = event
            elif isinstance(event, BatchChange):  # an adaptive batch moved: later samples are in steps of the new one
                self.batches = BatchSchedule(self.batches.base, tuple((h[0], h[1]) for h in event.history))
            elif isinstance(event, Recovery) and event.recovery == "live":
                out.append(self._narrow(event))
                continue
            elif isinstance(event, Start):
                if self.last_start is None:
                    derived += self._resumed_resized(event)
                else:
                    self.pending = self._restarted(event, self.last_start.world_size)
                self.last_start = event
            out.append(event)
        if self.pending is not None and self.last_start is not None:
            done = next((r for r in rows if r.time >= self.last_start.time), None)
            if done is not None:  # the first step the new group completed
                failed_at = self.pending.failed_at or done.time
                derived.append(replace(self.pending, time=done.time, mttr_seconds=round(done.time - failed_at, 3)))
                self.pending = None
        if self.live:
            for row in rows:
                derived += self._whole_group_lost(row)
                self.since_row = [e for e in self.since_row if e.time > row.time]
                self.last_row = row
        return out + derived

    def _whole_group_lost(self, row: Row) -> list[Event]:
        before = self.last_row
        news = [e for e in self.since_row if e.time <= row.time]
        joins = [e for e in news if isinstance(e, Join)]
        if before is None or len({j.replica for j in joins}) < row.world_size:
            return []  # the run's first step, or a survivor trained this step
        kills = [e for e in news if isinstance(e, Fault)]
        if kills:
            self.last_fault = None  # accounted for here
        failed_at = min(e.time for e in kills) if kills else before.time
        resumed = min(j.step for j in joins)
        resumed_samples = min(j.samples_seen for j in joins if j.step == resumed)
        tiers = [j.resumed_from_tier for j in joins if j.resumed_from_tier is not None]
        return [
            Recovery(
                time=row.time,
                recovery="restart",
                step=row.step,
                cause="; ".join(map(fault_cause, kills)) if kills else "every worker of the live group was lost",
                world_size_before=before.world_size,
                world_size_after=row.world_size,
                global_batch_size=row.global_batch_size,
                micro_batches=row.micro_batches,
                resumed_from_step=resumed,
                resumed_from_tier=max(tiers, default=None),
                lost_steps=max(0, before.step - resumed),
                lost_samples=max(0, before.samples_seen - resumed_samples),
                failed_at=failed_at,
                restart_seconds=round(min(j.time for j in joins) - failed_at, 3),
                mttr_seconds=round(row.time - failed_at, 3),
            )
        ]

    def _resumed_resized(self, start: Start) -> list[Event]:
        saved = start.saved_world_size
        if saved in (None, start.world_size) or start.resumed_from_step is None:
            return []
        return [
            Resize(
                time=start.time,
                cause=f"resumed a checkpoint saved by {saved} worker(s)",
                step=start.resumed_from_step,
                world_size_before=saved,
                world_size_after=start.world_size,
                global_batch_size=self.batches.at(start.resumed_samples_seen or 0),
                micro_batches=start.micro_batches,
            )
        ]

    def _restarted(self, start: Start, before: int) -> Change:
        """The change a restarted group makes, but for its MTTR (known at its first step)."""
        fault, self.last_fault = self.last_fault, None
        failed_at = fault.time if fault else start.last_staged_at or start.time
        detected = min((t for t in self.noticed if t >= failed_at), default=None)
        # Steps past the resumed one: those handed over in snapshots (the worker's restore counts
        # them) or completed before a step that failed or was killed (between spaced snapshots).
        lost = max(start.lost_steps, self.completed - (start.resumed_from_step or 0))
        resumed = start.resumed_samples_seen or 0
        self.noticed, self.completed = [], 0
        grew = fault is None and start.world_size > before
        change: type[Recovery] | type[Resize] = Resize if grew else Recovery
        if grew:
            cause = f"capacity for {start.world_size} workers (Ray Train's elastic policy restarted the group)"
        else:
            cause = fault_cause(fault) if fault else "worker group restarted"
        return change(
            time=start.time,
            cause=cause,
            failed_at=failed_at,
            step=start.resumed_from_step,
            world_size_before=before,
            world_size_after=start.world_size,
            global_batch_size=self.batches.at(resumed),
            micro_batches=start.micro_batches,
            resumed_from_step=start.resumed_from_step,
            resumed_from_tier=start.resumed_from_tier,
            lost_steps=lost,
            lost_samples=self.batches.samples_after(lost, resumed) - resumed,
            detection_seconds=None if detected is None else round(detected - failed_at, 3),
            restart_seconds=round(start.time - failed_at, 3),
        )

    def _narrow(self, event: Recovery) -> Recovery:
        """A live group's recovery, as its survivors saw it: their failure time is the failed
        step's start; an injected fault's time, when there is one, is closer to the crash."""
        leave, self.last_leave = self.last_leave, None
        if leave is not None and event.detection_seconds is None:  # no step failed: a worker left
            return replace(
                event,
                cause=f"rank {leave.replica} left: {leave.reason}",
                failed_at=leave.time,
                mttr_seconds=round(event.time - leave.time, 3),
            )
        fault, self.last_fault = self.last_fault, None
        failed_at = event.failed_at if event.failed_at is not None else event.time
        after = event.failed_after if event.failed_after is not None else failed_at
        if fault is None or not after <= fault.time <= event.time:
            return event
        detection = event.detection_seconds
        if detection is not None:
            detection = round(max(0.0, failed_at + detection - fault.time), 3)
        return replace(
            event,
            cause=fault_cause(fault),
            failed_at=fault.time,
            detection_seconds=detection,
            mttr_seconds=round(event.time - fault.time, 3),
        )


def fault_cause(fault: Fault) -> str:
    what = "kill rank" if fault.action == "kill_rank" else "kill the node of rank"
    return f"fault: {what} {fault.rank} at step {fault.step} ({fault.point})"
