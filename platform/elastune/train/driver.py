"""The Ray Train driver: prepare data, find the newest checkpoint, launch workers, watch them.

`run_job` is what `elastune run` calls. It starts an embedded local Ray (or joins the address
given, or RAY_ADDRESS; elastune.cluster), creates the run sink, runs a TorchTrainer with
ScalingConfig(num_workers=(min, max)) and a FailureConfig, and turns the sink's rows and events
into the run directory and the live progress view.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console

import ray
from elastune.batch_plan import BatchSchedule, batch_plan
from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.format import step_dir
from elastune.checkpoint.lease import Lease, this_process
from elastune.cluster import DrainWatch, connect_ray
from elastune.data.progress_bar import preparing
from elastune.errors import LeaseHeld, SpecError
from elastune.events import BatchChange, End, Event, FailurePolicy, Finish, Row, RunWarning
from elastune.recipes import load_recipe
from elastune.spec.load import validate_spec
from elastune.spec.models import JobSpec
from elastune.train.actors import RunActors
from elastune.train.adaptive import Decision, decisions_of, replay_spec, with_decisions
from elastune.train.controller import make_trainer
from elastune.train.fsdp import shard_problem
from elastune.train.outcome import RunOutcome, conclude
from elastune.train.precision import check_step
from elastune.train.preflight import prepare_data, resuming, settle_root
from elastune.train.progress import ProgressView, describe_event
from elastune.train.recovery import RecoveryTracker, stranded
from elastune.train.resume import plan_resume
from elastune.train.run_dir import RunDir, new_run_id
from elastune.train.state import model_state
from elastune.train.stopping import STOP_GRACE_S, StopRequest, abort_controller, begin_stop

log = logging.getLogger(__name__)

POLL_S = 0.25
HEALTH_CHECK_S = 0.5  # Ray Train's worker health check interval for our runs (its default: 2 s)


def resolve_paths(spec: JobSpec) -> JobSpec:
    """Make every local path absolute (workers run in other folders)."""
    raw = spec.to_dict()
    raw["data"]["path"] = os.path.abspath(spec.data.path)
    raw["output_dir"] = os.path.abspath(spec.output_dir)
    ckpt = spec.checkpoint_path
    raw["checkpoint"]["path"] = ckpt if "://" in ckpt else os.path.abspath(ckpt)
    return validate_spec(raw)


def run_job(
    spec: JobSpec,
    spec_dir: str,
    *,
    address: str | None = None,
    fresh: bool = False,
    console: Console | None = None,
    verbose: bool = False,
    observe: Callable[[list[Row], list[Event]], None] | None = None,
    member: Any = None,
) -> RunOutcome:
    """Train `spec` to its stop; `observe(rows, events)`, when given, sees every batch of metrics
    rows and events as the driver drains them (a search forwards its trials' to its exporter);
    `member` (train.member.MemberLink): the run is a search member, which meets its population at
    every interval boundary.

    Before anything starts, the run takes its checkpoint root's lease (LeaseHeld: another run
    holds it) and decides what to do with the checkpoint there (train.resume): a checkpoint of
    another model stops it (IncompatibleCheckpoint), one that holds the whole budget ends it."""
    console = console or Console()
    spec = resolve_paths(spec)
    recipe = load_recipe(spec.model, spec_dir, spec.data.path)  # import errors surface here, before any worker starts
    batch_plan(spec.batch.global_batch_size, spec.batch.micro_batch_size, spec.scaling.min_workers)
    check_step(spec.step.precision, spec.step.compile, "cuda" if spec.scaling.gpus_per_worker > 0 else "cpu")
    run_id = new_run_id()
    ckpt = Checkpointer(spec.checkpoint_path, spec.checkpoint.keep_last)
    ckpt.storage.probe()
    lease = Lease(ckpt.storage, this_process(run_id, spec.name))
    lease.acquire()
    try:
        return _run(spec, spec_dir, recipe, run_id, ckpt, lease, address, fresh, console, verbose, observe, member)
    finally:
        lease.release()


def _run(
    spec: JobSpec,
    spec_dir: str,
    recipe,
    run_id: str,
    ckpt: Checkpointer,
    lease: Lease,
    address: str | None,
    fresh: bool,
    console: Console,
    verbose: bool,
    observe,
    member,
) -> RunOutcome:
    for event in (events := settle_root(ckpt, lease, fresh)):
        console.print(describe_event(event), highlight=False)
    latest = ckpt.latest()
    where = f"checkpoint {ckpt.uri}/{step_dir(latest.step)}" if latest else ""
    resume = plan_resume(latest, model_state(recipe.build_model), spec, where) if latest else None
    if resume is not None and resume.complete:
        console.print(
            f"Nothing to train: {where} ({resume.samples_seen:,} samples) already holds this job's whole budget "
            f"({spec.budget_samples:,} samples). To train on, raise stop.max_steps or stop.max_samples (or pass a larger "
            f"--max-steps); to start over, run with --fresh.",
            highlight=False,
        )
        return RunOutcome(None, "complete", resume.step, resume.samples_seen, None, 0.0, durable_step=resume.step, uri=ckpt.uri)
    run_dir = RunDir.create(spec.output_dir, spec.name, run_id)
    run_dir.write_spec(spec.to_dict())
    history = decisions_of(latest.meta) if latest is not None and resume is not None else []  # an adaptive batch's
    if spec.batch.adaptive is not None:  # the history the resumed checkpoint holds, until the run changes it
        run_dir.write_replay(replay_spec(spec, history))
    saved = latest.meta.get("dataset") if latest is not None and resume is not None else None
    with preparing(console) as on_progress:
        more = prepare_data(spec, recipe, saved, on_progress)
    if spec.scaling.layout == "fsdp" and (problem := shard_problem(recipe.build_model)):
        raise SpecError(problem)
    more += [resuming(resume, ckpt.uri)] if resume is not None else []
    for event in more:
        console.print(describe_event(event), highlight=False)
    run_dir.append_events(events + more)
    console.print(f"Run directory: {run_dir.path}", highlight=False)

    connected = connect_ray(spec, address, console, verbose)
    try:
        start = {"step": resume.step, "samples_seen": resume.samples_seen} if resume else {"step": 0, "samples_seen": 0}
        tokens = spec.data.window - 1 if recipe.dataset is None else None  # predicted tokens per token window
        with StopRequest() as stop:
            batches = with_decisions(spec, history).batches
            return _train(spec, spec_dir, run_id, run_dir, console, start, batches, tokens, observe, lease, stop, member)
    finally:
        if connected:
            ray.shutdown()


def _train(
    spec: JobSpec,
    spec_dir: str,
    run_id: str,
    run_dir: RunDir,
    console: Console,
    start: dict[str, int],
    batches: BatchSchedule,
    tokens_per_sample: int | None,
    observe,
    lease: Lease,
    stop: StopRequest,
    member=None,
) -> RunOutcome:
    # Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
    # default), so a run's end and a dead worker are noticed up to that late. 0.5 s costs the
    # controller a few calls a second and saved about 1.7 s per run here (and per restart); Ray
    # Train passes the variable on to its controller. A value the user set wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(HEALTH_CHECK_S))
    actors = RunActors.start(spec, run_id, tokens_per_sample, console)
    sink, service, exporter = actors.sink, actors.service, actors.exporter
    trainer = make_trainer(spec, spec_dir, run_id, run_dir, actors.driver_node, console, member)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except Exception as exc:  # reported below, on the main thread
            outcome["error"] = exc
        except SystemExit:  # Ray disconnected under a fit the driver stopped waiting for
            return

    view = ProgressView(console, None if spec.batch.adaptive else spec.max_steps)  # adaptive: steps unknown ahead
    started = time.time()
    last: Row | None = None
    recoveries = RecoveryTracker(batches, live=spec.scaling.recovery == "live")  # the batch at each sample, as known
    thread = threading.Thread(target=fit, name="elastune-fit", daemon=True)
    thread.start()
    finished_at: float | None = None
    stopping: dict[str, Any] | None = None
    stranded_ended = False  # the driver ended a finished live run's Ray Train part: its error is ours
    gave_up: str | None = None
    notices = DrainWatch(service)
    try:
        while True:
            alive = thread.is_alive()
            if stop.signum is not None and stopping is None:
                stopping = begin_stop(stop, service, sink, view, Checkpointer(spec.checkpoint_path))
                alive = False
            rows, events = ray.get(sink.drain.remote())
            if finished_at is None and any(isinstance(e, Finish) for e in events):
                finished_at = time.monotonic()
            events += notices.poll()
            gave_up = next((e.message for e in events if isinstance(e, FailurePolicy) and not e.retry), gave_up)
            if alive and stranded(spec.scaling.recovery, finished_at):
                # A live group finished while Ray Train still waits to place a lost worker's
                # replacement (no capacity came back): the run is done; end Ray Train's part.
                message = (
                    "training finished while a worker Ray Train started was not training (a replacement still "
                    "starting, or one with no capacity to run on); the run is complete, so that worker was stopped"
                )
                events.append(RunWarning(time=time.time(), message=message))
                abort_controller(sink, thread)
                alive, stranded_ended = False, True
            if not alive:  # everything the run will write is in now
                ray.get(service.flush.remote(STOP_GRACE_S if stopping else None))
                more_rows, more_events = ray.get(sink.drain.remote())
                rows, events = rows + more_rows, events + more_events
            events = recoveries.observe(events, rows)  # after the last drain: the service passes rows on in batches
            if stopping is not None:
                rows = [r for r in rows if r.step <= stopping["keep_rows_to"]]  # later steps are redone on resume
            run_dir.append_metrics(rows)
            run_dir.append_events(events)
            if moved := [e for e in events if isinstance(e, BatchChange)]:
                run_dir.write_replay(replay_spec(spec, [Decision(*h) for h in moved[-1].history]))
            if exporter is not None:
                exporter.observe(rows, events)
            if observe is not None:
                observe(rows, events)
            for event in events:
                if (line := describe_event(event)) is not None:
                    view.say(line)
            for row in rows:
                view.update(row)
                last = row
            if not alive:
                break
            renew(lease, view)
            thread.join(POLL_S)
    finally:
        view.close()
    if stopping is not None:
        abort_controller(sink, thread)
    error = None if stranded_ended else outcome.get("error")
    result = conclude(spec, run_dir, last, start, started, error, gave_up, ray.get(service.flush.remote(0)), stop.signum)
    run_dir.write_result(result.__dict__ | {"run_dir": str(run_dir.path)})
    run_dir.append_events([End(time=time.time(), status=result.status, error=result.error, durable_step=result.durable_step)])
    actors.stop(run_dir.path)
    return result


def renew(lease: Lease, view: ProgressView) -> None:
    try:
        lease.renew()
    except OSError as exc:  # a store that does not answer now; the lease only needs renewing within TTL_S
        view.say(f"[yellow]Warning[/yellow]: could not renew the checkpoint root's lease: {exc}")
    except LeaseHeld as exc:
        view.say(f"[yellow]Warning[/yellow]: {exc}")
