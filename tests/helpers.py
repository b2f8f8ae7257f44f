"""Shared test helpers: tiny models, specs, and independent reference computations."""

from __future__ import annotations

import numpy as np
import torch

from elastune.recipes.byte_gpt import ByteGPT, sample_losses
from elastune.spec.models import ByteGPTOptions

TINY = ByteGPTOptions(num_layers=1, width=16, num_heads=2, context=16, dropout=0.0)


class RandomTokens:
    """A SampleSource of fixed random windows (deterministic from its seed)."""

    def __init__(self, n: int = 97, window: int = 17, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, 256, (n, window), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def take(self, indices: np.ndarray) -> torch.Tensor:
        return self.data[torch.as_tensor(indices)]


def tiny_model(options: ByteGPTOptions = TINY, seed: int = 0) -> ByteGPT:
    torch.manual_seed(seed)
    return ByteGPT(options)


def reference_sgd_update(model, source, indices: np.ndarray, lr: float) -> dict[str, torch.Tensor]:
    """Single process, one forward over the whole global batch, mean loss, plain SGD."""
    model.train()
    model.zero_grad()
    sample_losses(model, source.take(indices)).mean().backward()
    with torch.no_grad():
        return {n: p - lr * p.grad for n, p in model.named_parameters()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error |a - b| / |b| (elementwise relative error is meaningless near 0)."""
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()).clamp_min(1e-30))


def save_from_ranks(ckpt, manifest_args: tuple, tensors: dict[str, torch.Tensor], world: int):
    """Save as `world` ranks would, in one process: ranks 1.. write first, then rank 0 gathers
    their entries and commits. Returns rank 0's SaveReport."""
    from elastune.checkpoint.format import Manifest

    parts: dict[int, str] = {}
    for rank in range(world - 1, 0, -1):
        ckpt.save(Manifest(*manifest_args, {}, {}), tensors, rank, world, gather=lambda s, r=rank: parts.setdefault(r, s) and [])
    return ckpt.save(Manifest(*manifest_args, {}, {}), tensors, 0, world, gather=lambda s: [s] + [parts[r] for r in range(1, world)])
