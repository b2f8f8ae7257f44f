"""Elastune's training step alone, in plain gloo processes (no Ray): separates the step's own
cost from running under Ray, for the throughput comparison in BENCHMARKS.md. With `fsdp` as the
fourth argument, the fsdp layout's step (train.fsdp) on a sharded model; compare with
`tests/bench/torchrun_ddp.py JOB STEPS WARMUP fsdp` (torchrun FSDP2) in the same minutes.

    .venv/bin/python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \
        tests/bench/step_without_ray.py jobs/quickstart.yaml 300 50 [fsdp]
"""

import os
import sys
import time

import torch
import torch.distributed as dist

from elastune.batch_plan import batch_plan
from elastune.data.dataset import TokenWindows
from elastune.recipes import load_recipe
from elastune.spec import load_spec
from elastune.train.fsdp import fsdp_step, shard_model
from elastune.train.optim import build_optimizer, set_hyper
from elastune.train.state import Progress, TrainState
from elastune.train.step import GradBuffer, StepContext, StepStats, train_step


def main(job: str, steps: int, warmup: int, layout: str = "replicated") -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    spec = load_spec(job)
    recipe = load_recipe(spec.model)
    torch.manual_seed(spec.seed)
    model = recipe.build_model()
    if layout == "fsdp":
        model = shard_model(model)
    opt = build_optimizer(model, spec.optimizer)
    grads = None if layout == "fsdp" else GradBuffer(model, micro_batch_norms=os.environ.get("NOISE", "1") == "1")
    source = TokenWindows(os.path.abspath(spec.data.path))
    g = spec.batch.global_batch_size
    plan = batch_plan(g, spec.batch.micro_batch_size, world)
    stamps = []
    for step in range(steps):
        set_hyper(opt, spec.optimizer.lr, spec.optimizer.weight_decay)
        ctx, state, at = (
            StepContext(model, recipe, source, spec.seed, spec.optimizer.grad_clip_norm),
            TrainState(model, opt),
            Progress(step, step * g),
        )
        if grads is None:
            fsdp_step(ctx, state, StepStats(torch.device("cpu")), plan, rank, at)
        else:
            train_step(ctx, state, grads, plan, rank, at)
        stamps.append(time.perf_counter())
    if rank == 0:
        window = stamps[warmup:]
        print(f"elastune {layout} step without Ray: {g * (len(window) - 1) / (window[-1] - window[0]):.0f} samples/s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
