"""How often a run snapshots into tier 0 under `checkpoint.snapshot_every_steps: auto`.

A snapshot costs its worker the copy into host memory (the stall) and the hand-over to the
checkpoint service (checksums, one actor call) on a background thread that shares the worker's
cores; on the days nothing fails that is pure overhead. `auto` spaces snapshots so that this cost
stays within SNAPSHOT_BUDGET of the time the steps between them take (and they are never more
than MAX_GAP_S of training apart, since metrics rows travel with them). What a restart then loses is
bounded by the same figure: at most interval - 1 steps, about cost / SNAPSHOT_BUDGET seconds of
training (50 snapshot costs). A live group loses no step either way: survivors keep their state.

Every rank must snapshot the same steps (a step is complete in tier 0 only once its writer, or
every rank, has handed it over), so the interval is computed from figures every rank holds alike:
each rank's own estimates travel in the step's statistics all-reduce (train.step.GradBuffer) and
every rank reads back the same sums. Intervals are powers of two and a snapshot is due when the
step is a multiple of the interval, so the steps of a longer interval are among those of a shorter
one: while the estimates move, the gap between snapshots never exceeds the larger interval.
"""

from __future__ import annotations

from typing import Literal

SNAPSHOT_BUDGET = 0.02  # of the training time between two snapshots
# Rows reach the run directory with snapshots (exactly once after a failure), so the gap is also
# how stale the metrics a user watches may be: never more than this much training time.
MAX_GAP_S = 30.0
SMOOTHING = 0.2  # weight of the newest figure in each running estimate


def snapshot_interval(cost_s: float, step_s: float, cap: int, budget: float = SNAPSHOT_BUDGET) -> int:
    """The smallest power of two k with cost_s <= budget * k * step_s, at most the largest power of
    two <= cap and <= MAX_GAP_S / step_s (and at least 1)."""
    top = 1 << (max(1, min(cap, int(MAX_GAP_S / step_s) if step_s > 0 else cap)).bit_length() - 1)
    k = 1
    while k < top and cost_s > budget * k * step_s:
        k *= 2
    return k


def snapshot_due(step: int, interval: int | None) -> bool:
    """Whether step (counted from 1) is snapshotted at this interval (None: snapshots off)."""
    return interval is not None and step % interval == 0


class SnapshotPace:
    """One rank's running estimates (seconds of a snapshot's cost, of a step) and the interval the
    group agreed on from everyone's: `interval` (None: snapshots off; fixed unless `auto`).

    `offer()` is what this rank adds to the step's all-reduce: (cost, step seconds, 1), or zeros
    while it lacks either estimate (a rank that has not written a snapshot yet). The agreed
    interval is 1 until some rank knows both, then follows the mean over the ranks that do."""

    def __init__(self, fixed: int | Literal["auto"] | None, cap: int):
        self.auto = fixed == "auto"
        self.interval: int | None = 1 if fixed == "auto" else fixed
        self.cap = cap
        self.cost_s: float | None = None
        self.step_s: float | None = None

    def offer(self) -> tuple[float, float, float]:
        if self.cost_s is None or self.step_s is None:
            return (0.0, 0.0, 0.0)
        return (self.cost_s, self.step_s, 1.0)

    def settle(self, sums: list[float], step_s: float, costs: list[float]) -> None:
        """After a step: agree on the interval from the reduced `sums` of every rank's offer, then
        add this rank's figures (the step's seconds, the costs of hand-overs completed since)."""
        cost, step, count = sums
        if self.auto:
            self.interval = snapshot_interval(cost / count, step / count, self.cap) if count > 0 else 1
        self.step_s = _smoothed(self.step_s, step_s)
        for c in costs:
            self.cost_s = _smoothed(self.cost_s, c)


def _smoothed(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new
