import contextlib
import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

import ray
from elastune.cluster import start_local_ray


@pytest.fixture(scope="session", autouse=True)
def local_ray():
    """One local Ray for the whole session (4 logical CPUs so 3 workers fit on 2 cores)."""
    start_local_ray(num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, stdlib_dataset):
    """The uninterrupted 3-worker run (restart mode: no quorum) that live and node-loss runs track."""
    from tests.ray.jobs import run
    from tests.ray.live_cases import job

    spec = job(tmp_path_factory.mktemp("uninterrupted"), stdlib_dataset, "uninterrupted", recovery="restart")
    # Snapshots spaced as the default spaces them: every run compared with this one also shows
    # that their interval leaves the numbers alone.
    spec = spec.model_validate({**spec.to_dict(), "checkpoint": {**spec.to_dict()["checkpoint"], "snapshot_every_steps": "auto"}})
    _, rows, _ = run(spec)
    return spec, rows


ROOT = Path(__file__).resolve().parents[2]
OBSERVED_STEPS = 16


@pytest.fixture(scope="session")
def observed(tmp_path_factory, stdlib_dataset):
    """A 3-worker run whose rank 1 is SIGKILLed mid-step 7 (restart mode; durable checkpoints
    every 10 steps, in-memory snapshots every 4, as `snapshot_every_steps: auto` spaces them; the
    `uninterrupted` run's schedule horizon, so that run is its reference), scraped every second
    by a real Prometheus on loopback that finds it through
    the run's file_sd target and evaluates dashboards/rules. Yields (query, outcome, rows,
    events); query(path, **params) asks that Prometheus's HTTP API, or is the reason it could
    not run (a str: the run still happens, for the tests that need only the run)."""
    from tests.ray.jobs import run, spec_for
    from tests.ray.live_cases import STEPS, G

    tmp = tmp_path_factory.mktemp("observed")
    raw = spec_for(tmp, stdlib_dataset, "killed", 3, OBSERVED_STEPS).to_dict()
    raw["schedule"]["horizon_samples"] = G * STEPS
    raw["checkpoint"] |= {"every_steps": 10, "snapshot_every_steps": 4}
    raw["faults"] = [{"action": "kill_rank", "rank": 1, "at_step": 7, "point": "mid"}]
    spec = spec_for(tmp, stdlib_dataset, "killed", 3, OBSERVED_STEPS).model_validate(raw)
    with prometheus_scraping(Path(spec.output_dir) / "prometheus-targets", tmp) as query:
        outcome, rows, events = run(spec)
        yield query, outcome, rows, events


@contextlib.contextmanager
def prometheus_scraping(targets: Path, tmp: Path):
    """A real Prometheus (Debian's package) on loopback that scrapes, every second, whatever
    exporter a run or search announces with a file_sd target in `targets`, and evaluates
    dashboards/rules. Yields query(path, **params) against its HTTP API, or, where Prometheus cannot
    be had, the reason (a str: the run still happens, for the tests that need only the run)."""
    from tests.conftest import debian_program

    targets.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "dashboards" / "rules" / "elastune.rules.yml")],
        "scrape_configs": [
            {"job_name": "elastune", "honor_labels": True, "file_sd_configs": [{"files": [str(targets / "*.json")]}]}
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"

    def query(path: str, **params):
        with urllib.request.urlopen(f"{base}{path}?{urllib.parse.urlencode(params, doseq=True)}", timeout=10) as page:
            body = json.loads(page.read())
        assert body["status"] == "success", body
        return body["data"]

    try:
        prometheus = debian_program("prometheus", "prometheus")
    except pytest.skip.Exception as why:
        yield str(why)
        return
    log = open(tmp / "prometheus.log", "w")
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
                time.sleep(0.2)
        yield query
    finally:
        server.terminate()
        server.wait(30)
        log.close()
