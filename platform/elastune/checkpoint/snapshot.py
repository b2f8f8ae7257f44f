"""Worker side of the checkpoint service: hand this rank's state over without holding up the step.

`take` is the only part the training loop waits for: it copies the pieces this rank owns
(layout.pieces_to_write) into one host buffer laid out as their safetensors payload
(device-to-host copies are asynchronous on GPUs). A background thread then waits for the copy,
checksums the buffer (xxh3_64 per block: every later reader of the snapshot, a restore, a heal
or the service sealing it durable, verifies what it reads against these), hands it to the
service and frees it for the next snapshot. A payload up to INLINE_BYTES travels inside the call,
in arguments below Ray's inline limit (100 KiB each, 10 MiB a call), so no object is put or freed
per step; a larger one travels as one argument, through the object store. If that
hand-off is still running when the next snapshot is due, `take` waits for it: that wait is
counted as stall. `costs` holds the cost of each hand-over completed since it was last emptied
(stall + the hand-off thread's CPU seconds), for checkpoint.interval.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import torch

import ray
from elastune.checkpoint.format import BLOCK_BYTES, SNAPSHOT_CHECKSUM, PayloadPlan, Piece, payload_file, with_digests
from elastune.checkpoint.layout import pieces_to_write
from elastune.checkpoint.payload import block_digests
from elastune.events import Row

# A call's arguments up to Ray's max_direct_call_object_size (100 KiB) travel inside the call, up to
# task_rpc_inlined_bytes_limit (10 MiB) in all; beyond either, Ray puts them in the object store.
CHUNK_BYTES = 96 * 1024
INLINE_BYTES = 8 * 1024 * 1024


def chunks_of(payload, nbytes: int) -> tuple:
    """How a payload travels to the service: inline chunks when small enough, else whole."""
    if payload is None:
        return ()
    if nbytes > INLINE_BYTES:
        return (payload,)
    return tuple(payload[i : i + CHUNK_BYTES] for i in range(0, nbytes, CHUNK_BYTES))


class Snapshotter:
    def __init__(self, service):
        self.service = service
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="elastune-snapshot")
        self.pending: Future | None = None
        self.draining: frozenset[str] = frozenset()  # nodes with a preemption notice, as of the last hand-over
        self.buffer: torch.Tensor | None = None
        self.layout: tuple = ()  # what the cached plan below was made for
        self.names: list[str] = []
        self.plan = PayloadPlan.of({})
        self.file: str | None = None
        self.entries: dict[str, Any] = {}
        self.costs: list[float] = []

    def take(
        self,
        header: dict[str, Any],
        held: dict[str, Piece],
        rank: int,
        world_size: int,
        rows: list[Row] | None = None,
        rows_final: bool = False,
        writer: int | None = None,
    ) -> float:
        """Snapshot this rank's share of `held` (of `world_size` ranks that snapshot this step),
        or, with a `writer` (layout.snapshot_writer), all of it on that rank and nothing on the
        others; returns the seconds the caller was held up.

        `rows`: metrics rows of the steps up to this one. They travel with the snapshot and reach
        the run's sink when the step is complete in tier 0, so after a failure the run directory
        holds exactly the steps training resumes after; or, `rows_final` (steps that never run
        again: a live group's), as soon as they arrive. The last row gets this stall.
        """
        if writer is not None and writer != rank:
            return 0.0
        started = time.perf_counter()
        self.wait()
        # Which pieces this rank writes, and where, depend only on names, dtypes, ranges and the
        # rank's place: worked out when those change, not every step.
        whole = writer is not None
        layout = (rank, world_size, whole, *((n, p.data.dtype, p.lo, p.hi, p.shape, p.replicated) for n, p in held.items()))
        if layout != self.layout:
            names = sorted(held if whole else pieces_to_write(held, rank, world_size))
            mine = {n: held[n] for n in names}
            self.layout, self.names, self.plan = layout, names, PayloadPlan.of(mine)
            self.file = payload_file(rank, world_size) if names else None
            self.entries = self.plan.entries(mine, self.file) if names else {}
        mine = {n: held[n] for n in self.names}
        on_gpu = any(p.data.is_cuda for p in mine.values())
        if self.buffer is None or self.buffer.numel() != self.plan.size:
            self.buffer = torch.empty(self.plan.size, dtype=torch.uint8, pin_memory=on_gpu)
        self.plan.fill(self.buffer, mine)
        copied = torch.cuda.Event() if on_gpu else None
        if copied is not None:
            copied.record()
        stall = time.perf_counter() - started
        if rows:
            rows = [*rows[:-1], replace(rows[-1], snapshot_stall_seconds=stall)]
        parts = 1 if whole else world_size  # hand-overs that make the step complete
        header = {**header, "world_size": world_size, "parts": parts, "rows": rows or [], "rows_final": rows_final}
        self.pending = self.pool.submit(self._hand_off, header, rank, self.file, self.entries, copied, stall)
        return stall

    def _hand_off(self, header: dict[str, Any], rank: int, file: str | None, entries: dict, copied, stall: float) -> None:
        cpu = time.thread_time()
        if copied is not None:
            copied.synchronize()
        assert self.buffer is not None  # take() filled it before handing off
        payload = self.buffer.numpy() if file else None
        if payload is not None:
            data = payload.data
            digests = {
                n: block_digests(data, off, ln, BLOCK_BYTES, SNAPSHOT_CHECKSUM) for n, (off, ln) in self.plan.offsets.items()
            }
            entries = with_digests(entries, digests, SNAPSHOT_CHECKSUM)
        chunks = chunks_of(payload, self.plan.size)
        self.draining = frozenset(ray.get(self.service.stage.remote(header, rank, file, entries, stall, *chunks)))
        self.costs.append(stall + time.thread_time() - cpu)

    def drain_costs(self) -> list[float]:
        """The costs of the hand-overs completed since the last call."""
        costs, self.costs = self.costs, []
        return costs

    def wait(self) -> None:
        """Block until the last hand-off is done (and raise what it raised)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()
