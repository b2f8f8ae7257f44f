"""What training state a worker holds in memory, in bytes: its parameters, gradients and optimizer
state, as the layout divides them (docs/checkpoints.md#memory-per-worker).

Counted from the tensors themselves, after a step (the optimizer's state exists from its first
step): a sharded tensor (fsdp) counts the rows this rank holds, a tensor shared by two names
(a tied head) counts once, and gradients count the buffers they live in (the replicated layouts'
flat buffers, with the noise scale's second buffer where it is on). Activations, the bf16 copies
FSDP gathers for one block at a time and the allocator's reserve are not training state and are
not counted (a GPU's peak is `torch.cuda.max_memory_allocated`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from elastune.train import shards


@dataclass(frozen=True)
class Held:
    """Bytes of training state one worker holds."""

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of what this rank holds of each tensor (its rows of a sharded one); a tensor given twice
    (the same storage and offset: a tied weight) counts once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for whole in tensors:
        t = shards.local(whole)
        key = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """The state tensors of a torch optimizer, or of the one a ZeRO optimizer wraps (its slices)."""
    inner = getattr(optimizer, "inner", optimizer)
    return [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def held(model: nn.Module, optimizer, grad_buffers: Iterable[torch.Tensor] | None = None) -> Held:
    """What this rank holds of `model`, its gradients and `optimizer`'s state. `grad_buffers`: the
    flat buffers the gradients are views into (a GradBuffer's); None: each parameter's own .grad."""
    params = list(model.parameters())
    grads = list(grad_buffers) if grad_buffers is not None else [p.grad for p in params if p.grad is not None]
    return Held(nbytes(params), nbytes(grads), nbytes(optimizer_tensors(optimizer)))
