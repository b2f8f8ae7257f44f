"""A job on a multi-node local cluster (ray.cluster_utils.Cluster: several raylets on this
machine), for what only several nodes can show. Three scenarios:

  node-loss:   the job's own `kill_node` fault takes the node of rank 1 mid-run; a fresh node is
               added as soon as the run records the kill (capacity returns).
  preemption:  as the job's first straggler fault fires, the node of rank 1 is drained the way
               a cloud provider's preemption notice drains it (GCS DrainNode, reason preemption,
               deadline in DRAIN_NOTICE_S), and removed at the deadline; a fresh node follows.
  resize:      the cluster starts with two worker nodes; a third is added as the job's first
               straggler fault fires (capacity for one more worker). A `kill_node` fault in the
               job then takes a node for good.

Run by tests/ray/test_node_loss.py and test_preemption.py in a process of their own (a second
Ray instance cannot share the test session's process):

    python tests/ray/cluster_job.py SCENARIO SPEC_JSON OUT_JSON

Head node: 1 CPU, which Ray Train's torchft lighthouse actor needs to be scheduled there (the
driver, Ray Train's controller and the run's actors live there too); worker nodes of 2 CPUs,
one worker each (the job asks 2 CPUs a worker, so none fits on the head). Prints nothing; writes
{"status", "error", "run_dir", "nodes_added", "drained"} to OUT_JSON.
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


DRAIN_NOTICE_S = 8.0


def main(scenario: str, spec_path: str, out_path: str) -> None:
    from ray.cluster_utils import Cluster
    from rich.console import Console

    import ray
    from elastune.spec import validate_spec
    from elastune.train.driver import run_job

    spec = validate_spec(json.loads(Path(spec_path).read_text()))
    # Node death noticed in about 3 s instead of Ray's default 15 s (health checks every 3 s, 5 misses).
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        },
    )
    for _ in range(2 if scenario == "resize" else 3):
        cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)  # run_job finds Ray connected
    outcome: dict = {}
    run = threading.Thread(
        target=lambda: outcome.update(result=run_job(spec, str(ROOT), console=Console(quiet=True))), daemon=True
    )
    run.start()
    added: list[float] = []
    drained: dict = {}
    try:
        # Nodes are added and removed from the main thread (Ray installs signal handlers for them).
        while run.is_alive():
            events = read_all(spec.output_dir, "events.jsonl")
            if scenario == "node-loss" and not added and any(e["kind"] == "fault" and e["action"] == "kill_node" for e in events):
                cluster.add_node(num_cpus=2)  # capacity returns
                added.append(time.time())
            if scenario == "resize" and not added and any(e["kind"] == "fault" and e["action"] == "delay_rank" for e in events):
                cluster.add_node(num_cpus=2)
                added.append(time.time())
            if scenario == "preemption":
                if not drained and any(e["kind"] == "fault" and e["action"] == "delay_rank" for e in events):
                    node = next(e["node"] for e in events if e["kind"] == "join" and e["replica"] == 1)
                    drained.update(node=node, deadline=time.time() + DRAIN_NOTICE_S, accepted=drain(node, DRAIN_NOTICE_S))
                if drained and "removed" not in drained and time.time() >= drained["deadline"]:
                    victim = next(n for n in cluster.worker_nodes if n.node_id == drained["node"])
                    cluster.remove_node(victim, allow_graceful=False)
                    drained["removed"] = time.time()
                    cluster.add_node(num_cpus=2)  # the provider's replacement machine
                    added.append(time.time())
            run.join(0.2)
        result = outcome["result"]
        Path(out_path).write_text(
            json.dumps(
                {
                    "status": result.status,
                    "error": result.error,
                    "run_dir": str(result.run_dir),
                    "nodes_added": added,
                    "drained": drained,
                }
            )
        )
    finally:
        # A Ray Train fit the driver stopped waiting for (a replacement with no capacity) is cut
        # off here; Ray may raise SystemExit in whichever thread waits on it. The result is written.
        try:
            ray.shutdown()
            cluster.shutdown()
        except BaseException:
            pass


def read_all(output_dir: str, name: str) -> list[dict]:
    return [json.loads(line) for p in Path(output_dir).rglob(name) for line in p.read_text().splitlines() if line]


def drain(node_id: str, seconds: float) -> bool:
    """Drain a node as a preemption notice does (what a cloud autoscaler asks Ray's GCS)."""
    from ray.core.generated.autoscaler_pb2 import DrainNodeReason

    import ray

    accepted, _ = ray._private.worker.global_worker.gcs_client.drain_node(
        node_id=node_id,
        reason=DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        reason_message="preemption rehearsal",
        deadline_timestamp_ms=int((time.time() + seconds) * 1000),
    )
    return bool(accepted)


if __name__ == "__main__":
    os.environ.pop("RAY_ADDRESS", None)  # this cluster, not the one the caller may name
    # Every node on 127.0.0.1: Ray takes "not a cluster platform" to mean loopback for every node
    # address, where it would otherwise advertise this machine's network address.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    main(sys.argv[1], sys.argv[2], sys.argv[3])
