"""The fully sharded layout on PyTorch's FSDP2 (`fully_shard`): parameters, gradients and
optimizer state sharded over the worker group, with the exact global batch at any world size.

Sharding: each block of the model's top-level ModuleLists is one FSDP unit, the root holds the
rest (embeddings, the final norm, a tied head). FSDP2 cuts every parameter along dim 0 as
`torch.chunk` does (rows of ceil(d0/W); the last ranks may hold fewer rows, or none), so a
rank's shard is one contiguous range of the flattened tensor: checkpoint.layout.fsdp_rows.

The step (`fsdp_step`), the same arithmetic as train.step's:
- every rank backpropagates sum(sample losses) / G, and FSDP's reduce-scatter is a plain SUM
  (its division by the world size switched off: `shard_model`), so each rank's gradient shard is
  the shard of sum over the global batch of per-sample gradients / G, whatever the split;
- FSDP gathers parameters and reduces gradients collectively, so every rank runs as many
  forward/backward passes as the rank with the most micro-batches (known from the plan, no
  collective needed): the passes a rank has no micro-batch for run on an empty batch, which
  adds exactly nothing;
- every pass reduce-scatters its gradients into the rank's gradient rows, which the optimizer
  step leaves in place (zeroed): a rank never holds a whole gradient, whatever its number of
  micro-batches (skipping the reduction until the last pass would send less and hold each
  block's whole gradient meanwhile; memory is what this layout is for);
- the loss sum, the tally of samples read, the snapshot pace and a held-out evaluation's sums
  travel in one float64 all-reduce (train.step.StepStats, through the group's `reduce`); the
  gradient norm (and clipping) is over the whole sharded gradient (torch's DTensor-aware
  clip_grad_norm_). An evaluation runs as many forward passes on every rank, for the same reason.
Randomness: every micro-batch reseeds from (seed, step, micro-batch index), as in every layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from elastune.batch_plan import BatchPlan
from elastune.recipes import to_device
from elastune.train.precision import AUTOCAST, compile_in_place
from elastune.train.state import Progress, TrainState, without_memory
from elastune.train.step import StepContext, StepResult, StepStats, open_step

# FSDP2's mixed precision: parameters gathered and computed in bf16, gradients reduced and
# optimizer masters kept in fp32 (the step's `precision`).
POLICIES = {
    "fp32": MixedPrecisionPolicy(),
    "bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
}


def units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded as units of their own: the entries of the model's top-level ModuleLists
    (a GPT's blocks). Each is gathered just before it runs and freed after."""
    return [m for child in model.children() if isinstance(child, nn.ModuleList) for m in child]


def shard_problem(build: Callable[[], nn.Module]) -> str | None:
    """Why the model `build` makes cannot train in the fsdp layout (None: it can). Rows are cut
    along dim 0: a scalar parameter has none. Built on torch's meta device where it can be."""
    scalars = [name for name, p in without_memory(build).named_parameters() if p.ndim == 0]
    if scalars:
        return (
            f"scaling.layout fsdp cuts every parameter into rows along its first dimension, but the model holds "
            f"scalar ones ({', '.join(scalars[:3])}); give them a dimension (shape [1]) or set scaling.layout: replicated"
        )
    return None


def shard_model(model: nn.Module, precision: str = "fp32", compile: bool = False) -> nn.Module:
    """Shard `model` in place over the default process group (every rank calls this). Gradients
    reduce as a plain SUM: the step's 1/G scaling is the only division. `compile`: each unit is
    compiled in place first (the root's few modules run eagerly between them)."""
    if precision not in POLICIES:
        raise ValueError(f"the fsdp layout trains in {', '.join(POLICIES)}, not {precision}")
    policy = POLICIES[precision]
    if compile:
        compile_in_place(units(model))
    for unit in units(model):
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for m in model.modules():
        if isinstance(m, FSDPModule):  # the setters act on one module's own state: every unit is set
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied SUM: reduce as SUM, divide by 1
    return model


def fsdp_step(
    ctx: StepContext, state: TrainState, stats: StepStats, plan: BatchPlan, rank: int, at: Progress
) -> StepResult | None:
    """This rank's share of the step after `at` on a sharded model (`shard_model`), and the update
    (the lr is already set). Every rank of the group calls it with the same plan. None: the
    statistics' reduction (`ctx.reduce`) said no, and nothing was applied."""
    model = ctx.forward
    assert isinstance(model, FSDPModule), "fsdp_step trains a model sharded by shard_model"
    assert state.scaler is None  # spec.models refuses fp16 with fsdp
    model.train()
    stats.zero()
    device = stats.stats.device
    G = plan.global_batch_size
    autocast = AUTOCAST[ctx.precision]
    batch_of = open_step(ctx, stats, plan, rank, at, device, together=True)
    mine = plan.for_rank(rank)
    passes = max(plan.counts())
    for i in range(passes):
        # Past its own micro-batches a rank reads nothing, but the group gathers and reduces together.
        batch = batch_of(mine[i]) if i < len(mine) else to_device(ctx.source.take(np.arange(0)), device)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            total = ctx.recipe.sample_losses(model, batch).float().sum()
        (total / G).backward()
        stats.add_loss(total.detach())
    if ctx.before_reduce is not None:
        ctx.before_reduce()
    if not ctx.reduce(stats):
        return None
    assert isinstance(state.optimizer, torch.optim.Optimizer)  # layouts.Fsdp builds a torch optimizer
    params = [p for p in model.parameters() if p.grad is not None]
    # The norm over every rank's rows (a collective); max_norm inf leaves the gradients as they are.
    norm = torch.nn.utils.clip_grad_norm_(params, ctx.grad_clip_norm if ctx.grad_clip_norm is not None else math.inf)
    grad_norm = float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    state.step()
    state.optimizer.zero_grad(set_to_none=False)  # the rows stay allocated, as a replicated layout's buffer does
    counts = tuple(int(v) for v in stats.tally.tolist())
    return StepResult(loss=stats.loss_sum() / G, grad_norm=grad_norm, tally=counts, eval_loss=stats.eval_loss())
