"""Tensors a rank may hold only part of: FSDP2's DTensors, sharded on dim 0 (train.fsdp).

A checkpoint names every tensor whole (train.state); a rank holding a DTensor saves and loads the
contiguous range of the flattened whole tensor that its rows are (checkpoint.layout.fsdp_rows).
A plain tensor is held whole. Nothing here talks to other ranks.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Shard

from elastune.checkpoint.format import Piece
from elastune.checkpoint.layout import fsdp_rows


def local(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of `t`: a DTensor's local rows (the storage FSDP gathers from), or `t`."""
    return t.to_local() if isinstance(t, DTensor) else t


def held_range(t: torch.Tensor) -> tuple[int, int]:
    """The range [lo, hi) of the flattened whole tensor this rank holds."""
    if not isinstance(t, DTensor):
        return 0, t.numel()
    if t.placements != (Shard(0),):
        raise ValueError(f"a sharded tensor is held as rows (Shard(0)), not {t.placements}")
    r0, r1 = fsdp_rows(t.shape[0], t.device_mesh.get_local_rank(), t.device_mesh.size())
    if t.to_local().shape[0] != r1 - r0:  # FSDP2 cuts as torch.chunk does; say so if that changes
        raise ValueError(f"a shard holds {t.to_local().shape[0]} rows where fsdp_rows gives {r1 - r0}")
    row = math.prod(t.shape[1:])
    return r0 * row, r1 * row


def piece(t: torch.Tensor) -> Piece:
    """`t` as the piece this rank holds: whole (and the same on every rank) or its rows."""
    if not isinstance(t, DTensor):
        return Piece.whole(t)
    lo, hi = held_range(t)
    return Piece(t.to_local().detach().reshape(-1), lo, hi, tuple(t.shape))


def install(t: torch.Tensor, flat: torch.Tensor) -> None:
    """Copy `flat` (the held range, flattened) into what this rank holds of `t`."""
    with torch.no_grad():  # a DTensor's local view is written in place only outside autograd
        mine = local(t)
        mine.copy_(flat.view(mine.shape))


def like(t: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """A tensor laid out as `t` (a DTensor: sharded as it is) holding `flat`, the held range."""
    if not isinstance(t, DTensor):
        return flat.view(t.shape).to(t.device)
    rows = flat.view(t.to_local().shape).to(t.device)
    return DTensor.from_local(rows, t.device_mesh, t.placements, shape=t.shape, stride=t.stride())
