"""`elastune submit | status | logs | stop | list` against real Ray heads (`ray start --head` on
loopback, Ray Jobs API): with token authentication (the default of Ray 2.60) and without."""

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

from tests.e2e.ray_head import new_token, ray_head

ROOT = Path(__file__).resolve().parents[2]


def elastune(*args: str, env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "elastune", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def client_env(home: Path, token: str | None = None, **extra: str) -> dict[str, str]:
    """A user's shell: no Ray variables but `extra`, a home without ~/.ray/auth_token, `token` if given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(home)} | extra
    if token:
        env["RAY_AUTH_TOKEN"] = token
    return env


def write_job(folder: Path, dataset: Path, name: str, steps: int, **changes) -> Path:
    """A small quickstart job in its own folder, with absolute output and data paths (the cluster
    runs on this machine, so the test can read the run directory)."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    spec["name"] = name
    spec["model"]["options"] |= {"num_layers": 1, "width": 16, "num_heads": 2, "context": 16}
    spec["data"] = {"path": str(dataset), "window": 17}
    spec["schedule"]["warmup_samples"] = 64
    spec["scaling"] = {"min_workers": 1, "max_workers": 1, "recovery": "restart"}
    spec["stop"] = {"max_steps": steps}
    spec["output_dir"] = str(folder / "out")
    spec |= changes
    (folder / "job.yaml").write_text(yaml.safe_dump(spec))
    (folder / ".venv").mkdir(exist_ok=True)
    (folder / ".venv" / "big.bin").write_bytes(b"\0" * 1_000_000)  # never travels
    return folder / "job.yaml"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A head with token authentication on, and its token."""
    token = new_token()
    with ray_head(num_cpus=3, token=token) as url:
        yield url, token


@pytest.fixture(scope="module")
def long_job(secured, tmp_path_factory, stdlib_dataset):
    """A long job, submitted without waiting as soon as the head is up: it trains while the
    other tests run, until test_a_long_job_is_stopped_and_its_checkpoints_stay stops it."""
    url, token = secured
    tmp = tmp_path_factory.mktemp("long")
    env = client_env(tmp, token)
    job = write_job(tmp / "long", stdlib_dataset, "long", steps=100_000, checkpoint={"every_steps": 5, "keep_last": 2})
    result = elastune("submit", "job.yaml", "--address", url, "--name", "long-1", "--no-wait", env=env, cwd=job.parent)
    return job, env, result


def test_bad_spec_is_refused_before_anything_is_submitted(tmp_path, secured, long_job):
    url, token = secured
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "model": {"recipe": "byte_gpt"},
                "data": {"path": "d"},
                "batch": {"global_batch_size": 8, "micro_batch_size": 16},
                "stop": {"max_steps": 1},
            }
        )
    )
    result = elastune("submit", str(bad), "--address", url, env=client_env(tmp_path, token), cwd=tmp_path)
    assert result.returncode == 2 and "batch.micro_batch_size = 16" in result.stderr and "Traceback" not in result.stderr
    listed = elastune("list", "--json", "--address", url, env=client_env(tmp_path, token), cwd=tmp_path)
    assert listed.returncode == 0 and all(j["spec"] is None or j["spec"]["name"] != "x" for j in json.loads(listed.stdout))


def test_an_unreachable_address_fails_within_seconds_naming_it(tmp_path):
    # A closed port; an address where nothing answers, or (behind an HTTP proxy) something that is not Ray.
    for address in ("http://127.0.0.1:9", "http://198.51.100.7:8265"):
        started = time.monotonic()
        result = elastune("status", "any", "--address", address, env=client_env(tmp_path), cwd=tmp_path)
        assert result.returncode == 3, result.stderr
        assert address in result.stderr and "(from --address)" in result.stderr and "Traceback" not in result.stderr
        assert time.monotonic() - started < 15


def test_the_token_is_required_and_never_printed(tmp_path, secured):
    url, token = secured
    without = elastune("list", "--address", url, env=client_env(tmp_path), cwd=tmp_path)
    assert without.returncode == 4 and "no token was sent" in without.stderr and "RAY_AUTH_TOKEN" in without.stderr
    wrong = new_token()
    refused = elastune("list", "--address", url, env=client_env(tmp_path, wrong), cwd=tmp_path)
    assert refused.returncode == 4 and "a token was sent and refused" in refused.stderr
    assert wrong not in refused.stdout + refused.stderr and "Traceback" not in refused.stderr
    (tmp_path / "token").write_text(token + "\n")  # a token file, as Ray reads it
    by_file = elastune(
        "list", "--address", url, env=client_env(tmp_path, RAY_AUTH_TOKEN_PATH=str(tmp_path / "token")), cwd=tmp_path
    )
    assert by_file.returncode == 0, by_file.stderr
    assert token not in by_file.stdout + by_file.stderr
    unknown = elastune("status", "no-such-job", "--address", url, env=client_env(tmp_path, token), cwd=tmp_path)
    assert unknown.returncode == 2 and "no-such-job does not exist" in unknown.stderr and "elastune list" in unknown.stderr


def test_submit_follows_to_the_end_and_the_same_name_is_idempotent(tmp_path, secured, stdlib_dataset):
    url, token = secured
    job = write_job(tmp_path / "proj", stdlib_dataset, "submitted", steps=6)
    (tmp_path / "proj" / "notes.txt").write_text("travels with the job")
    # Ray's client would take these over its argument, and Ray sets RAY_ADDRESS inside every job.
    env = client_env(tmp_path, token, RAY_ADDRESS="http://127.0.0.1:9", RAY_API_SERVER_ADDRESS="http://127.0.0.1:9")
    dry = elastune("submit", "job.yaml", "--address", url, "--name", "sub-1", "--dry-run", "--json", env=env, cwd=job.parent)
    plan = json.loads(dry.stdout)
    assert dry.returncode == 0 and plan["address"] == url and plan["address_from"] == "--address"
    assert plan["entrypoint"] == "python -m elastune run job.yaml" and plan["upload"]["files"] == 2  # job.yaml, notes.txt
    assert ".venv" in plan["runtime_env"]["excludes"] and plan["runtime_env"]["env_vars"]["ELASTUNE_REQUIRE"].startswith(
        "python==3."
    )

    result = elastune("submit", "job.yaml", "--address", url, "--name", "sub-1", env=env, cwd=job.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Submitted sub-1 to {url} (from --address)" in result.stdout
    assert "Done: step 6" in result.stdout  # the job's own log, followed to its end
    assert "sub-1: SUCCEEDED (job submitted); the driver exited with code 0" in result.stdout
    rows = [json.loads(line) for p in (job.parent / "out").rglob("metrics.jsonl") for line in p.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))

    status = elastune("status", "sub-1", "--json", "--address", url, env=env, cwd=job.parent)
    view = json.loads(status.stdout)
    assert status.returncode == 0 and view["status"] == "SUCCEEDED" and view["driver_exit_code"] == 0
    assert view["spec"]["name"] == "submitted" and view["spec"]["stop"]["max_steps"] == 6  # the resolved spec travels as metadata
    again = elastune("submit", "job.yaml", "--address", url, "--name", "sub-1", "--no-wait", env=env, cwd=job.parent)
    assert again.returncode == 0 and "Already submitted (same spec) sub-1" in again.stdout
    write_job(tmp_path / "proj", stdlib_dataset, "submitted", steps=7)
    other = elastune("submit", "job.yaml", "--address", url, "--name", "sub-1", env=env, cwd=job.parent)
    assert other.returncode == 2 and "already a job" in other.stderr and "different spec" in other.stderr
    logs = elastune("logs", "sub-1", "--address", url, env=env, cwd=job.parent)
    assert logs.returncode == 0 and "Done: step 6" in logs.stdout


def test_a_long_job_is_stopped_and_its_checkpoints_stay(secured, long_job):
    url, _ = secured
    job, env, result = long_job
    assert result.returncode == 0 and "Follow: elastune logs long-1 --follow --address" in result.stdout
    checkpoints = job.parent / "out" / "long" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(checkpoints.glob("step-*/manifest.json")):  # training, with a durable checkpoint
        assert time.monotonic() < deadline, elastune("logs", "long-1", "--address", url, env=env, cwd=job.parent).stdout
        time.sleep(0.5)
    # Ctrl-C while following detaches: exit 0, the follow-up commands, the job still running.
    follow = subprocess.Popen(
        [sys.executable, "-m", "elastune", "logs", "long-1", "--follow", "--address", url],
        cwd=job.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert follow.stdout.readline()  # following: the job's log has started to arrive
    follow.send_signal(signal.SIGINT)
    out, err = follow.communicate(timeout=30)
    assert follow.returncode == 0 and "Detached; long-1 keeps running" in out and "Traceback" not in err, (out, err)
    assert "elastune stop long-1" in out
    status = json.loads(elastune("status", "long-1", "--json", "--address", url, env=env, cwd=job.parent).stdout)
    assert status["status"] == "RUNNING", status
    stopped = elastune("stop", "long-1", "--address", url, env=env, cwd=job.parent)
    assert stopped.returncode == 0 and "Stopping: long-1" in stopped.stdout
    followed = elastune("logs", "long-1", "--follow", "--address", url, env=env, cwd=job.parent)
    assert followed.returncode == 1 and "long-1: STOPPED" in followed.stdout
    # The stop reached the driver as SIGTERM, which stopped the run gracefully: its newest step durable, said so.
    assert "SIGTERM: stopping" in followed.stdout and "SIGTERM received" not in followed.stdout, followed.stdout[-3000:]
    (run,) = (job.parent / "out" / "long").glob("2*")
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "stopped" and result["durable_step"] == result["steps"], (result, followed.stdout[-2000:])
    assert f"Stopped at step {result['steps']}" in followed.stdout
    assert (checkpoints / f"step-{result['durable_step']:09d}" / "manifest.json").is_file()
    listed = json.loads(elastune("list", "--json", "--address", url, env=env, cwd=job.parent).stdout)
    assert {j["submission_id"]: j["status"] for j in listed}["long-1"] == "STOPPED"


def test_without_token_authentication_a_failing_job_reports_why_and_the_drivers_exit_code(tmp_path, stdlib_dataset):
    """Its model code lives beside the spec (it travels with the job) and raises in training."""
    job = write_job(
        tmp_path / "crashy",
        stdlib_dataset,
        "crashy",
        steps=3,
        model={"factory": "crashy:build"},
        scaling={"min_workers": 1, "max_workers": 1, "max_failures": 0},
    )
    (job.parent / "crashy.py").write_text(
        "from elastune.recipes import Recipe\n"
        "from elastune.recipes.gpt import GPT\n"
        "from elastune.spec.models import ByteGPTOptions\n"
        "def build():\n"
        "    def losses(model, batch):\n"
        "        raise RuntimeError('model exploded on purpose')\n"
        "    return Recipe(build_model=lambda: GPT(ByteGPTOptions(num_layers=1, width=16, num_heads=2, context=16)),\n"
        "                  sample_losses=losses)\n"
    )
    with ray_head(num_cpus=2, token=None) as url:
        result = elastune("submit", "job.yaml", "--address", url, "--name", "crashy-1", env=client_env(tmp_path), cwd=job.parent)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Training failed" in result.stdout and "model exploded on purpose" in result.stdout  # the job's own log
    assert "crashy-1: FAILED (job crashy); the driver exited with code 1" in result.stdout
    (run_dir,) = (job.parent / "out" / "crashy").glob("2*")
    outcome = json.loads((run_dir / "result.json").read_text())
    assert outcome["status"] == "failed" and "model exploded on purpose" in outcome["error"]
