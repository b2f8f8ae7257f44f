"""Held-out evaluation, exact at any world size.

The held-out windows of one evaluation are cut into micro-batches exactly as a global batch of
that many samples is (batch_plan), and each rank adds the per-sample losses of its share in
float64; the sums ride in the step's statistics reduction (train.step.GradBuffer), so the mean
over every window, read once, does not depend on the world size or on how the windows fall to
ranks, and an evaluation is redone with the step when the step fails (never counted twice).

It runs at the start of the step whose samples include a multiple of eval.every_samples, on the
parameters that step starts from, with dropout off and no random number drawn: a run trains the
same with evaluation on or off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from elastune.batch_plan import batch_plan, micro_batch_count
from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.format import Manifest
from elastune.data.dataset import TokenWindows
from elastune.recipes import Recipe, SampleSource, load_recipe, to_device
from elastune.spec.models import JobSpec
from elastune.train.precision import AUTOCAST
from elastune.train.state import tied_aliases


def eval_due(samples_seen: int, global_batch_size: int, every: int) -> bool:
    """Whether the step training samples [samples_seen, samples_seen + G) evaluates first: its
    samples include a multiple of `every` (so does the first step: 0 is one)."""
    return (samples_seen + global_batch_size - 1) // every > (samples_seen - 1) // every


@dataclass(frozen=True)
class Evaluation:
    """What every evaluation of a run reads: the first `samples` windows of `source` (the held-out
    split), `micro_batch_size` at a time."""

    source: SampleSource
    every_samples: int
    samples: int
    micro_batch_size: int

    def due(self, samples_seen: int, global_batch_size: int) -> bool:
        return eval_due(samples_seen, global_batch_size, self.every_samples)

    def share(
        self, model: nn.Module, recipe: Recipe, rank: int, world_size: int, precision: str = "fp32", together: bool = False
    ) -> tuple[torch.Tensor, int]:
        """This rank's (sum of per-sample losses in float64, samples read) of one evaluation.
        `together`: every rank runs as many forward passes as the busiest one, the extra ones on
        no windows (a sharded model gathers its parameters collectively in each)."""
        # More ranks than micro-batches: the first ones take one each, the rest none.
        k = micro_batch_count(self.samples, self.micro_batch_size)
        plan = batch_plan(self.samples, self.micro_batch_size, min(world_size, k))
        mine: list[tuple[int, int]] = [(mb.start, mb.size) for mb in plan.for_rank(rank)] if rank < plan.world_size else []
        if together:
            mine += [(0, 0)] * (max(plan.counts()) - len(mine))
        device = next(model.parameters()).device
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0
        autocast = AUTOCAST[precision]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for start, size in mine:
                    batch = to_device(self.source.take(np.arange(start, start + size)), device)
                    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                        losses = recipe.sample_losses(model, batch)
                    total += losses.double().sum()
                    count += size
        finally:
            model.train(was_training)
        return total, count


def evaluation_of(spec: JobSpec) -> Evaluation | None:
    """The run's held-out evaluation (`eval:`), reading the dataset's held-out split."""
    if spec.eval is None:
        return None
    source = TokenWindows(spec.data.path, "eval")
    samples = min(spec.eval.samples or len(source), len(source))
    micro = spec.eval.micro_batch_size or spec.batch.micro_batch_size
    return Evaluation(source, spec.eval.every_samples, samples, micro)


def checkpoint_eval_loss(spec: JobSpec, spec_dir: str, ckpt: Checkpointer, manifest: Manifest) -> float:
    """The held-out loss of a checkpoint's parameters, in one process and in fp32: the windows
    and float64 sums a run's evaluation takes (so the same mean, to summation order). Only the
    model's tensors are read."""
    evaluation = evaluation_of(spec)
    assert evaluation is not None  # the spec has an eval section (JobSpec holds tune.fitness eval_loss to one)
    recipe = load_recipe(spec.model, spec_dir, spec.data.path)
    model = recipe.build_model()
    own = {n: t for n, t in model.state_dict().items() if n not in tied_aliases(model)}
    tensors = ckpt.load(manifest, [f"model/{n}" for n in own])
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(tensors[f"model/{name}"].view(t.shape))
    total, count = evaluation.share(model, recipe, 0, 1)
    return float(total) / count
