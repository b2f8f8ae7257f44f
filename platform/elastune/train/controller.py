"""Ray Train's controller, as Elastune runs it: the failure rule of the run's recovery mode
(train.failure_policy) inside the controller, and the controller's handle for the driver (which
aborts the run when it is stopped or stranded).

These reach into Ray Train's developer API (`ray.train.v2._internal`), which Ray 2.60, the pinned
version, documents for custom callbacks and failure policies.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2._internal.execution.failure_handling import FailureDecision as RayDecision
from ray.train.v2._internal.execution.failure_handling.default import _is_preemption_failure
from ray.train.v2.api.exceptions import WorkerGroupError

from elastune.train.failure_policy import decide_live


class ElastuneTrainer(TorchTrainer):
    """A TorchTrainer whose controller uses `failure_policy` when one is given."""

    def __init__(self, *args: Any, failure_policy: DefaultFailurePolicy | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.elastune_failure_policy = failure_policy

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any):
        if self.elastune_failure_policy is not None:
            controller_init_kwargs["failure_policy"] = self.elastune_failure_policy
        return super()._initialize_and_run_controller(**controller_init_kwargs)


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
        sink = ray.get_actor(self.sink_name)
        try:
            step = ray.get(sink.last_step.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - no answer: count it as no progress
            step = self.steps[-1] if self.steps else None
        self.steps.append(step)
        decision = decide_live(self.steps, self.max_failures)
        sink.event.remote({"time": time.time(), "kind": "failure_policy", "retry": decision.retry, "in_a_row": decision.in_a_row,
                           "step": step, "message": decision.reason})  # fmt: skip
        return RayDecision.RETRY if decision.retry else RayDecision.RAISE


class PublishController(ControllerCallback):
    """Hands the controller's actor handle to the run's sink as the controller starts, so the
    driver can abort the run (TrainController.abort) when it must end it."""

    def __init__(self, sink_name: str):
        self.sink_name = sink_name

    def after_controller_start(self, train_run_context) -> None:
        ray.get_actor(self.sink_name).set_controller.remote(ray.get_runtime_context().current_actor)
