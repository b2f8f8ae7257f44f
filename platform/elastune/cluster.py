"""Ray for a run or a search: join a cluster or start an embedded local one, what the cluster has
room for, and the preemption notices Ray reports for its nodes.

train/ and tune/ both bring Ray up through `connect_ray`; the capacity rules are pure functions
of `ray.nodes()` entries (tested without Ray).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from rich.console import Console

import ray
from elastune.events import Preemption
from elastune.spec.models import JobSpec

RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _drop_auth_default_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def connect_ray(spec: JobSpec, address: str | None, console: Console, verbose: bool, cpus: float | None = None) -> bool:
    """Join `address` (or RAY_ADDRESS), or start an embedded local Ray with at least `cpus`
    logical CPUs (default: the job's workers'); True when this call connected (the caller
    disconnects at its end: a process that leaves with Ray still connected can exit with 1)."""
    if ray.is_initialized():
        return False
    if not verbose:
        log_cluster_messages()
    if address is None and not os.environ.get("RAY_ADDRESS"):
        needed = cpus or spec.scaling.max_workers * spec.scaling.cpus_per_worker
        start_local_ray(max(os.cpu_count() or 1, int(needed + 0.999)), verbose)
        auth = "on" if os.environ.get("RAY_AUTH_MODE", "token").lower() == "token" else "off (RAY_AUTH_MODE)"
        console.print(f"Started an embedded local Ray on 127.0.0.1 (token authentication {auth}).", highlight=False)
        return True
    ray.init(address=address, log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)
    console.print(f"Joined Ray at {address or os.environ['RAY_ADDRESS']}.", highlight=False)
    return True


def log_cluster_messages() -> None:
    """Send what Ray's raylets push to this driver (a worker's or a raylet's death with its last
    log lines and state dump, worker-pool size warnings) to the log rather than the terminal.

    Ray prints them straight to stdout, colour codes and all, into the progress lines; the
    failures they tell of are Elastune's own events (recovery, warning), and Ray's session logs
    keep the messages. Ray 2.60 prints them through `ray._private.worker.print_to_stdstream`,
    looked up on every message; worker logs (--verbose) take the same path and stay on screen."""
    import ray._private.worker as ray_worker

    shown = ray_worker.print_to_stdstream
    if getattr(shown, "elastune_routed", False):
        return

    def routed(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            for line in data.get("lines", []):
                CLUSTER_LOG.info("%s", line)
            return
        shown(data, ignore_prefix)

    routed.elastune_routed = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = routed


CLUSTER_LOG = logging.getLogger("elastune.cluster")


def start_local_ray(num_cpus: int, verbose: bool = False) -> None:
    """An embedded single-node Ray bound to 127.0.0.1, whose workers run at normal priority.

    Without Ray's dashboard unless ELASTUNE_RAY_DASHBOARD=1 (then on 127.0.0.1 only): nothing of
    Elastune's uses it, and its processes took about 4 % of a 2-core machine from the workers of a
    steady run (BENCHMARKS.md); on a machine this small every daemon's share of a core is taken
    from one worker while the others wait for it at the all-reduce.

    Token authentication stays on, as Ray 2.60 defaults for local clusters: Ray creates
    ~/.ray/auth_token once and every process of the cluster uses it; RAY_AUTH_MODE=disabled opts
    out. Ray's warning about that default is replaced by the line `connect_ray` prints; the
    token itself is never printed.
    """
    logging.getLogger(RAY_AUTH_LOGGER).addFilter(_drop_auth_default_warning)
    ray.init(
        # "local": a new Ray of our own even where `ray start` left a cluster (or its address file)
        # that a bare ray.init() would join instead.
        address="local",
        num_cpus=num_cpus,
        # Ray starts workers at nice 15 so its own daemons win every contested core; here the
        # workers are the job, and on a small machine that priority cost about a quarter of the
        # throughput (BENCHMARKS.md). Same priority as the daemons, then.
        _system_config={"worker_niceness": 0},
        include_dashboard=os.environ.get("ELASTUNE_RAY_DASHBOARD", "0") == "1",
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
    )


class DrainWatch:
    """Preemption notices: nodes Ray's GCS reports as draining (a cloud autoscaler's notice, with
    a deadline), polled every POLL_S. Each new one becomes a `preemption` event, and the service
    makes its newest in-memory step durable at once and tells the workers there to leave."""

    POLL_S = 1.0

    def __init__(self, service):
        self.service = service
        self.seen: set[str] = set()
        self.polled = 0.0

    def poll(self) -> list[Preemption]:
        if time.monotonic() - self.polled < self.POLL_S:
            return []
        self.polled = time.monotonic()
        draining = ray._private.state.state.get_draining_nodes()  # {node id: deadline ms, 0 = none}; Ray Train polls the same
        new = sorted(set(draining) - self.seen)
        if not new:
            return []
        self.seen |= set(new)
        step = ray.get(self.service.drain.remote(new))
        deadlines = [draining[n] / 1000 for n in new if draining[n]]
        return [Preemption(time=time.time(), nodes=tuple(new), deadline=min(deadlines, default=None), persisted_step=step)]


def placeable_workers(nodes: list[dict[str, Any]], cpus_per_worker: float, gpus_per_worker: float) -> int:
    """How many workers asking `cpus_per_worker` CPUs and `gpus_per_worker` GPUs the alive nodes
    (`ray.nodes()` entries) hold in all, counting each node's total resources (a worker is never
    split across nodes)."""
    fit = 0
    for node in nodes:
        if not node.get("Alive"):
            continue
        have = node.get("Resources", {})
        counts = [int(have.get("CPU", 0) // cpus_per_worker)]
        if gpus_per_worker > 0:
            counts.append(int(have.get("GPU", 0) // gpus_per_worker))
        fit += min(counts)
    return fit


def short_of_workers(max_workers: int, room: int) -> str | None:
    """What to tell a live run's user when the cluster holds fewer than the `max_workers` Ray
    Train will place before the first step (None when it holds them)."""
    if room >= max_workers:
        return None
    return (
        f"recovery live starts all {max_workers} workers (Ray Train runs replica groups at a fixed count) and the "
        f"cluster has room for {room} now: Ray Train waits for capacity up to its placement timeout "
        f"(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by default), then counts a failed start. To start with what "
        f"there is, use recovery: restart (it grows into capacity as it comes) or max_workers: {max(room, 1)}"
    )
