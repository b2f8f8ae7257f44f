"""The checkpoint service on a real Ray: snapshots outlive the worker processes that took them,
the newest complete step is what a restart resumes from (tier 0), durable steps are committed in
the background (tier 1), and a step some rank never handed over is never used."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

import ray
from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.retention import RetentionPolicy
from elastune.checkpoint.service import start_service
from elastune.checkpoint.snapshot import CHUNK_BYTES, INLINE_BYTES, chunks_of
from elastune.spec.models import AdamWSpec
from elastune.train.layouts import ZERO1
from elastune.train.loop import restore
from elastune.train.optim import build_optimizer
from elastune.train.state import TrainState, state_pieces, state_tensors
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
def worker(service, rank: int, last_step: int, die: bool, one_writer: bool = False):
    """One rank: snapshots steps 1..last_step (durable every 2nd), then exits like a killed
    process. `one_writer`: ranks take turns writing each step whole (layout.snapshot_writer)."""
    from elastune.checkpoint.layout import snapshot_writer
    from elastune.checkpoint.snapshot import Snapshotter

    snapshots = Snapshotter(service)
    stalls = []
    for step in range(1, last_step + 1):
        model, opt = trained(step)
        header = {
            "step": step,
            "samples_seen": 8 * step,
            "spec_hash": "h",
            "layout": "replicated",
            "durable": step % 2 == 0,
            "meta": {"metrics": {"loss": 1.0 / step}},
        }
        held = state_pieces(TrainState(model, opt))
        writer = snapshot_writer(held, step, WORLD) if one_writer else None
        stalls.append(snapshots.take(header, held, rank, WORLD, writer=writer))
    snapshots.wait()
    if die:
        os._exit(9)  # no cleanup, no goodbye: what SIGKILL leaves
    return stalls


@pytest.fixture(scope="module")
def service_run(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("service") / "ckpt")
    service = start_service("test-service", uri, RetentionPolicy(keep_last=2))
    # Both ranks hand over steps 1..5 and die; rank 0 also got step 6 out before the crash.
    done = [
        worker.options(max_retries=0).remote(service, 0, 6, die=True),
        worker.options(max_retries=0).remote(service, 1, 5, die=True),
    ]
    for ref in done:
        with pytest.raises(ray.exceptions.RayError):
            ray.get(ref)
    reports = ray.get(service.flush.remote())
    yield service, uri, reports
    ray.kill(service)


def test_with_one_writer_a_step_is_complete_once_its_writer_handed_it_over(tmp_path):
    """Rank 1 writes the odd steps, rank 0 the even (durable) ones; rank 0 got to step 4, rank 1
    to 5: step 5 is complete without rank 0 and restores bit-exact from tier 0; each durable
    checkpoint is one file, its writer's."""
    uri = str(tmp_path / "ckpt")
    service = start_service("test-one-writer", uri, RetentionPolicy(keep_last=2))
    try:
        done = [worker.options(max_retries=0).remote(service, r, last, die=True, one_writer=True) for r, last in ((0, 4), (1, 5))]
        for ref in done:
            with pytest.raises(ray.exceptions.RayError):
                ray.get(ref)
        reports = ray.get(service.flush.remote())
        assert [(r["step"], len(r["rank_bytes"])) for r in reports] == [(2, 1), (4, 1)]
        model, opt = trained(0)
        progress, info = restore(service, Checkpointer(uri), TrainState(model, opt))
        assert (progress.step, info["resumed_from_tier"]) == (5, 0)
        manifest, tensors = Checkpointer(uri).load_latest_valid()
        assert {f["file"] for e in manifest.tensors.values() for f in e["fragments"]} == {"rank-00000-of-00002.safetensors"}
        assert manifest.step == 4 and all(torch.equal(tensors[n], t) for n, t in state_tensors(TrainState(*trained(4))).items())
        want = state_tensors(TrainState(*trained(5)))
        assert all(torch.equal(t, want[n]) for n, t in state_tensors(TrainState(model, opt)).items())
    finally:
        ray.kill(service)


def test_restart_resumes_from_the_newest_complete_snapshot(service_run):
    service, uri, _ = service_run
    model, opt = trained(0)
    progress, info = restore(service, Checkpointer(uri), TrainState(model, opt))
    assert (progress.step, progress.samples_seen, info["resumed_from_tier"]) == (5, 40, 0)  # not 6: rank 1 never staged it
    want_model, want_opt = trained(5)
    want = state_tensors(TrainState(want_model, want_opt))
    got = state_tensors(TrainState(model, opt))
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_restart_into_zero1_takes_only_its_slice(service_run):
    service, uri, _ = service_run
    model = tiny_model()
    opt = ZeroOptimizer(model, ADAM, rank=1, world_size=3)
    progress, info = restore(service, Checkpointer(uri), TrainState(model, opt, ZERO1))
    assert progress.step == 5
    full = state_tensors(TrainState(*trained(5)))
    for name, piece in state_pieces(TrainState(model, opt, ZERO1)).items():
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
        "rank-00000-of-00002.safetensors",
        "rank-00001-of-00002.safetensors",
    }
    want = state_tensors(TrainState(*trained(4)))
    for name, t in want.items():
        assert torch.equal(tensors[name], t), name


def test_a_newer_durable_checkpoint_wins_over_an_older_snapshot(tmp_path, service_run):
    service, uri, _ = service_run
    ckpt = Checkpointer(uri)
    ckpt.save(ckpt.read_manifest(4).__class__(7, 56, "h", {"kind": "replicated"}, {}), state_tensors(TrainState(*trained(7))))
    try:
        model, opt = trained(0)
        progress, info = restore(service, Checkpointer(uri), TrainState(model, opt))
        assert (progress.step, info["resumed_from_tier"]) == (7, 1)
    finally:
        shutil.rmtree(os.path.join(uri, "step-000000007"))


def snapshot(service, steps: list[int], durable: bool = True) -> None:
    """Hand the service one-rank snapshots of these steps from here (the test is the worker)."""
    from elastune.checkpoint.snapshot import Snapshotter

    snapshots = Snapshotter(service)
    for step in steps:
        model, opt = trained(step)
        snapshots.take(header(step, durable), state_pieces(TrainState(model, opt)), 0, 1)
    snapshots.wait()


def header(step: int, durable: bool) -> dict:
    return {
        "step": step,
        "samples_seen": 8 * step,
        "spec_hash": "h",
        "layout": "replicated",
        "durable": durable,
        "meta": {},
        "world_size": 1,
    }


def corrupt_snapshot(service, step: int) -> None:
    """What a worker hands over when a byte changes after its checksums were taken (or in the
    object store's copy): the entries carry the checksums of the bytes as they were."""
    from elastune.checkpoint.checkpointer import pack
    from elastune.checkpoint.format import BLOCK_BYTES, SNAPSHOT_CHECKSUM, with_digests
    from elastune.checkpoint.payload import digests_of

    pieces = state_pieces(TrainState(*trained(step)))
    plan, buffer = pack(pieces)
    entries = with_digests(
        plan.entries(pieces, "rank-00000-of-00001.safetensors"),
        digests_of(plan.offsets, memoryview(buffer.numpy()), BLOCK_BYTES, SNAPSHOT_CHECKSUM),
        SNAPSHOT_CHECKSUM,
    )
    data = buffer.numpy().copy()
    data[-1] ^= 0xFF
    chunks = chunks_of(data, len(data))
    ray.get(service.stage.remote(header(step, True), 0, "rank-00000-of-00001.safetensors", entries, 0.0, *chunks))


@pytest.mark.parametrize("nbytes", [1, CHUNK_BYTES, 3 * CHUNK_BYTES + 7, INLINE_BYTES, INLINE_BYTES + 1])
def test_a_part_is_the_services_own_copy_of_exactly_what_was_handed_over(nbytes):
    """Small payloads travel inline and stay in the service's memory, larger ones in the object
    store; either way the service holds the same bytes, and a restoring worker gets them."""
    from elastune.checkpoint.service import Part

    sent = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    chunks = chunks_of(sent, nbytes)
    assert all(len(c) <= CHUNK_BYTES for c in chunks) if nbytes <= INLINE_BYTES else len(chunks) == 1
    part = Part.of("f", {}, chunks, 0.0)
    assert isinstance(part.payload, bytes) == (nbytes <= INLINE_BYTES) and part.nbytes == nbytes
    assert part.data().tobytes() == sent.tobytes()
    assert np.asarray(ray.get(part.ref())).tobytes() == sent.tobytes() and part.data().tobytes() == sent.tobytes()


def test_tier0_is_verified_and_a_corrupt_snapshot_is_never_made_durable(tmp_path):
    uri = str(tmp_path / "ckpt")
    service = start_service("test-tier0", uri, RetentionPolicy(keep_last=5))
    try:
        snapshot(service, [2])  # durable
        corrupt_snapshot(service, 3)
        reports = ray.get(service.flush.remote())
        assert [r["step"] for r in reports] == [2, 3] and "does not match the checksum its worker took" in reports[1]["error"]
        assert Checkpointer(uri).committed_steps() == [2] and not os.path.exists(os.path.join(uri, "step-000000003"))
        model, opt = trained(0)
        # tier 0 (step 3) fails its checksums: tier 1
        progress, info = restore(service, Checkpointer(uri), TrainState(model, opt))
        assert (progress.step, info["resumed_from_tier"]) == (2, 1)
        assert (
            "checksum mismatch" in info["skipped_checkpoints"][0]
            and "newest durable checkpoint instead" in info["skipped_checkpoints"][0]
        )
        want = state_tensors(TrainState(*trained(2)))
        assert all(torch.equal(t, want[n]) for n, t in state_tensors(TrainState(model, opt)).items())
    finally:
        ray.kill(service)


def checkpoint_bytes(tmp_path) -> int:
    from elastune.checkpoint.format import Manifest

    probe = Checkpointer(str(tmp_path / "probe"))
    probe.save(Manifest(1, 8, "h", {}, {}), state_tensors(TrainState(*trained(1))))
    return sum(f.stat().st_size for f in (tmp_path / "probe").rglob("*") if f.is_file())


def test_out_of_space_makes_room_keeping_the_newest_and_a_failed_write_leaves_nothing(tmp_path):
    """Room for two checkpoints: each new one deletes older ones (never the newest) to fit, and
    keep_last 3 yields to that; in room for less than one, every write fails and cleans up."""
    from tests.helpers import small_disk

    size = checkpoint_bytes(tmp_path)
    with small_disk(tmp_path / "two", int(size * 2.5)) as disk:
        service = start_service("test-full", str(disk), RetentionPolicy(keep_last=3))
        try:
            snapshot(service, [2, 4, 6, 8])
            reports = ray.get(service.flush.remote())
            assert [(r["step"], "error" in r) for r in reports] == [(2, False), (4, False), (6, False), (8, False)]
            assert Checkpointer(str(disk)).committed_steps() == [6, 8]
            assert sorted(os.listdir(disk)) == ["step-000000006", "step-000000008"]  # no torn payload anywhere
        finally:
            ray.kill(service)
    with small_disk(tmp_path / "none", int(size * 0.6)) as disk:
        service = start_service("test-none", str(disk), RetentionPolicy(keep_last=3))
        try:
            snapshot(service, [2, 4])
            reports = ray.get(service.flush.remote())
            assert all("No space left" in r["error"] for r in reports) and len(reports) == 2
            assert os.listdir(disk) == []  # what the failed writes wrote is gone: the store is not left full
        finally:
            ray.kill(service)
