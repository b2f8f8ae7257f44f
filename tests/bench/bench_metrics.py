"""Worker-side cost of metrics, per step, against a quickstart training step in the same run.

A worker never calls the exporter: its metrics row goes to the run sink (restart mode: with rank
0's snapshot hand-over; live mode: with every participant's; without snapshots: batched every
0.5 s, fire and forget), and the driver feeds the exporter from the sink. So the worker's cost
is `Reporter.committed` (building nothing new: the row exists for metrics.jsonl anyway) plus,
without snapshots, its share of the batched `sink.record` calls. Measured here with a real
RunSink actor on a local Ray, over --steps calls each, median and p99 per call; the anchor is one
training step of the quickstart model on one process (`train_step`, same invocation). Target:
under 1 ms per step. The driver side (`RunMetrics.observe`, on the exporter actor) is timed too,
and the step's own cost of the gradient noise scale (micro-batch gradient norms, a second
gradient buffer), as the ratio of the same step with and without it.

    .venv/bin/python tests/bench/bench_metrics.py [--steps 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "platform"))

from elastune.events import Row  # noqa: E402


def per_call(fn, n: int) -> tuple[float, float]:
    times = []
    for i in range(n):
        started = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - started)
    times.sort()
    return statistics.median(times), times[int(0.99 * (n - 1))]


def row(step: int) -> Row:
    return Row(
        time=time.time(),
        step=step,
        samples_seen=32 * step,
        loss=3.0,
        lr=1e-3,
        grad_norm=1.0,
        world_size=2,
        global_batch_size=32,
        micro_batches=(2, 2),
        step_seconds=0.1,
        samples_per_s=320.0,
        sample_tally=(32, 1000, 12345),
    )


def quickstart_step_seconds(steps: int = 40) -> tuple[float, float]:
    """Median step time of the quickstart model without and with micro-batch gradient norms,
    the two alternating step by step (the same machine state for both)."""
    import torch

    from elastune.batch_plan import batch_plan
    from elastune.data.prepare import ensure_prepared
    from elastune.recipes import load_recipe
    from elastune.spec import validate_spec
    from elastune.train.loop import open_source
    from elastune.train.optim import build_optimizer
    from elastune.train.state import Progress, TrainState
    from elastune.train.step import GradBuffer, StepContext, train_step

    raw = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    raw["data"]["path"] = str(ROOT / raw["data"]["path"])
    spec = validate_spec(raw)
    ensure_prepared(spec.data)
    torch.set_num_threads(1)
    recipe = load_recipe(spec.model, str(ROOT))
    source = open_source(recipe, spec)
    plan = batch_plan(spec.batch.global_batch_size, spec.batch.micro_batch_size, 2)  # one rank's share of a 2-worker step
    arms = []
    for norms in (False, True):
        torch.manual_seed(0)
        model = recipe.build_model()
        arms.append((model, build_optimizer(model, spec.optimizer), GradBuffer(model, norms), []))
    for step in range(steps):
        for model, optimizer, grads, times in arms:
            started = time.perf_counter()
            train_step(
                StepContext(model, recipe, source, spec.seed),
                TrainState(model, optimizer),
                grads,
                plan,
                0,
                Progress(step, step * plan.global_batch_size),
            )
            times.append(time.perf_counter() - started)
    plain, norms = (statistics.median(times[3:]) for *_, times in arms)
    return plain, norms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    import ray
    from elastune.batch_plan import batch_plan
    from elastune.cluster import start_local_ray
    from elastune.metrics.exporter import RunMetrics
    from elastune.train.loop import Reporter
    from elastune.train.sink import RunSink

    anchor, with_norms = quickstart_step_seconds()
    start_local_ray(num_cpus=2)
    plan = batch_plan(32, 8, 2)
    results = {}
    for name, live, snapshots in (
        ("restart, rank 0, rows with snapshots", False, True),
        ("live, rows with snapshots", True, True),
        ("live, no snapshots (sink every 0.5 s)", True, False),
    ):
        sink = RunSink.remote()
        report = Reporter(sink, 0, live, with_snapshots=snapshots)

        def commit(i: int) -> None:
            report.committed(row(i + 1), plan)
            report.rows_for_snapshot()  # what the snapshot hand-over takes with it

        results[name] = per_call(commit, args.steps)
        ray.get(sink.drain.remote())
        ray.kill(sink)
    # Without snapshots a flush every 0.5 s carries the rows of that half second: time the call
    # with that many rows and spread it over them.
    sink = RunSink.remote()
    per_flush = max(1, int(0.5 / anchor))
    flush = per_call(lambda i: sink.record.remote([row(i * per_flush + k + 1) for k in range(per_flush)], True), 200)
    ray.kill(sink)
    metrics = RunMetrics("bench", "r", 64)
    driver = per_call(lambda i: metrics.observe([row(i + 1)], []), args.steps)
    ray.shutdown()
    print(f"anchor: one quickstart training step (one rank of 2, 1 thread): {anchor * 1e3:.1f} ms")
    print(
        f"the same step keeping micro-batch gradient norms (noise scale): {with_norms * 1e3:.1f} ms ({with_norms / anchor:.3f}x)"
    )
    for name, (median, p99) in results.items():
        print(
            f"worker, {name}: median {median * 1e6:.1f} us, p99 {p99 * 1e6:.1f} us per step "
            f"({median / anchor * 100:.3f} % of the step; target < 1 ms)"
        )
    print(
        f"worker, the 0.5 s flush without snapshots ({per_flush} rows): median {flush[0] * 1e6:.1f} us per flush, "
        f"{flush[0] / per_flush * 1e6:.1f} us per step amortized"
    )
    print(f"exporter side, RunMetrics.observe of one row: median {driver[0] * 1e6:.1f} us, p99 {driver[1] * 1e6:.1f} us")


if __name__ == "__main__":
    main()
