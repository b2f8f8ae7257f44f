"""`step.compile: true`: the compiled model trains like the eager one, dropout masks included,
with the gradient buckets' hooks firing as in eager mode (the rank-order sums over 3 gloo ranks
agree with one eager process); and in the fsdp layout, its blocks compiled before sharding, over
2 gloo ranks."""

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
from elastune.train.fsdp import fsdp_step, shard_model
from elastune.train.optim import build_optimizer, set_hyper
from elastune.train.precision import compile_model, compile_problem
from elastune.train.state import Progress, TrainState
from elastune.train.step import GradBuffer, StepContext, StepStats, train_step
from tests.helpers import TINY, RandomTokens, free_port, rel_err, start_ranks, tiny_model

pytestmark = pytest.mark.skipif(compile_problem("cpu") is not None, reason=str(compile_problem("cpu")))

G, M, LR, SEED, STEPS = 24, 4, 0.5, 5, 2
# Inductor fuses and re-associates fp32 reductions (layer norm, softmax, matmul tiles): each op
# is within its reduction length (<= 64 here) times 2^-24 of eager's, ~4e-6 at worst; the
# update of two steps stays within 1e-5 (another dropout mask or split is off by over 1e-2).
COMPILE_REL = 1e-5


def _train(rank: int, world: int, port: int, out: str, compiled: bool, sharded: bool = False) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = tiny_model(TINY.model_copy(update={"dropout": 0.2}))
        if sharded:
            model = shard_model(model, compile=compiled)
        opt = build_optimizer(model, SGDSpec(name="sgd", lr=LR, momentum=0.0))
        set_hyper(opt, LR, 0.0)
        forward = compile_model(model) if compiled and not sharded else model
        recipe = Recipe(build_model=lambda: model, sample_losses=sample_losses)
        grads = None if sharded else GradBuffer(model, bucket_bytes=512)
        for step in range(STEPS):
            ctx, state, plan = (
                StepContext(forward, recipe, RandomTokens(), SEED),
                TrainState(forward, opt),
                batch_plan(G, M, world),
            )
            if grads is None:
                fsdp_step(ctx, state, StepStats(torch.device("cpu")), plan, rank, Progress(step, step * G))
            else:
                train_step(ctx, state, grads, plan, rank, Progress(step, step * G))
        whole = {n: (p.full_tensor() if sharded else p).detach().clone() for n, p in model.named_parameters()}
        save_file(whole, os.path.join(out, f"{compiled}-{'fsdp' if sharded else world}-r{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile")
    start_ranks(_train, (1, free_port(), str(out), False), 1)
    return out


@pytest.mark.parametrize(("world", "sharded"), [(3, False), (2, True)], ids=["replicated", "fsdp"])
def test_a_compiled_model_trains_like_the_eager_one(trained, world, sharded):
    start_ranks(_train, (world, free_port(), str(trained), True, sharded), world)
    eager = load_file(str(trained / "False-1-r0.safetensors"))
    start = dict(tiny_model().named_parameters())
    want = torch.cat([(eager[n] - p.detach()).flatten() for n, p in start.items()])
    for rank in range(world):
        got = load_file(str(trained / f"True-{'fsdp' if sharded else world}-r{rank}.safetensors"))
        # The whole update (all parameters' together: a single small gradient summed with
        # cancellation, a layer norm's, may lose more digits alone without moving the step).
        err = rel_err(torch.cat([(got[n] - p.detach()).flatten() for n, p in start.items()]), want)
        assert err <= COMPILE_REL, f"rank {rank}: the update is off by {err:.2e} relative"
    assert rel_err(eager["blocks.0.mlp.0.weight"], start["blocks.0.mlp.0.weight"].detach()) > 1e-3  # it trained
