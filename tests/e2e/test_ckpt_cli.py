"""`elastune ckpt ls | show | verify | prune | clear` on real checkpoints, as a user runs them."""

from __future__ import annotations

import json

import pytest

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.format import Manifest, step_dir
from tests.e2e.test_cli import elastune
from tests.helpers import tiny_model


@pytest.fixture()
def root(tmp_path):
    tensors = {f"model/{n}": t for n, t in tiny_model().state_dict().items()}
    ckpt = Checkpointer(str(tmp_path / "ckpts"), keep_last=10)
    for step in (10, 20, 30):
        ckpt.save(Manifest(step, step * 24, "abc", {}, {}, meta={"job": "demo"}), tensors)
    return tmp_path / "ckpts"


def test_ls_lists_every_committed_checkpoint(root):
    (root / step_dir(40)).mkdir()  # an interrupted save: no manifest, so not listed
    out = elastune("ckpt", "ls", str(root))
    assert out.returncode == 0, out.stderr
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.stdout.splitlines() if line.startswith("│")]
    assert [(r[0], r[1], r[4], r[5]) for r in rows] == [
        ("10", "240", "replicated x1", "yes"),
        ("20", "480", "replicated x1", "yes"),
        ("30", "720", "replicated x1", "yes"),
    ]


def test_show_names_tensors_and_json_is_the_manifest(root):
    out = elastune("ckpt", "show", str(root))
    assert out.returncode == 0 and "step 30" in out.stdout and "model/tok.weight  F32 [256, 16]" in out.stdout
    raw = json.loads(elastune("ckpt", "show", f"{root}/{step_dir(20)}", "--json").stdout)
    assert raw["step"] == 20 and raw["format"] == "elastune.checkpoint/3"


def test_verify_exit_codes(root, tmp_path):
    assert elastune("ckpt", "verify", str(root)).returncode == 0
    manifest = json.loads((root / step_dir(30) / "manifest.json").read_text())
    frag = manifest["tensors"]["model/pos.weight"]["fragments"][0]
    payload = root / step_dir(30) / frag["file"]
    data = bytearray(payload.read_bytes())
    data[frag["offset"]] ^= 0x01
    payload.write_bytes(bytes(data))
    bad = elastune("ckpt", "verify", f"{root}/{step_dir(30)}")
    assert bad.returncode == 1 and "CORRUPT" in bad.stdout and "model/pos.weight" in bad.stdout
    assert elastune("ckpt", "verify", f"{root}/{step_dir(20)}").returncode == 0
    assert elastune("ckpt", "verify", str(tmp_path / "empty")).returncode == 2
    (root / step_dir(50)).mkdir()
    assert elastune("ckpt", "verify", f"{root}/{step_dir(50)}").returncode == 2


def test_prune_keeps_the_newest_and_the_pinned(root):
    assert elastune("ckpt", "pin", f"{root}/{step_dir(10)}").returncode == 0
    assert "replicated x1, pinned" in elastune("ckpt", "ls", str(root)).stdout
    out = elastune("ckpt", "prune", str(root), "--keep-last", "1")
    assert out.returncode == 0 and "steps 20" in out.stdout
    assert Checkpointer(str(root)).committed_steps() == [10, 30]
    assert elastune("ckpt", "pin", f"{root}/{step_dir(10)}", "--unpin").returncode == 0
    assert elastune("ckpt", "prune", str(root), "--keep-last", "1").returncode == 0
    assert Checkpointer(str(root)).committed_steps() == [30]
    refused = elastune("ckpt", "prune", str(root), "--keep-last", "0")
    assert refused.returncode == 2 and "would delete every checkpoint" in refused.stderr


def test_clear_deletes_every_checkpoint_only_when_told_to(root):
    assert elastune("ckpt", "pin", f"{root}/{step_dir(10)}").returncode == 0
    refused = elastune("ckpt", "clear", str(root))
    assert refused.returncode == 2 and "add --yes" in refused.stderr and "Traceback" not in refused.stderr
    assert Checkpointer(str(root)).committed_steps() == [10, 20, 30]
    out = elastune("ckpt", "clear", str(root), "--yes")
    assert out.returncode == 0 and "deleted 3 checkpoint(s)" in out.stdout
    assert Checkpointer(str(root)).committed_steps() == [] and not list(root.glob("step-*"))


def _adamw_state():
    from elastune.spec.models import AdamWSpec
    from elastune.train.optim import build_optimizer

    model = tiny_model()
    opt = build_optimizer(model, AdamWSpec(name="adamw", lr=1e-2))
    import torch

    model(torch.randint(0, 256, (2, 8))).sum().backward()
    opt.step()
    return model, opt


def test_export_dcp_reads_back_with_torch_and_imports_bit_exact(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    from elastune.train.state import TrainState, state_tensors

    model, opt = _adamw_state()
    tensors = state_tensors(TrainState(model, opt))
    src = Checkpointer(str(tmp_path / "src"))
    src.save(Manifest(7, 168, "abc", {}, {}), tensors)
    out = elastune("ckpt", "export", str(tmp_path / "src"), "--format", "dcp", str(tmp_path / "dcp"))
    assert out.returncode == 0, out.stderr
    # torch's own reader, independent of ours, gets the same numbers back.
    target = {
        "model": {n[6:]: torch.empty_like(t) for n, t in tensors.items() if n.startswith("model/")},
        "progress": {"step": torch.tensor(0), "samples_seen": torch.tensor(0)},
    }
    dcp.load(target, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    assert int(target["progress"]["step"]) == 7
    for name, t in target["model"].items():
        assert torch.equal(t, tensors[f"model/{name}"]), name
    back = elastune("ckpt", "import", str(tmp_path / "dcp"), str(tmp_path / "back"))
    assert back.returncode == 0 and "as " in back.stdout, back.stderr
    assert elastune("ckpt", "verify", str(tmp_path / "back")).returncode == 0
    manifest, got = Checkpointer(str(tmp_path / "back")).load_latest_valid()
    assert (manifest.step, manifest.samples_seen) == (7, 168) and set(got) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(got[name], t), name


def test_import_a_dcp_checkpoint_torch_wrote(tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from elastune.spec.models import AdamWSpec
    from elastune.train.optim import build_optimizer
    from elastune.train.state import TrainState, load_state, state_tensors

    model, opt = _adamw_state()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)  # param_groups pickled
    out = elastune("ckpt", "import", str(tmp_path / "dcp"), str(tmp_path / "ours"))
    assert out.returncode == 0 and "skipped" in out.stdout and "never loaded" in out.stdout, out.stdout + out.stderr
    fresh = tiny_model(seed=3)
    fresh_opt = build_optimizer(fresh, AdamWSpec(name="adamw", lr=1e-2))
    _, got = Checkpointer(str(tmp_path / "ours")).load_latest_valid()
    load_state(TrainState(fresh, fresh_opt), got, "imported")
    for name, t in state_tensors(TrainState(model, opt)).items():
        assert torch.equal(state_tensors(TrainState(fresh, fresh_opt))[name], t), name


def test_import_refuses_a_hostile_dcp_metadata_pickle(tmp_path):
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / ".metadata").write_bytes(pickle.dumps(Payload()))
    out = elastune("ckpt", "import", str(tmp_path / "evil"), str(tmp_path / "ours"))
    assert out.returncode == 2 and "posix.system" in out.stderr and "refusing" in out.stderr, out.stderr
    assert not (tmp_path / "pwned").exists() and "Traceback" not in out.stderr
    missing = elastune("ckpt", "import", str(tmp_path / "nothing"), str(tmp_path / "ours"))
    assert missing.returncode == 2 and "not a DCP checkpoint" in missing.stderr
