"""Recovery after one worker SIGKILL: elastune vs a plain Ray Train loop, in one invocation.

Both train the quickstart model and data with 2 workers, global batch 32, and lose rank 1 in
the middle of step 10 (before the gradients are all-reduced) on the first attempt.
  (a) elastune: `faults: [{action: kill_rank, rank: 1, at_step: 10}]`, tier-0 snapshots every step;
      MTTR and lost steps from the run's `recovery` event.
  (b) plain Ray Train: TorchTrainer, DDP, `ray.train.report` with a checkpoint every 5 steps,
      FailureConfig(max_failures=1), Ray's default restart from the last reported checkpoint.
MTTR = kill to the first step completed after it (wall clock); lost steps = steps completed
before the kill minus the step resumed from. Whole-job timings on a shared machine: compare the
two figures of one invocation, not across invocations.

    .venv/bin/python tests/bench/bench_recovery.py [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT))
KILL_STEP = 10


def quickstart(tmp: Path, steps: int) -> dict:
    spec = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    spec["data"]["path"] = str(ROOT / spec["data"]["path"])
    spec["output_dir"] = str(tmp / "runs")
    spec["checkpoint"] = {"path": str(tmp / "ckpt"), "every_steps": 5}
    spec["stop"] = {"max_steps": steps}
    spec["schedule"] = {"name": "constant"}
    return spec


def elastune_run(tmp: Path, steps: int) -> dict:
    from rich.console import Console

    from elastune.spec import validate_spec
    from elastune.train.driver import run_job
    from elastune.train.run_dir import read_jsonl

    raw = quickstart(tmp, steps) | {"faults": [{"action": "kill_rank", "rank": 1, "at_step": KILL_STEP, "point": "mid"}]}
    outcome = run_job(validate_spec(raw), str(ROOT), console=Console(quiet=True))
    (recovery,) = [e for e in read_jsonl(outcome.run_dir / "events.jsonl") if e["kind"] == "recovery"]
    return {"mttr_s": recovery["mttr_seconds"], "lost_steps": recovery["lost_steps"], "restart_s": recovery["restart_seconds"]}


def plain_loop(config: dict) -> None:
    """A Ray Train loop as its docs write one: DDP, report a checkpoint every 5 steps."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    from elastune.data.dataset import TokenWindows
    from elastune.recipes import load_recipe
    from elastune.spec import validate_spec

    spec = validate_spec(config["spec"])
    recipe = load_recipe(spec.model, str(ROOT))
    data = TokenWindows(spec.data.path)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(recipe.build_model())
    opt = torch.optim.AdamW(model.parameters(), lr=spec.optimizer.lr)
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(os.path.join(d, "state.pt"), weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start = state["step"]
    per_rank = spec.batch.global_batch_size // world
    marks = Path(config["marks"])
    for step in range(start + 1, config["steps"] + 1):
        g = torch.Generator().manual_seed(step * 1000 + rank)
        batch = data.take(torch.randint(0, len(data), (per_rank,), generator=g).numpy())
        loss = recipe.sample_losses(model, batch).mean()
        if step == KILL_STEP and rank == 1 and not (marks / "killed").exists():
            # Before backward: DDP all-reduces inside backward, so this is the same moment of the step.
            (marks / "killed").write_text(json.dumps({"time": time.time(), "completed": step - 1}))
            os.kill(os.getpid(), signal.SIGKILL)
        loss.backward()
        opt.step()  # DDP averaged the gradients in backward
        opt.zero_grad()
        if rank == 0:
            with open(marks / "steps.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "time": time.time(), "resumed_from": start}) + "\n")
        if step % 5 == 0:
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, os.path.join(d, "state.pt"))
                ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)


def plain_run(tmp: Path, steps: int) -> dict:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    marks = tmp / "marks"
    marks.mkdir(parents=True)
    TorchTrainer(
        plain_loop,
        train_loop_config={"spec": quickstart(tmp, steps), "steps": steps, "marks": str(marks)},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="plain", storage_path=str(tmp / "ray"), failure_config=FailureConfig(max_failures=1)),
    ).fit()
    kill = json.loads((marks / "killed").read_text())
    rows = [json.loads(line) for line in (marks / "steps.jsonl").read_text().splitlines()]
    after = next(r for r in rows if r["time"] > kill["time"])
    reported = sorted({r["step"] for r in rows if r["step"] % 5 == 0 and r["time"] < kill["time"]})
    return {"mttr_s": round(after["time"] - kill["time"], 3), "lost_steps": kill["completed"] - after["resumed_from"],
            "resumed_from": after["resumed_from"], "reported": reported}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    from elastune.data.prepare import ensure_prepared
    from elastune.spec import validate_spec
    from elastune.train.driver import start_local_ray

    with tempfile.TemporaryDirectory() as tmp:
        ensure_prepared(validate_spec(quickstart(Path(tmp), args.steps)).data)
        start_local_ray(num_cpus=2)
        ours = elastune_run(Path(tmp) / "a", args.steps)
        plain = plain_run(Path(tmp) / "b", args.steps)
    print(f"elastune:          MTTR {ours['mttr_s']:.1f} s (new workers up {ours['restart_s']:.1f} s), lost steps {ours['lost_steps']}")
    print(f"plain Ray Train:   MTTR {plain['mttr_s']:.1f} s, lost steps {plain['lost_steps']} "
          f"(resumed from step {plain['resumed_from']}; checkpoints reported before the kill: steps {plain['reported']})")
    print(f"MTTR elastune / plain = {ours['mttr_s'] / plain['mttr_s']:.2f} (target <= 0.30)")


if __name__ == "__main__":
    main()
