"""The exact global batch: how one optimizer step's samples split into micro-batches and ranks,
and which global batch each step of a run has. A leaf module: the spec's checks and training
both read the batch arithmetic from here.

`batch_plan` is a pure function of (global_batch_size, micro_batch_size, world_size). The step's
samples are positions 0..G-1 of the step; micro-batch i holds positions [i*m, min((i+1)*m, G)).
Micro-batches go to ranks in contiguous runs, the first `K mod W` ranks taking one extra, so any
world size from 1 to K = micro_batch_count(G, m) works, divisor or not.

`BatchSchedule`: a run's global batch over samples. `phases` may change it at sample counts; a
step takes the batch in force when it starts, and always trains it whole, so step n's samples,
and the steps to a budget, follow from the schedule alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from elastune.errors import BatchPlanError


def micro_batch_count(global_batch_size: int, micro_batch_size: int) -> int:
    """K, the micro-batches of one step: also the most workers a step can split over (1 <= W <= K)."""
    return math.ceil(global_batch_size / micro_batch_size)


@dataclass(frozen=True)
class BatchSchedule:
    """The global batch from sample 0 (`base`) and its changes, (from_samples, G) in order."""

    base: int
    changes: tuple[tuple[int, int], ...] = ()

    def at(self, samples: int) -> int:
        """The global batch of a step that starts with `samples` seen."""
        batch = self.base
        for start, size in self.changes:
            if start > samples:
                break
            batch = size
        return batch

    def samples_after(self, steps: int, start: int = 0) -> int:
        """Samples seen after `steps` steps from `start` samples (phase by phase, not step by
        step: budgets run to 2^53 samples)."""
        seen, left = start, steps
        for begins, _ in self.changes:
            if seen >= begins:  # in force already
                continue
            batch = self.at(seen)
            n = min(left, math.ceil((begins - seen) / batch))  # the steps before this change takes over
            seen, left = seen + n * batch, left - n
        return seen + left * self.at(seen)

    def steps_to(self, samples: int) -> int:
        """Steps until at least `samples` are seen (a run's steps to its budget)."""
        seen, taken = 0, 0
        for start, _ in self.changes:
            if seen >= min(start, samples):
                continue
            batch = self.at(seen)
            n = math.ceil((min(start, samples) - seen) / batch)
            seen, taken = seen + n * batch, taken + n
        return taken + max(0, math.ceil((samples - seen) / self.at(seen)))


@dataclass(frozen=True)
class MicroBatch:
    index: int  # position of this micro-batch in the step (0..K-1); seeds its randomness
    start: int  # first sample position within the step
    size: int  # samples; the last micro-batch may be smaller than micro_batch_size


@dataclass(frozen=True)
class BatchPlan:
    global_batch_size: int
    micro_batch_size: int
    world_size: int
    micro_batches: tuple[MicroBatch, ...]
    rank_ranges: tuple[tuple[int, int], ...]  # per rank: [first, last) micro-batch index

    @property
    def num_micro_batches(self) -> int:
        return len(self.micro_batches)

    def for_rank(self, rank: int) -> tuple[MicroBatch, ...]:
        first, last = self.rank_ranges[rank]
        return self.micro_batches[first:last]

    def counts(self) -> list[int]:
        """Micro-batches per rank, e.g. [2, 2, 1]."""
        return [last - first for first, last in self.rank_ranges]

    def describe(self) -> str:
        counts = ",".join(map(str, self.counts()))
        return (
            f"global batch {self.global_batch_size} = {self.num_micro_batches} micro-batches of <= "
            f"{self.micro_batch_size} over {self.world_size} worker(s) ({counts} per rank)"
        )


def batch_plan(global_batch_size: int, micro_batch_size: int, world_size: int) -> BatchPlan:
    if global_batch_size < 1 or micro_batch_size < 1:
        raise BatchPlanError(f"global_batch_size ({global_batch_size}) and micro_batch_size ({micro_batch_size}) must be >= 1")
    if micro_batch_size > global_batch_size:
        raise BatchPlanError(
            f"micro_batch_size ({micro_batch_size}) exceeds global_batch_size ({global_batch_size}); "
            f"set micro_batch_size <= {global_batch_size}"
        )
    k = micro_batch_count(global_batch_size, micro_batch_size)
    if not 1 <= world_size <= k:
        raise BatchPlanError(
            f"world size {world_size} cannot split global_batch_size {global_batch_size} into micro-batches of "
            f"{micro_batch_size}: there are only {k} micro-batches, so 1 <= world size <= {k}; "
            f"use at most {k} workers or lower micro_batch_size to {max(1, global_batch_size // max(world_size, 1))}"
        )
    micro = tuple(
        MicroBatch(index=i, start=i * micro_batch_size, size=min(micro_batch_size, global_batch_size - i * micro_batch_size))
        for i in range(k)
    )
    base, extra = divmod(k, world_size)
    ranges, first = [], 0
    for rank in range(world_size):
        last = first + base + (1 if rank < extra else 0)
        ranges.append((first, last))
        first = last
    return BatchPlan(global_batch_size, micro_batch_size, world_size, micro, tuple(ranges))
