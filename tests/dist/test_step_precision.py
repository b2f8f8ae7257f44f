"""The step's reduction and precision with real gloo process groups, at world sizes 1..5.

- Buckets: the gradient summed in many small buckets, launched as backward finishes them, is
  bitwise the gradient summed as one flat buffer (train.reduce's rank order), and the buckets
  really are launched while backward runs.
- Precision: in fp32, bf16 and fp16 the reduced gradient equals a single process's, computed
  here micro-batch by micro-batch in the same precision (autocast, the loss scale), within fp32
  summation-order error: the split over ranks adds the same micro-batch gradients in another
  association, nothing else.
- fp16's overflow: an inf in one rank's micro-batch makes every rank skip the same step and
  halve the scale; the next step applies.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from elastune.batch_plan import batch_plan
from elastune.data.sampler import positions, sample_indices
from elastune.recipes import Recipe
from elastune.recipes.gpt import sample_losses
from elastune.spec.models import SGDSpec
from elastune.train.optim import build_optimizer, set_hyper
from elastune.train.precision import AUTOCAST, LossScale
from elastune.train.rng import micro_batch_seed
from elastune.train.state import Progress, TrainState
from elastune.train.step import GradBuffer, StepContext, train_step
from tests.helpers import TINY, RandomTokens, free_port, rel_err, tiny_model

G, M, LR, SEED, DROPOUT = 24, 4, 0.5, 5, 0.1
FLAT, SMALL = 1 << 30, 512  # bytes per bucket: one bucket per dtype; one or a few parameters per bucket
SCALE = 1024.0
# Every rank's micro-batch gradients are bitwise the single process's (same ops, same inputs);
# only their fp32 sum is associated differently (per rank, then over ranks): a few ulps of the
# largest partial sums, far below 1e-6 of the gradient's norm at 6 micro-batches.
SUM_ORDER_REL = 1e-6


def _model():
    return tiny_model(TINY.model_copy(update={"dropout": DROPOUT}))


def _worker(rank: int, world: int, port: int, out: str, precision: str, poison: bool, idle_rank: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        plan = batch_plan(G, M, world)
        if idle_rank:  # the last rank gets no micro-batch: it still launches every bucket, as zeros
            ranges = [(0, 4), (4, 6)] + [(6, 6)] * (world - 2)
            plan = dataclasses.replace(plan, rank_ranges=tuple(ranges))
        tensors = {}
        for label, bucket_bytes in (("flat", FLAT), ("small", SMALL)):
            model = _model()
            opt = build_optimizer(model, SGDSpec(name="sgd", lr=LR, momentum=0.0))
            set_hyper(opt, LR, 0.0)
            grads = GradBuffer(model, micro_batch_norms=True, bucket_bytes=bucket_bytes)
            grads.offer = _pace_offer(rank, world)
            launched = []  # buckets launched when the first block's first gradient became final (the embeddings' still to come)
            model.blocks[0].ln1.weight.register_post_accumulate_grad_hook(lambda p: launched.append(grads._launched))
            scaler = LossScale(SCALE) if precision == "fp16" else None
            hit = {"armed": poison}

            def losses(m, batch):
                out = sample_losses(m, batch)
                if hit["armed"] and rank == world - 1:  # one rank, one micro-batch: an overflow
                    hit["armed"] = False
                    return out * float("inf")
                return out

            recipe = Recipe(build_model=lambda: model, sample_losses=losses)
            steps = 2 if poison else 1
            for step in range(steps):
                result = train_step(
                    StepContext(model, recipe, RandomTokens(), SEED, precision=precision),
                    TrainState(model, opt, scaler=scaler),
                    grads,
                    plan,
                    rank,
                    Progress(step, step * G),
                )
                tensors[f"{label}/skipped{step}"] = torch.tensor([result.skipped])
            for n, p in model.named_parameters():
                tensors[f"{label}/param/{n}"] = p.detach().clone()
                tensors[f"{label}/grad/{n}"] = p.grad.detach().clone()
            tensors[f"{label}/launched"] = torch.tensor(launched[-1:] or [-1])
            tensors[f"{label}/pace"] = grads.pace.clone()
            tensors[f"{label}/buckets"] = torch.tensor([len(grads.buckets)])
            if scaler is not None:
                tensors[f"{label}/scale"] = torch.tensor([scaler.scale])
        save_file(tensors, os.path.join(out, f"r{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _pace_offer(rank: int, world: int) -> tuple[float, float, float]:
    """What each rank offers to the snapshot pace (checkpoint.interval): the last rank has no
    estimate yet (zeros), the others differing figures whose sum depends on the order."""
    return (0.0, 0.0, 0.0) if rank == world - 1 and world > 1 else (0.1 * (rank + 1) / 3, 0.07 / (rank + 1), 1.0)


def _run(tmp_path, world: int, precision: str, poison: bool = False, idle_rank: bool = False) -> list[dict[str, torch.Tensor]]:
    from tests.helpers import start_ranks

    out = tmp_path / f"{precision}-{world}-{poison}-{idle_rank}"
    out.mkdir()
    start_ranks(_worker, (world, free_port(), str(out), precision, poison, idle_rank), world)
    return [load_file(str(out / f"r{r}.safetensors")) for r in range(world)]


def reference_grads(precision: str, step: int = 0, scale: float = SCALE) -> dict[str, torch.Tensor]:
    """One process: the step's micro-batches one after another, each under its own seed, in the
    given precision (autocast; fp16 with the loss scale), gradients summed by backward."""
    source, model = RandomTokens(), _model()
    model.train()
    idx = sample_indices(positions(step * G, 0, G), len(source), SEED)
    dtype = AUTOCAST[precision]
    scale = scale if precision == "fp16" else 1.0
    for i in range(0, G, M):
        torch.manual_seed(micro_batch_seed(SEED, step, i // M))
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            total = sample_losses(model, source.take(idx[i : i + M])).float().sum()
        (total * scale / G).backward()
    return {n: p.grad / scale for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def references():
    return {p: reference_grads(p) for p in ("fp32", "bf16", "fp16")}


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_each_precision_matches_one_process_and_buckets_match_flat_bitwise(tmp_path, references, precision, world):
    ranks = _run(tmp_path, world, precision)
    want = references[precision]
    for rank, got in enumerate(ranks):
        for name, ref in want.items():
            err = rel_err(got[f"flat/grad/{name}"], ref)
            assert err <= SUM_ORDER_REL, f"{precision} world {world} rank {rank} {name}: relative error {err:.2e}"
            for kind in ("grad", "param"):
                assert torch.equal(got[f"small/{kind}/{name}"], got[f"flat/{kind}/{name}"]), (
                    f"{precision} W={world} r{rank} {kind} {name}"
                )
        assert int(got["small/buckets"]) > 3 and int(got["flat/buckets"]) == 1
        # Mid-backward, the buckets of the gradients already final were on their way, the rest not.
        assert 0 < int(got["small/launched"]) < int(got["small/buckets"])
        assert all(torch.equal(got[k], ranks[0][k]) for k in got if "/param/" in k), "ranks disagree"
    if precision != "fp32":  # the precision took effect: not the fp32 gradient
        assert rel_err(ranks[0]["flat/grad/blocks.0.mlp.0.weight"], references["fp32"]["blocks.0.mlp.0.weight"]) > 1e-4


def test_a_rank_without_micro_batches_joins_every_bucket(tmp_path, references):
    ranks = _run(tmp_path, 3, "fp32", idle_rank=True)
    for rank, got in enumerate(ranks):
        for name, ref in references["fp32"].items():
            assert rel_err(got[f"small/grad/{name}"], ref) <= SUM_ORDER_REL, f"rank {rank} {name}"
            assert torch.equal(got[f"small/grad/{name}"], got[f"flat/grad/{name}"])


@pytest.mark.parametrize("world", [1, 3])
def test_an_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path, world):
    ranks = _run(tmp_path, world, "fp16", poison=True)
    initial = dict(_model().named_parameters())
    second = reference_grads("fp16", step=1, scale=SCALE / 2)  # the step after the skip starts from the initial parameters
    for rank, got in enumerate(ranks):
        assert bool(got["flat/skipped0"]) and not bool(got["flat/skipped1"]), f"rank {rank}"
        assert float(got["flat/scale"]) == SCALE / 2
        for name, p in initial.items():
            want = p.detach() - LR * second[name]
            assert rel_err(got[f"flat/param/{name}"], want) <= SUM_ORDER_REL, f"rank {rank} {name}"


def test_every_rank_agrees_on_the_snapshot_interval(tmp_path):
    """The pace figures travel in the step's statistics: every rank reads back the same bytes
    (so the same interval), the sum over the ranks that offered any."""
    from elastune.checkpoint.interval import SnapshotPace

    world = 4
    ranks = _run(tmp_path, world, "fp32")
    offers = [_pace_offer(r, world) for r in range(world)]
    want = [sum(o[i] for o in offers) for i in range(3)]
    intervals = set()
    for got in ranks:
        assert torch.equal(got["flat/pace"], ranks[0]["flat/pace"]) and torch.equal(got["small/pace"], ranks[0]["flat/pace"])
        assert got["flat/pace"].tolist() == pytest.approx(want, rel=1e-15) and want[2] == world - 1
        pace = SnapshotPace("auto", cap=64)
        pace.settle(got["flat/pace"].tolist(), step_s=1.0, costs=[])
        intervals.add(pace.interval)
    # Mean cost 0.0667 s against mean steps of 0.0428 s: 2 % of 78 steps, so 128, capped at 64.
    assert intervals == {64}


def _values(rank: int, n: int = 1000) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(n, generator=g) * torch.logspace(-3, 6, n)  # magnitudes where the order of a sum shows


def _sum_worker(rank: int, world: int, port: int, out: str) -> None:
    from elastune.train.reduce import Bucket, finish_all

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        got = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            buffer = _values(rank)
            buckets = [
                Bucket(buffer[lo:hi], dtype) for lo, hi in ((700, 1000), (2, 700), (0, 2))
            ]  # (0, 2): fewer elements than ranks
            for b in buckets:
                b.start()
            finish_all(buckets)
            got[name] = buffer
        save_file(got, os.path.join(out, f"r{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3, 5])
def test_a_sum_adds_the_ranks_in_rank_order(tmp_path, world):
    """fp32: bitwise ((x_0 + x_1) + x_2) + ..., the closed form a single process computes;
    bf16 on the wire: within the bound docs/performance.md states, per element
    |error| <= 2^-8 (|sum| + sum of |x_r|) (inputs rounded once, the fp32 sum rounded once)."""
    from tests.helpers import start_ranks

    start_ranks(_sum_worker, (world, free_port(), str(tmp_path)), world)
    xs = [_values(r) for r in range(world)]
    exact = xs[0].clone()
    for x in xs[1:]:
        exact += x
    bound = 2.0**-8 * (exact.abs() + sum(x.abs() for x in xs)) * 1.001
    for r in range(world):
        got = load_file(str(tmp_path / f"r{r}.safetensors"))
        assert torch.equal(got["fp32"], exact), f"rank {r}"
        assert bool(((got["bf16"] - exact).abs() <= bound).all()), f"rank {r}"
        assert not torch.equal(got["bf16"], exact)  # it did travel in bf16


K16, MORE16 = 4, 4  # fp16 steps before the checkpoint, and after it
# A first scale far past fp16's range: the first steps overflow and halve it, then it grows
# every other clean step, overflows again, ...: the scale's state decides which steps apply.
FP16_SCALE, FP16_GROWTH = 2.0**22, 2
# Another world size re-associates the fp32 sum of the same micro-batch gradients (1e-7
# relative); under autocast that can move an fp16 rounding of an activation by one unit, 2^-11.
FP16_REL = 2.0**-11


def _fp16_worker(rank: int, world: int, port: int, root: str, phase: str) -> None:
    from elastune.checkpoint.checkpointer import Checkpointer
    from elastune.checkpoint.format import Manifest
    from elastune.spec.models import AdamWSpec
    from elastune.train.state import restore_state, state_pieces

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _model()
        opt = build_optimizer(model, AdamWSpec(name="adamw", lr=1e-2))
        scaler = LossScale(FP16_SCALE, FP16_GROWTH)
        grads = GradBuffer(model, bucket_bytes=SMALL)
        recipe = Recipe(build_model=lambda: model, sample_losses=sample_losses)
        ckpt = Checkpointer(f"{root}/ckpt")
        steps = {"save": range(K16), "load": range(K16, K16 + MORE16), "through": range(K16 + MORE16)}[phase]
        if phase == "load":
            m = ckpt.latest()
            restore_state(TrainState(model, opt, scaler=scaler), m.shapes, lambda wanted: ckpt.load_pieces(m, wanted), "test")
        record = {}
        for step in steps:
            r = train_step(
                StepContext(model, recipe, RandomTokens(), SEED, precision="fp16"),
                TrainState(model, opt, scaler=scaler),
                grads,
                batch_plan(G, M, world),
                rank,
                Progress(step, step * G),
            )
            record[f"step{step}"] = torch.tensor([r.loss, float(r.skipped), r.loss_scale], dtype=torch.float64)
        if phase == "save":
            ckpt.save(
                Manifest(K16, K16 * G, "h", {"kind": "replicated"}, {}),
                state_pieces(TrainState(model, opt, scaler=scaler)),
                rank,
                world,
            )
        record |= {f"param/{n}": p.detach().clone() for n, p in model.named_parameters()}
        save_file(record, f"{root}/{phase}-r{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_fp16_loss_scale_survives_a_resume_at_another_world_size(tmp_path):
    """Saved from 2 ranks mid-way through the scale's growth, loaded into 3: the same steps skip
    and apply, at the same scales, as in an uninterrupted 3-rank run."""
    from tests.helpers import start_ranks

    for phase, world in (("through", 3), ("save", 2), ("load", 3)):
        start_ranks(_fp16_worker, (world, free_port(), str(tmp_path), phase), world)
    want = load_file(str(tmp_path / "through-r0.safetensors"))
    got = load_file(str(tmp_path / "save-r0.safetensors")) | load_file(str(tmp_path / "load-r0.safetensors"))
    history = [want[f"step{s}"].tolist() for s in range(K16 + MORE16)]
    skipped = [bool(h[1]) for h in history]
    assert skipped[0] and not all(skipped[K16:]) and any(skipped[K16:]), history  # the scale is live state after the resume
    for s in range(K16 + MORE16):
        loss, skip, scale = got[f"step{s}"].tolist()
        assert (skip, scale) == tuple(history[s][1:]), f"step {s}: {got[f'step{s}'].tolist()} vs {history[s]}"
        assert loss == pytest.approx(history[s][0], rel=FP16_REL), f"step {s}"
    for name, p in want.items():
        if name.startswith("param/"):
            assert rel_err(got[name], p) <= FP16_REL, name
