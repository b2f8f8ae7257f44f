"""The same step on CUDA (NCCL where two GPUs exist) matches the CPU full-batch reference."""

from __future__ import annotations

import pytest
import torch

from elastune.data.sampler import positions, sample_indices
from elastune.recipes import Recipe
from elastune.recipes.byte_gpt import sample_losses
from elastune.spec.models import SGDSpec
from elastune.train.batch_plan import batch_plan
from elastune.train.optim import build_optimizer, set_hyper
from elastune.train.step import GradBuffer, train_step
from tests.helpers import RandomTokens, reference_sgd_update, rel_err, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_cuda_step_matches_cpu_reference():
    g, m, lr, seed = 24, 4, 0.5, 3
    source = RandomTokens()
    expected = reference_sgd_update(tiny_model(), source, sample_indices(positions(0, 0, g), len(source), seed), lr)
    model = tiny_model().cuda()
    opt = build_optimizer(model, SGDSpec(name="sgd", lr=lr, momentum=0.0))
    set_hyper(opt, lr, 0.0)
    recipe = Recipe(build_model=lambda: model, sample_losses=sample_losses)
    train_step(model, opt, GradBuffer(model), recipe, source, batch_plan(g, m, 1), 0, 0, 0, seed)
    for name, p in model.named_parameters():
        assert p.device.type == "cuda"
        # TF32 and other kernels differ from the CPU's; 1e-4 still catches a wrong scale or split.
        assert rel_err(p.detach().cpu(), expected[name]) <= 1e-4, name


def test_checkpoint_from_cuda_loads_on_cpu_and_back(tmp_path):
    from elastune.checkpoint.checkpointer import Checkpointer
    from elastune.checkpoint.format import Manifest
    from elastune.spec.models import AdamWSpec
    from elastune.train.state import load_state, state_tensors

    model = tiny_model().cuda()
    opt = build_optimizer(model, AdamWSpec(name="adamw", lr=1e-2))
    model(torch.randint(0, 256, (2, 8), device="cuda")).sum().backward()
    opt.step()
    ckpt = Checkpointer(str(tmp_path))
    ckpt.save(Manifest(1, 24, "h", {}, {}), state_tensors(model, opt))
    saved = {k: v.detach().cpu() for k, v in state_tensors(model, opt).items()}
    for device in ("cpu", "cuda"):
        other = tiny_model(seed=9).to(device)
        other_opt = build_optimizer(other, AdamWSpec(name="adamw", lr=1e-2))
        load_state(other, other_opt, ckpt.load(ckpt.latest()), "ckpt")
        for name, t in state_tensors(other, other_opt).items():
            assert torch.equal(t.detach().cpu(), saved[name]), (device, name)
        other_opt.step()  # optimizer state landed where the optimizer can use it
