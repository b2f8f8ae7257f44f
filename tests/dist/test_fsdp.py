"""The fully sharded layout (train.fsdp, FSDP2) with real gloo process groups: at every world size
1..5 (divisors or not; at W = 5 with global batch 18 in micro-batches of 4, ranks run 1, 1, 1, 1, 1
micro-batches and one of them 2 samples; at W = 4 one rank runs two passes and the others one and
an empty one) the update is the single-process full-batch update within 1e-6, without dropout
against the closed form (one forward over the whole batch, plain SGD), with dropout against the
replicated layout's single-process step (train.step at W = 1, itself proven against the closed
form in test_exact_batch.py): randomness belongs to micro-batches, not to ranks or layouts; and so
with activation checkpointing (each block recomputed in backward, its dropout masks replayed)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from elastune.batch_plan import batch_plan
from elastune.data.sampler import positions, sample_indices, tally
from elastune.recipes import Recipe
from elastune.recipes.gpt import sample_losses
from elastune.spec.models import SGDSpec
from elastune.train.fsdp import fsdp_step, shard_model
from elastune.train.memory import held
from elastune.train.optim import build_optimizer, set_hyper
from elastune.train.state import Progress, TrainState
from elastune.train.step import GradBuffer, StepContext, StepStats, train_step
from tests.helpers import TINY, RandomTokens, free_port, reference_sgd_update, rel_err, start_ranks, tiny_model

G, M, LR, SEED = 18, 4, 0.5, 11


def _step(model, world: int, rank: int, sharded: bool):
    opt = build_optimizer(model, SGDSpec(name="sgd", lr=LR, momentum=0.0))
    set_hyper(opt, LR, 0.0)
    ctx = StepContext(model, Recipe(build_model=lambda: model, sample_losses=sample_losses), RandomTokens(), SEED)
    plan = batch_plan(G, M, world)
    if sharded:
        return fsdp_step(ctx, TrainState(model, opt), StepStats(torch.device("cpu")), plan, rank, Progress(0, 0))
    return train_step(ctx, TrainState(model, opt), GradBuffer(model), plan, rank, Progress(0, 0))


def _worker(rank: int, world: int, port: int, out: str, dropout: float, recompute: bool = False) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        options = TINY.model_copy(update={"dropout": dropout, "activation_checkpointing": recompute})
        model = shard_model(tiny_model(options))
        result = _step(model, world, rank, sharded=True)
        tensors = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}  # a collective
        local = {f"local/{n}": p.to_local().detach().clone() for n, p in model.named_parameters()}
        tensors |= local | {"loss": torch.tensor([result.loss]), "tally": torch.tensor(result.tally, dtype=torch.float64)}
        # What the rank holds with AdamW's two moments (its step on the zeroed gradient rows creates them).
        adam = torch.optim.AdamW(model.parameters())
        adam.step()
        mem = held(model, adam)
        tensors["held"] = torch.tensor([mem.params, mem.grads, mem.optimizer], dtype=torch.float64)
        save_file(tensors, os.path.join(out, f"d{dropout}{'-ac' if recompute else ''}-w{world}-r{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fsdp"))
    for world in (1, 2, 3, 4, 5):
        start_ranks(_worker, (world, free_port(), out, 0.0), world)
    for world in (1, 3, 5):
        start_ranks(_worker, (world, free_port(), out, 0.2), world)
    start_ranks(_worker, (3, free_port(), out, 0.2, True), 3)  # activation checkpointing: blocks recomputed in backward
    return lambda dropout, world, rank: load_file(os.path.join(out, f"d{dropout}-w{world}-r{rank}.safetensors"))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_the_sharded_update_is_the_full_batch_update(runs, world):
    source = RandomTokens()
    idx = sample_indices(positions(0, 0, G), len(source), SEED)
    expected = reference_sgd_update(tiny_model(), source, idx, LR)
    with torch.no_grad():
        loss = float(sample_losses(tiny_model(), source.take(idx)).mean())
    for rank in range(world):
        got = runs(0.0, world, rank)
        for name, want in expected.items():
            assert rel_err(got[name], want) <= 1e-6, (world, rank, name)
            # Each rank holds the rows torch.chunk gives it: ceil(d0 / W) a rank, the last ones fewer or none.
            rows = -(-want.shape[0] // world)
            assert torch.equal(got[f"local/{name}"], got[name][rank * rows : (rank + 1) * rows]), (world, rank, name)
        assert float(got["loss"]) == pytest.approx(loss, rel=1e-6)
        assert tuple(got["tally"].long().tolist()) == tally(idx)  # every sample of the batch read once
    assert rel_err(runs(0.0, world, 0)["tok.weight"], tiny_model().tok.weight.detach()) > 1e-3  # it moved


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_a_rank_holds_its_rows_of_parameters_gradients_and_moments(runs, world):
    # Closed form: fp32 rows as torch.chunk cuts dim 0, gradients the same, AdamW's two moments
    # twice that plus a float32 step count per parameter.
    params = list(tiny_model().parameters())
    total = sum(4 * p.numel() for p in params)
    got = [runs(0.0, world, r)["held"].long().tolist() for r in range(world)]
    for rank, (p_bytes, g_bytes, o_bytes) in enumerate(got):
        rows = sum(4 * c.numel() for p in params for c in torch.chunk(p.detach(), world)[rank : rank + 1])
        assert (p_bytes, g_bytes, o_bytes) == (rows, rows, 2 * rows + 4 * len(params)), (world, rank)
    assert sum(g[0] for g in got) == total  # every row held once: no padding counted, nothing twice


def test_dropout_randomness_belongs_to_micro_batches_not_to_ranks_or_layouts(runs):
    model = tiny_model(TINY.model_copy(update={"dropout": 0.2}))
    replicated = _step(model, 1, 0, sharded=False)
    for key, world in ((0.2, 1), (0.2, 3), (0.2, 5), ("0.2-ac", 3)):  # "-ac": with activation checkpointing
        for rank in range(world):
            got = runs(key, world, rank)
            for name, p in model.named_parameters():
                assert rel_err(got[name], p.detach()) <= 1e-6, (world, rank, name)
            assert float(got["loss"]) == pytest.approx(replicated.loss, rel=1e-6)
    no_dropout = reference_sgd_update(tiny_model(), RandomTokens(), sample_indices(positions(0, 0, G), 97, SEED), LR)
    assert rel_err(runs(0.2, 1, 0)["blocks.0.mlp.0.weight"], no_dropout["blocks.0.mlp.0.weight"]) > 1e-4  # dropout was on


def test_a_model_with_a_scalar_parameter_is_refused_naming_it():
    from torch import nn

    from elastune.train.fsdp import shard_problem

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.gain = nn.Linear(4, 4), nn.Parameter(torch.tensor(1.0))

    problem = shard_problem(Scaled)
    assert problem is not None and "gain" in problem and "scaling.layout: replicated" in problem
    assert shard_problem(tiny_model) is None
