"""The anchor: plain torchrun (gloo) on the same model, data and batch, in DistributedDataParallel
or, with `fsdp` as the fourth argument, PyTorch's FSDP2 (`fully_shard` on each block, then the
root, as its documentation and torchtitan do; its default reduce-scatter, which averages).

Each rank takes its share of every global batch in micro-batches: DDP reduces on the last one
(no_sync before it), FSDP2 reduce-scatters every one (its default), so the work per step matches
`elastune run` at world size 2 in the replicated and fsdp layouts. Prints one JSON line on rank 0.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from elastune.data.dataset import TokenWindows
from elastune.recipes.gpt import GPT, sample_losses
from elastune.spec import load_spec


def main(job: str, steps: int, warmup: int, layout: str = "ddp") -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    spec = load_spec(job)
    torch.manual_seed(spec.seed)
    model = GPT(spec.model.options)
    if layout == "fsdp":
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    else:
        model = DDP(model)
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
            last = i == len(micro) - 1
            with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
                (sample_losses(model, data.take(idx)).sum() / per_rank).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.optimizer.grad_clip_norm or 1e9)
        opt.step()
        stamps.append(time.perf_counter())
    if rank == 0:
        window = stamps[warmup:]
        print(json.dumps({"samples_per_s": g * (len(window) - 1) / (window[-1] - window[0])}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
