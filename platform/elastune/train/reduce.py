"""Gradient SUMs in buckets: where they are cut, how each is summed, in which order.

A bucket is a run of whole parameters' gradients, a contiguous slice of a flat gradient buffer
(train.step.GradBuffer). Buckets are cut from the end of the parameter order, the order backward
finishes gradients in, each about `bucket_bytes` (a parameter larger than that is a bucket of its
own), and are launched strictly in that order on every rank, so every rank issues the same
collectives in the same sequence.

Summation order. The SUM of every element adds the ranks' values in rank order,
    ((g_0 + g_1) + g_2) + ... + g_{W-1},
whatever bucket the element falls in, so bucketed and flat reductions agree bit for bit:
- at W <= 2 any reduction does (IEEE addition is commutative, and two terms have one order);
- on gloo at W >= 3 a ring all-reduce adds in an order that depends on where the element falls
  in the buffer, so each bucket is summed in rank order instead: rank r owns an even share of
  the bucket, receives every rank's values of it (all_to_all), adds them in rank order and hands
  the sum back to all (all_gather): the same bytes on the wire as a ring all-reduce;
- NCCL (GPUs) keeps its own all-reduce: it is far faster than the two-collective form there,
  and its sums are deterministic for a given bucket layout; bitwise equality across bucket sizes
  is promised on CPU only.

Reduction dtype: fp32 by default. `bf16` sends the gradients as bfloat16 (half the bytes) and
adds in fp32 where the sum is Elastune's own (rank order); the result is rounded to bf16 once
per element (docs/performance.md gives the error bound).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from elastune.checkpoint.layout import even_range

REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bucket_bounds(sizes: list[int], bucket_elems: int) -> list[tuple[int, int]]:
    """Element ranges [lo, hi) of a flat buffer holding parameters of these `sizes` (in order),
    cut into buckets of whole parameters of at least `bucket_elems` elements where the
    parameters allow, from the end of the buffer to its start (the order they are launched in)."""
    bounds, hi, filled = [], sum(sizes), 0
    lo = hi
    for size in reversed(sizes):
        lo -= size
        filled += size
        if filled >= bucket_elems:
            bounds.append((lo, hi))
            hi, filled = lo, 0
    if hi > 0:
        bounds.append((0, hi))
    return bounds


def rank_order_needed(world_size: int) -> bool:
    """Whether this process group's all-reduce may add more than two values in a
    position-dependent order (gloo at W >= 3): then Elastune sums in rank order itself."""
    return world_size > 2 and dist.get_backend() == "gloo"


@dataclass
class Bucket:
    """One bucket: `view` is its slice of the gradient buffer; `dtype` the dtype it travels in."""

    view: torch.Tensor
    dtype: torch.dtype
    _work: dist.Work | None = None  # the collective in flight
    _ordered: bool = False  # summed in rank order by Elastune (gloo, W >= 3)
    _staged: torch.Tensor | None = None  # the bucket in the reduction dtype, when that differs
    _recv: torch.Tensor | None = None  # rank order: every rank's values of this rank's share
    _gathered: torch.Tensor | None = None  # rank order: every share's sum, padded to equal shares

    def wire(self) -> torch.Tensor:
        """The tensor that travels: the bucket itself, or a copy of it in the reduction dtype."""
        if self.dtype == self.view.dtype:
            return self.view
        if self._staged is None:
            self._staged = torch.empty(self.view.shape, dtype=self.dtype, device=self.view.device)
        return self._staged.copy_(self.view)

    def land(self, summed: torch.Tensor) -> None:
        if summed is not self.view:
            self.view.copy_(summed)

    def start(self) -> None:
        """Launch this bucket's SUM over the default process group (no-op alone)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return
        world, rank = dist.get_world_size(), dist.get_rank()
        send = self.wire()
        self._ordered = rank_order_needed(world)
        if not self._ordered:
            self._work = dist.all_reduce(send, op=dist.ReduceOp.SUM, async_op=True)
            return
        splits = [hi - lo for lo, hi in (even_range(send.numel(), r, world) for r in range(world))]
        if self._recv is None:
            self._recv = torch.empty(world * splits[rank], dtype=send.dtype, device=send.device)
        self._work = dist.all_to_all_single(self._recv, send, [splits[rank]] * world, splits, async_op=True)

    def gather(self) -> None:
        """Rank order only, after `start` on every bucket: add this rank's share in rank order and
        launch handing it to everyone. Called bucket by bucket in launch order on every rank."""
        if not self._ordered or self._work is None:
            return
        self._work.wait()
        assert self._recv is not None  # `start` made it
        world, n = dist.get_world_size(), self.view.numel()
        share = -(-n // world)
        parts = self._recv.view(world, -1)
        total = parts[0].to(torch.float32, copy=True)  # sums in fp32 whatever the wire dtype
        for r in range(1, world):
            total += parts[r]
        mine = torch.zeros(share, dtype=self._recv.dtype, device=self._recv.device)
        mine[: parts.shape[1]].copy_(total)
        if self._gathered is None:
            self._gathered = torch.empty(world * share, dtype=self._recv.dtype, device=self._recv.device)
        self._work = dist.all_gather_single(self._gathered, mine, async_op=True)

    def finish(self) -> None:
        """Wait for the SUM and put it in the bucket."""
        if self._work is None:
            return
        self._work.wait()
        self._work = None
        if not self._ordered:
            self.land(self._staged if self._staged is not None else self.view)
            return
        assert self._gathered is not None  # `gather` made it
        world, n = dist.get_world_size(), self.view.numel()
        shares = self._gathered.view(world, -1)
        for r in range(world):
            lo, hi = even_range(n, r, world)
            self.view[lo:hi].copy_(shares[r, : hi - lo])


def finish_all(buckets: list[Bucket]) -> None:
    """Complete buckets already started, in launch order on every rank."""
    for bucket in buckets:
        bucket.gather()
    for bucket in buckets:
        bucket.finish()
