"""`elastune run --address` against a real multi-node cluster made with `ray start` (a 1-CPU head and
three 2-CPU nodes on loopback): a live 3-worker job whose rank-1 node is killed mid-run trains
every step once and, having succeeded, exits 0, with a console free of the raylets' own log lines
and state dumps. (Its lost worker cannot be replaced: no capacity comes back, so the run ends
Ray Train's part itself.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from tests.e2e.ray_head import core_address, ray_head
from tests.e2e.test_cli import ROOT

STEPS = 14


def test_a_live_run_that_lost_a_node_exits_0_on_a_ray_start_cluster(tmp_path, stdlib_dataset):
    spec = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    spec["name"] = "cluster-live"
    spec["model"]["options"] |= {"num_layers": 1, "width": 16, "num_heads": 2, "context": 16, "dropout": 0.0}
    spec["data"] = {"path": str(stdlib_dataset), "window": 17}
    spec["batch"] = {"global_batch_size": 24, "micro_batch_size": 4}
    spec["schedule"]["warmup_samples"] = 48
    spec["scaling"] = {"min_workers": 2, "max_workers": 3, "cpus_per_worker": 2, "torch_threads": 1, "recovery": "live"}
    spec["checkpoint"] = {"every_steps": 5, "keep_last": 2}
    spec["stop"] = {"max_steps": STEPS}
    spec["output_dir"] = str(tmp_path / "out")
    spec["faults"] = [{"action": "kill_node", "rank": 1, "at_step": 6, "point": "mid"}]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_AUTH_MODE": "disabled"}
    with ray_head(num_cpus=1, token=None, nodes=(2, 2, 2)) as url:
        done = subprocess.run(
            [sys.executable, "-m", "elastune", "run", "job.yaml", "--address", core_address(url)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"Done: step {STEPS}" in done.stdout and done.stderr.strip() == ""
    assert "(raylet)" not in done.stdout and "[state-dump]" not in done.stdout  # the raylets' messages go to the log
    (run,) = (tmp_path / "out" / "cluster-live").glob("2*")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    (recovery,) = [e for e in events if e["kind"] == "recovery"]
    assert recovery["lost_steps"] == 0 and (recovery["world_size_before"], recovery["world_size_after"]) == (3, 2)
    assert json.loads((run / "result.json").read_text())["status"] == "succeeded"
