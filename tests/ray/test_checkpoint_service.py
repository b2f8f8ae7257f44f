"""The checkpoint service on a real Ray: snapshots outlive the worker processes that took them,
the newest complete step is what a restart resumes from (tier 0), durable steps are committed in
the background (tier 1), and a step some rank never handed over is never used."""

from __future__ import annotations

import os

import pytest
import ray
import torch

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.retention import RetentionPolicy
from elastune.checkpoint.service import start_service
from elastune.spec.models import AdamWSpec
from elastune.train.loop import restore
from elastune.train.optim import build_optimizer
from elastune.train.state import state_pieces, state_tensors
from elastune.train.zero import ZeroOptimizer
from tests.helpers import tiny_model

ADAM = AdamWSpec(name="adamw", lr=1e-2)
WORLD = 2


def trained(steps: int):
    """The state after `steps` deterministic updates (what every rank of a replicated run holds)."""
    torch.set_num_threads(1)  # the same kernels, so the same bits, in Ray's workers and here
    torch.manual_seed(0)
    model = tiny_model()
    opt = build_optimizer(model, ADAM)
    for _ in range(steps):
        model(torch.randint(0, 256, (2, 8))).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@ray.remote(num_cpus=0)
def worker(service, rank: int, last_step: int, die: bool):
    """One rank: snapshots steps 1..last_step (durable every 2nd), then exits like a killed process."""
    from elastune.checkpoint.snapshot import Snapshotter

    snapshots = Snapshotter(service)
    stalls = []
    for step in range(1, last_step + 1):
        model, opt = trained(step)
        header = {"step": step, "samples_seen": 8 * step, "spec_hash": "h", "layout": "replicated", "durable": step % 2 == 0,
                  "meta": {"metrics": {"loss": 1.0 / step}}}  # fmt: skip
        stalls.append(snapshots.take(header, state_pieces(model, opt), rank, WORLD))
    snapshots.wait()
    if die:
        os._exit(9)  # no cleanup, no goodbye: what SIGKILL leaves
    return stalls


@pytest.fixture(scope="module")
def service_run(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("service") / "ckpt")
    service = start_service("test-service", uri, RetentionPolicy(keep_last=2))
    # Both ranks hand over steps 1..5 and die; rank 0 also got step 6 out before the crash.
    done = [worker.options(max_retries=0).remote(service, 0, 6, die=True), worker.options(max_retries=0).remote(service, 1, 5, die=True)]
    for ref in done:
        with pytest.raises(ray.exceptions.RayError):
            ray.get(ref)
    reports = ray.get(service.flush.remote())
    yield service, uri, reports
    ray.kill(service)


def test_restart_resumes_from_the_newest_complete_snapshot(service_run):
    service, uri, _ = service_run
    model, opt = trained(0)
    progress, info = restore(service, Checkpointer(uri), model, opt)
    assert (progress.step, progress.samples_seen, info["resumed_from_tier"]) == (5, 40, 0)  # not 6: rank 1 never staged it
    want_model, want_opt = trained(5)
    want = state_tensors(want_model, want_opt)
    got = state_tensors(model, opt)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_restart_into_zero1_takes_only_its_slice(service_run):
    service, uri, _ = service_run
    model = tiny_model()
    opt = ZeroOptimizer(model, ADAM, rank=1, world_size=3)
    progress, info = restore(service, Checkpointer(uri), model, opt)
    assert progress.step == 5
    full = state_tensors(*trained(5))
    for name, piece in state_pieces(model, opt).items():
        assert torch.equal(piece.data.reshape(-1).cpu(), full[name].reshape(-1)[piece.lo : piece.hi]), name
    assert info["load_bytes"] < sum(t.numel() * t.element_size() for t in full.values())


def test_durable_steps_are_committed_in_the_background(service_run):
    _, uri, reports = service_run
    assert [r["step"] for r in reports] == [2, 4]
    assert all(r["bytes"] == sum(r["rank_bytes"]) > 0 and len(r["stall_seconds"]) == WORLD for r in reports)
    ckpt = Checkpointer(uri)
    assert ckpt.committed_steps() == [2, 4]  # keep_last 2; the in-memory step 5 is not durable
    manifest, tensors = ckpt.load_latest_valid()
    assert manifest.step == 4 and manifest.layout == {"kind": "replicated", "world_size": WORLD}
    assert {f["file"] for e in manifest.tensors.values() for f in e["fragments"]} == {
        "rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"}  # fmt: skip
    want = state_tensors(*trained(4))
    for name, t in want.items():
        assert torch.equal(tensors[name], t), name


def test_a_newer_durable_checkpoint_wins_over_an_older_snapshot(tmp_path, service_run):
    service, uri, _ = service_run
    ckpt = Checkpointer(uri)
    ckpt.save(ckpt.read_manifest(4).__class__(7, 56, "h", {"kind": "replicated"}, {}), state_tensors(*trained(7)))
    try:
        model, opt = trained(0)
        progress, info = restore(service, Checkpointer(uri), model, opt)
        assert (progress.step, info["resumed_from_tier"]) == (7, 1)
    finally:
        ckpt.storage.delete("step-000000007")
