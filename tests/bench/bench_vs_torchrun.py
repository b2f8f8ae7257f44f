"""Steady-state samples/s of `elastune run` against plain torchrun DDP (gloo), back to back; with
`--layout fsdp`, Elastune's fsdp layout against torchrun FSDP2, and Elastune's replicated layout
in the same rounds (what sharding costs).

Same model, data, global batch, micro-batch and world size (2): the quickstart job, or `--job`
(e.g. tests/bench/comm_heavy.yaml, where the gradient reduction weighs most).
Both measure wall time between consecutive optimizer steps after a warmup, so per-step overhead
(metrics, lr, the all-reduce) counts on both sides; process and Ray start-up do not.

    .venv/bin/python tests/bench/bench_vs_torchrun.py [--job JOB] [--steps 300] [--warmup 50] [--rounds 2]
        [--layout fsdp]        # Elastune fsdp against torchrun FSDP2 (and against Elastune replicated)
        [--compare CHECKOUT]   # also another checkout of Elastune (e.g. a `git worktree` of the
                               # commit before a change), in the same rounds: head / that ratio
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "quickstart.yaml"


def torchrun(steps: int, warmup: int, job: Path = JOB, layout: str = "ddp") -> float:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        "29533",
        str(Path(__file__).with_name("torchrun_ddp.py")),
        str(job),
        str(steps),
        str(warmup),
        layout,
    ]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])["samples_per_s"]


def elastune(steps: int, warmup: int, checkout: Path = ROOT, source: Path = JOB, layout: str = "replicated") -> float:
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.yaml"
        import yaml

        spec = yaml.safe_load(source.read_text())
        spec["data"]["path"] = str(ROOT / spec["data"]["path"])
        spec["output_dir"] = str(Path(tmp) / "runs")
        spec["checkpoint"] = {"every_steps": 10**9}  # only the final checkpoint, as the anchor saves none mid-run
        spec["stop"] = {"max_steps": steps}
        spec["scaling"] = {**spec["scaling"], "layout": layout}
        job.write_text(yaml.safe_dump(spec))
        env = os.environ | {"PYTHONPATH": str(checkout / "platform")}  # that checkout's elastune, workers included
        subprocess.run(
            [sys.executable, "-m", "elastune", "run", str(job), "--fresh"], cwd=tmp, check=True, capture_output=True, env=env
        )
        (metrics,) = Path(tmp, "runs", spec["name"]).glob("*/metrics.jsonl")
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    window = [r["time"] for r in rows[warmup:]]
    return rows[0]["global_batch_size"] * (len(window) - 1) / (window[-1] - window[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compare", type=Path, default=None)
    parser.add_argument("--job", type=Path, default=JOB)
    parser.add_argument("--layout", choices=("replicated", "fsdp"), default="replicated")
    args = parser.parse_args()
    job = args.job.resolve()
    subprocess.run(
        [sys.executable, "-m", "elastune", "data", "prepare", "--job", str(job)], cwd=ROOT, check=True, capture_output=True
    )
    if args.layout == "fsdp":
        return compare_fsdp(args, job)
    ddp, ours, theirs = [], [], []
    for r in range(args.rounds):  # alternate, so drift in machine load hits both
        ddp.append(torchrun(args.steps, args.warmup, job))
        ours.append(elastune(args.steps, args.warmup, source=job))
        line = f"round {r + 1}: torchrun DDP {ddp[-1]:.0f} samples/s, elastune {ours[-1]:.0f} samples/s, "
        line += f"ratio {ours[-1] / ddp[-1]:.3f}"
        if args.compare:
            theirs.append(elastune(args.steps, args.warmup, args.compare.resolve(), job))
            line += f"; {args.compare} {theirs[-1]:.0f} samples/s, ratio {theirs[-1] / ddp[-1]:.3f}"
        print(line, flush=True)
    a, b = statistics.median(ddp), statistics.median(ours)
    print(f"median: torchrun DDP {a:.0f} samples/s, elastune {b:.0f} samples/s, ratio {b / a:.3f} (target >= 0.97)")
    if theirs:
        c = statistics.median(theirs)
        print(f"median {args.compare}: {c:.0f} samples/s, ratio {c / a:.3f}; this checkout / that one {b / c:.3f}")


def compare_fsdp(args, job: Path) -> None:
    anchor, sharded, replicated = [], [], []
    for r in range(args.rounds):
        anchor.append(torchrun(args.steps, args.warmup, job, "fsdp"))
        sharded.append(elastune(args.steps, args.warmup, source=job, layout="fsdp"))
        replicated.append(elastune(args.steps, args.warmup, source=job))
        print(
            f"round {r + 1}: torchrun FSDP2 {anchor[-1]:.0f} samples/s, elastune fsdp {sharded[-1]:.0f} "
            f"(ratio {sharded[-1] / anchor[-1]:.3f}), elastune replicated {replicated[-1]:.0f} "
            f"(fsdp / replicated {sharded[-1] / replicated[-1]:.3f})",
            flush=True,
        )
    a, b, c = (statistics.median(x) for x in (anchor, sharded, replicated))
    print(
        f"median: torchrun FSDP2 {a:.0f} samples/s, elastune fsdp {b:.0f}, ratio {b / a:.3f} (target >= 0.95); "
        f"elastune replicated {c:.0f}, fsdp / replicated {b / c:.3f}"
    )


if __name__ == "__main__":
    main()
