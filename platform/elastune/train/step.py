"""One optimizer step with an exact global batch, at any world size.

Each rank runs its micro-batches of the plan, backpropagating `sum(sample losses) / G` (G the
global batch size), then one SUM all-reduce makes every rank's gradient
    sum over the global batch of per-sample gradients / G,
whatever the split. A rank with no micro-batch contributes zeros but still joins the reduction.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from elastune.data.sampler import positions, sample_indices, tally
from elastune.metrics.noise import noise_estimates
from elastune.recipes import Recipe, SampleSource, to_device
from elastune.train.batch_plan import BatchPlan
from elastune.train.optim import named_params


def micro_batch_seed(seed: int, step: int, micro_batch: int) -> int:
    """Seed of one micro-batch's randomness (dropout, augmentation): the same on every rank."""
    digest = hashlib.sha256(f"elastune-rng:{seed}:{step}:{micro_batch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_device(seed: int, device: torch.device) -> None:
    """Seed the generators a micro-batch on `device` draws from: the CPU's, plus the GPU's.

    Not torch.manual_seed: with CUDA, MTIA and XPU uninitialised it records a formatted stack
    trace per backend on every call, which cost about 1 ms per micro-batch on CPU workers.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # CUDA is initialised here, so this seeds at once


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean per-sample loss over the global batch
    grad_norm: float  # of the applied (all-reduced, pre-clip) gradient
    tally: tuple[int, int, int]  # data.sampler.tally of every sample every rank read this step
    noise: tuple[float, float] | None = None  # metrics.noise.noise_estimates of this step: (tr(Sigma), |G|^2)


class GradBuffer:
    """One flat gradient buffer per dtype; parameters' .grad are views into it.

    Backward accumulates straight into the buffer and the all-reduce runs on it in place: no
    per-step gather or scatter of gradients. The last slot of the first buffer carries the loss sum;
    a small float64 buffer carries the tally of the samples read (exact sums of integers) and the
    micro-batch gradient norms the noise scale needs.

    `micro_batch_norms`: keep each micro-batch's gradient apart long enough to take its norm (for
    the gradient noise scale): backward then writes into the buffer alone and `fold` adds it to
    a second buffer of the same size, in the order backward would have (the same sums, bit for
    bit). Costs one more gradient-sized buffer and a pass over it per micro-batch.
    """

    def __init__(self, model: nn.Module, micro_batch_norms: bool = False):
        self.params = [p for _, p in named_params(model)]
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in self.params:
            by_dtype.setdefault(p.dtype, []).append(p)
        self.flats: list[torch.Tensor] = []
        for i, (dtype, params) in enumerate(by_dtype.items()):
            extra = 1 if i == 0 else 0
            flat = torch.zeros(sum(p.numel() for p in params) + extra, dtype=dtype, device=params[0].device)
            offset = 0
            for p in params:
                p.grad = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            self.flats.append(flat)
        # [tally count, sum, hashed sum; sum of micro-batch |g_b|^2, sum of 1/b, micro-batches]
        self.stats = torch.zeros(6, dtype=torch.float64, device=self.flats[0].device)
        self.tally, self.norms = self.stats[:3], self.stats[3:]
        self.sums = [torch.zeros_like(f) for f in self.flats] if micro_batch_norms else None

    @property
    def buffers(self) -> list[torch.Tensor]:
        """Everything one step reduces, in order."""
        return [*self.flats, self.stats]

    def fold(self, size: int, global_batch_size: int) -> None:
        """Record the gradient norm of the micro-batch just backpropagated (alone in the buffer,
        with its loss in the loss slot) and move it to the step's sums."""
        # On the device, no host round trip per micro-batch; the loss slot (last of flats[0]) left out.
        sq = sum(torch.linalg.vector_norm(f, dtype=torch.float64) ** 2 for f in (self.flats[0][:-1], *self.flats[1:]))
        scale = global_batch_size / size  # the buffer holds sum(grads) / G; the micro-batch's mean gradient is that times G / b
        self.norms[0] += sq * scale**2
        self.norms[1] += 1.0 / size
        self.norms[2] += 1.0
        for total, f in zip(self.sums, self.flats):
            total += f
            f.zero_()

    def unfold(self) -> None:
        """Put the step's summed gradient back where the reduction and the optimizer expect it."""
        if self.sums is not None:
            for total, f in zip(self.sums, self.flats):
                f.copy_(total)
                total.zero_()

    def zero(self) -> None:
        for buffer in self.buffers:
            buffer.zero_()

    def add_loss(self, loss_sum: torch.Tensor) -> None:
        self.flats[0][-1] += loss_sum.to(self.flats[0].dtype)

    def loss_sum(self) -> float:
        return float(self.flats[0][-1])

    def read(self, counts: tuple[int, int, int]) -> None:
        self.tally += torch.tensor(counts, dtype=torch.float64, device=self.tally.device)

    def all_reduce(self) -> bool:
        """SUM over the worker group's process group; True: the step may apply (a reduction that
        fails raises)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # All at once, then wait: the small statistics buffer's round trips overlap the
            # gradients' instead of following them (each buffer's sums are the same either way).
            for work in [dist.all_reduce(buffer, op=dist.ReduceOp.SUM, async_op=True) for buffer in self.buffers]:
                work.wait()
        return True


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    grads: GradBuffer,
    recipe: Recipe,
    source: SampleSource,
    plan: BatchPlan,
    rank: int,
    step: int,
    samples_seen: int,
    seed: int,
    grad_clip_norm: float | None = None,
    before_reduce: Callable[[], None] | None = None,
    reduce: Callable[[GradBuffer], bool] = GradBuffer.all_reduce,
) -> StepResult | None:
    """Run this rank's share of the step and apply the update (the lr is already set).

    `before_reduce` runs between the backward passes and the all-reduce (fault rehearsal).
    `reduce` sums the buffers over the step's participants and says whether the step may apply;
    when it says no (a live group lost a peer mid-step), nothing is applied and None is returned:
    the caller runs the step again."""
    model.train()
    grads.zero()
    device = grads.flats[0].device
    micro_batches = plan.for_rank(rank)
    if micro_batches:  # this rank's micro-batches are contiguous positions: index them in one call
        first = micro_batches[0].start
        indices = sample_indices(positions(samples_seen, first, sum(mb.size for mb in micro_batches)), len(source), seed)
        grads.read(tally(indices))
    for mb in micro_batches:
        batch = to_device(source.take(indices[mb.start - first : mb.start - first + mb.size]), device)
        seed_device(micro_batch_seed(seed, step, mb.index), device)
        losses = recipe.sample_losses(model, batch)
        total = losses.sum()
        # Each backward adds a gradient sum into the buffer; dividing by the global batch here
        # (not by the micro-batch or the world size) makes the all-reduced SUM the exact mean.
        (total / plan.global_batch_size).backward()
        grads.add_loss(total.detach())
        if grads.sums is not None:
            grads.fold(mb.size, plan.global_batch_size)
    grads.unfold()
    if before_reduce is not None:
        before_reduce()
    if not reduce(grads):
        return None
    norm = torch.nn.utils.get_total_norm([p.grad for p in grads.params], foreach=True)
    if grad_clip_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(grads.params, grad_clip_norm, norm, foreach=True)
    optimizer.step()
    counts = tuple(int(v) for v in grads.tally.tolist())
    noise = None
    if grads.sums is not None:
        sum_sq, sum_inv_b, count = grads.norms.tolist()
        noise = noise_estimates(sum_sq, sum_inv_b, int(count), float(norm) ** 2, plan.global_batch_size)
    return StepResult(loss=grads.loss_sum() / plan.global_batch_size, grad_norm=float(norm), tally=counts, noise=noise)
