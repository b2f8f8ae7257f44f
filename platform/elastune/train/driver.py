"""The Ray Train driver: prepare data, find the newest checkpoint, launch workers, watch them.

`run_job` is what `elastune run` calls. It starts an embedded local Ray (or joins the address
given, or RAY_ADDRESS), creates the run sink, runs a TorchTrainer with
ScalingConfig(num_workers=(min, max)) and a FailureConfig, and turns the sink's rows and events
into the run directory and the live progress view.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.format import step_dir
from elastune.checkpoint.lease import Lease, this_process
from elastune.checkpoint.retention import RetentionPolicy
from elastune.checkpoint.service import service_name, start_service
from elastune.data.prepare import ensure_prepared
from elastune.errors import ElastuneError, LeaseHeld
from elastune.metrics.exporter import RunExporter
from elastune.recipes import load_recipe
from elastune.spec.load import validate_spec
from elastune.spec.models import JobSpec
from elastune.train.batch_plan import batch_plan
from elastune.train.controller import ElastuneTrainer, LiveFailurePolicy, PublishController
from elastune.train.loop import WorkerConfig, run_worker
from elastune.train.progress import ProgressView, describe_event
from elastune.train.precision import check_step
from elastune.train.resume import plan_resume
from elastune.train.run_dir import RunDir, new_run_id
from elastune.train.sink import RunSink, sink_name
from elastune.train.state import model_state
from elastune.train.stopping import STOP_GRACE_S, StopRequest

log = logging.getLogger(__name__)

POLL_S = 0.25
HEALTH_CHECK_S = 0.5  # Ray Train's worker health check interval for our runs (its default: 2 s)


@dataclass
class RunOutcome:
    """How a run ended. `status`: succeeded (trained to its stop; the final step durable),
    not_durable (trained to its stop, but the final step could not be made durable: see
    `durable_step` and `error`), complete (its checkpoint already held the whole budget; nothing
    ran), stopped (by `signal`, after making the newest step durable), failed."""

    run_dir: Path | None
    status: str
    steps: int
    samples_seen: int
    final_loss: float | None
    seconds: float
    error: str | None = None
    durable_step: int | None = None  # the newest checkpoint at the run's checkpoint root when it ended
    signal: int | None = None
    uri: str = ""


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
    observe: Callable[[list[dict[str, Any]], list[dict[str, Any]]], None] | None = None,
) -> RunOutcome:
    """Train `spec` to its stop; `observe(rows, events)`, when given, sees every batch of metrics
    rows and events as the driver drains them (a search forwards its trials' to its exporter).

    Before anything starts, the run takes its checkpoint root's lease (LeaseHeld: another run
    holds it) and decides what to do with the checkpoint there (train.resume): a checkpoint of
    another model stops it (IncompatibleCheckpoint), one that holds the whole budget ends it."""
    console = console or Console()
    spec = resolve_paths(spec)
    recipe = load_recipe(spec.model, spec_dir)  # import errors surface here, before any worker starts
    batch_plan(spec.batch.global_batch_size, spec.batch.micro_batch_size, spec.scaling.min_workers)
    check_step(spec.step.precision, spec.step.compile, "cuda" if spec.scaling.gpus_per_worker > 0 else "cpu")
    run_id = new_run_id()
    ckpt = Checkpointer(spec.checkpoint_path, spec.checkpoint.keep_last)
    ckpt.storage.probe()
    lease = Lease(ckpt.storage, this_process(run_id, spec.name))
    lease.acquire()
    try:
        return _run(spec, spec_dir, recipe, run_id, ckpt, lease, address, fresh, console, verbose, observe)
    finally:
        lease.release()


def _run(spec: JobSpec, spec_dir: str, recipe, run_id: str, ckpt: Checkpointer, lease: Lease, address: str | None, fresh: bool,
         console: Console, verbose: bool, observe) -> RunOutcome:  # fmt: skip
    events: list[dict[str, Any]] = []

    def note(kind: str, message: str, **fields: Any) -> None:
        console.print(message, highlight=False)
        events.append({"time": time.time(), "kind": kind, **fields})

    if lease.took_over is not None:
        note("lease", f"Took over the checkpoint root from {lease.took_over.describe(time.time())}, which is gone.")
    if fresh:
        removed = ckpt.clear()
        if removed:
            note("fresh", f"--fresh: deleted {removed} checkpoint(s) at {ckpt.uri}; starting over.", deleted=removed)
        for left in ckpt.notes:
            note("warning", f"--fresh: {left}", message=f"--fresh: {left}")
    latest = ckpt.latest()
    where = f"checkpoint {ckpt.uri}/{step_dir(latest.step)}" if latest else ""
    resume = plan_resume(latest, model_state(recipe.build_model), spec, where) if latest else None
    if resume is not None and resume.complete:
        console.print(f"Nothing to train: {where} ({resume.samples_seen:,} samples) already holds this job's whole budget "
                      f"({spec.budget_samples:,} samples). To train on, raise stop.max_steps or stop.max_samples (or pass a larger "
                      f"--max-steps); to start over, run with --fresh.", highlight=False)  # fmt: skip
        return RunOutcome(None, "complete", resume.step, resume.samples_seen, None, 0.0, durable_step=resume.step, uri=ckpt.uri)
    run_dir = RunDir.create(spec.output_dir, spec.name, run_id)
    run_dir.write_spec(spec.to_dict())
    if recipe.dataset is None:  # the recipe reads prepared token windows
        manifest, prepared_now = ensure_prepared(spec.data)
        if prepared_now:
            note("data_prepared", f"Prepared {manifest.count:,} samples of {manifest.window} tokens at {spec.data.path}.",
                 count=manifest.count, content_hash=manifest.content_hash)  # fmt: skip
    if resume is not None:
        changed = f"; these fields differ from the spec that saved it: {'; '.join(resume.changes)}" if resume.changes else ""
        note("resume", f"Resuming from checkpoint step {resume.step} ({resume.samples_seen:,} samples) at {ckpt.uri}{changed}; "
             f"pass --fresh to start over.", step=resume.step, samples_seen=resume.samples_seen, changes=list(resume.changes))  # fmt: skip
    run_dir.append_events(events)
    console.print(f"Run directory: {run_dir.path}", highlight=False)

    connected = connect_ray(spec, address, console, verbose)
    try:
        start = {"step": resume.step, "samples_seen": resume.samples_seen} if resume else {"step": 0, "samples_seen": 0}
        tokens = spec.data.window - 1 if recipe.dataset is None else None  # predicted tokens per token window
        with StopRequest() as stop:
            return _train(spec, spec_dir, run_id, run_dir, console, start, tokens, observe, lease, stop)
    finally:
        if connected:
            ray.shutdown()


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


def _train(spec: JobSpec, spec_dir: str, run_id: str, run_dir: RunDir, console: Console, start: dict[str, int],
           tokens_per_sample: int | None, observe, lease: Lease, stop: StopRequest) -> RunOutcome:  # fmt: skip
    # Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
    # default), so a run's end and a dead worker are noticed up to that late. 0.5 s costs the
    # controller a few calls a second and saved about 1.7 s per run here (and per restart); Ray
    # Train passes the variable on to its controller. A value the user set wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(HEALTH_CHECK_S))
    # The run's actors live on the driver's node: the in-memory snapshots (objects the service
    # put) outlive any worker node, and the driver's node going means the run goes anyway.
    driver_node = ray.get_runtime_context().get_node_id()
    here = NodeAffinitySchedulingStrategy(node_id=driver_node, soft=False)
    sink = RunSink.options(name=sink_name(run_id), scheduling_strategy=here).remote()
    c = spec.checkpoint
    policy = RetentionPolicy(c.keep_last, c.keep_best, c.best_metric, c.best_mode)
    service = start_service(run_id, spec.checkpoint_path, policy, sink_name(run_id), scheduling_strategy=here)
    exporter = start_exporter(spec, run_id, tokens_per_sample, console, here)
    trainer = make_trainer(spec, spec_dir, run_id, run_dir, driver_node, console)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except Exception as exc:  # reported below, on the main thread
            outcome["error"] = exc
        except SystemExit:  # Ray disconnected under a fit the driver stopped waiting for
            return

    view = ProgressView(console, spec.max_steps)
    started = time.time()
    last: dict[str, Any] = {**start, "loss": None}
    recoveries = RecoveryTracker(spec.batch.global_batch_size, live=spec.scaling.recovery == "live")
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
            if finished_at is None and any(e["kind"] == "finish" for e in events):
                finished_at = time.monotonic()
            events += notices.poll()
            gave_up = next((e["message"] for e in events if e["kind"] == "failure_policy" and not e["retry"]), gave_up)
            if alive and stranded(spec.scaling.recovery, finished_at):
                # A live group finished while Ray Train still waits to place a lost worker's
                # replacement (no capacity came back): the run is done; end Ray Train's part.
                events.append({"time": time.time(), "kind": "warning", "message": "training finished while a worker Ray Train "
                               "started was not training (a replacement still starting, or one with no capacity to run on); "
                               "the run is complete, so that worker was stopped"})  # fmt: skip
                abort_controller(sink, thread)
                alive, stranded_ended = False, True
            if not alive:  # everything the run will write is in now
                ray.get(service.flush.remote(STOP_GRACE_S if stopping else None))
                more_rows, more_events = ray.get(sink.drain.remote())
                rows, events = rows + more_rows, events + more_events
            events += recoveries.observe(events, rows)  # after the last drain: the service passes rows on in batches
            if stopping is not None:
                rows = [r for r in rows if r["step"] <= stopping["keep_rows_to"]]  # later steps are redone on resume
            run_dir.append_metrics(rows)
            run_dir.append_events(events)
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
    result = conclude(spec, run_dir, last, started, error, gave_up, ray.get(service.flush.remote(0)), stop.signum)
    run_dir.write_result(result.__dict__ | {"run_dir": str(run_dir.path)})
    run_dir.append_events([{"time": time.time(), "kind": "end", "status": result.status, "error": result.error,
                            "durable_step": result.durable_step}])  # fmt: skip
    if exporter is not None:
        exporter.close(run_dir.path / "metrics.prom")
    ray.kill(sink)
    ray.kill(service)
    return result


def make_trainer(spec: JobSpec, spec_dir: str, run_id: str, run_dir: RunDir, driver_node: str, console: Console):
    """Ray Train's trainer for the run: every worker runs `run_worker`; recovery restart lets Ray
    Train restart the group (max_failures restarts) and resize it between min and max workers;
    recovery live runs every worker as its own torchft replica group, under train.failure_policy."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    scaling = spec.scaling
    failure_policy = None
    if scaling.recovery == "live":
        # Every worker its own replica group; Ray Train replaces a dead one alone and the rest go on
        # (train.live). Ray Train keeps max_workers started; the quorum trains with those alive.
        from ray.train.v2.torch.torchft_config import TorchftConfig

        from elastune.train.live import LIGHTHOUSE

        workers: int | tuple[int, int] = scaling.max_workers
        room = placeable_workers(ray.nodes(), scaling.cpus_per_worker, scaling.gpus_per_worker)
        if warning := short_of_workers(scaling.max_workers, room):
            console.print(f"[yellow]Warning:[/yellow] {warning}", highlight=False)
            run_dir.append_events([{"time": time.time(), "kind": "warning", "message": warning}])
        backend = "nccl" if scaling.gpus_per_worker > 0 else "gloo"
        torch_config = TorchftConfig(backend=backend, lighthouse_kwargs={"min_replicas": scaling.min_workers, **LIGHTHOUSE})
        failure_config = FailureConfig(max_failures=-1)  # worker failures go by LiveFailurePolicy
        failure_policy = LiveFailurePolicy(failure_config, sink_name(run_id), scaling.max_failures)
    else:
        workers = scaling.min_workers if scaling.min_workers == scaling.max_workers else (scaling.min_workers, scaling.max_workers)
        torch_config = None
        failure_config = FailureConfig(max_failures=scaling.max_failures)
    return ElastuneTrainer(
        run_worker,
        failure_policy=failure_policy,
        train_loop_config=WorkerConfig(spec=spec.to_dict(), spec_dir=spec_dir, sink_name=sink_name(run_id),
                                       service_name=service_name(run_id), run_id=run_id, driver_node=driver_node).__dict__,
        torch_config=torch_config,
        scaling_config=ScalingConfig(
            num_workers=workers,
            elastic_resize_monitor_interval_s=scaling.resize_check_seconds,
            use_gpu=scaling.gpus_per_worker > 0,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.gpus_per_worker else {})},
        ),
        run_config=RunConfig(
            name=f"{spec.name}-{run_id}",
            storage_path=str(run_dir.path / "ray"),
            failure_config=failure_config,
            callbacks=[PublishController(sink_name(run_id))],
        ),
    )  # fmt: skip


def begin_stop(stop: StopRequest, service, sink, view: ProgressView, ckpt: Checkpointer) -> dict[str, Any]:
    """A stop signal: the service takes no more snapshots and makes the newest complete one
    durable; then Ray Train's run is ended. Rows are kept up to that step (the newest durable one
    when there is no snapshot), the step a rerun resumes from."""
    step = ray.get(service.freeze.remote())
    if step is None:
        steps = ckpt.committed_steps()
        step = steps[-1] if steps else 0
    view.say(f"{stop.name}: stopping; the run resumes from step {step} (again to end at once).")
    controller = ray.get(sink.controller.remote())
    if controller is not None:
        controller.abort.remote()  # the workers stop while the step is written; abort_controller waits for it
    return {"keep_rows_to": step}


def abort_controller(sink, thread: threading.Thread, grace_s: float = 3.0) -> None:
    """End Ray Train's run (its controller stops every worker) and wait for the fit thread: a
    process that disconnects from Ray while a fit still waits on it exits with status 1.

    The controller takes an abort between its steps; one busy placing a replacement for which no
    capacity exists takes it only when that placement times out (a minute), so after `grace_s` it
    is killed instead (its workers go with it)."""
    controller = ray.get(sink.controller.remote())
    if controller is not None:
        controller.abort.remote()
        thread.join(grace_s)
        if thread.is_alive():
            ray.kill(controller, no_restart=True)
    thread.join(10 * grace_s)


def renew(lease: Lease, view: ProgressView) -> None:
    try:
        lease.renew()
    except OSError as exc:  # a store that does not answer now; the lease only needs renewing within TTL_S
        view.say(f"[yellow]Warning[/yellow]: could not renew the checkpoint root's lease: {exc}")
    except LeaseHeld as exc:
        view.say(f"[yellow]Warning[/yellow]: {exc}")


def conclude(spec: JobSpec, run_dir: RunDir, last: dict[str, Any], started: float, error: BaseException | None, gave_up: str | None,
             reports: list[dict[str, Any]], signum: int | None) -> RunOutcome:  # fmt: skip
    """The run's outcome, with the newest checkpoint its root holds: a run that trained to its stop
    but could not make its last step durable says so (not_durable), with the write's error."""
    ckpt = Checkpointer(spec.checkpoint_path)
    steps = ckpt.committed_steps()
    durable = steps[-1] if steps else None
    common = {"run_dir": run_dir.path, "steps": last["step"], "samples_seen": last["samples_seen"], "final_loss": last["loss"],
              "seconds": round(time.time() - started, 3), "durable_step": durable, "uri": ckpt.uri}  # fmt: skip
    if signum is not None:
        return RunOutcome(status="stopped", signal=signum, **common)
    if error is not None:
        return RunOutcome(status="failed", error=gave_up or _reason(error), **common)
    if durable != last["step"]:
        failed = next((r["error"] for r in reversed(reports) if r.get("step") == last["step"] and "error" in r), "it was not written")
        return RunOutcome(status="not_durable", error=f"the final step {last['step']} is not durable: {failed}", **common)
    return RunOutcome(status="succeeded", **common)


def start_exporter(spec: JobSpec, run_id: str, tokens_per_sample: int | None, console: Console, strategy) -> RunExporter | None:
    """The run's Prometheus exporter on the driver's node (`metrics:` in the spec), announced with
    its address and the file_sd target a local Prometheus finds it by."""
    m = spec.metrics
    if not m.enabled:
        return None
    exporter = RunExporter(spec.name, run_id, m.host, m.port, tokens_per_sample, Path(spec.output_dir) / "prometheus-targets", strategy)
    console.print(f"Metrics: http://{exporter.address}/metrics (Prometheus file_sd target {exporter.target}).", highlight=False)
    return exporter


class DrainWatch:
    """Preemption notices: nodes Ray's GCS reports as draining (a cloud autoscaler's notice, with
    a deadline), polled every POLL_S. Each new one becomes a `preemption` event, and the service
    makes its newest in-memory step durable at once and tells the workers there to leave."""

    POLL_S = 1.0

    def __init__(self, service):
        self.service = service
        self.seen: set[str] = set()
        self.polled = 0.0

    def poll(self) -> list[dict[str, Any]]:
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
        return [{"time": time.time(), "kind": "preemption", "nodes": new, "deadline": min(deadlines) if deadlines else None,
                 "persisted_step": step}]  # fmt: skip


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
    return (f"recovery live starts all {max_workers} workers (Ray Train runs replica groups at a fixed count) and the "
            f"cluster has room for {room} now: Ray Train waits for capacity up to its placement timeout "
            f"(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by default), then counts a failed start. To start with what "
            f"there is, use recovery: restart (it grows into capacity as it comes) or max_workers: {max(room, 1)}")  # fmt: skip


FINISH_GRACE_S = 5.0  # after the last step, how long a live group's Ray Train run may take to end before it is ended


def stranded(recovery: str, finished_at: float | None, now: float | None = None) -> bool:
    """Whether a live run whose workers finished training has waited long enough for Ray Train.

    Ray Train ends a run when every replica group is done; a live group that lost a node and got
    no capacity back has one group Ray Train cannot place, and would wait for it forever (one
    still starting when the others finish would train no step either)."""
    if recovery != "live" or finished_at is None:
        return False
    return (time.monotonic() if now is None else now) - finished_at >= FINISH_GRACE_S


class RecoveryTracker:
    """What each start of a worker group means, as one event once its first step completes.

    The run's first start: a `resize` if it resumed a checkpoint saved at another world size.
    A later start (Ray Train restarted the group): a `resize` when the group grew and no fault
    was injected (Ray Train's elastic policy found capacity), else a `recovery`. Both carry the
    cause, world size before and after, lost steps and samples, detection seconds (to the first
    worker whose reduction failed, if one did), restart seconds (end of the old group to the new
    group's start: Ray Train notices a dead worker within its health check, every HEALTH_CHECK_S; the rest is
    tearing down and starting the group) and MTTR (to the first step completed after). Lost
    steps are those the run knows the old group completed past the resumed step (snapshots handed
    over, steps before one that failed or was killed): exact when a survivor saw its reduction
    fail, a lower bound when every worker went at once between spaced snapshots.
    The old group's end is the injected fault's time when there is one, else the last snapshot
    any rank handed over (so both figures are upper bounds).

    A live group reports its own recoveries (the survivors' view, narrowed here to the fault's
    time). What no survivor can report is the loss of every worker at once, after which Ray Train
    starts a whole new group: a step all of whose participants joined after the step before it
    committed is that loss (`live=True`)."""

    def __init__(self, global_batch_size: int, live: bool = False):
        self.global_batch_size, self.live = global_batch_size, live
        self.last_start: dict[str, Any] | None = None
        self.last_fault: dict[str, Any] | None = None
        self.pending: dict[str, Any] | None = None
        self.last_leave: dict[str, Any] | None = None
        self.last_row: dict[str, Any] | None = None
        self.since_row: list[dict[str, Any]] = []  # joins and kills after the last row (live)
        self.noticed: list[float] = []  # when workers of the current group saw a reduction fail
        self.completed = 0  # the newest step the current group is known to have completed

    def observe(self, events: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for event in events:
            if event["kind"] == "fault" and event["action"] in ("kill_rank", "kill_node") and not event.get("skipped"):
                self.last_fault = event
                self.since_row.append(event)
                self.completed = max(self.completed, event["step"] - 1)
            if event["kind"] == "join":
                self.since_row.append(event)
            if event["kind"] == "collective_failed":
                self.noticed.append(event["time"])
                self.completed = max(self.completed, event["step"] - 1)
            if event["kind"] == "leave":
                self.last_leave = event
            if event["kind"] == "recovery" and event.get("recovery") == "live":
                self._narrow(event)
            if event["kind"] == "start":
                if self.last_start is None:
                    out += self._resumed_resized(event)
                else:
                    self.pending = self._restarted(event, self.last_start["world_size"])
                self.last_start = event
        done = next((r for r in rows if self.pending and r["time"] >= self.last_start["time"]), None)
        if done is not None:  # the first step the new group completed
            out.append({**self.pending, "time": done["time"], "mttr_seconds": round(done["time"] - self.pending["failed_at"], 3)})
            self.pending = None
        if self.live:
            for row in rows:
                out += self._whole_group_lost(row)
                self.since_row = [e for e in self.since_row if e["time"] > row["time"]]
                self.last_row = row
        return out

    def _whole_group_lost(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        before = self.last_row
        news = [e for e in self.since_row if e["time"] <= row["time"]]
        joins = [e for e in news if e["kind"] == "join"]
        if before is None or len({j["replica"] for j in joins}) < row["world_size"]:
            return []  # the run's first step, or a survivor trained this step
        kills = [e for e in news if e["kind"] == "fault"]
        if kills:
            self.last_fault = None  # accounted for here
        failed_at = min(e["time"] for e in kills) if kills else before["time"]
        resumed = min(j["step"] for j in joins)
        lost = max(0, before["step"] - resumed)
        return [{
            "time": row["time"], "kind": "recovery", "recovery": "restart", "step": row["step"],
            "cause": "; ".join(map(fault_cause, kills)) if kills else "every worker of the live group was lost",
            "world_size_before": before["world_size"], "world_size_after": row["world_size"],
            "resumed_from_step": resumed, "resumed_from_tier": max((j["resumed_from_tier"] for j in joins if j.get("resumed_from_tier") is not None), default=None),
            "lost_steps": lost, "lost_samples": lost * self.global_batch_size, "failed_at": failed_at,
            "detection_seconds": None, "restart_seconds": round(min(j["time"] for j in joins) - failed_at, 3),
            "mttr_seconds": round(row["time"] - failed_at, 3), "micro_batches": row["micro_batches"],
        }]  # fmt: skip

    def _resumed_resized(self, start: dict[str, Any]) -> list[dict[str, Any]]:
        saved = start.get("saved_world_size")
        if saved in (None, start["world_size"]):
            return []
        return [{"time": start["time"], "kind": "resize", "cause": f"resumed a checkpoint saved by {saved} worker(s)",
                 "step": start["resumed_from_step"], "world_size_before": saved, "world_size_after": start["world_size"],
                 "global_batch_size": self.global_batch_size, "micro_batches": start["micro_batches"]}]  # fmt: skip

    def _restarted(self, start: dict[str, Any], before: int) -> dict[str, Any]:
        fault, self.last_fault = self.last_fault, None
        failed_at = fault["time"] if fault else start.get("last_staged_at") or start["time"]
        detected = min((t for t in self.noticed if t >= failed_at), default=None)
        # Steps past the resumed one: those handed over in snapshots (the worker's restore counts
        # them) or completed before a step that failed or was killed (between spaced snapshots).
        lost = max(start["lost_steps"], self.completed - (start["resumed_from_step"] or 0))
        self.noticed, self.completed = [], 0
        grew = fault is None and start["world_size"] > before
        if fault:
            kind, cause = "recovery", fault_cause(fault)
        elif grew:
            kind, cause = "resize", f"capacity for {start['world_size']} workers (Ray Train's elastic policy restarted the group)"
        else:
            kind, cause = "recovery", "worker group restarted"
        return {
            "kind": kind, "cause": cause, "failed_at": failed_at, "step": start["resumed_from_step"],
            "world_size_before": before, "world_size_after": start["world_size"],
            "global_batch_size": self.global_batch_size, "micro_batches": start.get("micro_batches"),
            "resumed_from_step": start["resumed_from_step"], "resumed_from_tier": start.get("resumed_from_tier"),
            "lost_steps": lost, "lost_samples": lost * self.global_batch_size,
            "detection_seconds": None if detected is None else round(detected - failed_at, 3),
            "restart_seconds": round(start["time"] - failed_at, 3),
        }  # fmt: skip

    def _narrow(self, event: dict[str, Any]) -> None:
        """A live group's recovery, as its survivors saw it: their failure time is the failed
        step's start; an injected fault's time, when there is one, is closer to the crash."""
        leave, self.last_leave = self.last_leave, None
        if leave is not None and event["detection_seconds"] is None:  # no step failed: a worker left
            event["cause"] = f"rank {leave['replica']} left: {leave['reason']}"
            event["failed_at"] = leave["time"]
            event["mttr_seconds"] = round(event["time"] - leave["time"], 3)
            return
        fault, self.last_fault = self.last_fault, None
        if fault is not None and event.get("failed_after", event["failed_at"]) <= fault["time"] <= event["time"]:
            if event["detection_seconds"] is not None:
                detected_at = event["failed_at"] + event["detection_seconds"]
                event["detection_seconds"] = round(max(0.0, detected_at - fault["time"]), 3)
            event["cause"] = fault_cause(fault)
            event["failed_at"] = fault["time"]
            event["mttr_seconds"] = round(event["time"] - fault["time"], 3)


def fault_cause(fault: dict[str, Any]) -> str:
    what = "kill rank" if fault["action"] == "kill_rank" else "kill the node of rank"
    return f"fault: {what} {fault['rank']} at step {fault['step']} ({fault['point']})"


def _reason(error: BaseException) -> str:
    """The user-facing cause of a failed fit: our own error's message when a worker raised one.

    Ray Train's WorkerGroupError keeps each rank's exception in `worker_failures`.
    """
    pending: list[BaseException] = [error]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, ElastuneError):
            return exc.message
        pending += [e for e in (exc.__cause__, exc.__context__) if e is not None]
        pending += list(getattr(exc, "worker_failures", {}).values())
    return f"{type(error).__name__}: {error}"
