"""The worker loop: every (re)start of every Ray Train worker runs `run_worker`.

restore -> plan -> (set lr, step, record, checkpoint)* ; all state that matters is global
(samples_seen, named tensors), so the same code resumes at any world size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.format import Manifest
from elastune.checkpoint.payload import BufferSource, read_pieces
from elastune.checkpoint.snapshot import Snapshotter
from elastune.data.dataset import TokenWindows
from elastune.recipes import Recipe, SampleSource, load_recipe
from elastune.spec.models import JobSpec
from elastune.train.batch_plan import BatchPlan, batch_plan
from elastune.train.faults import FaultInjector
from elastune.train.optim import build_optimizer, set_lr
from elastune.train.schedules import lr_multiplier
from elastune.train.state import Progress, layout_of, restore_state, state_pieces
from elastune.train.step import GradBuffer, train_step
from elastune.train.zero import ZeroOptimizer


@dataclass(frozen=True)
class WorkerConfig:
    """What the driver hands every worker (plain data: it crosses process boundaries)."""

    spec: dict[str, Any]
    spec_dir: str
    sink_name: str
    service_name: str
    run_id: str


def run_worker(config: dict[str, Any]) -> None:
    job = WorkerConfig(**config)
    spec = JobSpec.model_validate(job.spec)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.scaling.torch_threads or max(1, int(spec.scaling.cpus_per_worker)))
    sink = ray.get_actor(job.sink_name)
    emit = _emitter(sink, rank)
    c = spec.checkpoint
    # With snapshots on, rows travel with them (Snapshotter.take); otherwise straight to the sink.
    rows = RowBuffer(sink if rank == 0 else None, every_s=None if c.snapshot_every_steps else RowBuffer.FLUSH_S)
    faults = FaultInjector(spec.faults, rank, lambda key: ray.get(sink.claim.remote(key)), lambda e: ray.get(sink.event.remote(e)))

    recipe = load_recipe(spec.model, job.spec_dir)
    source = open_source(recipe, spec)
    torch.manual_seed(spec.seed)  # identical initial parameters on every rank
    model = recipe.build_model().to(ray.train.torch.get_device())
    if spec.scaling.layout == "zero1":
        optimizer = ZeroOptimizer(model, spec.optimizer, rank, world)
    else:
        optimizer = build_optimizer(model, spec.optimizer)
    grads = GradBuffer(model)
    service = ray.get_actor(job.service_name)
    progress, restored = restore(service, Checkpointer(spec.checkpoint_path), model, optimizer)
    plan = batch_plan(spec.batch.global_batch_size, spec.batch.micro_batch_size, world)
    announce(emit, plan, progress, restored, dataset_identity(source))
    snapshots = Snapshotter(service, rank, world)
    base = snapshot_base(spec, layout_of(optimizer), dataset_identity(source))

    while progress.step < spec.max_steps:
        lr = spec.optimizer.lr * lr_multiplier(spec.schedule, progress.samples_seen, spec.horizon_samples)
        set_lr(optimizer, lr)
        started = time.perf_counter()
        faults.at(progress.step + 1, "start")
        result = train_step(
            model, optimizer, grads, recipe, source, plan, rank, progress.step, progress.samples_seen,
            spec.seed, spec.optimizer.grad_clip_norm, before_reduce=lambda: faults.at(progress.step + 1, "mid"),
        )  # fmt: skip
        progress = progress.advance(plan.global_batch_size)
        seconds = time.perf_counter() - started
        durable = progress.step % c.every_steps == 0 or progress.step == spec.max_steps
        rows.add(metrics_row(progress, result, lr, plan, seconds))
        if durable or (c.snapshot_every_steps and progress.step % c.snapshot_every_steps == 0):
            header = {**base, "step": progress.step, "samples_seen": progress.samples_seen, "durable": durable,
                      "meta": {**base["meta"], "metrics": {"loss": result.loss}}}  # metrics rank checkpoints for keep_best
            snapshots.take(header, state_pieces(model, optimizer), rows.take() if c.snapshot_every_steps else None)
    snapshots.wait()  # the last step is with the service before this worker reports done
    rows.flush()
    emit("finish", step=progress.step, samples_seen=progress.samples_seen)


def open_source(recipe: Recipe, spec: JobSpec) -> SampleSource:
    return recipe.dataset(spec.data) if recipe.dataset is not None else TokenWindows(spec.data.path)


def dataset_identity(source: SampleSource) -> dict[str, Any]:
    """What identifies the data a checkpoint's positions refer to (count, and content hash if known)."""
    manifest = getattr(source, "manifest", None)
    return {"count": len(source), "content_hash": getattr(manifest, "content_hash", None)}


def announce(emit, plan: BatchPlan, progress: Progress, restored: dict[str, Any], dataset: dict[str, Any]) -> None:
    emit("start", world_size=plan.world_size, plan=plan.describe(), micro_batches=plan.counts(),
         **{k: v for k, v in restored.items() if k not in ("dataset", "skipped_checkpoints")})  # fmt: skip
    for reason in restored.get("skipped_checkpoints", []):
        emit("warning", message=f"CHECKPOINT CORRUPT, used an older one: {reason}")
    if restored.get("saved_world_size") not in (None, plan.world_size):
        emit("resize", step=progress.step, world_size_before=restored["saved_world_size"], world_size_after=plan.world_size,
             global_batch_size=plan.global_batch_size, micro_batches=plan.counts())  # fmt: skip
    saved = restored.get("dataset")
    if saved and saved != dataset:
        # Positions still resume exactly, but they now name other samples: say so loudly.
        emit("warning", message=f"the dataset changed since the checkpoint (then {saved}, now {dataset}); "
             f"samples_seen continues, but the epoch's order is over different data")  # fmt: skip


def restore(service, ckpt: Checkpointer, model, optimizer) -> tuple[Progress, dict[str, Any]]:
    """Newest state from the service's in-memory snapshot (tier 0) when it is the newest there is,
    else from the newest valid durable checkpoint (tier 1); only the ranges this layout needs."""
    started = time.perf_counter()
    loaded: dict[str, Any] = {}

    def apply(manifest: Manifest, read, where: str) -> None:
        loaded["bytes"] = restore_state(model, optimizer, manifest.shapes, read, where)

    found = ray.get(service.snapshot.remote())
    snap = found["tier0"]
    if snap is not None:
        manifest = Manifest.from_json(snap["manifest"].encode(), "in-memory snapshot")
        where = f"in-memory snapshot of step {manifest.step}"
        source = BufferSource(lambda file: ray.get(snap["payloads"][file]))
        apply(manifest, lambda wanted: read_pieces(manifest, source, wanted, where), where)
        tier = 0
    else:
        manifest = ckpt.restore_latest(lambda m, read: apply(m, read, f"{ckpt.uri} step {m.step}"))
        tier = 1
    high_water = found["high_water"]
    if manifest is None:
        return Progress(), {"resumed_from_step": None, "skipped_checkpoints": ckpt.skipped, "lost_steps": high_water or 0}
    return Progress(manifest.step, manifest.samples_seen), {
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
        "load_bytes": loaded["bytes"],
        "skipped_checkpoints": ckpt.skipped,
    }


def snapshot_base(spec: JobSpec, layout: str, dataset: dict[str, Any]) -> dict[str, Any]:
    """What every snapshot's manifest says besides progress and tensors (the service adds the
    world size): computed once per worker, not per step."""
    sections = spec.to_dict()
    return {
        "spec_hash": spec.fingerprint(),
        "layout": layout,
        "meta": {
            "job": spec.name,
            "model_hash": spec.fingerprint("model"),
            "optimizer": sections["optimizer"],
            "schedule": {**sections["schedule"], "horizon_samples": spec.horizon_samples},
            "rng": {"seed": spec.seed, "scheme": "each micro-batch seeds the device generators with sha256(seed, step, micro_batch_index)"},
            "batch": sections["batch"],
            "dataset": dataset,
        },
    }


def metrics_row(progress: Progress, result, lr: float, plan: BatchPlan, seconds: float) -> dict[str, Any]:
    return {
        "time": time.time(),
        "step": progress.step,
        "samples_seen": progress.samples_seen,
        "loss": result.loss,
        "lr": lr,
        "grad_norm": result.grad_norm,
        "world_size": plan.world_size,
        "global_batch_size": plan.global_batch_size,
        "micro_batches": plan.counts(),
        "step_seconds": seconds,
        "samples_per_s": plan.global_batch_size / seconds if seconds > 0 else None,
        "snapshot_stall_seconds": None,  # rank 0's, set by Snapshotter.take; every rank's is in checkpoint events
    }


class RowBuffer:
    """Rank 0's metrics rows on their way to the sink: handed over in batches, by `take` (with a
    snapshot) or every `every_s` seconds (one actor call per step costs the worker and the sink
    measurable CPU on a small machine)."""

    FLUSH_S = 0.5

    def __init__(self, sink, every_s: float | None = FLUSH_S):
        self.sink = sink  # None on ranks other than 0: they record nothing
        self.every_s = every_s
        self.rows: list[dict[str, Any]] = []
        self.flushed = time.monotonic()

    def add(self, row: dict[str, Any]) -> None:
        if self.sink is None:
            return
        self.rows.append(row)
        if self.every_s is not None and time.monotonic() - self.flushed >= self.every_s:
            self.flush()

    def take(self) -> list[dict[str, Any]]:
        rows, self.rows = self.rows, []
        return rows

    def flush(self) -> None:
        if self.rows and self.sink is not None:
            self.sink.record.remote(self.take())
        self.flushed = time.monotonic()


def _emitter(sink, rank: int):
    def emit(kind: str, **fields: Any) -> None:
        if rank == 0:
            sink.event.remote({"time": time.time(), "kind": kind, **fields})

    return emit
