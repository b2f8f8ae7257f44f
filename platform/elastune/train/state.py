"""Training state as named tensors: what a checkpoint holds and how it goes back in.

Names are universal (independent of world size, layout and parameter order):
  model/<parameter or buffer name>
  optim/<parameter name>/<state key>      e.g. optim/blocks.0.qkv.weight/exp_avg
  amp/loss_scale, amp/growth_tracker      fp16's loss scale (train.precision), when training in fp16
A rank holds them as Pieces (checkpoint.format): whole replicated tensors, or its share of the
optimizer tensors as its layout (train.layouts) holds them. Progress (step, samples_seen) lives in
the manifest.
Randomness has no state to save: every micro-batch reseeds from (seed, step, micro-batch index).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from elastune.checkpoint.checkpointer import ReadPieces
from elastune.checkpoint.format import Piece
from elastune.errors import IncompatibleCheckpoint
from elastune.spec.models import AdamWSpec, SGDSpec
from elastune.train import shards
from elastune.train.layouts import LAYOUTS, REPLICATED, Layout, Optimizer
from elastune.train.precision import SCALE_STATE, LossScale
from elastune.train.resume import ModelState


@dataclass(frozen=True)
class Progress:
    step: int = 0
    samples_seen: int = 0

    def advance(self, global_batch_size: int) -> Progress:
        return Progress(self.step + 1, self.samples_seen + global_batch_size)


@dataclass(frozen=True)
class TrainState:
    """What a worker trains and checkpoints: the model, its optimizer as `layout` holds it, and
    fp16's loss scale (None in other precisions)."""

    model: nn.Module
    optimizer: Optimizer
    layout: Layout = REPLICATED
    scaler: LossScale | None = None

    @classmethod
    def build(
        cls,
        model: nn.Module,
        spec: AdamWSpec | SGDSpec,
        layout: str,
        rank: int,
        world_size: int,
        scaler: LossScale | None = None,
    ) -> TrainState:
        chosen = LAYOUTS[layout]
        return cls(model, chosen.optimizer(model, spec, rank, world_size), chosen, scaler)

    def step(self) -> None:
        """Apply the reduced gradients (the layout's optimizer updates what this rank holds)."""
        self.optimizer.step()


def state_pieces(state: TrainState) -> dict[str, Piece]:
    aliases = tied_aliases(state.model)
    out = {f"model/{n}": shards.piece(t) for n, t in state.model.state_dict().items() if n not in aliases}
    if state.scaler is not None:
        out |= state.scaler.pieces()
    return out | state.layout.pieces(state.model, state.optimizer)


def state_tensors(state: TrainState) -> dict[str, torch.Tensor]:
    """The whole state of a replicated layout as plain tensors."""
    return {n: p.data.reshape(p.shape) for n, p in state_pieces(state).items()}


def tied_aliases(model: nn.Module) -> set[str]:
    """state_dict keys that alias a parameter saved under another name (tied weights)."""
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return every - {n for n, _ in model.named_parameters()}


def without_memory(build: Callable[[], nn.Module]) -> nn.Module:
    """The model `build` makes, on torch's meta device (names and shapes, no memory) where it can
    be built there, else on the CPU."""
    try:
        with torch.device("meta"):
            return build()
    except Exception:
        return build()


def model_state(build: Callable[[], nn.Module]) -> ModelState:
    """The names and shapes of the state a model built by `build` holds, without its memory
    where the model can be built on torch's meta device (else it is built on the CPU)."""
    model = without_memory(build)
    aliases = tied_aliases(model)
    shapes = {n: list(t.shape) for n, t in model.state_dict().items() if n not in aliases}
    return ModelState(shapes, frozenset(aliases))


def restore_state(state: TrainState, shapes: dict[str, list[int]], read: ReadPieces, where: str) -> int:
    """Load saved tensors of these `shapes` into model, optimizer and fp16's loss scale, reading
    through `read` only the ranges this rank's layout needs. Returns the bytes read. A saved
    loss scale is for fp16 only: another precision leaves it unread, and an fp16 run resuming
    from a checkpoint without one starts from its spec's initial scale."""
    model, scaler = state.model, state.scaler
    aliases = tied_aliases(model)
    own = set(model.state_dict()) - aliases
    saved = {k[len("model/") :] for k in shapes if k.startswith("model/")} - aliases  # imports may carry tied copies
    if saved != own:
        missing, extra = sorted(own - saved), sorted(saved - own)
        raise IncompatibleCheckpoint(
            f"{where} was saved from a different model (missing {missing[:3]}, unexpected {extra[:3]}); "
            f"point checkpoint.path elsewhere or run with --fresh"
        )
    tensors = {n: t for n, t in model.state_dict(keep_vars=True).items() if n in own}
    for name, t in tensors.items():  # before any read: the ranges a rank reads follow the model's shapes
        if list(t.shape) != shapes[f"model/{name}"]:
            raise IncompatibleCheckpoint(
                f"{where}: {name} has shape {shapes[f'model/{name}']} but the model's is {list(t.shape)}; "
                f"the model changed since the checkpoint; run with --fresh or restore the model options"
            )
    wanted = {f"model/{n}": shards.held_range(t) for n, t in tensors.items()}  # whole, or this rank's rows (fsdp)
    optim_shapes = {k: v for k, v in shapes.items() if k.startswith("optim/")}
    wanted |= state.layout.wanted(model, state.optimizer, optim_shapes)
    if scaler is not None:
        wanted |= {k: (0, 1) for k in SCALE_STATE if k in shapes}
    flat = read(wanted)
    for name, t in tensors.items():
        shards.install(t, flat[f"model/{name}"])
    state.layout.load(model, state.optimizer, {k: v for k, v in flat.items() if k.startswith("optim/")}, shapes)
    if scaler is not None:
        scaler.load(flat)
    return sum(t.numel() * t.element_size() for t in flat.values())


def load_state(state: TrainState, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load whole tensors (as `Checkpointer.load` returns them)."""
    shapes = {n: list(t.shape) for n, t in tensors.items()}
    restore_state(state, shapes, lambda wanted: {n: tensors[n].reshape(-1)[lo:hi] for n, (lo, hi) in wanted.items()}, where)
