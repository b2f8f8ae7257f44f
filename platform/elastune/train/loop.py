"""The worker loop: every (re)start of every Ray Train worker runs `run_worker`.

restore -> plan -> (set lr, step, record, checkpoint)* ; all state that matters is global
(samples_seen, named tensors), so the same code resumes at any world size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.train.torch
import torch

import ray
from elastune.batch_plan import BatchPlan, batch_plan
from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.format import Manifest
from elastune.checkpoint.interval import SnapshotPace, snapshot_due
from elastune.checkpoint.layout import snapshot_writer
from elastune.checkpoint.payload import BufferSource, read_pieces
from elastune.checkpoint.snapshot import Snapshotter
from elastune.data.dataset import TokenWindows
from elastune.errors import CheckpointError
from elastune.events import CollectiveFailed, Event, Finish, Join, Leave, Memory, Row, RunWarning, Start
from elastune.recipes import Recipe, SampleSource, load_recipe
from elastune.spec.models import JobSpec
from elastune.train.adaptive import AdaptiveBatch
from elastune.train.evaluate import evaluation_of
from elastune.train.faults import FaultInjector
from elastune.train.fsdp import fsdp_step, shard_model
from elastune.train.group import Group, Membership, StaticGroup
from elastune.train.member import MemberLink, MemberWorker
from elastune.train.memory import Held, held
from elastune.train.optim import set_hyper
from elastune.train.precision import LossScale, check_step, compile_model
from elastune.train.reduce import REDUCE_DTYPES
from elastune.train.resume import saved_spec
from elastune.train.rng import SCHEME as RNG_SCHEME
from elastune.train.schedules import step_values
from elastune.train.state import Progress, TrainState, restore_state, state_pieces
from elastune.train.step import GradBuffer, StepContext, StepStats, train_step


@dataclass(frozen=True)
class WorkerConfig:
    """What the driver hands every worker (plain data: it crosses process boundaries)."""

    spec: dict[str, Any]
    spec_dir: str
    sink_name: str
    service_name: str
    run_id: str
    driver_node: str  # Ray node id of the driver's node (where the run's actors live)
    member: dict[str, Any] | None = None  # a search member's link to its population (train.member.MemberLink)
    run_dir: str = ""


def run_worker(config: dict[str, Any]) -> None:
    job = WorkerConfig(**config)
    spec = JobSpec.model_validate(job.spec)
    ctx = ray.train.get_context()
    replica, workers = ctx.get_world_rank(), ctx.get_world_size()  # this worker's slot; a replacement takes it over
    node = ray.get_runtime_context().get_node_id()
    live = spec.scaling.recovery == "live"
    torch.set_num_threads(spec.scaling.torch_threads or max(1, int(spec.scaling.cpus_per_worker)))
    sink: Any = ray.get_actor(job.sink_name)  # actor handles: their methods are looked up at run time
    service: Any = ray.get_actor(job.service_name)
    c = spec.checkpoint
    report = Reporter(sink, replica, live, with_snapshots=c.snapshot_every_steps is not None)
    faults = FaultInjector(
        spec.faults,
        replica,
        lambda key: ray.get(sink.claim.remote(key)),
        lambda e: ray.get(sink.event.remote(e)),
        on_driver_node=node == job.driver_node,
        rejoined=lambda: ray.get(sink.rejoined.remote()),
    )

    recipe = load_recipe(spec.model, job.spec_dir, spec.data.path)
    source = open_source(recipe, spec)
    torch.manual_seed(spec.seed)  # identical initial parameters on every rank
    device = ray.train.torch.get_device()
    check_step(spec.step.precision, spec.step.compile, device.type)
    model = recipe.build_model().to(device)
    sharded = spec.scaling.layout == "fsdp"
    if sharded:  # rows of every parameter on each rank (FSDP2), before the optimizer is built over them
        model = shard_model(model, spec.step.precision, spec.step.compile)
    scaler = (
        LossScale(spec.step.loss_scale.initial, spec.step.loss_scale.growth_interval) if spec.step.precision == "fp16" else None
    )
    state = TrainState.build(model, spec.optimizer, spec.scaling.layout, replica, workers, scaler)
    grads = (
        None
        if sharded  # FSDP2 reduces the gradients itself, in backward
        else GradBuffer(
            model,
            micro_batch_norms=spec.noise_scale,
            bucket_bytes=int(spec.step.bucket_mb * 2**20),
            reduce_dtype=REDUCE_DTYPES[spec.step.reduce_dtype],
            overlap=not live,
        )
    )
    stats = grads or StepStats(device)
    ckpt = Checkpointer(spec.checkpoint_path)
    progress, restored = restore(service, ckpt, state, keep_partial=live)
    member = MemberWorker(MemberLink(**job.member), job.service_name, job.run_dir) if job.member else None
    trains = spec if member is None else member.spec_at(progress.samples_seen)  # a search member's own values (train.member)
    adaptive = None
    if spec.batch.adaptive is not None:  # its batch history so far; a member's changes only at its boundaries
        boundaries = member.link.boundaries if member is not None else None
        adaptive = AdaptiveBatch(spec, restored.get("adaptive"), trains, boundaries)
        trains = adaptive.trains

    def taken(manifest: Manifest) -> Progress:  # another's state loaded (a live peer's, a donor's): its batch history too
        nonlocal trains
        if adaptive is not None:
            trains = adaptive.restore(manifest.meta.get("adaptive"))
        return progress_of(manifest)

    def load(handle: dict[str, Any] | None) -> tuple[Progress, int | None]:  # a donor's state, at a search member's boundary
        if handle is not None:
            return taken(load_snapshot(handle, state)[0]), 0
        mine, found = restore(service, ckpt, state)  # the clone of the donor's, in this member's root
        if adaptive is not None:
            adaptive.restore(found.get("adaptive"))
        return mine, found.get("resumed_from_tier")

    def follow(told: JobSpec | None) -> None:  # a member's values from its boundary on
        nonlocal trains
        if told is not None:
            trains = adaptive.rebase(told) if adaptive is not None else told

    if not live or ray.get(sink.claim.remote("start")):  # a live group's replacements only join
        first = step_values(trains, progress.samples_seen).global_batch_size
        for event in announce(batch_plan(first, spec.batch.micro_batch_size, workers), restored, dataset_identity(source)):
            report.emit(event)
    base = snapshot_base(spec, state.layout.name, dataset_identity(source))

    def header(
        p: Progress, durable: bool = False, loss: float | None = None, boundary: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        meta = {**base["meta"], "metrics": {"loss": loss}} if loss is not None else base["meta"]  # loss ranks for keep_best
        if boundary is not None:  # a search member's report there: a worker restarted at the boundary sends the same
            meta = {**meta, "boundary_report": boundary}
        if adaptive is not None:  # the batch history to here: a restart or a resume goes on with it
            meta = {**meta, "adaptive": adaptive.state()}
        return {**base, "step": p.step, "samples_seen": p.samples_seen, "durable": durable, "meta": meta}

    if member is not None and member.due(progress.samples_seen):  # restarted at a boundary: its decision first
        told, progress, met = member.meet(progress, restored.get("boundary_report"), load)
        follow(told)
        report.emit(met)

    group: Group
    if live:
        from elastune.train.live import LiveGroup, start_together  # torchft is imported only by live groups

        group = LiveGroup(
            replica,
            spec.scaling.min_workers,
            service,
            header,
            lambda: (progress, state_pieces(state)),
            lambda found: taken(load_snapshot(found, state)[0]),
            progress,
            spec.scaling.gpus_per_worker > 0,
        )
        start_together(sink, workers)
    else:
        group = StaticGroup(replica, workers, lambda error: report.collective_failed(replica, progress.step + 1, error))
    # Joined: restored and in a group, so its next step's quorum (live) takes it in.
    report.emit(
        Join(
            time=time.time(),
            replica=replica,
            node=node,
            step=progress.step,
            samples_seen=progress.samples_seen,
            resumed_from_tier=restored.get("resumed_from_tier"),
            load_seconds=restored.get("load_seconds"),
        )
    )
    snapshots, pace = Snapshotter(service), SnapshotPace(c.snapshot_every_steps, cap=c.every_steps)
    # The compiled module runs the steps and shares the parameters; state is read and written
    # through `model` itself, under the universal names (a compiled module's would be prefixed).
    step = StepContext(
        compile_model(model) if spec.step.compile and not sharded else model,  # fsdp: shard_model compiled its blocks
        recipe,
        source,
        spec.seed,
        spec.optimizer.grad_clip_norm,
        spec.step.precision,
        reduce=group.reduce,
        before_reduce=lambda: faults.at(progress.step + 1, "mid"),
        evaluation=evaluation_of(spec),
        timed=spec.batch.adaptive is not None and spec.batch.adaptive.goodput,
    )
    budget = spec.budget_samples
    while progress.samples_seen < budget:
        progress, rank, world = group.begin(progress)  # live: this step's quorum; a worker behind heals here
        if progress.samples_seen >= budget:
            break
        values = step_values(trains, progress.samples_seen)  # peak lr x schedule, weight decay, global batch (spec phases)
        plan, lr = batch_plan(values.global_batch_size, spec.batch.micro_batch_size, world), values.lr
        set_hyper(state.optimizer, lr, values.weight_decay)
        started, started_at = time.perf_counter(), time.time()
        faults.at(progress.step + 1, "start")
        stats.offer = pace.offer()  # travels in the step's statistics: every rank agrees on the interval
        if adaptive is not None:  # goodput's figures of this rank's previous step, summed alike on every rank
            stats.speed_offer = adaptive.offer
        if grads is None:
            result = fsdp_step(step, state, stats, plan, rank, progress)
        else:
            result = train_step(step, state, grads, plan, rank, progress)
        if result is None:  # a peer was lost mid-step: nothing applied anywhere; the next quorum runs the step again
            report.failed(progress.step + 1, world, started_at, group.error())
            continue
        progress = progress.advance(plan.global_batch_size)
        seconds = time.perf_counter() - started
        row = metrics_row(progress, result, lr, plan, seconds)
        report.committed(row, plan)
        if adaptive is not None:
            adaptive.timed(seconds, result.busy_seconds, len(plan.for_rank(rank)))
            if adaptive.observe(progress.samples_seen, plan.global_batch_size, world, result.noise, stats.speed):
                trains = adaptive.trains  # the next step trains the new batch
                report.emit(adaptive.event(progress.step, plan.global_batch_size))
        batches = adaptive.history if adaptive is not None else None
        boundary = member.after(row, step, rank, world, sharded, batches) if member is not None else None  # its report
        # A search member's boundary becomes durable once the population has decided (tune.coordinator).
        durable = progress.samples_seen >= budget or (progress.step % c.every_steps == 0 and boundary is None)
        if report.memory_due:  # after the first step: the optimizer's state exists from then on
            mine = held(model, state.optimizer, None if grads is None else grads.storage)
            report.memory(replica, progress.step, world, mine, state.layout.name)
        pace.settle(stats.pace.tolist(), seconds, snapshots.drain_costs())
        if durable or snapshot_due(progress.step, pace.interval) or boundary is not None:
            pieces = state_pieces(state)
            turn = progress.step // (pace.interval or c.every_steps)
            writer = None if live else snapshot_writer(pieces, turn, world)  # a live group heals from every rank's share
            snapshots.take(
                header(progress, durable, result.loss, boundary),
                pieces,
                rank,
                world,
                report.rows_for_snapshot(rank, writer),
                live,
                writer,
            )
        if member is not None and boundary is not None:
            snapshots.wait()  # the boundary's state is with the service before the population hears of it
            report.flush(wait=True)  # and the interval's rows with the run's sink (the driver writes them on its next drain)
            told, progress, met = member.meet(progress, boundary, load)
            follow(told)
            report.emit(met)
            if met.stop:
                break
        if live and node in snapshots.draining:  # a preemption notice for this node: leave at this step boundary
            reason = "its node is draining (preemption notice)"
            report.emit(Leave(time=time.time(), replica=replica, node=node, step=progress.step, reason=reason))
            break
    snapshots.wait()  # the last step is with the service before this worker reports done
    report.flush()
    if progress.samples_seen >= budget:
        report.emit(Finish(time=time.time(), step=progress.step, samples_seen=progress.samples_seen), key="finish")
    group.close()


def open_source(recipe: Recipe, spec: JobSpec) -> SampleSource:
    return recipe.dataset(spec.data) if recipe.dataset is not None else TokenWindows(spec.data.path)


def dataset_identity(source: SampleSource) -> dict[str, Any]:
    """What identifies the data a checkpoint's positions refer to (count, and content hash if known)."""
    manifest = getattr(source, "manifest", None)
    identity = getattr(manifest, "identity", None)  # a prepared dataset's (data.dataset.DatasetManifest)
    return identity if identity is not None else {"count": len(source), "content_hash": getattr(manifest, "content_hash", None)}


def announce(plan: BatchPlan, restored: dict[str, Any], dataset: dict[str, Any]) -> list[Event]:
    """What a worker group says as it starts: its plan and what `restore` found, then a loud
    warning for each corrupt checkpoint passed over and for a dataset that changed since."""
    now = time.time()
    found = {k: v for k, v in restored.items() if k not in ("dataset", "skipped_checkpoints", "boundary_report", "adaptive")}
    out: list[Event] = [
        Start(time=now, world_size=plan.world_size, plan=plan.describe(), micro_batches=tuple(plan.counts()), **found)
    ]
    for reason in restored.get("skipped_checkpoints", []):
        out.append(RunWarning(time=now, message=f"CHECKPOINT CORRUPT, used an older one: {reason}"))
    saved = restored.get("dataset")
    if saved and saved != dataset:
        # Positions still resume exactly, but they now name other samples: say so loudly.
        message = (
            f"the dataset changed since the checkpoint (then {saved}, now {dataset}); "
            f"samples_seen continues, but the epoch's order is over different data"
        )
        out.append(RunWarning(time=now, message=message))
    return out


def restore(service, ckpt: Checkpointer, state: TrainState, keep_partial: bool = False) -> tuple[Progress, dict[str, Any]]:
    """Newest state from the service's in-memory snapshot (tier 0) when it is the newest there is,
    else from the newest valid durable checkpoint (tier 1); only the ranges this layout needs.
    A snapshot that fails its checksums is passed over for tier 1, with a warning.
    `keep_partial`: a worker joining a live group leaves the survivors' snapshots in flight alone."""
    started = time.perf_counter()
    found = ray.get(service.snapshot.remote(keep_partial))
    skipped: list[str] = []
    manifest: Manifest | None = None
    nbytes: int | None = None
    if found["tier0"] is not None:
        try:
            (manifest, nbytes), tier = load_snapshot(found["tier0"], state), 0
        except CheckpointError as exc:
            skipped.append(f"{exc}; resuming from the newest durable checkpoint instead")
    if manifest is None:
        loaded: dict[str, int] = {}

        def apply(m: Manifest, read) -> None:
            loaded["bytes"] = restore_state(state, m.shapes, read, f"{ckpt.uri} step {m.step}")

        manifest, tier = ckpt.restore_latest(apply), 1
        nbytes = loaded.get("bytes")
        skipped += ckpt.skipped
    high_water = found["high_water"]
    if manifest is None:
        return Progress(), {"resumed_from_step": None, "skipped_checkpoints": skipped, "lost_steps": high_water or 0}
    return progress_of(manifest), {
        # Updates this run made past the resumed step and lost with the group that made them.
        "lost_steps": max(0, (high_water or 0) - manifest.step),
        "last_staged_at": found["last_staged_at"],
        "resumed_from_step": manifest.step,
        "resumed_samples_seen": manifest.samples_seen,
        "resumed_from_tier": tier,
        "saved_world_size": manifest.layout.get("world_size"),
        "saved_layout": manifest.layout.get("kind"),
        "dataset": manifest.meta.get("dataset"),
        "load_seconds": round(time.perf_counter() - started, 4),
        "load_bytes": nbytes,
        "skipped_checkpoints": skipped,
        "boundary_report": manifest.meta.get("boundary_report"),  # a search member's (train.member)
        "adaptive": manifest.meta.get("adaptive"),  # an adaptive batch's history (train.adaptive)
    }


def progress_of(manifest: Manifest) -> Progress:
    return Progress(manifest.step, manifest.samples_seen)


def load_snapshot(snap: dict[str, Any], state: TrainState) -> tuple[Manifest, int]:
    """Load an in-memory snapshot the service handed out ({"manifest", "payloads"}), every block
    checked against the checksums its workers took; returns its manifest and the bytes read."""
    manifest = Manifest.from_json(snap["manifest"].encode(), "in-memory snapshot")
    where = f"in-memory snapshot of step {manifest.step}"

    def fetch(file: str):
        if file not in snap["payloads"]:
            raise CheckpointError(f"{where}: names a payload {file!r} it does not hold")
        return ray.get(snap["payloads"][file])

    source = BufferSource(fetch)
    nbytes = restore_state(state, manifest.shapes, lambda wanted: read_pieces(manifest, source, wanted, where), where)
    return manifest, nbytes


def snapshot_base(spec: JobSpec, layout: str, dataset: dict[str, Any]) -> dict[str, Any]:
    """What every snapshot's manifest says besides progress and tensors (the service adds the
    world size): computed once per worker, not per step."""
    sections = spec.to_dict()
    return {
        "spec_hash": spec.fingerprint(),
        "layout": layout,
        "meta": {
            "spec": saved_spec(spec),  # what a resume compares its own spec with (train.resume)
            "job": spec.name,
            "model_hash": spec.fingerprint("model"),
            "optimizer": sections["optimizer"],
            "schedule": {**sections["schedule"], "horizon_samples": spec.horizon_samples},
            "rng": {
                "seed": spec.seed,
                "scheme": RNG_SCHEME,
            },
            "batch": sections["batch"],
            "dataset": dataset,
        },
    }


def metrics_row(progress: Progress, result, lr: float, plan: BatchPlan, seconds: float) -> Row:
    return Row(
        time=time.time(),
        step=progress.step,
        samples_seen=progress.samples_seen,
        loss=result.loss,
        lr=lr,
        grad_norm=result.grad_norm,
        loss_scale=result.loss_scale,
        world_size=plan.world_size,
        global_batch_size=plan.global_batch_size,
        micro_batches=tuple(plan.counts()),
        step_seconds=seconds,
        samples_per_s=plan.global_batch_size / seconds if seconds > 0 else None,
        sample_tally=tuple(result.tally),
        noise=None if result.noise is None else tuple(result.noise),
        eval_loss=result.eval_loss,
    )


class Reporter:
    """Where a worker's metrics rows and events go.

    restart: rank 0 reports events. Rows travel with snapshots and reach the sink only when the
    step is complete in tier 0, so after a failure the run directory holds exactly the steps the
    run resumes after: every rank keeps them (they are the same on every rank but for timings),
    and the rank that hands over a step's first part, rank 0 or the step's one writer
    (layout.snapshot_writer), sends those since the last snapshot.
    live: every participant reports, and the run's sink keeps each step's first row and each
    event's first report: the worker that would have reported may be the one that died. A
    committed step never runs again, so its row is final at once: rows still travel with the
    snapshot hand-over (a call each step makes anyway), and the service passes them on as they
    arrive (in both modes in batches, at most ROWS_EVERY_S apart). If every worker dies at once,
    the rows of the steps the restart resumes after are with the service already.
    Without snapshots, rows go to the sink every FLUSH_S (one actor call per step costs the
    worker and the sink measurable CPU on a small machine).
    """

    FLUSH_S = 0.5

    def __init__(self, sink, replica: int, live: bool, with_snapshots: bool):
        self.sink, self.live = sink, live
        self.speaks = live or replica == 0
        self.with_snapshots = with_snapshots
        self.keeps_rows = self.speaks or with_snapshots
        self.membership = Membership() if live else None
        self.rows: list[Row] = []
        self.flushed = time.monotonic()
        self.memory_due = True

    def emit(self, event: Event, key: str | None = None) -> None:
        if self.speaks:
            self.sink.event.remote(event, key)

    def memory(self, replica: int, step: int, world: int, mine: Held, layout: str) -> None:
        """What this worker holds: every worker tells its own (a sharded layout's ranks differ), once."""
        self.memory_due = False
        event = Memory(
            time=time.time(),
            replica=replica,
            step=step,
            world_size=world,
            layout=layout,
            param_bytes=mine.params,
            grad_bytes=mine.grads,
            optimizer_bytes=mine.optimizer,
        )
        self.sink.event.remote(event)

    def failed(self, step: int, world: int, started_at: float, error: str | None) -> None:
        assert self.membership is not None  # live groups only
        self.membership.failed(step, world, started_at, error)

    def collective_failed(self, rank: int, step: int, error: str) -> None:
        """Any rank of a static group whose reduction failed (it is about to go down with the
        group): delivered before that, within a bounded wait, and never in the way of the error."""
        try:
            event = CollectiveFailed(time=time.time(), rank=rank, step=step, error=error)
            ray.get(self.sink.event.remote(event), timeout=5)
        except Exception:
            pass

    def committed(self, row: Row, plan: BatchPlan) -> None:
        if not self.keeps_rows:
            return
        self.rows.append(row)
        if self.membership is not None:
            for event in self.membership.committed(row.step, plan.world_size, tuple(plan.counts()), plan.global_batch_size):
                self.sink.event.remote(event, f"{event.kind}-{event.step}")
        if not self.with_snapshots and time.monotonic() - self.flushed >= self.FLUSH_S:
            self.flush()

    def rows_for_snapshot(self, rank: int, writer: int | None) -> list[Row] | None:
        """The rows this rank's hand-over of a snapshot carries (None: none)."""
        if not self.with_snapshots:
            return None
        rows, self.rows = self.rows, []
        return rows if self.live or rank == (writer or 0) else None

    def flush(self, wait: bool = False) -> None:
        """Rows kept so far to the sink (`wait`: and in it before this returns)."""
        if self.rows:
            sent = self.sink.record.remote(self.rows, self.live)
            self.rows = []
            if wait:
                ray.get(sent)
        self.flushed = time.monotonic()
