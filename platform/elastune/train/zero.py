"""ZeRO-1: each rank keeps and updates only its slice of the optimizer state.

The trainable parameters of each dtype live in one flat buffer (parameters become views into it).
Rank r owns elements [r*T/W, (r+1)*T/W) of each buffer (checkpoint.layout.zero1_slices). Every
rank still receives the full all-reduced gradient (train.step), clips it like everyone else, runs
the spec's optimizer on its slices only (views into the parameters, so updates land in place), then
each owner broadcasts its updated range: every rank ends the step with identical parameters while
holding 1/W of the optimizer state. The update of each element is the same arithmetic the
replicated optimizer does, so the two layouts train alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from elastune.checkpoint.format import Piece
from elastune.checkpoint.layout import even_range, zero1_slices
from elastune.spec.models import AdamWSpec, SGDSpec
from elastune.train.optim import by_dtype, named_params, optimizer_for


@dataclass(frozen=True)
class Slice:
    name: str
    param: nn.Parameter
    lo: int
    hi: int
    view: torch.Tensor  # param's elements [lo, hi), sharing its storage


class ZeroOptimizer:
    def __init__(self, model: nn.Module, spec: AdamWSpec | SGDSpec, rank: int, world_size: int):
        self.world_size = world_size
        self.buffers: list[tuple[torch.Tensor, list[tuple[int, int]]]] = []
        self.slices: list[Slice] = []
        for group in by_dtype(named_params(model)):
            sizes = [p.numel() for _, p in group]
            flat = torch.empty(sum(sizes), dtype=group[0][1].dtype, device=group[0][1].device)
            offset = 0
            with torch.no_grad():
                for (_, p), n in zip(group, sizes):
                    flat[offset : offset + n].copy_(p.reshape(-1))
                    p.data = flat[offset : offset + n].view_as(p)
                    offset += n
            self.buffers.append((flat, [even_range(flat.numel(), r, world_size) for r in range(world_size)]))
            for i, lo, hi in zero1_slices(sizes, rank, world_size):
                name, p = group[i]
                self.slices.append(Slice(name, p, lo, hi, p.detach().view(-1)[lo:hi]))
        self.inner = optimizer_for(spec, [(s.view, s.param.ndim >= 2) for s in self.slices])

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    def step(self) -> None:
        for s in self.slices:
            assert s.param.grad is not None  # GradBuffer gives every trainable parameter its .grad view
            s.view.grad = s.param.grad.view(-1)[s.lo : s.hi]
        self.inner.step()
        if self.world_size > 1 and dist.is_initialized():
            for flat, ranges in self.buffers:
                for owner, (lo, hi) in enumerate(ranges):
                    if hi > lo:
                        dist.broadcast(flat[lo:hi], src=owner)

    def pieces(self) -> dict[str, Piece]:
        """This rank's optimizer state as pieces of the universal per-parameter tensors.

        Scalars (Adam's step count) are the same for every slice of a parameter: the holder of the
        parameter's first element writes it.
        """
        out = {}
        for s in self.slices:
            for key, value in self.inner.state.get(s.view, {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                if value.ndim == 0:
                    if s.lo == 0:
                        out[f"optim/{s.name}/{key}"] = Piece.whole(value, replicated=False)
                else:
                    out[f"optim/{s.name}/{key}"] = Piece(value.detach().view(-1), s.lo, s.hi, tuple(s.param.shape))
        return out

    def wanted(self, shapes: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
        """The element ranges of saved optimizer tensors this rank needs."""
        out = {}
        for s in self.slices:
            prefix = f"optim/{s.name}/"
            for name, shape in shapes.items():
                if name.startswith(prefix):
                    out[name] = (0, 1) if shape == [] else (s.lo, s.hi)
        return out

    def load(self, flat: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> None:
        """Install the ranges `wanted` asked for (scalars stay on the CPU, as torch keeps them)."""
        for s in self.slices:
            prefix = f"optim/{s.name}/"
            state = {
                k[len(prefix) :]: v.reshape(()) if shapes[k] == [] else v.to(s.view.device)
                for k, v in flat.items()
                if k.startswith(prefix)
            }
            if state:
                self.inner.state[s.view] = state
