"""Training state each worker holds (parameters + gradients + optimizer state, train.memory) in
each layout at W = 1, 2, 4, after one real AdamW step over real gloo ranks; fsdp and zero1 as a
ratio to replicated at the same W (the anchor). Target at W = 4: fsdp / replicated <= 0.3.

    .venv/bin/python tests/bench/bench_memory.py [--job tests/bench/comm_heavy.yaml] [--worlds 1 2 4]

The job names the model (its `model.options`, a byte_gpt or gpt recipe's); the batch is one
micro-batch per rank. The replicated layout is measured without the noise-scale buffer (what
the layouts themselves hold) and with it (the default there: one more gradient-sized buffer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers import RandomTokens, free_port, start_ranks

from elastune.batch_plan import batch_plan
from elastune.recipes import Recipe
from elastune.recipes.gpt import GPT, sample_losses
from elastune.spec import load_spec
from elastune.spec.models import AdamWSpec
from elastune.train.fsdp import fsdp_step, shard_model
from elastune.train.memory import held
from elastune.train.optim import set_hyper
from elastune.train.state import Progress, TrainState
from elastune.train.step import GradBuffer, StepContext, StepStats, train_step

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {
    "replicated": ("replicated", False),
    "replicated+noise": ("replicated", True),
    "zero1": ("zero1", False),
    "fsdp": ("fsdp", False),
}


def _rank(rank: int, world: int, port: int, job: str, variant: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        spec = load_spec(job)
        layout, noise = VARIANTS[variant]
        torch.manual_seed(0)
        model = GPT(spec.model.options)
        if layout == "fsdp":
            model = shard_model(model)
        state = TrainState.build(model, AdamWSpec(name="adamw", lr=1e-3), layout, rank, world)
        set_hyper(state.optimizer, 1e-3, 0.0)
        window = spec.model.options.context + 1
        ctx = StepContext(model, Recipe(build_model=lambda: model, sample_losses=sample_losses), RandomTokens(64, window), 0)
        plan = batch_plan(2 * world, 2, world)
        grads = None if layout == "fsdp" else GradBuffer(model, micro_batch_norms=noise)
        if grads is None:
            fsdp_step(ctx, state, StepStats(torch.device("cpu")), plan, rank, Progress())
        else:
            train_step(ctx, state, grads, plan, rank, Progress())
        mine = held(model, state.optimizer, None if grads is None else grads.storage)
        Path(out, f"{variant}-{world}-{rank}.json").write_text(json.dumps(mine.__dict__ | {"total": mine.total}))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", type=Path, default=ROOT / "tests" / "bench" / "comm_heavy.yaml")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as out:
        figures: dict[tuple[str, int], dict[str, int]] = {}
        for world in args.worlds:
            for variant in VARIANTS:
                start_ranks(_rank, (world, free_port(), str(args.job.resolve()), variant, out), world)
                ranks = [json.loads(Path(out, f"{variant}-{world}-{r}.json").read_text()) for r in range(world)]
                figures[variant, world] = max(ranks, key=lambda h: h["total"])  # the worker that holds most
    mib = 2**20
    print(f"model: {args.job.name} ({figures['replicated', args.worlds[0]]['params'] // 4:,} fp32 parameters)")
    print(f"{'layout':<18}{'W':>3}{'params MiB':>12}{'grads MiB':>11}{'optim MiB':>11}{'total MiB':>11}{'/ replicated':>14}")
    for (variant, world), h in figures.items():
        ratio = h["total"] / figures["replicated", world]["total"]
        print(
            f"{variant:<18}{world:>3}{h['params'] / mib:>12.2f}{h['grads'] / mib:>11.2f}"
            f"{h['optimizer'] / mib:>11.2f}{h['total'] / mib:>11.2f}{ratio:>14.3f}"
        )
    if ("fsdp", 4) in figures:
        print(
            f"fsdp / replicated at W = 4: {figures['fsdp', 4]['total'] / figures['replicated', 4]['total']:.3f} (target <= 0.3)"
        )


if __name__ == "__main__":
    main()
