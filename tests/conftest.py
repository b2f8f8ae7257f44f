"""Test tiers by folder: unit/ (pure), dist/ (gloo processes), ray/ (one local Ray per session),
e2e/ (the CLI and real outside parts: an S3-protocol server), k8s/ (manifests against the Kubernetes
and KubeRay schemas, the operator against an in-memory Kubernetes API)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIERS = ("unit", "dist", "ray", "e2e", "k8s")

# Tests never reach a cluster they did not start.
os.environ.pop("RAY_ADDRESS", None)


def pytest_collection_modifyitems(items):
    for item in items:
        tier = Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def stdlib_dataset(tmp_path_factory) -> Path:
    """A small prepared byte dataset (window 17) from the stdlib sources, a tenth of its documents
    held out for evaluation, shared by a session."""
    from elastune.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "stdlib-w17"
    prepare("stdlib", out, window=17, max_bytes=400_000, eval_fraction=0.1)
    return out


def debian_program(program: str, package: str) -> str:
    """A program from a Debian package (`promtool` and `prometheus` from `prometheus`, `chromium`):
    installed here when absent and apt can (.ci/run installs them first); the test is skipped,
    saying why, only where it cannot be had."""
    import shutil
    import subprocess

    found = shutil.which(program)
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        install = ["apt-get", "install", "-y", "-q", package]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(install, capture_output=True, env=env).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            subprocess.run(install, capture_output=True, env=env)
        found = shutil.which(program)
    if found is None:
        pytest.skip(f"{program} is not installed and Debian's {package} package cannot be installed here (needs apt-get as root)")
    return found


@pytest.fixture(scope="session")
def promtool() -> str:
    return debian_program("promtool", "prometheus")


@pytest.fixture(scope="session")
def prometheus() -> str:
    return debian_program("prometheus", "prometheus")


@pytest.fixture(scope="session")
def chromium() -> str:
    return debian_program("chromium", "chromium")
