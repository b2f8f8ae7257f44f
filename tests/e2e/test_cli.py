"""The CLI as a user runs it: exit codes, messages without tracebacks, a real embedded-Ray run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def elastune(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "elastune", *args], cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_bad_spec_exits_2_with_field_value_rule_fix_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "model": {"recipe": "byte_gpt"},
                "data": {"path": "d"},
                "batch": {"global_batch_size": 8, "micro_batch_size": 16},
                "optimizer": {"name": "adamw", "lr": 0.1, "momentum": 0.9},
                "stop": {"max_steps": 1},
            }
        )
    )
    for command in ("validate", "run"):
        result = elastune(command, str(bad))
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        assert "optimizer.momentum = 0.9" in result.stderr
        assert "batch.micro_batch_size = 16" in result.stderr and "set micro_batch_size <= 8" in result.stderr


def test_bad_arguments_exit_2():
    result = elastune("run", "jobs/quickstart.yaml", "--workers", "0")
    assert result.returncode == 2 and "give a whole number >= 1" in result.stderr
    result = elastune("run", "jobs/quickstart.yaml", "--workers", "9")
    assert result.returncode == 2 and "scaling.max_workers = 9" in result.stderr and "Traceback" not in result.stderr
    result = elastune("run", "no/such.yaml")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_tune_refuses_a_job_without_a_search_or_with_a_bad_one_before_starting_anything(tmp_path):
    result = elastune("tune", "jobs/quickstart.yaml")
    assert result.returncode == 2 and "no tune: section" in result.stderr and "Traceback" not in result.stderr
    job = yaml.safe_load((ROOT / "jobs" / "pbt.yaml").read_text())
    job["tune"]["search"]["schedule.warmup_samples"] = {"scale": "int", "low": 0, "high": 20000}
    job["output_dir"] = str(tmp_path / "out")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(job))
    result = elastune("tune", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "tune.search.schedule.warmup_samples reaches 20000" in result.stderr
        and "schedule.warmup_samples = 20000" in result.stderr
    )
    assert not (tmp_path / "out").exists()  # refused before any search directory


def test_help_on_every_command():
    for args in (
        ["--help"],
        ["run", "--help"],
        ["validate", "--help"],
        ["schema", "--help"],
        ["data", "prepare", "--help"],
        ["ckpt", "verify", "--help"],
        ["runs", "ls", "--help"],
        ["report", "--help"],
        ["tune", "--help"],
    ):
        result = elastune(*args)
        assert result.returncode == 0 and "usage:" in result.stdout


def test_schema_prints_the_json_schema():
    result = elastune("schema")
    schema = json.loads(result.stdout)
    assert result.returncode == 0 and schema["title"] == "Elastune JobSpec"


def test_data_prepare_from_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello elastic world " * 20)
    result = elastune("data", "prepare", "--source", str(tmp_path / "a.txt"), "--output", str(tmp_path / "ds"), "--window", "9")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["window"] == 9 and manifest["count"] == (20 * 20 + 1) // 9
    missing = elastune("data", "prepare", "--source", str(tmp_path / "none*.txt"), "--output", str(tmp_path / "x"))
    assert missing.returncode == 2 and "matches no file" in missing.stderr


@pytest.fixture(scope="module")
def quick_job(tmp_path_factory, stdlib_dataset) -> Path:
    """The quickstart with a smaller model and data already prepared, in its own folder."""
    tmp = tmp_path_factory.mktemp("e2e")
    spec = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    spec["model"]["options"] |= {"num_layers": 1, "width": 16, "num_heads": 2, "context": 16}
    spec["data"] = {"path": str(stdlib_dataset), "window": 17}
    spec["schedule"]["warmup_samples"] = 64
    spec["checkpoint"]["every_steps"] = 10
    spec["stop"] = {"max_steps": 20}
    (tmp / "job.yaml").write_text(yaml.safe_dump(spec))
    return tmp / "job.yaml"


def test_run_trains_resumes_and_leaves_a_run_directory(quick_job):
    cwd = quick_job.parent
    # The address file a `ray start` left behind, its cluster gone: a bare ray.init() would try to
    # join it; the embedded Ray starts regardless.
    stale = Path("/tmp/ray/ray_current_cluster")
    if not stale.exists():
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_text("127.0.0.1:9")
    try:
        first = elastune("run", str(quick_job), cwd=cwd)
    finally:
        if stale.exists() and stale.read_text() == "127.0.0.1:9":
            stale.unlink()
    assert first.returncode == 0, first.stdout + first.stderr
    assert "token authentication on" in first.stdout
    assert "WARNING" not in first.stderr and "Token authentication is enabled" not in first.stdout + first.stderr
    assert "Worker group up: 2 worker(s)" in first.stdout and "world 2" in first.stdout
    run_dirs = sorted((cwd / "runs" / "quickstart").glob("2*"))
    assert len(run_dirs) == 1
    rows = [json.loads(line) for line in (run_dirs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    for key in ("step", "samples_seen", "loss", "lr", "world_size", "global_batch_size", "step_seconds"):
        assert key in rows[0]
    assert (run_dirs[0] / "spec.yaml").is_file() and json.loads((run_dirs[0] / "result.json").read_text())[
        "status"
    ] == "succeeded"

    second = elastune("run", str(quick_job), "--workers", "1", "--max-steps", "25", cwd=cwd)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Resuming from checkpoint step 20 (640 samples)" in second.stdout
    assert "Done: step 25" in second.stdout
    third = elastune("run", str(quick_job), "--max-steps", "25", cwd=cwd)  # the checkpoint holds that whole budget
    assert third.returncode == 0 and "Nothing to train" in third.stdout and "--fresh" in third.stdout, third.stdout + third.stderr
    assert "Started an embedded local Ray" not in third.stdout  # told before anything starts
    assert len(sorted((cwd / "runs" / "quickstart").glob("2*"))) == 2  # and no run directory for it

    # A changed model: the checkpoint is not corrupt and must not be written over.
    manifests = {p: p.read_bytes() for p in (cwd / "runs" / "quickstart" / "checkpoints").rglob("*") if p.is_file()}
    wider = yaml.safe_load(quick_job.read_text())
    wider["model"]["options"]["width"] = 24
    (cwd / "wider.yaml").write_text(yaml.safe_dump(wider))
    refused = elastune("run", "wider.yaml", "--max-steps", "30", cwd=cwd)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stdout + refused.stderr
    assert (
        "does not fit this job's model: tensor model/blocks.0.ln1.bias has shape [16] in the checkpoint and [24] in the model"
        in refused.stderr
    )
    assert "--fresh" in refused.stderr and "checkpoint.path" in refused.stderr
    assert {p: p.read_bytes() for p in (cwd / "runs" / "quickstart" / "checkpoints").rglob("*") if p.is_file()} == manifests
