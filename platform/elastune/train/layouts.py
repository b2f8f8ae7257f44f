"""Training layouts: what replicated and ZeRO-1 training do differently, each in one class.

A layout decides how a rank holds the optimizer state and therefore what it saves, which saved
ranges it reads back and how it installs them; the model's own tensors are whole on every rank
in both. Names stay universal (train.state): a checkpoint saved in one layout loads into the other.
A third layout is one more class here and an entry in LAYOUTS.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch
from torch import nn

from elastune.checkpoint.format import Piece, numel
from elastune.spec.models import AdamWSpec, SGDSpec
from elastune.train.optim import build_optimizer, named_params
from elastune.train.zero import ZeroOptimizer

Optimizer = torch.optim.Optimizer | ZeroOptimizer


class Layout(Protocol):
    name: ClassVar[str]  # as the spec (scaling.layout) and a checkpoint's manifest name it

    def optimizer(self, model: nn.Module, spec: AdamWSpec | SGDSpec, rank: int, world_size: int) -> Optimizer:
        """The spec's optimizer over `model` as this rank of `world_size` holds it."""
        ...

    def pieces(self, model: nn.Module, optimizer: Optimizer) -> dict[str, Piece]:
        """The optimizer state this rank holds, as pieces of the universal optim/ tensors."""
        ...

    def wanted(self, optimizer: Optimizer, shapes: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
        """The element ranges of the saved optim/ tensors (`shapes`) this rank reads."""
        ...

    def load(self, model: nn.Module, optimizer: Optimizer, flat: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> None:
        """Install what `wanted` asked for (`flat`: each saved tensor's range, flattened)."""
        ...


class Replicated:
    """Every rank holds the whole optimizer state and runs the whole update."""

    name: ClassVar[str] = "replicated"

    def optimizer(self, model: nn.Module, spec: AdamWSpec | SGDSpec, rank: int, world_size: int) -> Optimizer:
        return build_optimizer(model, spec)

    def pieces(self, model: nn.Module, optimizer: Optimizer) -> dict[str, Piece]:
        assert isinstance(optimizer, torch.optim.Optimizer)  # built by `optimizer` above
        out = {}
        for name, p in named_params(model):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"optim/{name}/{key}"] = Piece.whole(value)
        return out

    def wanted(self, optimizer: Optimizer, shapes: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
        return {k: (0, numel(v)) for k, v in shapes.items()}

    def load(self, model: nn.Module, optimizer: Optimizer, flat: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> None:
        assert isinstance(optimizer, torch.optim.Optimizer)  # built by `optimizer` above
        device = next(model.parameters()).device
        for name, p in named_params(model):
            prefix = f"optim/{name}/"
            state = {k[len(prefix) :]: v.view(shapes[k]) for k, v in flat.items() if k.startswith(prefix)}
            if state:
                # Optimizer step counters stay on CPU (torch keeps `step` there unless capturable).
                optimizer.state[p] = {k: (v if k == "step" else v.to(device)) for k, v in state.items()}


class Zero1:
    """Each rank holds and updates its slice of the optimizer state (train.zero)."""

    name: ClassVar[str] = "zero1"

    def optimizer(self, model: nn.Module, spec: AdamWSpec | SGDSpec, rank: int, world_size: int) -> Optimizer:
        return ZeroOptimizer(model, spec, rank, world_size)

    def pieces(self, model: nn.Module, optimizer: Optimizer) -> dict[str, Piece]:
        assert isinstance(optimizer, ZeroOptimizer)
        return optimizer.pieces()

    def wanted(self, optimizer: Optimizer, shapes: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
        assert isinstance(optimizer, ZeroOptimizer)
        return optimizer.wanted(shapes)

    def load(self, model: nn.Module, optimizer: Optimizer, flat: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> None:
        assert isinstance(optimizer, ZeroOptimizer)
        optimizer.load(flat, shapes)


REPLICATED, ZERO1 = Replicated(), Zero1()
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (REPLICATED, ZERO1)}
