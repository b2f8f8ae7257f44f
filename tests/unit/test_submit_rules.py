"""Submission rules: which address wins, what travels with a job, the version pins, where the
token comes from."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from elastune.errors import ElastuneError
from elastune.spec import validate_spec
from elastune.submit.address import DEFAULT_ADDRESS, resolve_address
from elastune.submit.client import token
from elastune.submit.package import build_submission, excluded, mismatches, upload_size

QUICKSTART = yaml.safe_load((Path(__file__).resolve().parents[2] / "jobs" / "quickstart.yaml").read_text())


def test_the_flag_wins_over_the_environment_which_only_defaults():
    env = {"RAY_ADDRESS": "http://ray-address:8265", "RAY_API_SERVER_ADDRESS": "http://api-server:8265"}
    assert resolve_address("http://flag:8265/", env).describe() == "http://flag:8265 (from --address)"
    assert resolve_address("head:8265", env).url == "http://head:8265"  # a bare host:port is a dashboard URL
    assert resolve_address(None, env).describe() == "http://api-server:8265 (from RAY_API_SERVER_ADDRESS)"
    assert resolve_address(None, {"RAY_ADDRESS": "http://ray-address:8265"}).source == "RAY_ADDRESS"
    # Inside a Ray job RAY_ADDRESS is the cluster's core address, not its Jobs API: not a guess.
    assert resolve_address(None, {"RAY_ADDRESS": "10.0.0.5:6379"}).url == DEFAULT_ADDRESS
    for bad in ("ray://head:10001", "http://head:port"):
        with pytest.raises(ElastuneError, match="--address"):
            resolve_address(bad, {})


def test_what_travels(tmp_path):
    for path in ("job.yaml", "model.py", "pkg/layers.py", ".git/HEAD", ".venv/lib/x.py", "pkg/__pycache__/a.pyc", "runs/q/metrics.jsonl",
                 ".elastune/data/tokens.arrow", "data/big/tokens.arrow", "weights.safetensors"):  # fmt: skip
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("x" * 10)
    raw = {**QUICKSTART, "data": {"path": str(tmp_path / "data" / "big"), "window": 65}, "output_dir": str(tmp_path / "out")}
    sub = build_submission(validate_spec(raw), tmp_path / "job.yaml", tmp_path)
    assert "/data/big" in sub.runtime_env["excludes"]  # the spec's own dataset, inside the folder
    assert (sub.upload_files, sub.upload_bytes) == (3, 30)  # job.yaml, model.py, pkg/layers.py
    assert sub.entrypoint == "python -m elastune run job.yaml"
    assert sub.runtime_env["py_modules"][0].endswith("elastune") and sub.runtime_env["working_dir"] == str(tmp_path)
    assert validate_spec(__import__("json").loads(sub.metadata["elastune_spec"])).name == "quickstart"
    assert not sub.warnings  # absolute output and checkpoint paths
    relative = build_submission(validate_spec({**raw, "output_dir": "runs"}), tmp_path / "job.yaml", tmp_path)
    assert any("output_dir and checkpoint.path are relative" in w for w in relative.warnings)
    assert upload_size(tmp_path, ["*.py"])[0] == 7  # only the three .py files are out: no default excludes here
    with pytest.raises(ElastuneError, match="outside the working directory"):
        build_submission(validate_spec(raw), tmp_path / "job.yaml", tmp_path / "pkg")


def test_exclude_patterns():
    assert excluded(".venv/lib/x.py", [".venv"]) and excluded("a/b/__pycache__/c.pyc", ["__pycache__"])
    assert excluded("data/big/t.arrow", ["/data/big"]) and not excluded("src/data/big/t.arrow", ["/data/big"])
    assert excluded("w.safetensors", ["*.safetensors"]) and not excluded("model.py", ["*.safetensors"])
    assert excluded("logs/a/b.txt", ["logs/a"]) and not excluded("model.py", ["logs/a"])


def test_pins_ignore_local_build_tags_but_not_releases():
    assert mismatches("python==3.11 torch==2.13.0+cpu ray==2.60.0", {"python": "3.11", "torch": "2.13.0+cu128", "ray": "2.60.0"}) == []
    assert mismatches("python==3.11 torch==2.13.0 ray==2.60.0", {"python": "3.12", "torch": "2.12.0", "ray": "2.60.0"}) == [
        "python 3.12 (the job was submitted with 3.11)", "torch 2.12.0 (the job was submitted with 2.13.0)"]
    assert mismatches("ray==2.60.0", {}) == ["ray missing (the job was submitted with 2.60.0)"]


def test_the_token_is_found_where_ray_looks(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert token({}) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    (tmp_path / "file").write_text("from-path")
    assert token({}) == "from-home"
    assert token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "file")}) == "from-path"
    assert token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "file")}) == "from-env"
    assert token({"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "from-env"}) is None
