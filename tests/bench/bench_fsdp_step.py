"""The fsdp layout's step (train.fsdp.fsdp_step) against a plain FSDP2 loop (`fully_shard` on each
block and the root, backward per micro-batch, clip, AdamW: tests/bench/torchrun_ddp.py's), in the
same two gloo processes, in alternating blocks of steps: the machine's drift hits both alike.
No Ray: this is the step's own cost (the exact global batch, per-micro-batch seeding, the
statistics reduction), apart from running under Ray (bench_vs_torchrun.py --layout fsdp).

    OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \\
        tests/bench/bench_fsdp_step.py [JOB] [--steps 60] [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from elastune.batch_plan import batch_plan
from elastune.data.dataset import TokenWindows
from elastune.recipes import load_recipe
from elastune.recipes.gpt import sample_losses
from elastune.spec import load_spec
from elastune.train.fsdp import fsdp_step, shard_model
from elastune.train.optim import build_optimizer, set_hyper
from elastune.train.state import Progress, TrainState
from elastune.train.step import StepContext, StepStats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", nargs="?", default="jobs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    spec = load_spec(args.job)
    recipe = load_recipe(spec.model)
    data = TokenWindows(os.path.abspath(spec.data.path))
    g, m, o = spec.batch.global_batch_size, spec.batch.micro_batch_size, spec.optimizer

    torch.manual_seed(spec.seed)
    plain = recipe.build_model()
    for block in plain.blocks:
        fully_shard(block)
    fully_shard(plain)
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=o.lr, weight_decay=o.weight_decay, foreach=True)
    rng = np.random.default_rng(rank)
    per_rank = g // world

    def plain_step() -> None:
        plain_opt.zero_grad(set_to_none=True)
        for _ in range(per_rank // m):
            (sample_losses(plain, data.take(rng.integers(0, len(data), m))).sum() / per_rank).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), o.grad_clip_norm or 1e9)
        plain_opt.step()

    torch.manual_seed(spec.seed)
    ours = shard_model(recipe.build_model())
    state = TrainState(ours, build_optimizer(ours, o))
    ctx = StepContext(ours, recipe, data, spec.seed, o.grad_clip_norm)
    stats, plan, done = StepStats(torch.device("cpu")), batch_plan(g, m, world), [0]

    def our_step() -> None:
        set_hyper(state.optimizer, o.lr, o.weight_decay)
        fsdp_step(ctx, state, stats, plan, rank, Progress(done[0], done[0] * g))
        done[0] += 1

    ms: dict[str, list[float]] = {"FSDP2": [], "elastune fsdp_step": []}
    for _ in range(args.rounds):
        for name, step in (("FSDP2", plain_step), ("elastune fsdp_step", our_step)):
            for _ in range(5):  # warm
                step()
            dist.barrier()
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            dist.barrier()
            ms[name].append((time.perf_counter() - started) / args.steps * 1e3)
    if rank == 0:
        for name, values in ms.items():
            print(f"{name}: {statistics.median(values):.1f} ms a step (rounds: {', '.join(f'{v:.1f}' for v in values)})")
        ratios = [a / b for a, b in zip(ms["FSDP2"], ms["elastune fsdp_step"])]
        print(
            f"throughput elastune / FSDP2: median {statistics.median(ratios):.3f} "
            f"(per round {', '.join(f'{r:.3f}' for r in ratios)})"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
