"""Recovery after one worker SIGKILL, in one invocation, on the same job.

The quickstart model and data, 2 workers, global batch 32; rank 1 dies in the middle of step 10
(elastune and torchft: before the gradients are reduced; the plain loop: before backward, where
DDP reduces) on the first attempt.
  (a) elastune, `recovery: restart`: Ray Train restarts the worker group, which resumes from the
      tier-0 snapshot. (a') elastune, `recovery: live` (min_workers 1): the survivor carries on
      alone with the whole global batch while Ray Train replaces rank 1, which heals back in.
      Both rehearse the kill with `faults:`; MTTR and lost steps from the run's `recovery` event.
  (b) plain Ray Train: TorchTrainer, DDP, `ray.train.report` with a checkpoint every 5 steps,
      FailureConfig(max_failures=1), Ray's default restart from the last reported checkpoint.
  (c) Ray Train with torchft replica groups, as Ray's own torchft example writes it
      (TorchftConfig(lighthouse_kwargs={"min_replicas": 1}), torchft DDP and Optimizer wrappers,
      PGTransport), rank 1 killed once before backward (where torchft's DDP reduces) and once
      between steps 9 and 10: the survivor goes on with its own per-worker batch, i.e. half the
      global batch.
  (d) node loss, elastune live: tests/ray/cluster_job.py's node-loss scenario (a head and three
      1-worker nodes on this machine, the node of rank 1 killed mid-step 10 by the `kill_node`
      fault), MTTR from its `recovery` event.
Convergence deviation: mean relative |loss difference| against the same loop run uninterrupted,
over the 30 steps from the failed one, for elastune live and for (c), the naive elastic loop that
keeps the per-worker batch. MTTR = kill to the first step completed after it (wall clock); lost
steps = steps completed before the kill minus the step resumed from. Whole-job timings on a
shared machine: compare the figures of one invocation, not across invocations.

    .venv/bin/python tests/bench/bench_recovery.py [--steps 40] [--node-loss-runs K] [--node-loss-only]
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


def elastune_run(tmp: Path, steps: int, recovery: str | None, kill: bool = True) -> dict:
    from rich.console import Console

    from elastune.spec import validate_spec
    from elastune.train.driver import run_job
    from elastune.train.run_dir import read_jsonl

    raw = quickstart(tmp, steps)
    if recovery == "live":
        raw["scaling"] = {**raw.get("scaling", {}), "min_workers": 1, "max_workers": 2, "recovery": "live"}
    if kill:
        raw["faults"] = [{"action": "kill_rank", "rank": 1, "at_step": KILL_STEP, "point": "mid"}]
    outcome = run_job(validate_spec(raw), str(ROOT), console=Console(quiet=True))
    losses = {r["step"]: r["loss"] for r in read_jsonl(outcome.run_dir / "metrics.jsonl")}
    if not kill:
        return {"losses": losses}
    (recovery_event,) = [e for e in read_jsonl(outcome.run_dir / "events.jsonl") if e["kind"] == "recovery"]
    return {
        "mttr_s": recovery_event["mttr_seconds"],
        "lost_steps": recovery_event["lost_steps"],
        "restart_s": recovery_event["restart_seconds"],
        "losses": losses,
    }


def worker_setup(config: dict):
    """What the comparison loops share: the spec, recipe, data, this worker's rank and world size,
    and the model, seeded alike on every worker."""
    import ray.train
    import torch

    from elastune.data.dataset import TokenWindows
    from elastune.recipes import load_recipe
    from elastune.spec import validate_spec

    spec = validate_spec(config["spec"])
    recipe = load_recipe(spec.model, str(ROOT))
    ctx = ray.train.get_context()
    torch.manual_seed(0)
    return spec, recipe, TokenWindows(spec.data.path), ctx.get_world_rank(), ctx.get_world_size(), recipe.build_model()


def plain_loop(config: dict) -> None:
    """A Ray Train loop as its docs write one: DDP, report a checkpoint every 5 steps."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    spec, recipe, data, rank, world, model = worker_setup(config)
    model = ray.train.torch.prepare_model(model)
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
    return {
        "mttr_s": round(after["time"] - kill["time"], 3),
        "lost_steps": kill["completed"] - after["resumed_from"],
        "resumed_from": after["resumed_from"],
        "reported": reported,
    }


def torchft_loop(config: dict) -> None:
    """Ray's torchft example pattern on the quickstart model: each worker its own replica group,
    torchft's DDP and Optimizer wrappers, a per-worker batch of global/world samples."""
    from datetime import timedelta

    import torch
    from torchft import DistributedDataParallel, Manager, Optimizer, ProcessGroupGloo
    from torchft.checkpointing.pg_transport import PGTransport

    spec, recipe, data, rank, world, model = worker_setup(config)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.optimizer.lr)
    pg = ProcessGroupGloo(timeout=timedelta(seconds=30))
    manager = Manager(
        pg=pg,
        min_replica_size=1,
        world_size=1,
        rank=0,
        replica_id=f"bench_{rank}",
        timeout=timedelta(seconds=60),
        load_state_dict=lambda sd: (model.load_state_dict(sd["model"]), opt.load_state_dict(sd["optim"])),
        state_dict=lambda: {"model": model.state_dict(), "optim": opt.state_dict()},
        checkpoint_transport=PGTransport(pg, timeout=timedelta(seconds=30), device=torch.device("cpu")),
    )
    ddp, ft_opt = DistributedDataParallel(manager, model), Optimizer(manager, opt)
    per_rank = spec.batch.global_batch_size // world
    marks = Path(config["marks"])
    while manager.current_step() < config["steps"]:
        step = manager.current_step() + 1
        # At step 10, or the first step rank 1 trains after it: with min_replicas 1 the first
        # quorums may form before rank 1 is up, and it heals into the run some steps later.
        dies = config["kill"] is not None and step >= KILL_STEP and rank == 1 and not (marks / "killed").exists()
        if dies and config["kill"] == "between":  # after step 9 committed, before asking for quorum 10
            (marks / "killed").write_text(json.dumps({"time": time.time(), "step": step}))
            os.kill(os.getpid(), signal.SIGKILL)
        ft_opt.zero_grad()  # starts the quorum
        g = torch.Generator().manual_seed(step * 1000 + rank)
        batch = data.take(torch.randint(0, len(data), (per_rank,), generator=g).numpy())
        loss = recipe.sample_losses(ddp, batch).mean()
        if dies:  # "mid": before backward, where torchft's DDP reduces
            (marks / "killed").write_text(json.dumps({"time": time.time(), "step": step}))
            os.kill(os.getpid(), signal.SIGKILL)
        loss.backward()  # torchft's DDP all-reduces (averages over the quorum) here
        ft_opt.step()
        if rank == 0 and manager.current_step() == step:  # committed
            with open(marks / "steps.jsonl", "a") as f:
                f.write(
                    json.dumps(
                        {"step": step, "time": time.time(), "loss": float(loss), "participants": manager.num_participants()}
                    )
                    + "\n"
                )
    manager.shutdown()


def torchft_run(tmp: Path, steps: int, kill: str | None) -> dict:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2.torch.torchft_config import TorchftConfig

    marks = tmp / "marks"
    marks.mkdir(parents=True)
    TorchTrainer(
        torchft_loop,
        train_loop_config={"spec": quickstart(tmp, steps), "steps": steps, "marks": str(marks), "kill": kill},
        scaling_config=ScalingConfig(num_workers=2),
        torch_config=TorchftConfig(backend="gloo", lighthouse_kwargs={"min_replicas": 1}),
        run_config=RunConfig(name="torchft", storage_path=str(tmp / "ray"), failure_config=FailureConfig(max_failures=1)),
    ).fit()
    rows = [json.loads(line) for line in (marks / "steps.jsonl").read_text().splitlines()]
    out = {"losses": {r["step"]: r["loss"] for r in rows}}
    if kill:
        killed = json.loads((marks / "killed").read_text())
        # The survivor may still be writing its row of step 9 as rank 1 dies: the recovery is the
        # first step past the killed one's last; lost steps are those committed again after the kill.
        after = next(r for r in rows if r["time"] > killed["time"] and r["step"] >= killed["step"])
        before = {r["step"] for r in rows if r["time"] <= killed["time"]}
        redone = {r["step"] for r in rows if r["time"] > killed["time"] and r["step"] in before}
        alone = [r["step"] for r in rows if r["participants"] == 1 and r["step"] >= KILL_STEP]
        out |= {"mttr_s": round(after["time"] - killed["time"], 3), "lost_steps": len(redone), "half_batch_steps": len(alone)}
    return out


def node_loss_run(tmp: Path, steps: int) -> dict:
    """The node-loss scenario of the tests, in a process of its own (its own Ray cluster)."""
    import subprocess

    from elastune.spec import validate_spec
    from elastune.train.run_dir import read_jsonl

    raw = quickstart(tmp, steps) | {"faults": [{"action": "kill_node", "rank": 1, "at_step": KILL_STEP, "point": "mid"}]}
    raw["scaling"] = {"min_workers": 2, "max_workers": 3, "recovery": "live", "cpus_per_worker": 2, "torch_threads": 1}
    tmp.mkdir(parents=True)
    (tmp / "spec.json").write_text(json.dumps(validate_spec(raw).to_dict()))
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "ray" / "cluster_job.py"),
            "node-loss",
            str(tmp / "spec.json"),
            str(tmp / "out.json"),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    out = json.loads((tmp / "out.json").read_text())
    (event,) = [e for e in read_jsonl(Path(out["run_dir"]) / "events.jsonl") if e["kind"] == "recovery"]
    return {
        "mttr_s": event["mttr_seconds"],
        "lost_steps": event["lost_steps"],
        "world": (event["world_size_before"], event["world_size_after"]),
    }


def node_loss_report(runs: list[dict]) -> None:
    for node in runs:
        print(
            f"node loss, elastune live (3 -> {node['world'][1]} workers): MTTR "
            f"{node['mttr_s']:.2f} s, lost steps {node['lost_steps']} (target < 10 s)"
        )


def deviation(losses: dict[int, float], reference: dict[int, float], first: int, count: int = 30) -> float:
    """Mean relative |loss difference| over `count` steps from `first`."""
    steps = [s for s in range(first, first + count) if s in losses and s in reference]
    return sum(abs(losses[s] - reference[s]) / abs(reference[s]) for s in steps) / len(steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--node-loss-runs", type=int, default=1, help="repeat arm (d) this many times")
    parser.add_argument("--node-loss-only", action="store_true", help="run arm (d) only (its target is absolute)")
    args = parser.parse_args()
    if args.node_loss_only:
        with tempfile.TemporaryDirectory() as tmp:
            node_loss_report([node_loss_run(Path(tmp) / f"d{i}", args.steps) for i in range(args.node_loss_runs)])
        return
    import ray
    from elastune.cluster import start_local_ray
    from elastune.data.prepare import ensure_prepared
    from elastune.spec import validate_spec

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ensure_prepared(validate_spec(quickstart(root, args.steps)).data)
        start_local_ray(num_cpus=2)
        restart = elastune_run(root / "a", args.steps, "restart")
        live = elastune_run(root / "a-live", args.steps, "live")
        clean = elastune_run(root / "a-clean", args.steps, "live", kill=False)
        plain = plain_run(root / "b", args.steps)
        ft = torchft_run(root / "c", args.steps, kill="mid")
        ft_between = torchft_run(root / "c-between", args.steps, kill="between")
        ft_clean = torchft_run(root / "c-clean", args.steps, kill=None)
        ray.shutdown()  # the node-loss run brings its own cluster
        nodes = [node_loss_run(root / f"d{i}", args.steps) for i in range(args.node_loss_runs)]
    ours_dev = deviation(live["losses"], clean["losses"], KILL_STEP)
    ft_dev = deviation(ft_between["losses"], ft_clean["losses"], KILL_STEP)
    print(
        f"elastune restart:  MTTR {restart['mttr_s']:.2f} s (new workers up "
        f"{restart['restart_s']:.1f} s), lost steps {restart['lost_steps']}"
    )
    print(f"elastune live:     MTTR {live['mttr_s']:.2f} s, lost steps {live['lost_steps']}")
    print(
        f"plain Ray Train:   MTTR {plain['mttr_s']:.2f} s, lost steps {plain['lost_steps']} "
        f"(resumed from step {plain['resumed_from']}; checkpoints reported before the kill: steps {plain['reported']})"
    )
    for name, arm in (("mid-step", ft), ("between steps", ft_between)):
        print(
            f"torchft (Ray's example), kill {name}: MTTR {arm['mttr_s']:.2f} s, lost steps {arm['lost_steps']}, "
            f"{arm['half_batch_steps']} step(s) on half the global batch"
        )
    node_loss_report(nodes)
    print(
        f"MTTR elastune live / plain = {live['mttr_s'] / plain['mttr_s']:.3f}, restart / "
        f"plain = {restart['mttr_s'] / plain['mttr_s']:.2f} (target <= 0.30)"
    )
    print(
        f"convergence deviation over {min(30, args.steps - KILL_STEP + 1)} steps "
        f"from step {KILL_STEP}: elastune live {ours_dev:.2e}, "
        f"torchft naive (kill between steps) {ft_dev:.2e}; elastune is {100 * (1 - ours_dev / ft_dev):.2f}% below (target >= 99%)"
    )


if __name__ == "__main__":
    main()
