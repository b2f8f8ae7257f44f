"""The anchor: plain torchrun + DistributedDataParallel (gloo) on the same model, data and batch.

Each rank takes its half of every global batch in micro-batches (no_sync on all but the last),
so the work per step matches `elastune run` at world size 2. Prints one JSON line on rank 0.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from elastune.data.dataset import TokenWindows
from elastune.recipes.gpt import GPT, sample_losses
from elastune.spec import load_spec


def main(job: str, steps: int, warmup: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    spec = load_spec(job)
    torch.manual_seed(spec.seed)
    model = DDP(GPT(spec.model.options))
    opt = torch.optim.AdamW(model.parameters(), lr=spec.optimizer.lr, weight_decay=spec.optimizer.weight_decay, foreach=True)
    data = TokenWindows(os.path.abspath(spec.data.path))
    g, m = spec.batch.global_batch_size, spec.batch.micro_batch_size
    per_rank = g // world
    rng = np.random.default_rng(rank)
    stamps = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        micro = [rng.integers(0, len(data), m) for _ in range(per_rank // m)]
        for i, idx in enumerate(micro):
            ctx = model.no_sync() if i < len(micro) - 1 else torch.enable_grad()
            with ctx:
                (sample_losses(model, data.take(idx)).sum() / per_rank).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.optimizer.grad_clip_norm or 1e9)
        opt.step()
        stamps.append(time.perf_counter())
    if rank == 0:
        window = stamps[warmup:]
        print(json.dumps({"samples_per_s": g * (len(window) - 1) / (window[-1] - window[0])}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
