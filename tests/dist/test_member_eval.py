"""A search member's held-out loss at a boundary (train.member.held_out_loss), with real gloo
process groups: an fsdp model's ranks (W = 2, 3: shares of 23 windows in micro-batches of 4 that
fall unevenly) and a whole model read by one rank alone give the mean per-window loss of the
same windows taken in one batch by an unsharded model in this process."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from elastune.recipes import Recipe
from elastune.recipes.gpt import sample_losses
from elastune.train.evaluate import Evaluation
from elastune.train.fsdp import shard_model
from elastune.train.member import held_out_loss
from elastune.train.step import StepContext
from tests.helpers import TINY, RandomTokens, free_port, start_ranks, tiny_model

WINDOWS, MICRO = 23, 4


def _context(model) -> StepContext:
    evaluation = Evaluation(RandomTokens(n=WINDOWS, seed=3), every_samples=1, samples=WINDOWS, micro_batch_size=MICRO)
    return StepContext(
        model, Recipe(build_model=lambda: model, sample_losses=sample_losses), RandomTokens(), 0, evaluation=evaluation
    )


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loss = held_out_loss(_context(shard_model(tiny_model(TINY))), rank, world, sharded=True)
        save_file({"loss": torch.tensor([loss], dtype=torch.float64)}, os.path.join(out, f"w{world}-r{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_the_sharded_ranks_and_a_whole_model_agree_with_one_batch(world, tmp_path):
    model = tiny_model(TINY)
    model.eval()
    with torch.no_grad():
        want = sample_losses(model, RandomTokens(n=WINDOWS, seed=3).data).double().mean().item()
    # A whole model: each rank reads every window alone (no collective).
    assert held_out_loss(_context(tiny_model(TINY)), 1, world, sharded=False) == pytest.approx(want, rel=1e-6)
    start_ranks(_worker, (world, free_port(), str(tmp_path)), world)
    got = [load_file(str(tmp_path / f"w{world}-r{r}.safetensors"))["loss"].item() for r in range(world)]
    # Every rank the same sum; float32 forward passes over batches of 4 against one of 23 differ
    # in the last bits of each window's loss (float64 sums after that).
    assert len(set(got)) == 1 and got[0] == pytest.approx(want, rel=1e-6)
