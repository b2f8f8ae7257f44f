"""A real Ray head on loopback for submission tests: `ray start --head` with its own temp dir and
ports, token authentication on (a token of its own) or off, stopped by killing only the processes
that carry its temp dir (a bare `ray stop` would kill every Ray on the machine, the test
session's own included)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import free_port

RAY = str(Path(sys.executable).with_name("ray"))


def head_env(token: str | None) -> dict[str, str]:
    """The environment of the head's processes (and so of every job's driver): this venv's
    `python` first on PATH; token authentication on with `token`, or off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token" if token else "disabled"
    if token:
        env["RAY_AUTH_TOKEN"] = token
    return env


@contextlib.contextmanager
def ray_head(num_cpus: int, token: str | None, nodes: tuple[int, ...] = ()) -> Iterator[str]:
    """Yields the head's Ray Jobs API URL; `nodes`: the CPUs of each worker node to start beside
    it (`ray start --address`, on loopback: a multi-node cluster on one machine). The head's
    core address is `core_address(url)`."""
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths live under it
    port, dashboard = free_port(), free_port()
    ports = [
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--metrics-export-port",
        "--runtime-env-agent-port",
        "--ray-client-server-port",
        "--node-manager-port",
        "--object-manager-port",
    ]
    command = [
        RAY,
        "start",
        "--head",
        "--port",
        str(port),
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--include-dashboard",
        "true",
        "--temp-dir",
        temp,
        "--num-cpus",
        str(num_cpus),
        "--disable-usage-stats",
        *(x for p in ports for x in (p, str(free_port()))),
    ]
    started = subprocess.run(command, env=head_env(token), capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        for cpus in nodes:
            node = [
                RAY,
                "start",
                "--address",
                f"127.0.0.1:{port}",
                "--node-ip-address",
                "127.0.0.1",
                "--num-cpus",
                str(cpus),
                "--disable-usage-stats",
                *(x for p in ports if p != "--ray-client-server-port" for x in (p, str(free_port()))),
            ]
            joined = subprocess.run(node, env=head_env(token), capture_output=True, text=True, timeout=120)
            assert joined.returncode == 0, joined.stdout + joined.stderr
        url = f"http://127.0.0.1:{dashboard}"
        wait_for_jobs_api(url)
        CORE[url] = f"127.0.0.1:{port}"
        yield url
    finally:
        stop_processes_under(temp)
        forget_address(f"127.0.0.1:{port}")


CORE: dict[str, str] = {}


def core_address(url: str) -> str:
    """The GCS address (host:port) of the head whose Jobs API is `url`: what `elastune run --address` joins."""
    return CORE[url]


def forget_address(address: str) -> None:
    """`ray start` records its head as the machine's current cluster (in /tmp/ray, whatever the
    temp dir), where a later bare `ray` command would look; `ray stop` would clear it."""
    current = Path("/tmp/ray/ray_current_cluster")
    with contextlib.suppress(OSError):
        if current.read_text().strip() == address:
            current.unlink()


def wait_for_jobs_api(url: str, timeout: float = 60) -> None:
    """The dashboard answers (any HTTP status: 401 means up, with token authentication)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def stop_processes_under(temp: str) -> None:
    """SIGTERM, then SIGKILL, every process whose command line names `temp`, and their
    descendants (a job's driver names no temp dir)."""

    def ours() -> list[int]:
        named, parent = set(), {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if temp.encode() in (entry / "cmdline").read_bytes():
                        named.add(int(entry.name))
                    parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        found, grew = set(named), True
        while grew:
            more = {pid for pid, ppid in parent.items() if ppid in found and pid not in found}
            found |= more
            grew = bool(more)
        return sorted(found)

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while ours() and time.monotonic() < deadline:
            time.sleep(0.1)


def new_token() -> str:
    return secrets.token_hex(32)
