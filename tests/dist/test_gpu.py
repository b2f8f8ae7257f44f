"""The step on CUDA: each precision against its single-process reference, compiled, and checkpoints
from GPU training loading bit-exact on the CPU. Skipped without a CUDA device; `make gpu-check`
runs them with the GPU benchmarks."""

from __future__ import annotations

import pytest
import torch

from elastune.batch_plan import batch_plan
from elastune.data.sampler import positions, sample_indices
from elastune.recipes import Recipe
from elastune.recipes.gpt import sample_losses
from elastune.spec.models import SGDSpec
from elastune.train.optim import build_optimizer, set_hyper
from elastune.train.state import Progress, TrainState
from elastune.train.step import GradBuffer, StepContext, train_step
from tests.helpers import TINY, RandomTokens, reference_sgd_update, rel_err, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_cuda_step_matches_cpu_reference():
    g, m, lr, seed = 24, 4, 0.5, 3
    source = RandomTokens()
    expected = reference_sgd_update(tiny_model(), source, sample_indices(positions(0, 0, g), len(source), seed), lr)
    model = tiny_model().cuda()
    opt = build_optimizer(model, SGDSpec(name="sgd", lr=lr, momentum=0.0))
    set_hyper(opt, lr, 0.0)
    recipe = Recipe(build_model=lambda: model, sample_losses=sample_losses)
    train_step(
        StepContext(model, recipe, source, seed),
        TrainState(model, opt),
        GradBuffer(model),
        batch_plan(g, m, 1),
        0,
        Progress(0, 0),
    )
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
    ckpt.save(Manifest(1, 24, "h", {}, {}), state_tensors(TrainState(model, opt)))
    saved = {k: v.detach().cpu() for k, v in state_tensors(TrainState(model, opt)).items()}
    for device in ("cpu", "cuda"):
        other = tiny_model(seed=9).to(device)
        other_opt = build_optimizer(other, AdamWSpec(name="adamw", lr=1e-2))
        load_state(TrainState(other, other_opt), ckpt.load(ckpt.latest()), "ckpt")
        for name, t in state_tensors(TrainState(other, other_opt)).items():
            assert torch.equal(t.detach().cpu(), saved[name]), (device, name)
        other_opt.step()  # optimizer state landed where the optimizer can use it


def _reference_grads(
    device: str, precision: str, scale: float, g: int, m: int, seed: int, dropout: float
) -> dict[str, torch.Tensor]:
    """One process on `device`: the step's micro-batches one after another, each under its own
    seed, in `precision` (autocast; fp16 with the loss scale), gradients summed by backward."""
    from elastune.train.precision import AUTOCAST
    from elastune.train.rng import micro_batch_seed

    source, model = RandomTokens(), tiny_model(TINY.model_copy(update={"dropout": dropout})).to(device)
    model.train()
    idx = sample_indices(positions(0, 0, g), len(source), seed)
    dtype = AUTOCAST[precision]
    for i in range(0, g, m):
        torch.manual_seed(micro_batch_seed(seed, 0, i // m))
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            total = sample_losses(model, source.take(idx[i : i + m]).to(device)).float().sum()
        (total * scale / g).backward()
    return {n: (p.grad / scale).cpu() for n, p in model.named_parameters()}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_each_precision_on_cuda_matches_its_single_process_reference(precision):
    """Elastune's step (buckets, autocast, fp16's scale) against the same micro-batches summed by
    backward on the same GPU: the same kernels on the same inputs, so only the fp32 sum of the
    micro-batch gradients may associate differently (1e-6 of the norm)."""
    from elastune.train.precision import LossScale

    g, m, lr, seed, scale = 24, 4, 0.5, 3, 1024.0
    want = _reference_grads("cuda", precision, scale if precision == "fp16" else 1.0, g, m, seed, 0.1)
    model = tiny_model(TINY.model_copy(update={"dropout": 0.1})).cuda()
    opt = build_optimizer(model, SGDSpec(name="sgd", lr=lr, momentum=0.0))
    set_hyper(opt, lr, 0.0)
    recipe = Recipe(build_model=lambda: model, sample_losses=sample_losses)
    scaler = LossScale(scale) if precision == "fp16" else None
    result = train_step(
        StepContext(model, recipe, RandomTokens(), seed, precision=precision),
        TrainState(model, opt, scaler=scaler),
        GradBuffer(model, micro_batch_norms=True, bucket_bytes=4096),
        batch_plan(g, m, 1),
        0,
        Progress(0, 0),
    )
    assert not result.skipped
    for name, p in model.named_parameters():
        assert rel_err(p.grad.cpu(), want[name]) <= 1e-6, f"{precision} {name}"


def test_a_compiled_step_on_cuda_trains_like_the_eager_one():
    from elastune.train.precision import compile_model

    g, m, lr, seed = 24, 4, 0.5, 3
    updates = []
    for compiled in (False, True):
        model = tiny_model(TINY.model_copy(update={"dropout": 0.1})).cuda()
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        opt = build_optimizer(model, SGDSpec(name="sgd", lr=lr, momentum=0.0))
        set_hyper(opt, lr, 0.0)
        recipe = Recipe(build_model=lambda: model, sample_losses=sample_losses)
        forward, grads = compile_model(model) if compiled else model, GradBuffer(model)
        for step in range(2):
            train_step(
                StepContext(forward, recipe, RandomTokens(), seed, precision="bf16"),
                TrainState(forward, opt),
                grads,
                batch_plan(g, m, 1),
                0,
                Progress(step, step * g),
            )
        updates.append((torch.cat([p.detach().flatten() for p in model.parameters()]) - start).cpu())
    # Fused kernels re-associate reductions, and in bf16 a re-associated activation may round one
    # unit (2^-8) differently: the update agrees to 1e-2 of its norm; other dropout masks would not.
    assert rel_err(updates[1], updates[0]) <= 1e-2


def test_a_checkpoint_of_bf16_cuda_training_loads_bit_exact_on_cpu(tmp_path):
    """Masters are fp32 whatever the precision: what the GPU held is what the CPU loads."""
    from elastune.checkpoint.checkpointer import Checkpointer
    from elastune.checkpoint.format import Manifest
    from elastune.spec.models import AdamWSpec
    from elastune.train.state import restore_state, state_pieces

    g, m, seed = 24, 4, 3
    model = tiny_model().cuda()
    opt = build_optimizer(model, AdamWSpec(name="adamw", lr=1e-2))
    recipe = Recipe(build_model=lambda: model, sample_losses=sample_losses)
    grads = GradBuffer(model)
    for step in range(3):
        train_step(
            StepContext(model, recipe, RandomTokens(), seed, precision="bf16"),
            TrainState(model, opt),
            grads,
            batch_plan(g, m, 1),
            0,
            Progress(step, step * g),
        )
    ckpt = Checkpointer(str(tmp_path))
    held = state_pieces(TrainState(model, opt))
    ckpt.save(Manifest(3, 3 * g, "h", {"kind": "replicated"}, {}), held, 0, 1)
    other = tiny_model(seed=9)
    other_opt = build_optimizer(other, AdamWSpec(name="adamw", lr=1e-2))
    m_ = ckpt.latest()
    restore_state(TrainState(other, other_opt), m_.shapes, lambda wanted: ckpt.load_pieces(m_, wanted), "ckpt")
    loaded = state_pieces(TrainState(other, other_opt))
    assert set(loaded) == set(held)
    for name, piece in held.items():
        assert piece.data.dtype == loaded[name].data.dtype and (name.startswith("optim/") or piece.data.dtype == torch.float32)
        assert torch.equal(loaded[name].data.cpu(), piece.data.cpu()), name
