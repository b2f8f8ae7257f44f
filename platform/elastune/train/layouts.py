"""Training layouts: what replicated, ZeRO-1 and fully sharded training do differently, each in
one class.

A layout decides how a rank holds the optimizer state and therefore what it saves, which saved
ranges it reads back and how it installs them. The model's own tensors are whole on every rank
in replicated and zero1, and rows of each tensor under fsdp (train.fsdp shards the model before
the layout builds its optimizer; train.shards reads and writes such rows). Names stay universal
(train.state): a checkpoint saved in one layout loads into any other. A fourth layout is one
more class here and an entry in LAYOUTS.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from elastune.checkpoint.format import Piece
from elastune.spec.models import AdamWSpec, SGDSpec
from elastune.train import shards
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

    def wanted(self, model: nn.Module, optimizer: Optimizer, shapes: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
        """The element ranges of the saved optim/ tensors (`shapes`) this rank reads."""
        ...

    def load(self, model: nn.Module, optimizer: Optimizer, flat: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> None:
        """Install what `wanted` asked for (`flat`: each saved tensor's range, flattened)."""
        ...


class Replicated:
    """Every rank runs the whole update of what it holds of each parameter, with that part's
    optimizer state: the whole model and state here; under Fsdp (below) its rows."""

    name: ClassVar[str] = "replicated"

    def optimizer(self, model: nn.Module, spec: AdamWSpec | SGDSpec, rank: int, world_size: int) -> Optimizer:
        return build_optimizer(model, spec)

    def pieces(self, model: nn.Module, optimizer: Optimizer) -> dict[str, Piece]:
        assert isinstance(optimizer, torch.optim.Optimizer)  # built by `optimizer` above
        out = {}
        for name, p in named_params(model):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"optim/{name}/{key}"] = shards.piece(value)
        return out

    def wanted(self, model: nn.Module, optimizer: Optimizer, shapes: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for name, p in named_params(model):  # a parameter's state is held as the parameter is
            prefix = f"optim/{name}/"
            out |= {k: (0, 1) if v == [] else shards.held_range(p) for k, v in shapes.items() if k.startswith(prefix)}
        return out

    def load(self, model: nn.Module, optimizer: Optimizer, flat: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> None:
        assert isinstance(optimizer, torch.optim.Optimizer)  # built by `optimizer` above
        for name, p in named_params(model):
            prefix = f"optim/{name}/"
            state = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
            if state:
                # Optimizer step counters stay on CPU (torch keeps `step` there unless capturable).
                optimizer.state[p] = {k: (v.reshape(()) if k == "step" else shards.like(p, v)) for k, v in state.items()}


class Zero1:
    """Each rank holds and updates its slice of the optimizer state (train.zero)."""

    name: ClassVar[str] = "zero1"

    def optimizer(self, model: nn.Module, spec: AdamWSpec | SGDSpec, rank: int, world_size: int) -> Optimizer:
        return ZeroOptimizer(model, spec, rank, world_size)

    def pieces(self, model: nn.Module, optimizer: Optimizer) -> dict[str, Piece]:
        assert isinstance(optimizer, ZeroOptimizer)
        return optimizer.pieces()

    def wanted(self, model: nn.Module, optimizer: Optimizer, shapes: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
        assert isinstance(optimizer, ZeroOptimizer)
        return optimizer.wanted(shapes)

    def load(self, model: nn.Module, optimizer: Optimizer, flat: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> None:
        assert isinstance(optimizer, ZeroOptimizer)
        optimizer.load(flat, shapes)


class Fsdp(Replicated):
    """Each rank holds its rows of every parameter, gradient and optimizer state tensor (FSDP2:
    train.fsdp.shard_model, called before the optimizer is built) and updates them."""

    name: ClassVar[str] = "fsdp"

    def optimizer(self, model: nn.Module, spec: AdamWSpec | SGDSpec, rank: int, world_size: int) -> Optimizer:
        if not isinstance(next(model.parameters()), DTensor):
            raise ValueError("the fsdp layout's optimizer is built over a sharded model: shard it first (train.fsdp.shard_model)")
        return build_optimizer(model, spec)


REPLICATED, ZERO1, FSDP = Replicated(), Zero1(), Fsdp()
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (REPLICATED, ZERO1, FSDP)}
