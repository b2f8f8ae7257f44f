"""Stopping and sharing a checkpoint root, as a user meets them with `elastune run`: a second run
on a root another run holds is refused at once (exit 2, naming the holder); SIGTERM (what
`elastune stop`, Ray's job stop and a pod's termination send) and Ctrl-C (SIGINT to the terminal's
process group) stop a run the way a preemption notice does: the newest step made durable, every
row up to it written, one line saying where the run stands, exit 143 / 130, no stack dump; the
next run resumes from there and says which spec fields changed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_cli import ROOT, elastune


def start(job: Path) -> subprocess.Popen:
    """`elastune run JOB` in a session of its own, as a terminal runs it (Ctrl-C reaches its group)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-m", "elastune", "run", job.name],
        cwd=job.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_rows(run_root: Path, after: set[Path], count: int, timeout: float = 180) -> Path:
    """The run directory a new run made under `run_root`, once it has `count` metrics rows."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in set(run_root.glob("2*")) - after:
            metrics = run / "metrics.jsonl"
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= count:
                return run
        time.sleep(0.2)
    raise AssertionError(f"no run under {run_root} reached {count} steps in {timeout} s")


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def long_job(tmp_path_factory, stdlib_dataset) -> Path:
    tmp = tmp_path_factory.mktemp("stop")
    spec = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    spec["name"] = "stoppable"
    spec["model"]["options"] |= {"num_layers": 1, "width": 16, "num_heads": 2, "context": 16}
    spec["data"] = {"path": str(stdlib_dataset), "window": 17}
    spec["schedule"]["warmup_samples"] = 64
    spec["checkpoint"] = {"every_steps": 1000, "keep_last": 2}  # nothing durable but what a stop makes
    spec["stop"] = {"max_steps": 100_000}
    (tmp / "job.yaml").write_text(yaml.safe_dump(spec))
    return tmp / "job.yaml"


def test_one_root_one_writer_and_graceful_stops(long_job):
    runs = long_job.parent / "runs" / "stoppable"
    checkpoints = runs / "checkpoints"
    first = start(long_job)
    try:
        run = wait_for_rows(runs, set(), 5)
        # A second run on the same root: refused before it starts anything, naming the holder.
        second = elastune("run", "job.yaml", cwd=long_job.parent, timeout=60)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stdout + second.stderr
        assert f"is in use by run {run.name} of job stoppable" in second.stderr and "host" in second.stderr
        assert "checkpoint.path" in second.stderr and sorted(runs.glob("2*")) == [run]
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 143, out + err
    assert "Traceback" not in out + err and "SIGTERM received" not in out + err and "PC: @" not in err
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "stopped" and result["signal"] == signal.SIGTERM
    reached = result["durable_step"]
    assert reached == result["steps"] >= 5 and (checkpoints / f"step-{reached:09d}" / "manifest.json").is_file()
    assert [r["step"] for r in rows(run)] == list(range(1, reached + 1))  # every row up to the durable step, none after
    last = out.strip().splitlines()[-1]
    assert (
        last.startswith(f"Stopped at step {reached}")
        and f"newest durable checkpoint: step {reached}" in last
        and "elastune run job.yaml" in last
    )
    assert not (checkpoints / "LEASE.json").exists()

    # The next run resumes there, says what changed, and Ctrl-C (SIGINT to its process group, Ray's
    # own processes among them) stops it the same way.
    spec = yaml.safe_load(long_job.read_text())
    spec["optimizer"]["lr"] = 0.002
    long_job.write_text(yaml.safe_dump(spec))
    before = set(runs.glob("2*"))
    third = start(long_job)
    try:
        run = wait_for_rows(runs, before, 3)
        os.killpg(third.pid, signal.SIGINT)
        out, err = third.communicate(timeout=120)
    finally:
        third.kill()
    assert third.returncode == 130, out + err
    assert (
        f"Resuming from checkpoint step {reached}" in out
        and "these fields differ from the spec that saved it: optimizer.lr 0.003 -> 0.002" in out
    )
    resumed = rows(run)
    result = json.loads((run / "result.json").read_text())
    assert resumed[0]["step"] == reached + 1 and resumed[-1]["step"] == result["durable_step"] == result["steps"]
    assert result["status"] == "stopped" and "Traceback" not in out + err
    assert out.strip().splitlines()[-1].startswith(f"Stopped at step {result['steps']}")
