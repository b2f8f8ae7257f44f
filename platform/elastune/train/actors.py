"""The run's actors, all on the driver's node: the sink workers report to, the checkpoint service
that holds tier 0 and writes tier 1, and the Prometheus exporter (when `metrics:` enables it).

They live where the driver lives: the in-memory snapshots (objects the service put) outlive any
worker node, and the driver's node going means the run goes anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from rich.console import Console

import ray
from elastune.checkpoint.retention import RetentionPolicy
from elastune.checkpoint.service import start_service
from elastune.metrics.exporter import RunExporter
from elastune.spec.models import JobSpec
from elastune.train.sink import RunSink, sink_name


@dataclass(frozen=True)
class RunActors:
    driver_node: str  # Ray node id
    sink: Any  # actor handles: their methods are looked up at run time
    service: Any
    exporter: RunExporter | None

    @classmethod
    def start(cls, spec: JobSpec, run_id: str, tokens_per_sample: int | None, console: Console) -> RunActors:
        driver_node = ray.get_runtime_context().get_node_id()
        here = NodeAffinitySchedulingStrategy(node_id=driver_node, soft=False)
        sink_class: Any = RunSink  # an actor class (@ray.remote); Ray's stubs type it as the plain class
        sink = sink_class.options(name=sink_name(run_id), scheduling_strategy=here).remote()
        c = spec.checkpoint
        policy = RetentionPolicy(c.keep_last, c.keep_best, c.best_metric, c.best_mode)
        service = start_service(run_id, spec.checkpoint_path, policy, sink_name(run_id), scheduling_strategy=here)
        exporter = None
        if spec.metrics.enabled:
            m, targets = spec.metrics, Path(spec.output_dir) / "prometheus-targets"
            exporter = RunExporter(spec.name, run_id, m.host, m.port, tokens_per_sample, targets, here)
            where = f"http://{exporter.address}/metrics (Prometheus file_sd target {exporter.target})"
            console.print(f"Metrics: {where}.", highlight=False)
        return cls(driver_node, sink, service, exporter)

    def stop(self, run_dir: Path) -> None:
        """The exporter's last scrape kept as run_dir/metrics.prom; the sink and the service ended."""
        if self.exporter is not None:
            self.exporter.close(run_dir / "metrics.prom")
        ray.kill(self.sink)
        ray.kill(self.service)
