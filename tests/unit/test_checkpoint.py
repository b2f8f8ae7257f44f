"""Universal checkpoint v1: N ranks save, M load, bit-exact; never torn, never unpickled."""

import json
import logging

import pytest
import torch

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.format import Manifest, Piece, step_dir
from elastune.checkpoint.layout import ONE_WRITER_BYTES, assign_owners, snapshot_writer
from elastune.checkpoint.retention import RetentionPolicy
from elastune.errors import CheckpointError, IncompatibleCheckpoint
from elastune.spec.models import AdamWSpec
from elastune.train.optim import build_optimizer
from elastune.train.state import TrainState, load_state, state_tensors
from tests import helpers
from tests.helpers import tiny_model


def trained_state(seed=0):
    model = tiny_model(seed=seed)
    opt = build_optimizer(model, AdamWSpec(name="adamw", lr=1e-2))
    for _ in range(2):
        model(torch.randint(0, 256, (2, 8))).sum().backward()
        opt.step()
    return model, opt


def save_from_ranks(ckpt: Checkpointer, step: int, tensors, world: int) -> Manifest:
    return helpers.save_from_ranks(ckpt, (step, step * 10, "h"), tensors, world).manifest


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_save_from_n_ranks_loads_bit_exact(tmp_path, world):
    model, opt = trained_state()
    tensors = state_tensors(TrainState(model, opt))
    assert any(k.endswith("/exp_avg") for k in tensors) and any(k.endswith("/step") for k in tensors)
    ckpt = Checkpointer(str(tmp_path))
    report = helpers.save_from_ranks(ckpt, (5, 50, "h"), tensors, world)
    manifest = report.manifest
    assert manifest.layout == {"kind": "replicated", "world_size": world}
    payload_bytes = sum(p.stat().st_size for p in (tmp_path / step_dir(5)).glob("*.safetensors"))
    assert len(report.rank_bytes) == len(report.rank_seconds) == world and sum(report.rank_bytes) == payload_bytes
    files = {f["file"] for e in manifest.tensors.values() for f in e["fragments"]}
    assert len(files) == min(world, len(tensors))  # each rank wrote a share, nothing twice
    fresh_model, fresh_opt = trained_state(seed=1)
    got = ckpt.load(ckpt.latest())
    load_state(TrainState(fresh_model, fresh_opt), got, "test")
    for name, t in state_tensors(TrainState(fresh_model, fresh_opt)).items():
        assert torch.equal(t.cpu(), tensors[name].cpu()), name


def test_owner_split_balances_bytes():
    owners = assign_owners({"a": 100, "b": 60, "c": 50, "d": 10}, 2)
    load = [sum(s for n, s in {"a": 100, "b": 60, "c": 50, "d": 10}.items() if owners[n] == r) for r in (0, 1)]
    assert load == [110, 110]  # a | b+c, then d to the lighter rank


def test_a_small_replicated_state_is_snapshotted_whole_by_one_rank_in_turn():
    small = {"a": Piece.whole(torch.zeros(10)), "b": Piece.whole(torch.zeros(3, 4))}
    assert [snapshot_writer(small, step, 3) for step in range(1, 8)] == [1, 2, 0, 1, 2, 0, 1]
    assert [snapshot_writer(small, step, 1) for step in range(1, 4)] == [0, 0, 0]
    big = {"a": Piece.whole(torch.zeros(ONE_WRITER_BYTES // 4 + 1))}  # one element past the limit
    assert (
        snapshot_writer(big, 5, 2) is None and snapshot_writer({"a": Piece.whole(torch.zeros(ONE_WRITER_BYTES // 4))}, 5, 2) == 1
    )
    sharded = {**small, "c": Piece(torch.zeros(5), 0, 5, (10,), replicated=False)}  # a ZeRO-1 slice: only its rank has it
    assert snapshot_writer(sharded, 5, 2) is None and snapshot_writer({}, 5, 2) is None


def test_uncommitted_checkpoint_is_invisible(tmp_path):
    model, opt = trained_state()
    ckpt = Checkpointer(str(tmp_path))
    save_from_ranks(ckpt, 1, state_tensors(TrainState(model, opt)), 1)
    (tmp_path / step_dir(2)).mkdir()
    (tmp_path / step_dir(2) / "rank-00000-of-00001.safetensors").write_bytes(b"partial")
    assert ckpt.latest().step == 1


def test_retention_keeps_last_k(tmp_path):
    model, opt = trained_state()
    ckpt = Checkpointer(str(tmp_path), keep_last=2)
    for step in (1, 2, 3, 4):
        save_from_ranks(ckpt, step, state_tensors(TrainState(model, opt)), 2)
    assert ckpt.committed_steps() == [3, 4]
    assert not (tmp_path / step_dir(1)).exists()


def test_pickled_payload_is_refused_and_previous_is_used(tmp_path, caplog):
    model, opt = trained_state()
    tensors = state_tensors(TrainState(model, opt))
    ckpt = Checkpointer(str(tmp_path))
    save_from_ranks(ckpt, 1, tensors, 1)
    m2 = save_from_ranks(ckpt, 2, tensors, 1)
    payload = tmp_path / step_dir(2) / m2.tensors["model/tok.weight"]["fragments"][0]["file"]
    torch.save({"model/tok.weight": torch.zeros(3)}, payload)  # a pickle where safetensors should be
    with pytest.raises(CheckpointError, match="not a safetensors payload"):
        ckpt.load(ckpt.read_manifest(2))
    with caplog.at_level(logging.WARNING):
        manifest, _ = ckpt.load_latest_valid()
    assert manifest.step == 1 and "CHECKPOINT CORRUPT" in caplog.text


def test_corrupt_bytes_name_file_and_tensor(tmp_path, caplog):
    model, opt = trained_state()
    ckpt = Checkpointer(str(tmp_path))
    save_from_ranks(ckpt, 1, state_tensors(TrainState(model, opt)), 1)
    m2 = save_from_ranks(ckpt, 2, state_tensors(TrainState(model, opt)), 1)
    frag = m2.tensors["model/tok.weight"]["fragments"][0]
    path = tmp_path / step_dir(2) / frag["file"]
    data = bytearray(path.read_bytes())
    data[frag["offset"] + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=r"checksum mismatch in rank-00000-of-00001.safetensors .*tensor 'model/tok.weight'"
    ):
        ckpt.load(ckpt.read_manifest(2))
    with caplog.at_level(logging.WARNING):
        assert ckpt.load_latest_valid()[0].step == 1
    assert len(ckpt.skipped) == 1 and "checksum mismatch" in ckpt.skipped[0]


def test_manifest_is_plain_json_with_what_every_byte_is(tmp_path):
    model, opt = trained_state()
    ckpt = Checkpointer(str(tmp_path))
    save_from_ranks(ckpt, 3, state_tensors(TrainState(model, opt)), 2)
    raw = json.loads((tmp_path / step_dir(3) / "manifest.json").read_text())
    entry = raw["tensors"]["model/tok.weight"]
    assert raw["format"] == "elastune.checkpoint/3" and raw["samples_seen"] == 30
    assert entry["dtype"] == "F32" and entry["shape"] == [256, 16]
    (frag,) = entry["fragments"]
    assert set(frag) == {"file", "offset", "length", "elements", "block_bytes", "sha256"}
    assert frag["elements"] == [0, 256 * 16] and frag["length"] == 256 * 16 * 4 and len(frag["sha256"]) == 1
    with open(tmp_path / step_dir(3) / frag["file"], "rb") as f:  # the byte range is the tensor's raw data
        f.seek(frag["offset"])
        assert torch.equal(
            torch.frombuffer(bytearray(f.read(frag["length"])), dtype=torch.float32).reshape(256, 16), model.tok.weight.detach()
        )


def test_safetensors_payloads_open_with_the_safetensors_library(tmp_path):
    from safetensors.torch import load_file

    model, opt = trained_state()
    tensors = state_tensors(TrainState(model, opt))
    ckpt = Checkpointer(str(tmp_path))
    save_from_ranks(ckpt, 1, tensors, 2)
    loaded = {}
    for f in (tmp_path / step_dir(1)).glob("*.safetensors"):
        loaded |= load_file(f)
    assert set(loaded) == set(tensors)
    assert torch.equal(loaded["model/tok.weight"], tensors["model/tok.weight"])


def test_different_model_is_refused_with_advice(tmp_path):
    from tests.helpers import TINY

    model, opt = trained_state()
    ckpt = Checkpointer(str(tmp_path))
    save_from_ranks(ckpt, 1, state_tensors(TrainState(model, opt)), 1)
    other = tiny_model(TINY.model_copy(update={"num_layers": 2}))
    with pytest.raises(IncompatibleCheckpoint, match="different model .*--fresh"):  # not corrupt: nothing falls back past it
        load_state(TrainState(other, build_optimizer(other, AdamWSpec(name="adamw", lr=1e-2))), ckpt.load(ckpt.latest()), "ckpt")


def test_clone_copies_no_bytes_loads_the_same_and_protects_its_source(tmp_path):
    model, opt = trained_state()
    tensors = state_tensors(TrainState(model, opt))
    ckpt = Checkpointer(str(tmp_path / "a"), keep_last=1)
    save_from_ranks(ckpt, 10, tensors, 2)
    before = sorted(p.name for p in (tmp_path / "a").rglob("*.safetensors"))
    clone = ckpt.clone(10, dst_step=11, meta={"note": "exploit"})
    assert sorted(p.name for p in (tmp_path / "a").rglob("*.safetensors")) == before  # nothing copied
    assert not list((tmp_path / "a" / step_dir(11)).glob("*.safetensors"))
    assert clone.meta["cloned_from"]["step"] == 10
    got = ckpt.load(ckpt.read_manifest(11))
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
    # keep_last=1 keeps step 11, and step 10 because 11 references it.
    assert ckpt.prune() == [] and ckpt.committed_steps() == [10, 11]
    assert ckpt.info(11).references == frozenset({10})


def test_clone_into_another_root_references_across_roots(tmp_path):
    model, opt = trained_state()
    tensors = state_tensors(TrainState(model, opt))
    donor = Checkpointer(str(tmp_path / "donor"))
    save_from_ranks(donor, 5, tensors, 1)
    recipient = Checkpointer(str(tmp_path / "recipient"))
    donor.clone(5, dst=recipient, dst_step=7)
    manifest, got = recipient.load_latest_valid()
    assert manifest.step == 7 and all(torch.equal(got[n], t) for n, t in tensors.items())
    frag = manifest.tensors["model/tok.weight"]["fragments"][0]["file"]
    assert frag.startswith("../../donor/step-000000005/")
    # The donor's own retention keeps step 5 while the recipient's clone lives, then lets it go.
    donor.policy = RetentionPolicy(keep_last=1)
    save_from_ranks(donor, 6, tensors, 1)
    assert donor.committed_steps() == [5, 6] and "recipient" in donor.info(5).referenced_elsewhere
    recipient.clear()
    save_from_ranks(donor, 8, tensors, 1)
    assert donor.committed_steps() == [8]


def test_pinned_checkpoints_survive_prune(tmp_path):
    model, opt = trained_state()
    ckpt = Checkpointer(str(tmp_path), keep_last=1)
    save_from_ranks(ckpt, 1, state_tensors(TrainState(model, opt)), 1)
    ckpt.pin(1)
    for step in (2, 3):
        save_from_ranks(ckpt, step, state_tensors(TrainState(model, opt)), 1)
    assert ckpt.committed_steps() == [1, 3]
    ckpt.pin(1, pinned=False)
    assert ckpt.prune() == [1]


def test_export_safetensors_and_torch(tmp_path):
    from safetensors import safe_open

    from elastune.checkpoint.export import export

    model, opt = trained_state()
    ckpt = Checkpointer(str(tmp_path / "c"))
    save_from_ranks(ckpt, 4, state_tensors(TrainState(model, opt)), 2)
    manifest = ckpt.latest()
    export(ckpt, manifest, "safetensors", str(tmp_path / "model.safetensors"))
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata()["elastune_step"] == "4"
        assert set(f.keys()) == set(model.state_dict()) - {"head.weight"}  # tied: saved once
        assert torch.equal(f.get_tensor("tok.weight"), model.tok.weight.detach())
    export(ckpt, manifest, "torch", str(tmp_path / "state.pt"))
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)  # plain tensors and dicts only
    assert loaded["step"] == 4 and torch.equal(loaded["model"]["tok.weight"], model.tok.weight.detach())
    assert torch.equal(loaded["optimizer_state"]["tok.weight"]["exp_avg"], opt.state[model.tok.weight]["exp_avg"])


@pytest.mark.parametrize("size", [10, 8 * 2**20, 8 * 2**20 + 4095, 3 * 8 * 2**20 + 4097])
def test_local_writes_keep_every_byte_direct_or_not(tmp_path, size):
    from elastune.checkpoint.storage import Storage

    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(size)).numpy()
    Storage.from_uri(str(tmp_path)).write_bytes("sub/payload.bin", data)
    assert (tmp_path / "sub" / "payload.bin").read_bytes() == data.tobytes()


def test_sub_range_reads_verify_only_the_blocks_they_read(tmp_path, monkeypatch):
    """A ZeRO-1 rank reads a slice: the bytes outside it are neither read nor checked, and a
    corrupt block inside it is still caught."""
    import elastune.checkpoint.format as fmt

    monkeypatch.setattr(fmt, "BLOCK_BYTES", 4096)
    monkeypatch.setattr("elastune.checkpoint.checkpointer.BLOCK_BYTES", 4096)
    big = torch.arange(10_000, dtype=torch.float32)  # 40,000 bytes: 10 blocks
    ckpt = Checkpointer(str(tmp_path))
    m = ckpt.save(Manifest(1, 1, "h", {}, {}), {"optim/w/exp_avg": big}).manifest
    (frag,) = m.tensors["optim/w/exp_avg"]["fragments"]
    assert len(frag["sha256"]) == 10
    path = tmp_path / step_dir(1) / frag["file"]
    raw = bytearray(path.read_bytes())
    raw[frag["offset"] + 9 * 4096 + 5] ^= 0xFF  # corrupt the last block
    path.write_bytes(bytes(raw))
    got = ckpt.load_pieces(m, {"optim/w/exp_avg": (1000, 5000)})["optim/w/exp_avg"]
    assert torch.equal(got, big[1000:5000])
    with pytest.raises(CheckpointError, match=r"checksum mismatch in rank-00000-of-00001.safetensors \(tensor 'optim/w/exp_avg'"):
        ckpt.load_pieces(m, {"optim/w/exp_avg": (9500, 9600)})
