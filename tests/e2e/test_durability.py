"""Durable means durable, and a full disk is reported, cleaned up and survived.

- The commit's system calls, traced (strace): every payload is fsynced, the step folder is
  fsynced before the manifest is renamed into place (the payloads' entries are on disk first) and
  again after (the rename itself is), so a machine crash after a commit cannot lose the checkpoint.
- `elastune run` on a real filesystem too small for a second checkpoint: every failed write is
  warned about and removes what it wrote, training goes on, and a run whose final state could not
  be made durable says so in its last line and in result.json, with exit code 5.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.e2e.test_cli import ROOT, elastune
from tests.helpers import small_disk

SAVE = """
import torch
from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.format import Manifest
tensors = {{"model/w": torch.arange(3_000_000, dtype=torch.float32), "model/b": torch.ones(5)}}
Checkpointer({root!r}).save(Manifest(1, 8, "h", {{}}, {{}}), tensors)
"""


def test_a_commit_fsyncs_payloads_and_the_folder_around_the_manifests_rename(tmp_path):
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (.ci/run installs Debian's strace)")
    root = tmp_path / "root"
    traced = subprocess.run(
        [
            strace,
            "-f",
            "-y",
            "-e",
            "trace=fsync,fdatasync,rename,renameat,renameat2",
            "-o",
            str(tmp_path / "trace"),
            sys.executable,
            "-c",
            SAVE.format(root=str(root)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if traced.returncode != 0 and "ptrace" in traced.stderr:
        pytest.skip(f"this machine does not allow tracing: {traced.stderr.strip()[:200]}")
    assert traced.returncode == 0, traced.stderr[-2000:]
    folder = str(root / "step-000000001")
    calls = [line for line in (tmp_path / "trace").read_text().splitlines() if "resumed" not in line and folder in line]

    def index(pattern: str) -> int:
        return next(i for i, line in enumerate(calls) if re.search(pattern, line))

    payload = index(rf"fsync\(\d+<{re.escape(folder)}/rank-00000-of-00001\.safetensors>")
    before = index(rf"fsync\(\d+<{re.escape(folder)}>\)")
    tmp_synced = index(rf"fsync\(\d+<{re.escape(folder)}/manifest\.json\.tmp>")
    renamed = index(r"rename.*manifest\.json\.tmp.*manifest\.json")
    after = next(i for i, line in enumerate(calls) if i > renamed and re.search(rf"fsync\(\d+<{re.escape(folder)}>\)", line))
    assert payload < before < renamed and tmp_synced < renamed < after, calls


def test_a_full_disk_is_reported_cleaned_up_and_survived(tmp_path, stdlib_dataset):
    spec = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    spec["name"] = "full-disk"
    spec["model"]["options"] |= {"num_layers": 1, "width": 16, "num_heads": 2, "context": 16}
    spec["data"] = {"path": str(stdlib_dataset), "window": 17}
    spec["schedule"]["warmup_samples"] = 64
    spec["checkpoint"] = {"every_steps": 10, "keep_last": 3, "path": str(tmp_path / "disk" / "ckpt")}
    spec["stop"] = {"max_steps": 30}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    with small_disk(tmp_path / "disk", 160 * 1024):  # a checkpoint of this model is about 100 KB: room for one
        done = elastune("run", "job.yaml", cwd=tmp_path)
        left = sorted(str(p.relative_to(tmp_path / "disk")) for p in (tmp_path / "disk").rglob("*"))
    assert done.returncode == 5, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("Trained to step 30, but its final state is not durable") and "No space left on device" in last
    assert "newest durable checkpoint" in last and "is step 10" in last
    assert done.stdout.count("durable checkpoint of step") == 2  # steps 20 and 30, each warned about
    # A state this small is written whole by one rank a snapshot, in turn (layout.snapshot_writer); which
    # rank's turn step 10 is depends on the interval `snapshot_every_steps: auto` measured.
    assert left[:3] == ["ckpt", "ckpt/step-000000010", "ckpt/step-000000010/manifest.json"] and len(left) == 4, left
    assert re.fullmatch(r"ckpt/step-000000010/rank-0000[01]-of-00002\.safetensors", left[3]), left
    (run,) = (tmp_path / "runs" / "full-disk").glob("2*")
    result = json.loads((run / "result.json").read_text())
    assert (result["status"], result["steps"], result["durable_step"]) == ("not_durable", 30, 10)
