"""The checkpoint service: one Ray actor per run holding tier 0 and writing tier 1.

Workers hand it their payloads (snapshot.Snapshotter): each rank's share of a step, or the whole
state from one rank when it is small (layout.snapshot_writer), already laid out as the
safetensors file it will become. The service keeps its own copy of every part, so a part
outlives the worker process that made it: a small one (up to snapshot.INLINE_BYTES, which
arrives inside the call itself) in its own memory, a larger one in the object store under its
own ownership. Small parts never touch the object store on the per-step path (putting and
freeing two objects per rank and step cost the service and the raylet about 0.2 cores on the
quickstart, BENCHMARKS.md); they are put there only when a worker restores from them. Once all
parts of a step are in, that step is the newest in-memory snapshot (tier 0) that restarted
workers resume from. Durable steps are queued for a background thread that checksums the parts,
writes them and commits the manifest (tier 1), then applies retention; workers never wait for
storage.

Tier 0 lives with the service, on the driver's node (its memory, or that node's object store);
a worker's node going does not take it along. Losing the driver's node ends the run; a restart
then resumes from the newest durable checkpoint (docs/checkpoints.md).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import ray
from elastune.checkpoint.checkpointer import Checkpointer, out_of_space
from elastune.checkpoint.format import (
    BLOCK_BYTES,
    DURABLE_CHECKSUM,
    SNAPSHOT_CHECKSUM,
    Manifest,
    merge_entries,
    offsets_of,
    step_dir,
    with_digests,
)
from elastune.checkpoint.payload import block_digests, digests_of
from elastune.checkpoint.retention import RetentionPolicy
from elastune.checkpoint.snapshot import INLINE_BYTES
from elastune.errors import CheckpointError
from elastune.events import Checkpoint, Event, Row, RunWarning

log = logging.getLogger(__name__)


@dataclass
class Part:
    file: str | None  # None: this rank owned nothing at this step
    entries: dict[str, dict[str, Any]]
    payload: Any  # the payload bytes (a small part), or the ObjectRef of them (owned by the service); None: no file
    nbytes: int
    stall_seconds: float

    @classmethod
    def of(cls, file: str | None, entries: dict, chunks: tuple, stall_seconds: float) -> Part:
        """The service's own copy of what a worker handed over (`chunks`: see Snapshotter)."""
        nbytes = sum(len(c) for c in chunks)
        payload: Any
        if not chunks:
            payload = None
        elif nbytes <= INLINE_BYTES:
            payload = b"".join(chunks)
        else:  # an object the worker put would die with the worker
            payload = ray.put(chunks[0])
        return cls(file, entries, payload, nbytes, stall_seconds)

    def data(self) -> memoryview:
        return memoryview(self.payload if isinstance(self.payload, bytes) else ray.get(self.payload)).cast("B")

    def ref(self):
        """An ObjectRef of the payload, for a worker to restore from (put once, when first asked)."""
        if isinstance(self.payload, bytes):
            self.payload = ray.put(self.payload)
        return self.payload


@dataclass
class Snapshot:
    header: dict[str, Any]  # step, samples_seen, spec_hash, layout, world_size, durable, meta
    parts: dict[int, Part] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)  # metrics rows delivered when complete

    @property
    def step(self) -> int:
        return self.header["step"]

    def manifest(self, parts_entries: list[dict] | None = None) -> Manifest:
        h = self.header
        entries = parts_entries if parts_entries is not None else [p.entries for p in self.parts.values()]
        return Manifest(
            step=h["step"],
            samples_seen=h["samples_seen"],
            spec_hash=h["spec_hash"],
            layout={"kind": h["layout"], "world_size": h["world_size"]},
            tensors=merge_entries(entries, f"snapshot step {h['step']}"),
            meta=dict(h["meta"]),
        )

    def handle(self) -> dict[str, Any]:
        """What a worker restores this snapshot from: the manifest and one object per payload."""
        return {
            "manifest": self.manifest().to_json().decode(),
            "payloads": {p.file: p.ref() for p in self.parts.values() if p.file},
        }


ROWS_EVERY_S = 0.5


def service_name(run_id: str) -> str:
    return f"elastune-checkpoints-{run_id}"


class CheckpointService:
    def __init__(self, uri: str, policy: dict[str, Any], sink_name: str | None = None):
        self.ckpt = Checkpointer(uri, policy=RetentionPolicy(**policy))
        self.sink_name, self._sink = sink_name, None
        self.final_rows_step = 0  # the newest step whose final rows (a live group's) went to the sink
        self.outbox: list[Row] = []  # rows of complete steps not yet passed to the sink
        self.outbox_once, self.sent_at = False, time.monotonic()
        self.cv = threading.Condition()
        self.partial: dict[tuple[int, int], Snapshot] = {}
        self.tier0: Snapshot | None = None
        self.high_water: int | None = None  # newest step any rank handed over: its update happened
        self.last_staged_at: float | None = None
        self.queue: list[Snapshot] = []
        self.busy = False
        self.reports: list[dict[str, Any]] = []
        self.draining: set[str] = set()  # node ids with a preemption notice
        self.frozen = False  # the run is being stopped: no more snapshots
        self.pins: dict[int, Snapshot] = {}  # samples -> a search member's boundary state that others may load (`persist`)
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="elastune-persist")
        self.sealer = ThreadPoolExecutor(max_workers=8, thread_name_prefix="elastune-seal")  # its own: writers wait on it
        threading.Thread(target=self._persist_loop, name="elastune-persist", daemon=True).start()

    # ------------------------------------------------------------------ tier 0

    def stage(
        self, header: dict[str, Any], rank: int, file: str | None, entries: dict, stall_seconds: float, *chunks: Any
    ) -> list[str]:
        """Take one rank's part of a step (its payload in `chunks`, see Snapshotter); a step
        whose parts are all in (header "parts": W, or 1 from a single writer) becomes tier 0.
        Returns the ids of the nodes being drained
        (preemption notices): workers on them leave."""
        if self.frozen:
            return sorted(self.draining)
        part = Part.of(file, entries, chunks, stall_seconds)
        key = (header["step"], header["world_size"])
        rows, rows_final = header.pop("rows", []), header.pop("rows_final", False)
        with self.cv:
            if rows_final:  # a live group's: final at once; every participant sends them, the sink gets them once
                rows = [r for r in rows if r.step > self.final_rows_step]
                if rows:
                    self.final_rows_step = rows[-1].step
                    self._send_rows(rows, once=True)
                rows = []
            self.high_water = max(self.high_water or 0, header["step"])  # this step's update happened
            self.last_staged_at = time.time()
            snap = self.partial.setdefault(key, Snapshot(header))
            snap.parts[rank] = part
            snap.rows += rows
            if len(snap.parts) < header.get("parts", header["world_size"]):
                return sorted(self.draining)
            del self.partial[key]
            self.partial = {k: s for k, s in self.partial.items() if k[0] > snap.step}  # older ones can never complete
            if self.tier0 is None or snap.step >= self.tier0.step:
                self.tier0 = snap
                self.cv.notify_all()
            if header["durable"]:
                self.queue.append(snap)
                self.cv.notify_all()
            self._send_rows(snap.rows)  # under the lock: steps reach the sink in order
            return sorted(self.draining)

    def _send_rows(self, rows: list[Row], once: bool = False, now: bool = False) -> None:
        """Pass metrics rows on to the run's sink, in batches at most every ROWS_EVERY_S (a call
        per step cost the service and the sink measurable CPU); `now`: everything held, at once.
        Call with the lock held."""
        self.outbox += rows
        self.outbox_once = self.outbox_once or once
        if self.outbox and self.sink_name and (now or time.monotonic() - self.sent_at >= ROWS_EVERY_S):
            sent = self.sink().record.remote(self.outbox, self.outbox_once)
            self.outbox, self.sent_at = [], time.monotonic()
            if now:
                ray.get(sent)  # in the sink before the caller drains it

    def drain(self, nodes: list[str]) -> int | None:
        """A preemption notice for `nodes`: make the newest complete step durable now (the
        service holds it; no worker is involved) and tell workers on those nodes, at their next
        hand-over, to leave. Returns the step being persisted (None: nothing newer to persist)."""
        with self.cv:
            self.draining |= set(nodes)
            return self._persist_tier0("preemption")

    def freeze(self) -> int | None:
        """The run is being stopped: take no further snapshot (workers still finishing a step are
        not waited for, and what they hand over is dropped), and make the newest complete one
        durable unless it is already. Returns its step (None: no step ever completed here)."""
        with self.cv:
            self.frozen = True
            self._send_rows([], now=True)
            self._persist_tier0("stop")
            return None if self.tier0 is None else self.tier0.step

    def _persist_tier0(self, reason: str) -> int | None:
        snap = self.tier0
        if snap is None or snap.header["durable"] or any(q is snap for q in self.queue):
            return None
        snap.header = {**snap.header, "durable": True, "reason": reason}
        self.queue.append(snap)
        self.cv.notify_all()
        return snap.step

    def snapshot(self, keep_partial: bool = False) -> dict[str, Any]:
        """What a (re)starting worker resumes from: {"tier0": the newest complete in-memory
        snapshot when it is newer than every durable checkpoint ({"manifest": JSON text,
        "payloads": {file: ObjectRef}}) or None (restore from tier 1), "high_water": the newest
        step any rank got to (to count lost steps), "last_staged_at": when that was}.

        A restarting worker group asks before any of its ranks stages: parts still incomplete
        belong to the group that died and are dropped. A worker joining a live group keeps them
        (`keep_partial`): they are the survivors' steps in flight.
        """
        with self.cv:
            self._send_rows([], now=True)  # the rows of every step the group that asks resumes after
            if not keep_partial:
                self.partial.clear()
            snap = self.tier0
            out: dict[str, Any] = {"tier0": None, "high_water": self.high_water, "last_staged_at": self.last_staged_at}
        durable = self.ckpt.committed_steps()
        if snap is not None and not (durable and durable[-1] >= snap.step):
            out["tier0"] = snap.handle()
        return out

    def tier0_at(self, step: int, timeout_s: float) -> dict[str, Any] | None:
        """The complete in-memory snapshot of exactly `step` once there is one (a live group's
        joiner heals from it), or None after `timeout_s` or if tier 0 moved past `step`."""
        with self.cv:
            self.cv.wait_for(lambda: self.tier0 is not None and self.tier0.step >= step, timeout=timeout_s)
            snap = self.tier0
        return snap.handle() if snap is not None and snap.step == step else None

    # ------------------------------------------------------------------ a search member's boundaries (tune.coordinator)

    def persist(self, samples: int, timeout_s: float) -> dict[str, Any]:
        """Make the complete in-memory snapshot at `samples` durable (unless it is already), pin it
        (`pinned`, for members that exploit this one) and wait until it is committed. Returns
        {"uri", "step", "content_hash"} once it is durable here, or {"uri", "error"}."""
        with self.cv:
            self.cv.wait_for(lambda: self.tier0 is not None and self.tier0.header["samples_seen"] >= samples, timeout=timeout_s)
            self._send_rows([], now=True)  # the interval's rows (they travel with snapshots) with the run's sink
            snap = self.tier0
            if snap is None or snap.header["samples_seen"] != samples:
                return {"uri": self.ckpt.uri, "error": f"no complete in-memory snapshot at {samples} samples"}
            self.pins[samples] = snap
            self._persist_tier0("boundary")
            self.cv.wait_for(lambda: not self.queue and not self.busy, timeout=timeout_s)
        if snap.step not in self.ckpt.committed_steps():
            return {"uri": self.ckpt.uri, "error": f"step {snap.step} is not durable"}
        return {
            "uri": self.ckpt.uri,
            "step": snap.step,
            "content_hash": self.ckpt.content_hash(self.ckpt.read_manifest(snap.step)),
        }

    def pinned(self, samples: int) -> dict[str, Any] | None:
        """The pinned snapshot at `samples` (`persist`), for another member to load in place."""
        snap = self.pins.get(samples)
        return None if snap is None else snap.handle()

    def unpin(self, samples: int) -> None:
        self.pins.pop(samples, None)

    def adopt(self, donor_uri: str, step: int, meta: dict[str, Any]) -> dict[str, Any]:
        """This member exploits a donor: its root gets a clone of the donor's durable checkpoint of
        `step` (Checkpointer.adopt), and the in-memory snapshot of its own state there is dropped,
        so a restart from here on resumes from the donor's state. Returns {"uri", "step",
        "content_hash", "bytes"}."""
        with self.cv:
            self.cv.wait_for(lambda: not self.queue and not self.busy)
            self._send_rows([], now=True)  # the interval's rows (they travel with snapshots) with the run's sink
            clone = self.ckpt.adopt(donor_uri, step, meta)
            if self.tier0 is not None and self.tier0.header["samples_seen"] <= clone.samples_seen:
                self.tier0 = None
        return {
            "uri": self.ckpt.uri,
            "step": clone.step,
            "content_hash": self.ckpt.content_hash(clone),
            "bytes": len(clone.to_json()),  # what the clone wrote: its manifest, no payload
        }

    # ------------------------------------------------------------------ tier 1

    def flush(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Wait (at most `timeout_s`) until every queued durable checkpoint is committed or has
        failed; the reports of all of them so far (a failed one carries `error`)."""
        with self.cv:
            self._send_rows([], now=True)
            self.cv.wait_for(lambda: not self.queue and not self.busy, timeout=timeout_s)
            return list(self.reports)

    def _persist_loop(self) -> None:
        while True:
            with self.cv:
                self.cv.wait_for(lambda: bool(self.queue))
                snap = self.queue.pop(0)
                self.busy = True
            try:
                report = self._persist_or_make_room(snap)
                self._emit(Checkpoint(time=time.time(), **report))
            except Exception as exc:  # a failed write must not stop later ones; users see why
                log.exception("persisting step %s failed", snap.step)
                report = {"step": snap.step, "error": f"{type(exc).__name__}: {exc}", "uri": self.ckpt.uri}
                self._warn(
                    f"durable checkpoint of step {snap.step} failed: {report['error']}; "
                    f"what it wrote is removed, and training goes on"
                )
            with self.cv:
                self.reports.append(report)
                self.busy = False
                self.cv.notify_all()

    def _persist_or_make_room(self, snap: Snapshot) -> dict[str, Any]:
        try:
            return self._persist(snap)
        except OSError as exc:
            if not out_of_space(exc):
                raise
            freed = self.ckpt.make_room()
            if not freed:
                raise
            self._warn(
                f"no space for step {snap.step} at {self.ckpt.uri}: deleted step(s) "
                f"{', '.join(map(str, freed))} to make room (the newest checkpoint stays); trying again"
            )
            return self._persist(snap)

    def _persist(self, snap: Snapshot) -> dict[str, Any]:
        started = time.perf_counter()
        folder = step_dir(snap.step)
        ranks = sorted(snap.parts)
        files = [snap.parts[r].file for r in ranks if snap.parts[r].file]
        self.ckpt.begin(snap.step)
        try:
            writes = [self.pool.submit(self._write, snap.parts[r], folder, snap.step) for r in ranks]
            wait(writes)  # every write has ended (failed or not) before anything is cleaned up
            entries = [w.result() for w in writes]
            written = time.perf_counter()
            self.ckpt.commit(snap.manifest(entries), entries, snap.header["world_size"])
        except BaseException:
            self.ckpt.abandon(snap.step, files)
            raise
        committed = time.perf_counter()
        self.ckpt.prune()
        for note in self.ckpt.notes:
            self._warn(f"retention at {self.ckpt.uri}: {note}")
        return {
            "write_seconds": round(written - started, 4),  # payloads (checksummed as they are written)
            "commit_seconds": round(committed - written, 4),  # the manifest
            "prune_seconds": round(time.perf_counter() - committed, 4),  # retention, after the checkpoint exists
            "step": snap.step,
            "reason": snap.header.get("reason", "every_steps"),
            "uri": self.ckpt.uri,
            "bytes": sum(snap.parts[r].nbytes for r in ranks),
            "rank_bytes": tuple(snap.parts[r].nbytes for r in ranks),
            "stall_seconds": tuple(round(snap.parts[r].stall_seconds, 6) for r in ranks),
            "seconds": round(committed - started, 4),  # until durable
        }

    def _write(self, part: Part, folder: str, step: int) -> dict:
        """Write one rank's part, sealed with sha256 once its bytes match what its worker handed
        over (the object store's copy is checked before anything certifies it)."""
        if part.file is None:
            return {}
        data = part.data()
        offsets = offsets_of(part.entries)

        def seal() -> dict[str, list[str]]:
            for name, (offset, length) in offsets.items():
                frag = part.entries[name]["fragments"][0]
                if block_digests(data, offset, length, BLOCK_BYTES, SNAPSHOT_CHECKSUM) != frag[SNAPSHOT_CHECKSUM]:
                    raise CheckpointError(
                        f"in-memory snapshot of step {step} ({part.file}, tensor {name!r}) does not match the "
                        f"checksum its worker took; not writing it"
                    )
            return digests_of(offsets, data, BLOCK_BYTES, DURABLE_CHECKSUM)

        hashing = self.sealer.submit(seal)  # overlaps the write
        self.ckpt.storage.write_bytes(f"{folder}/{part.file}", data)
        return with_digests(part.entries, hashing.result(), DURABLE_CHECKSUM)

    def sink(self):
        """The run's sink, looked up once (a lookup is a call to the GCS; rows go there every step)."""
        if self._sink is None:
            self._sink = ray.get_actor(self.sink_name)
        return self._sink

    def _emit(self, event: Event) -> None:
        if self.sink_name:
            # Waited for, so the event is in the sink before `flush` returns and the driver drains.
            ray.get(self.sink().event.remote(event))

    def _warn(self, message: str) -> None:
        self._emit(RunWarning(time=time.time(), message=message))


def start_service(run_id: str, uri: str, policy: RetentionPolicy, sink_name: str | None = None, scheduling_strategy=None):
    """The run's service actor (created, or found if it exists: restarted drivers rejoin it).
    The driver places it on its own node (`scheduling_strategy`): tier 0 lives in that node's
    object store."""
    actor = ray.remote(num_cpus=0, max_concurrency=32)(CheckpointService)  # type: ignore[call-overload]  # actor options Ray's stubs omit
    options = {"name": service_name(run_id), "get_if_exists": True}
    if scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    return actor.options(**options).remote(uri, policy.__dict__, sink_name)
