"""What people look at, against a real run: a real Prometheus (Debian's package) on loopback finds
the run's exporter through the file_sd target the run writes, scrapes it every second and
evaluates dashboards/rules; then every query of every panel of the training, elasticity and
checkpoint dashboards, every template variable and every recording rule returns at least one
series, evaluated at the run's last step. The run's HTML report renders its plots in headless
Chromium, and `elastune runs ls` lists the run.

The run: 2 workers, restart mode, rank 1 SIGKILLed mid-step 6 (a recovery, so failure and MTTR
panels have data), durable checkpoints every 5 steps. The tuning dashboard reads trial metrics
that only a tuning job emits; it joins this proof with population-based tuning.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.ray.test_resume_world_size import run, spec_for

ROOT = Path(__file__).resolve().parents[2]
PROVEN = ("training", "elasticity", "checkpoints")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(base: str, path: str, **params) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params, doseq=True)}"
    with urllib.request.urlopen(url, timeout=10) as page:
        body = json.loads(page.read())
    assert body["status"] == "success", body
    return body["data"]


@pytest.fixture(scope="module")
def scraped(tmp_path_factory, stdlib_dataset, prometheus):
    tmp = tmp_path_factory.mktemp("prometheus")
    raw = spec_for(tmp, stdlib_dataset, "observed", 2, 24).to_dict()
    raw["checkpoint"]["every_steps"] = 5
    raw["faults"] = [{"action": "kill_rank", "rank": 1, "at_step": 6, "point": "mid"}]
    spec = spec_for(tmp, stdlib_dataset, "observed", 2, 24).model_validate(raw)
    targets = Path(spec.output_dir) / "prometheus-targets"
    targets.mkdir(parents=True)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "dashboards" / "rules" / "elastune.rules.yml")],
        "scrape_configs": [{"job_name": "elastune", "honor_labels": True, "file_sd_configs": [{"files": [str(targets / "*.json")]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [prometheus, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "w"),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, (tmp / "prometheus.log").read_text()[-2000:]
                time.sleep(0.2)
        outcome, rows, events = run(spec)
        yield base, rows, events, outcome.run_dir
    finally:
        server.terminate()
        server.wait(30)


def queries(name: str) -> list[tuple[str, str]]:
    d = json.loads((ROOT / "dashboards" / "grafana" / f"elastune-{name}.json").read_text())
    return [(p["title"], t["expr"].replace("$job", ".*").replace("$run", ".*")) for p in d["panels"] for t in p["targets"]]


def test_the_run_had_a_recovery_and_durable_checkpoints(scraped):
    _, rows, events, _ = scraped
    assert [e["kind"] for e in events].count("recovery") == 1 and any(e["kind"] == "checkpoint" for e in events)
    assert len(rows) == 24


@pytest.mark.parametrize("dashboard", PROVEN)
def test_every_panel_query_returns_series(scraped, dashboard):
    base, rows, _, _ = scraped
    at = rows[-1]["time"]  # the exporter served this step; after the run its series go stale
    empty = [(title, expr) for title, expr in queries(dashboard) if not get(base, "/api/v1/query", query=expr, time=at)["result"]]
    assert not empty, f"panels without data: {empty}"


def test_every_recording_rule_and_template_variable_returns_series(scraped):
    base, rows, _, _ = scraped
    at = rows[-1]["time"]
    rules = yaml.safe_load((ROOT / "dashboards" / "rules" / "elastune.rules.yml").read_text())
    records = [r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r]
    empty = [r for r in records if not get(base, "/api/v1/query", query=r, time=at)["result"]]
    assert not empty, f"recording rules without data: {empty}"
    assert get(base, "/api/v1/label/job/values", **{"match[]": "elastune_steps_total"}) == ["observed"]
    runs = get(base, "/api/v1/label/run/values", **{"match[]": 'elastune_steps_total{job=~"observed"}'})
    assert len(runs) == 1


def test_the_report_renders_its_plots_in_headless_chromium(scraped, chromium, tmp_path):
    from PIL import Image

    _, _, _, run_dir = scraped
    done = subprocess.run([sys.executable, "-m", "elastune", "report", str(run_dir), "--output", str(tmp_path / "r.html")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "r.html").read_text()
    assert "<script" not in page and "http" not in page.split("<pre>")[0]  # self-contained: nothing to fetch
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]
    url = (tmp_path / "r.html").as_uri()
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.stdout.count("<svg") == 4 and "fault: kill rank 1 at step 6" in dom.stdout
    shot = subprocess.run([chromium, *flags, "--window-size=1200,1800", f"--screenshot={tmp_path / 'r.png'}", url],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "CONSOLE" not in dom.stderr + shot.stderr, "console messages: " + (dom.stderr + shot.stderr)[-2000:]
    image = Image.open(tmp_path / "r.png").convert("L")
    drawn = sum(count for value, count in enumerate(image.histogram()) if value < 200)
    assert drawn > 0.03 * image.width * image.height  # lines, axes and text, not a blank page


def test_runs_ls_lists_the_run_with_its_failure(scraped):
    _, rows, _, run_dir = scraped
    done = subprocess.run([sys.executable, "-m", "elastune", "runs", "ls", "--output-dir", str(run_dir.parent.parent), "--json"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    (line,) = [json.loads(x) for x in done.stdout.splitlines()]
    assert (line["job"], line["status"], line["steps"], line["failures"]) == ("observed", "succeeded", 24, 1)
    assert line["final_loss"] == rows[-1]["loss"]
