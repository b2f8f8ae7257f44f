"""Held-out evaluation with real gloo process groups: the mean over every held-out window is the
same at every world size 1..5 (divisors or not, more ranks than eval micro-batches included),
equals a single process evaluating all windows at once, and switching evaluation on changes no
training number (dropout on: evaluation draws no random number)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from elastune.batch_plan import batch_plan
from elastune.recipes import Recipe
from elastune.recipes.gpt import sample_losses
from elastune.spec.models import SGDSpec
from elastune.train.evaluate import Evaluation, eval_due
from elastune.train.optim import build_optimizer, set_hyper
from elastune.train.state import Progress, TrainState
from elastune.train.step import GradBuffer, StepContext, train_step
from tests.helpers import TINY, RandomTokens, free_port, start_ranks, tiny_model

G, M, LR, SEED, STEPS = 24, 4, 0.5, 7, 3
HELD_OUT, EVAL_M = 7, 2  # 4 eval micro-batches, the last of 1: at W = 5 one rank evaluates nothing
# Across world sizes every per-window loss is the same bits (the same micro-batches on whatever
# rank); only the order of the float64 sum differs: 7 terms, well within 1e-12 relative. Against
# one forward pass over all windows at once, fp32 matmuls of other shapes round differently: a few
# ulps of fp32 per loss, so 1e-5 relative.
ACROSS_W, AGAINST_ONE_PASS = 1e-12, 1e-5


def _worker(rank: int, world: int, port: int, out: str, evaluate: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = tiny_model(TINY.model_copy(update={"dropout": 0.2}))
        opt = build_optimizer(model, SGDSpec(name="sgd", lr=LR, momentum=0.0))
        set_hyper(opt, LR, 0.0)
        recipe = Recipe(build_model=lambda: model, sample_losses=sample_losses)
        held = Evaluation(RandomTokens(n=HELD_OUT, seed=3), every_samples=G, samples=HELD_OUT, micro_batch_size=EVAL_M)
        ctx = StepContext(model, recipe, RandomTokens(), SEED, evaluation=held if evaluate else None)
        grads, state = GradBuffer(model), TrainState(model, opt)
        tensors = {}
        for step in range(STEPS):
            result = train_step(ctx, state, grads, batch_plan(G, M, world), rank, Progress(step, step * G))
            tensors[f"loss{step}"] = torch.tensor([result.loss], dtype=torch.float64)
            tensors[f"eval{step}"] = torch.tensor(
                [result.eval_loss if result.eval_loss is not None else -1.0], dtype=torch.float64
            )
            for n, p in model.named_parameters():
                tensors[f"{step}/{n}"] = p.detach().clone()
        save_file(tensors, os.path.join(out, f"{evaluate}-w{world}-r{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval"))
    for world in (1, 2, 3, 4, 5):
        start_ranks(_worker, (world, free_port(), out, True), world)
    start_ranks(_worker, (3, free_port(), out, False), 3)
    return lambda evaluate, world, rank=0: load_file(os.path.join(out, f"{evaluate}-w{world}-r{rank}.safetensors"))


def one_pass_reference(params: dict[str, torch.Tensor]) -> float:
    """Every held-out window in one forward pass of a model holding `params`, dropout off."""
    model = tiny_model(TINY.model_copy(update={"dropout": 0.2}))
    model.load_state_dict({n: params[n] for n, _ in model.named_parameters()}, strict=False)
    model.eval()
    with torch.no_grad():
        return float(sample_losses(model, RandomTokens(n=HELD_OUT, seed=3).take(range(HELD_OUT))).double().mean())


def test_every_world_size_evaluates_alike_and_like_one_pass(runs):
    initial = tiny_model(TINY.model_copy(update={"dropout": 0.2})).state_dict()
    first = float(runs(True, 1)["eval0"])  # the first step evaluates the initial parameters, the same at every W
    assert abs(first - one_pass_reference(initial)) <= AGAINST_ONE_PASS * abs(first)
    for world in (1, 2, 3, 4, 5):
        for rank in range(world):
            saved = runs(True, world, rank)
            assert abs(float(saved["eval0"]) - first) <= ACROSS_W * abs(first), (world, rank)
            # Later steps evaluate what this world size trained (the updates agree across W only to
            # fp32 summation order, tests/dist/test_exact_batch.py): each against its own parameters.
            for step in range(1, STEPS):
                want = one_pass_reference({k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith(f"{step - 1}/")})
                got = float(saved[f"eval{step}"])
                assert abs(got - want) <= AGAINST_ONE_PASS * abs(want), (world, rank, step, got, want)


def test_evaluation_changes_no_training_number(runs):
    on, off = runs(True, 3), runs(False, 3)
    for key, value in off.items():
        if key.startswith("eval"):
            assert float(value) == -1.0 and float(on[key]) > 0  # off: no evaluation; on: one per step
        else:
            assert torch.equal(on[key], value), key


def test_a_step_evaluates_when_its_samples_reach_a_multiple():
    # every 50 samples, steps of 24: [0,24) has 0, [24,48) none, [48,72) has 50, [72,96) none, [96,120) has 100
    assert [eval_due(s, 24, 50) for s in range(0, 120, 24)] == [True, False, True, False, True]
    assert all(eval_due(s, 24, 24) for s in range(0, 240, 24))  # every step
    assert [eval_due(s, 8, 24) for s in range(0, 48, 8)] == [True, False, False, True, False, False]
