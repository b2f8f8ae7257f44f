"""Live recovery (`scaling.recovery: live`): the survivors of a lost worker carry on at once, with
the same global batch, while Ray Train replaces it.

Every Ray Train worker is its own torchft replica group (Ray Train's TorchftConfig). Before each
step a torchft Manager asks the run's lighthouse for a quorum: this step's participants W and this
worker's place r among them. The batch plan splits the unchanged global batch over those W
(elastune.batch_plan), the gradient SUM runs over the quorum's process group, and the step applies
only where every participant's reduction went through (should_commit). A step during which a
peer died applies nothing and runs again under the next quorum, without the dead peer: no step
is lost and none counts twice. Ray Train starts a replacement meanwhile; it restores the newest
in-memory snapshot and joins at a step boundary.

A worker that joins behind the others heals: the donor torchft picks for it hands its whole state
to the checkpoint service as a one-rank snapshot of that step (`ServiceTransport.send_checkpoint`),
and the joiner loads it from there: the verified checkpoint format, never pickle (torchft's own
transports unpickle what a peer sends).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from torch.distributed import ReduceOp
from torchft import Manager, ProcessGroupGloo, ProcessGroupNCCL
from torchft.checkpointing.transport import CheckpointTransport

import ray
from elastune.checkpoint.snapshot import Snapshotter
from elastune.train.group import first_line
from elastune.train.state import Progress
from elastune.train.step import GradBuffer, StepStats

# The lighthouse's settings (TorchftConfig.lighthouse_kwargs), measured on a 2-core machine
# (docs/elastic.md). A quorum forms at once when everyone of the last one asks (plus any joiner);
# otherwise it waits for every worker still heartbeating: a dead one stops, and is out of the
# next quorum after heartbeat_timeout_ms. join_timeout_ms bounds the wait for a live worker that
# does not ask; it is counted from the first request, and a joiner may have been asking for a
# while: short, it would start a step without a survivor that was a few milliseconds late.
LIGHTHOUSE = {"heartbeat_timeout_ms": 1000, "quorum_tick_ms": 50, "join_timeout_ms": 30_000}
# How long a collective, a commit vote or a heal may take before the step counts as failed. A dead
# peer closes its sockets and is noticed at once; this bounds a hung one.
TIMEOUT = timedelta(seconds=30)
QUORUM_TIMEOUT = timedelta(seconds=120)


def start_together(sink, workers: int, timeout_s: float = 60.0) -> None:
    """Wait until the `workers` Ray Train started all have their torchft Manager up (or `timeout_s`).

    The first quorum waits only for workers whose Manager heartbeats already: without this, the
    first steps would run on whichever workers imported and built their model first, and the rest
    would heal into the run a step later. A replacement arrives after the count is complete and
    goes on at once."""
    if ray.get(sink.arrive.remote("live-start")) > workers:
        return
    deadline = time.monotonic() + timeout_s
    while ray.get(sink.arrived.remote("live-start")) < workers and time.monotonic() < deadline:
        time.sleep(0.05)


class LiveGroup:
    """This worker's membership of the run's torchft quorum.

    `state` returns (progress, pieces) of this worker now, for a joiner to heal from; `load` loads
    a snapshot the service returned ({"manifest", "payloads"}) and returns its progress.
    """

    def __init__(
        self,
        replica: int,
        min_workers: int,
        service,
        header: Callable[[Progress], dict[str, Any]],
        state: Callable[[], tuple[Progress, dict]],
        load: Callable[[dict[str, Any]], Progress],
        progress: Progress,
        on_gpu: bool = False,
    ):
        self.load = load
        self.healed: Progress | None = None
        self.transport = ServiceTransport(service, header, state)
        self.pg = ProcessGroupNCCL(timeout=TIMEOUT) if on_gpu else ProcessGroupGloo(timeout=TIMEOUT)
        self.manager = Manager(
            pg=self.pg,
            load_state_dict=self._heal,
            state_dict=lambda: None,  # the transport reads the state itself, as format pieces
            min_replica_size=min_workers,
            use_async_quorum=False,  # a joiner heals before the step, so it can take a share of it
            init_sync=False,  # every worker seeds its parameters alike and restores the same checkpoint
            world_size=1,
            rank=0,
            replica_id=f"elastune-{replica:04d}",  # the quorum orders replicas by id: stable ranks
            timeout=TIMEOUT,
            quorum_timeout=QUORUM_TIMEOUT,
            checkpoint_transport=self.transport,
        )
        self.manager.load_state_dict({"step": progress.step, "batches_committed": 0})

    def begin(self, progress: Progress) -> tuple[Progress, int, int]:
        """Join this step's quorum; returns (progress, rank, world size) for the step. A worker that
        was behind has healed by the time this returns, and its progress is the donor's."""
        self.healed = None
        self.manager.start_quorum()
        if self.healed is not None:
            progress = self.healed
        rank, world = self.manager.participating_rank(), self.manager.num_participants()
        return progress, (0 if rank is None else rank), max(world, 1)

    def _heal(self, found: dict[str, Any]) -> None:
        self.healed = self.load(found)

    def reduce(self, grads: StepStats) -> bool:
        """SUM over this step's quorum; True only if every participant's reduction went through.

        A participant that fails gives up on the step and closes this quorum's connections at
        once: a peer may be waiting for data from it rather than from the dead worker, and would
        otherwise learn only by the collective timeout (30 s, measured after a node loss; tests/
        dist/test_live_abandon.py). Reductions go one bucket at a time, after backward, for the
        same reason: once one fails, the Manager turns the rest into no-ops instead of leaving
        them in flight. So a live group does not overlap reduction with backward (the GradBuffer
        is built with overlap off), and its sums are the Manager's all-reduce (gloo's ring order,
        not train.reduce's rank order: bitwise equal to a flat reduction only at W <= 2)."""
        assert isinstance(grads, GradBuffer)  # a live group trains whole replicas (no fsdp: spec.scaling refuses it)
        for wire, land in [*((b.wire(), b.land) for b in grads.buckets), (grads.stats, lambda _: None)]:
            self.manager.allreduce(wire, reduce_op=ReduceOp.SUM).wait()
            if self.manager.errored() is not None:
                # The next quorum configures a new process group anyway; dropping this one now
                # (torchft's abort releases it) closes its sockets, so every peer fails at once.
                self.pg.abort()
                gc.collect()  # a failed work and its futures may still hold them (reference cycles)
                break
            land(wire)
        return self.manager.should_commit()

    def error(self) -> str | None:
        err = self.manager.errored()
        return None if err is None else first_line(err.original_exception)

    def close(self) -> None:
        self.manager.shutdown(wait=False)


class ServiceTransport(CheckpointTransport):
    """torchft's state hand-over between replicas, through the checkpoint service."""

    def __init__(self, service, header: Callable[[Progress], dict[str, Any]], state: Callable[[], tuple[Progress, dict]]):
        self.service, self.header, self.state = service, header, state

    def metadata(self) -> str:
        return "elastune-checkpoint-service"

    def send_checkpoint(self, dst_ranks: list[int], step: int, state_dict: Any, timeout: timedelta) -> None:
        # The donor is inside start_quorum: its state is that of `step` and nothing changes it.
        progress, pieces = self.state()
        snapshots = Snapshotter(self.service)
        snapshots.take(self.header(progress), pieces, rank=0, world_size=1)
        snapshots.wait()

    def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta) -> Any:
        found = ray.get(self.service.tier0_at.remote(step, timeout.total_seconds()))
        if found is None:
            raise TimeoutError(f"no complete snapshot of step {step} reached the checkpoint service within {timeout}")
        return {"user": {"default": found}, "torchft": {"step": step, "batches_committed": 0}}

    def disallow_checkpoint(self) -> None:
        pass

    def shutdown(self, wait: bool = True) -> None:
        pass
