"""The exact global batch with real gloo process groups: any world size, divisor or not,
gives the single-process full-batch update (global batch 24 in micro-batches of 4 = 6), with the
micro-batch gradient norms kept for the noise scale (which must not change the update), and the
noise-scale estimates a single process computes from the six micro-batch gradients one by one."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from elastune.batch_plan import batch_plan
from elastune.data.sampler import positions, sample_indices
from elastune.metrics.noise import noise_estimates
from elastune.recipes import Recipe
from elastune.recipes.gpt import sample_losses
from elastune.spec.models import SGDSpec
from elastune.train.optim import build_optimizer, set_hyper
from elastune.train.state import Progress, TrainState
from elastune.train.step import GradBuffer, StepContext, train_step
from tests.helpers import TINY, RandomTokens, free_port, reference_sgd_update, rel_err, start_ranks, tiny_model

G, M, LR, SEED = 24, 4, 0.5, 11


def _worker(rank: int, world: int, port: int, out: str, dropout: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        options = TINY.model_copy(update={"dropout": dropout})
        model = tiny_model(options)
        opt = build_optimizer(model, SGDSpec(name="sgd", lr=LR, momentum=0.0))
        set_hyper(opt, LR, 0.0)
        recipe = Recipe(build_model=lambda: model, sample_losses=sample_losses)
        grads = GradBuffer(model, micro_batch_norms=True)
        result = train_step(
            StepContext(model, recipe, RandomTokens(), SEED),
            TrainState(model, opt),
            grads,
            batch_plan(G, M, world),
            rank,
            Progress(0, 0),
        )
        tensors = {n: p.detach().clone() for n, p in model.named_parameters()}
        tensors["loss"] = torch.tensor([result.loss])
        tensors["noise"] = torch.tensor(result.noise, dtype=torch.float64)
        save_file(tensors, os.path.join(out, f"w{world}-r{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _run(world: int, out: str, dropout: float = 0.0) -> list[dict[str, torch.Tensor]]:
    start_ranks(_worker, (world, free_port(), out, dropout), world)
    return [load_file(os.path.join(out, f"w{world}-r{r}.safetensors")) for r in range(world)]


@pytest.fixture(scope="module")
def reference():
    source = RandomTokens()
    idx = sample_indices(positions(0, 0, G), len(source), SEED)
    model = tiny_model()
    expected = reference_sgd_update(model, source, idx, LR)
    with torch.no_grad():
        loss = float(sample_losses(tiny_model(), source.take(idx)).mean())
    return expected, loss, noise_reference(source, idx)


def noise_reference(source, idx) -> tuple[float, float]:
    """(tr(Sigma), |G|^2) from each micro-batch's mean gradient, computed on its own."""

    def mean_grad(rows) -> torch.Tensor:
        model = tiny_model()
        sample_losses(model, source.take(rows)).mean().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).double()

    small = [mean_grad(idx[i : i + M]) for i in range(0, G, M)]
    whole = mean_grad(idx)
    return noise_estimates(sum(float(g @ g) for g in small), len(small) / M, len(small), float(whole @ whole), G)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_update_equals_single_process_full_batch(tmp_path, reference, world):
    expected, loss, noise = reference
    ranks = _run(world, str(tmp_path))
    for rank, got in enumerate(ranks):
        for name, want in expected.items():
            err = rel_err(got[name], want)
            assert err <= 1e-6, f"world {world} rank {rank} {name}: relative error {err:.2e}"
        assert float(got["loss"]) == pytest.approx(loss, rel=1e-6)
        assert got["noise"].tolist() == pytest.approx(noise, rel=1e-5), f"world {world} rank {rank}"
    # The step really moved the parameters (the comparison above is not vacuous).
    assert rel_err(ranks[0]["tok.weight"], tiny_model().tok.weight.detach()) > 1e-3


def test_dropout_randomness_belongs_to_micro_batches_not_ranks(tmp_path, reference):
    one = _run(1, str(tmp_path), dropout=0.2)[0]
    three = _run(3, str(tmp_path), dropout=0.2)
    expected, _, _ = reference
    for name in expected:
        for rank in range(3):
            assert rel_err(three[rank][name], one[name]) <= 1e-6, f"{name} rank {rank}"
    # Dropout was on: the update differs from the dropout-free one.
    assert rel_err(one["blocks.0.mlp.0.weight"], expected["blocks.0.mlp.0.weight"]) > 1e-4
