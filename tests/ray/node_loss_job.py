"""A live job on a multi-node local cluster (ray.cluster_utils.Cluster: several raylets on this
machine) that loses the node of rank 1 mid-run and gets a fresh node when the loss is seen.

Run by tests/ray/test_node_loss.py in a process of its own (a second Ray instance cannot share
the test session's process):

    python tests/ray/node_loss_job.py SPEC_JSON OUT_JSON

Head node: 1 CPU, which Ray Train's torchft lighthouse actor needs to be scheduled there (the
driver, Ray Train's controller and the run's actors live there too); three worker nodes of 2 CPUs,
one worker each (the job asks 2 CPUs a worker, so none fits on the head). Prints nothing; writes {"run_dir", "nodes_added"} to
OUT_JSON.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "platform"))


def main(spec_path: str, out_path: str) -> None:
    import ray
    from ray.cluster_utils import Cluster
    from rich.console import Console

    from elastune.spec import validate_spec
    from elastune.train.driver import run_job

    spec = validate_spec(json.loads(Path(spec_path).read_text()))
    # Node death noticed in about 3 s instead of Ray's default 15 s (health checks every 3 s, 5 misses).
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
    })  # fmt: skip
    for _ in range(3):
        cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)  # run_job finds Ray connected
    outcome: dict = {}
    run = threading.Thread(target=lambda: outcome.update(result=run_job(spec, str(ROOT), console=Console(quiet=True))), daemon=True)
    run.start()
    added: list[float] = []
    try:
        # Capacity returns: a fresh node as soon as the run records the node kill (nodes are added
        # from the main thread: Ray installs signal handlers for them).
        while run.is_alive() and not added:
            events = [json.loads(line) for p in Path(spec.output_dir).rglob("events.jsonl") for line in p.read_text().splitlines()]
            if any(e["kind"] == "fault" and e["action"] == "kill_node" for e in events):
                cluster.add_node(num_cpus=2)
                added.append(time.time())
            run.join(0.2)
        run.join()
    finally:
        ray.shutdown()
        cluster.shutdown()
    result = outcome["result"]
    Path(out_path).write_text(json.dumps({"status": result.status, "error": result.error, "run_dir": str(result.run_dir), "nodes_added": added}))


if __name__ == "__main__":
    os.environ.pop("RAY_ADDRESS", None)  # this cluster, not the one the caller may name
    # Every node on 127.0.0.1: Ray takes "not a cluster platform" to mean loopback for every node
    # address, where it would otherwise advertise this machine's network address.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    main(sys.argv[1], sys.argv[2])
