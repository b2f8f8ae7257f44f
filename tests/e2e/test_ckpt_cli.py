"""`elastune ckpt ls | show | verify | prune` on real checkpoints, as a user runs them."""

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
    assert raw["step"] == 20 and raw["format"] == "elastune.checkpoint/2"


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
