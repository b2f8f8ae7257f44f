"""Ray Train as Elastune runs it: `make_trainer` builds the run's TorchTrainer; the failure rule
of the run's recovery mode (train.failure_policy) runs inside its controller, and the
controller's handle reaches the driver (which aborts the run when it is stopped or stranded).

These reach into Ray Train's developer API (`ray.train.v2._internal`), which Ray 2.60, the pinned
version, documents for custom callbacks and failure policies.
"""

from __future__ import annotations

import time
from typing import Any

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2._internal.execution.failure_handling import FailureDecision as RayDecision
from ray.train.v2._internal.execution.failure_handling.default import _is_preemption_failure
from ray.train.v2.api.exceptions import WorkerGroupError
from rich.console import Console

import ray
from elastune.checkpoint.service import service_name
from elastune.cluster import placeable_workers, short_of_workers
from elastune.events import FailurePolicy, RunWarning
from elastune.spec.models import JobSpec
from elastune.train.failure_policy import decide_live
from elastune.train.loop import WorkerConfig, run_worker
from elastune.train.run_dir import RunDir
from elastune.train.sink import sink_name


class ElastuneTrainer(TorchTrainer):
    """A TorchTrainer whose controller uses `failure_policy` when one is given."""

    def __init__(self, *args: Any, failure_policy: DefaultFailurePolicy | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.elastune_failure_policy = failure_policy

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any):
        if self.elastune_failure_policy is not None:
            controller_init_kwargs["failure_policy"] = self.elastune_failure_policy
        return super()._initialize_and_run_controller(**controller_init_kwargs)  # type: ignore[misc]  # Ray Train v2's, absent from the v1 stubs mypy reads


class LiveFailurePolicy(DefaultFailurePolicy):
    """Worker failures of a live run go by `decide_live` (progress: the newest step the run's
    sink has a row for); every other failure as Ray Train decides. Each decision is an event."""

    def __init__(self, failure_config, sink_name: str, max_failures: int):
        super().__init__(failure_config)
        self.sink_name, self.max_failures = sink_name, max_failures
        self.steps: list[int | None] = []

    def make_decision(self, training_failed_error) -> RayDecision:
        if not isinstance(training_failed_error, WorkerGroupError) or _is_preemption_failure(training_failed_error):
            return super().make_decision(training_failed_error)
        sink: Any = ray.get_actor(self.sink_name)  # an actor handle: its methods are looked up at run time
        try:
            step = ray.get(sink.last_step.remote(), timeout=10)
        except Exception:
            step = self.steps[-1] if self.steps else None
        self.steps.append(step)
        decision = decide_live(self.steps, self.max_failures)
        sink.event.remote(
            FailurePolicy(time=time.time(), retry=decision.retry, in_a_row=decision.in_a_row, step=step, message=decision.reason)
        )
        return RayDecision.RETRY if decision.retry else RayDecision.RAISE


class PublishController(ControllerCallback, WorkerGroupCallback):
    """Hands the controller's actor handle to the run's sink as the controller starts, so the
    driver can abort the run (TrainController.abort) when it must end it, and each worker group's
    placement group as the group starts, so the driver can release it when it has to kill the
    controller (stopping.abort_controller): Ray Train's own cleaner stops at an abort, and a killed
    controller would otherwise leave its workers' CPUs reserved for good."""

    def __init__(self, sink_name: str):
        self.sink_name = sink_name

    def after_controller_start(self, train_run_context) -> None:
        ray.get_actor(self.sink_name).set_controller.remote(ray.get_runtime_context().current_actor)

    def after_worker_group_start(self, worker_group) -> None:
        # Where Ray Train's PlacementGroupCleanerCallback reads it (Ray 2.60, pinned).
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        ray.get(ray.get_actor(self.sink_name).add_placement_group.remote(group))


def make_trainer(
    spec: JobSpec, spec_dir: str, run_id: str, run_dir: RunDir, driver_node: str, console: Console, member: Any = None
):
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
            run_dir.append_events([RunWarning(time=time.time(), message=warning)])
        backend = "nccl" if scaling.gpus_per_worker > 0 else "gloo"
        torch_config = TorchftConfig(backend=backend, lighthouse_kwargs={"min_replicas": scaling.min_workers, **LIGHTHOUSE})
        failure_config = FailureConfig(max_failures=-1)  # worker failures go by LiveFailurePolicy
        failure_policy = LiveFailurePolicy(failure_config, sink_name(run_id), scaling.max_failures)
    else:
        workers = (
            scaling.min_workers if scaling.min_workers == scaling.max_workers else (scaling.min_workers, scaling.max_workers)
        )
        torch_config = None
        failure_config = FailureConfig(max_failures=scaling.max_failures)
    return ElastuneTrainer(
        run_worker,
        failure_policy=failure_policy,
        train_loop_config=WorkerConfig(
            spec=spec.to_dict(),
            spec_dir=spec_dir,
            sink_name=sink_name(run_id),
            service_name=service_name(run_id),
            run_id=run_id,
            driver_node=driver_node,
            member=None if member is None else member.__dict__,
            run_dir=str(run_dir.path),
        ).__dict__,
        torch_config=torch_config,
        scaling_config=ScalingConfig(  # type: ignore[call-arg]  # Ray Train v2's ScalingConfig (elastic num_workers); mypy reads v1's
            num_workers=workers,  # type: ignore[arg-type]  # v2 takes (min, max)
            elastic_resize_monitor_interval_s=scaling.resize_check_seconds,
            use_gpu=scaling.gpus_per_worker > 0,
            resources_per_worker={
                "CPU": scaling.cpus_per_worker,
                **({"GPU": scaling.gpus_per_worker} if scaling.gpus_per_worker else {}),
            },
        ),
        run_config=RunConfig(
            name=f"{spec.name}-{run_id}",
            storage_path=str(run_dir.path / "ray"),
            failure_config=failure_config,
            callbacks=[PublishController(sink_name(run_id))],  # type: ignore[list-item]  # a v2 ControllerCallback; mypy reads v1's Callback
        ),
    )
