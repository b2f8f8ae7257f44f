"""Randomness tied to samples, not ranks: each micro-batch's dropout (and any augmentation) draws
from a generator seeded by (job seed, step, micro-batch index), so the same micro-batch draws the
same numbers on whichever rank runs it, at any world size, and after any resume.
"""

from __future__ import annotations

import hashlib

import torch

# How a checkpoint's manifest names the scheme (meta.rng.scheme): what a reader must do to draw
# the same numbers.
SCHEME = "each micro-batch seeds the device generators with sha256(seed, step, micro_batch_index)"


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
