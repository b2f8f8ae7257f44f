"""One optimizer step with an exact global batch, at any world size.

Each rank runs its micro-batches of the plan, backpropagating `sum(sample losses) / G` (G the
global batch size), then one SUM all-reduce makes every rank's gradient
    sum over the global batch of per-sample gradients / G,
whatever the split. A rank with no micro-batch contributes zeros but still joins the reduction.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist
from torch import nn

from elastune.batch_plan import BatchPlan, MicroBatch
from elastune.data.sampler import positions, sample_indices, tally
from elastune.metrics.noise import noise_estimates
from elastune.recipes import Batch, Recipe, SampleSource, to_device
from elastune.train.evaluate import Evaluation
from elastune.train.optim import named_params
from elastune.train.precision import AUTOCAST, unscale_and_check
from elastune.train.reduce import Bucket, bucket_bounds, finish_all
from elastune.train.rng import micro_batch_seed, seed_device
from elastune.train.state import Progress, TrainState


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean per-sample loss over the global batch
    grad_norm: float | None  # of the applied (all-reduced, pre-clip) gradient; None: an fp16 step skipped
    tally: tuple[int, ...]  # data.sampler.tally of every sample every rank read this step
    noise: tuple[float, float] | None = None  # metrics.noise.noise_estimates of this step: (tr(Sigma), |G|^2)
    loss_scale: float | None = None  # fp16: the scale this step ran with
    eval_loss: float | None = None  # held-out loss of the parameters the step started from, if it evaluated
    busy_seconds: float | None = None  # this rank's forward and backward passes (StepContext.timed)

    @property
    def skipped(self) -> bool:
        """fp16 only: the reduced gradient held an inf or nan, and no rank applied it."""
        return self.grad_norm is None


class StepStats:
    """What a step reduces besides gradients, in one float64 buffer (exact sums of integers, and
    sums a rank adds to): [tally count, sum, hashed sum of the samples read; sum of micro-batch
    |g_b|^2, sum of 1/b, micro-batches (the noise scale); loss sum; snapshot pace: cost seconds,
    step seconds, ranks offering them (checkpoint.interval); held-out evaluation: loss sum, windows
    (train.evaluate); speed: step seconds, busy seconds, micro-batches, ranks offering them
    (train.adaptive's goodput)]. `offer`, `speed_offer`: this rank's figures of its previous
    step, carried by the next one, so every rank reads back the same sums."""

    def __init__(self, device: torch.device):
        self.stats = torch.zeros(16, dtype=torch.float64, device=device)
        self.tally, self.norms, self.loss = self.stats[:3], self.stats[3:6], self.stats[6:7]
        self.pace, self.evals, self.speed = self.stats[7:10], self.stats[10:12], self.stats[12:16]
        self.offer: tuple[float, float, float] = (0.0, 0.0, 0.0)
        self.speed_offer: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def zero(self) -> None:
        """Start a step: nothing summed yet but this rank's offers."""
        self.stats.zero_()
        if any(self.offer):
            self.pace.copy_(torch.tensor(self.offer, dtype=torch.float64))
        if any(self.speed_offer):
            self.speed.copy_(torch.tensor(self.speed_offer, dtype=torch.float64))

    def add_loss(self, loss_sum: torch.Tensor) -> None:
        self.loss += loss_sum.to(torch.float64)

    def loss_sum(self) -> float:
        return float(self.loss)

    def read(self, counts: tuple[int, int, int]) -> None:
        self.tally += torch.tensor(counts, dtype=torch.float64, device=self.tally.device)

    def evaluated(self, total: torch.Tensor, count: int) -> None:
        self.evals[0] += total
        self.evals[1] += count

    def eval_loss(self) -> float | None:
        total, count = self.evals.tolist()
        return total / count if count else None

    def all_reduce(self) -> bool:
        """SUM the statistics over the default process group (True: the step may apply)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.stats, op=dist.ReduceOp.SUM)
        return True


class GradBuffer(StepStats):
    """One flat gradient buffer per parameter dtype (fp32 masters in every precision);
    parameters' .grad are views into it, cut into buckets (train.reduce) whose SUMs launch while
    backward still runs.

    Backward accumulates straight into the buffer and the reduction runs on it in place: no
    per-step gather or scatter of gradients. The step's statistics (StepStats) reduce with it.

    Overlap: `arm()` before the rank's last backward of the step; from then on each parameter's
    post-accumulate-grad hook counts down its bucket, and a bucket whose gradients are all final
    is launched, in bucket order (train.reduce). `close()` after the last backward launches what
    is left (unused parameters' buckets; all of them on a rank with no micro-batch, as zeros).
    With `overlap` False nothing is launched: the group reduces the buckets itself (live groups).

    `micro_batch_norms`: keep each micro-batch's gradient apart long enough to take its norm (for
    the gradient noise scale): backward then writes into the buffer alone and `fold` adds it to
    a second buffer of the same size, in the order backward would have (the same sums, bit for
    bit). The last micro-batch's norm is taken bucket by bucket as each is final.
    """

    def __init__(
        self,
        model: nn.Module,
        micro_batch_norms: bool = False,
        bucket_bytes: int = 25 << 20,
        reduce_dtype: torch.dtype = torch.float32,
        overlap: bool = True,
    ):
        self.params = [p for _, p in named_params(model)]
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in self.params:
            by_dtype.setdefault(p.dtype, []).append(p)
        self.flats: list[torch.Tensor] = []
        self.buckets: list[Bucket] = []
        self._members: list[list[nn.Parameter]] = []
        ranges: list[tuple[int, int, int]] = []  # (flat, lo, hi) of each bucket
        for dtype, params in by_dtype.items():
            flat = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
            offset, starts = 0, []
            for p in params:
                p.grad = flat[offset : offset + p.numel()].view_as(p)
                starts.append(offset)
                offset += p.numel()
            # Gradients travel in the reduction dtype where that is narrower than theirs.
            wire = reduce_dtype if dtype.is_floating_point and dtype.itemsize > reduce_dtype.itemsize else dtype
            for lo, hi in bucket_bounds([p.numel() for p in params], max(1, bucket_bytes // flat.element_size())):
                self.buckets.append(Bucket(flat[lo:hi], wire))
                self._members.append([p for p, at in zip(params, starts) if lo <= at < hi])
                ranges.append((len(self.flats), lo, hi))
            self.flats.append(flat)
        super().__init__(self.flats[0].device)
        self.sums = [torch.zeros_like(f) for f in self.flats] if micro_batch_norms else None
        self._sum_views = [self.sums[f][lo:hi] for f, lo, hi in ranges] if self.sums is not None else []
        self.overlap = overlap
        self._bucket_of: dict[torch.Tensor, int] = {p: i for i, members in enumerate(self._members) for p in members}
        self._waiting: list[int] = []  # per bucket: parameters whose final gradient is still to come
        self._launched = len(self.buckets)  # buckets launched this step (all: not armed)
        self._last_sq: list[torch.Tensor] = []  # the last micro-batch's |g|^2, bucket by bucket
        self._folded = 0  # micro-batches of this step moved to the sums so far
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._final)

    @property
    def storage(self) -> list[torch.Tensor]:
        """The gradient memory it holds: the flat buffers, and the noise scale's sums where kept."""
        return [*self.flats, *(self.sums or [])]

    @property
    def buffers(self) -> list[torch.Tensor]:
        """Everything one step reduces, in order."""
        return [*self.flats, self.stats]

    def fold(self, size: int, global_batch_size: int, loss_scale: float = 1.0) -> None:
        """Record the gradient norm of the micro-batch just backpropagated (alone in the buffer)
        and move it to the step's sums (every micro-batch of the rank's but the last)."""
        # On the device, no host round trip per micro-batch.
        assert self.sums is not None  # only with micro_batch_norms
        sq = cast(torch.Tensor, sum(_squared_norm(f) for f in self.flats))  # the same sums as before, on the device
        self._record_norm(sq, size, global_batch_size, loss_scale)
        for total, f in zip(self.sums, self.flats):
            if self._folded:
                total += f  # noqa: PLW2901 (in place: adds into the sum buffer)
            else:  # the first: 0 + f is f, so copy (and the sums never need zeroing)
                total.copy_(f)
            f.zero_()
        self._folded += 1

    def _record_norm(self, sq: torch.Tensor, size: int, global_batch_size: int, loss_scale: float) -> None:
        scale = (
            global_batch_size / size / loss_scale
        )  # the buffer holds S * sum(grads) / G; the micro-batch's mean gradient is that times G / (S b)
        self.norms[0] += sq * scale**2
        self.norms[1] += 1.0 / size
        self.norms[2] += 1.0

    def zero(self) -> None:
        """Start a step: empty buffers but for this rank's `offer`, nothing armed."""
        for flat in self.flats:
            flat.zero_()
        super().zero()
        self._launched, self._folded = len(self.buckets), 0

    def arm(self) -> None:
        """The next backward is this rank's last of the step: launch buckets as they are final."""
        self._waiting = [len(m) for m in self._members]
        self._launched, self._last_sq = 0, []

    def _final(self, p: torch.Tensor) -> None:
        """Post-accumulate-grad hook: p's gradient for this backward is complete."""
        if self._launched == len(self.buckets):
            return  # not armed: an earlier micro-batch, or a backward outside a step
        self._waiting[self._bucket_of[p]] -= 1
        while self._launched < len(self.buckets) and self._waiting[self._launched] == 0:
            self._launch(self._launched)

    def _launch(self, i: int) -> None:
        bucket = self.buckets[i]
        self._launched += 1
        if self.sums is not None:
            self._last_sq.append(_squared_norm(bucket.view))
            if self._folded:
                bucket.view += self._sum_views[i]
        if self.overlap:
            bucket.start()

    def close(self, last_size: int | None, global_batch_size: int, loss_scale: float = 1.0) -> None:
        """After the rank's last backward of the step (`last_size`: its micro-batch's samples;
        None: the rank had none): launch the buckets left, in order, and the statistics."""
        if last_size is None:
            self.arm()
        while self._launched < len(self.buckets):
            self._launch(self._launched)
        if last_size is not None and self.sums is not None:
            self._record_norm(cast(torch.Tensor, sum(self._last_sq)), last_size, global_batch_size, loss_scale)
        self._last_sq = []

    def all_reduce(self) -> bool:
        """Complete the step's SUM over the default process group: the buckets `close` launched
        (or all of them, when not overlapping) and the statistics. True: the step may apply (a
        reduction that fails raises)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return True
        stats = dist.all_reduce(self.stats, op=dist.ReduceOp.SUM, async_op=True)
        if not self.overlap:
            for bucket in self.buckets:
                bucket.start()
        finish_all(self.buckets)
        stats.wait()
        return True


def _squared_norm(t: torch.Tensor) -> torch.Tensor:
    """|t|^2 as float64, summed in t's own dtype (torch's cascaded sum: a relative error near 1e-7
    in fp32, plenty for a noise-scale statistic, and no float64 copy of the gradients)."""
    return torch.linalg.vector_norm(t).double() ** 2


@dataclass(frozen=True)
class StepContext:
    """What every step of a run shares besides the training state.

    `forward`: the module that computes the losses (the model, or its compiled form sharing its
    parameters). Samples come from `source` in the order `seed` gives every position; `recipe`
    turns a batch into per-sample losses. `before_reduce` runs between the backward passes and
    the completion of the reduction (fault rehearsal). `reduce` completes the SUM over the step's
    participants and says whether the step may apply. `precision`: train.precision."""

    forward: nn.Module
    recipe: Recipe
    source: SampleSource
    seed: int
    grad_clip_norm: float | None = None
    precision: str = "fp32"
    reduce: Callable[[StepStats], bool] = lambda stats: stats.all_reduce()  # a GradBuffer's reduces its gradients too
    before_reduce: Callable[[], None] | None = None
    evaluation: Evaluation | None = None  # held-out evaluation, at the steps it is due
    timed: bool = False  # time this rank's forward and backward passes (StepResult.busy_seconds)


def open_step(
    ctx: StepContext, stats: StepStats, plan: BatchPlan, rank: int, at: Progress, device: torch.device, together: bool = False
) -> Callable[[MicroBatch], Batch]:
    """What every layout's step does first on this rank: the held-out evaluation when it is due
    (`together`: every rank as many forward passes, train.evaluate), then this rank's samples,
    indexed in one call (its micro-batches are contiguous positions) and tallied. Returns the
    batch of each of its micro-batches, on `device`, with that micro-batch's randomness seeded."""
    if ctx.evaluation is not None and ctx.evaluation.due(at.samples_seen, plan.global_batch_size):
        stats.evaluated(*ctx.evaluation.share(ctx.forward, ctx.recipe, rank, plan.world_size, ctx.precision, together))
    mine = plan.for_rank(rank)
    first = mine[0].start if mine else 0
    indices = sample_indices(positions(at.samples_seen, first, sum(mb.size for mb in mine)), len(ctx.source), ctx.seed)
    if mine:
        stats.read(tally(indices))

    def batch_of(mb: MicroBatch) -> Batch:
        seed_device(micro_batch_seed(ctx.seed, at.step, mb.index), device)
        return to_device(ctx.source.take(indices[mb.start - first : mb.start - first + mb.size]), device)

    return batch_of


def train_step(
    ctx: StepContext, state: TrainState, grads: GradBuffer, plan: BatchPlan, rank: int, at: Progress
) -> StepResult | None:
    """Run this rank's share of the step after `at` and apply the update (the lr is already set).

    When `ctx.reduce` says no (a live group lost a peer mid-step), nothing is applied and None is
    returned: the caller runs the step again. fp16 steps scale by `state.scaler`."""
    model, scaler = ctx.forward, state.scaler
    model.train()
    grads.zero()
    device = grads.flats[0].device
    G = plan.global_batch_size
    S = scaler.scale if scaler is not None else 1.0
    autocast = AUTOCAST[ctx.precision]
    batch_of = open_step(ctx, grads, plan, rank, at, device)
    micro_batches = plan.for_rank(rank)
    started = time.perf_counter()
    for mb in micro_batches:
        last = mb is micro_batches[-1]
        batch = batch_of(mb)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            total = ctx.recipe.sample_losses(model, batch).float().sum()
        if last:
            grads.arm()
        # Each backward adds a gradient sum into the buffer; dividing by the global batch here
        # (not by the micro-batch or the world size) makes the reduced SUM the exact mean.
        (total * S / G if S != 1.0 else total / G).backward()
        grads.add_loss(total.detach())
        if grads.sums is not None and not last:
            grads.fold(mb.size, G, S)
    grads.close(micro_batches[-1].size if micro_batches else None, G, S)
    busy = None
    if ctx.timed:
        if device.type == "cuda":  # kernels run asynchronously: the passes end when the device is done with them
            torch.cuda.synchronize(device)
        busy = time.perf_counter() - started
    if ctx.before_reduce is not None:
        ctx.before_reduce()
    if not ctx.reduce(grads):
        return None
    counts = tuple(int(v) for v in grads.tally.tolist())
    loss = grads.loss_sum() / G
    eval_loss = grads.eval_loss()
    if scaler is not None:
        found_inf = unscale_and_check(grads.flats, S)
        scaler.update(found_inf)
        if found_inf:  # every rank holds the same reduced bytes, so every rank skips
            return StepResult(loss=loss, grad_norm=None, tally=counts, loss_scale=S, eval_loss=eval_loss, busy_seconds=busy)
    norm = torch.nn.utils.get_total_norm([p.grad for p in grads.params if p.grad is not None], foreach=True)
    if ctx.grad_clip_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(grads.params, ctx.grad_clip_norm, norm, foreach=True)
    state.step()
    noise = None
    if grads.sums is not None:
        sum_sq, sum_inv_b, count = grads.norms.tolist()
        noise = noise_estimates(sum_sq, sum_inv_b, int(count), float(norm) ** 2, G)
    return StepResult(
        loss=loss,
        grad_norm=float(norm),
        tally=counts,
        noise=noise,
        loss_scale=None if scaler is None else S,
        eval_loss=eval_loss,
        busy_seconds=busy,
    )
