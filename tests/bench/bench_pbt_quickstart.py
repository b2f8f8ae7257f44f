"""Population-based schedule search through `elastune tune` on the quickstart model, against
random search over fixed schedules and a grid-tuned cosine, at equal compute, in one invocation.

Everything trains through the system: Ray Tune trials that are Elastune runs (Ray Train workers,
checkpoint service; a PBT member is one run for the whole search, exploiting in place), on one
embedded local Ray.

- PBT: `jobs/pbt.yaml`'s search (peak lr, weight decay, schedule family, decay fraction; sqrt lr
  scaling) at P members x the budget, exploit decisions every interval.
- Random search: the same search space, P members, one interval the length of the budget (no
  exploit: each member keeps its first values to the end); equal compute.
- Grid-tuned cosine: cosine over K peak lrs (log grid), each the whole budget (K / P times the
  compute). Its best validation loss sets the target (+5 %).

Validation: the quickstart trains on the first 8,000,000 bytes of this Python's standard library
sources; the validation windows are cut from the whole files that follow (never trained on). Each
method's result is its best member's (or grid point's) final model by validation loss, evaluated
in eval mode (no dropout). Also reported: samples to reach the target (a member's training-loss
window mean of fitness_samples, along its lineage), exploits, exploit latency (the population's
decision to the recipient's first step, and as a share of the interval it then trains: wall time
from the decision to the interval's last step), every boundary's pause (a member's last step
before it to its first step after, waiting for slower members included) and the population's
close (deciding, making the boundary durable, cloning), and checkpoint bytes (payload bytes the
runs' checkpoints wrote, and what the clones wrote: manifests only).

`--against COMMIT`: also the whole PBT search's wall time, each seed, through `elastune tune` in
a process of its own, on this code and on COMMIT's (a git worktree), one after the other.

    .venv/bin/python tests/bench/bench_pbt_quickstart.py [--seeds 2] [--first-seed 0] [--budget 6400] [--against da6f060]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console

import ray

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "platform"))

from elastune.checkpoint.checkpointer import Checkpointer  # noqa: E402
from elastune.cluster import start_local_ray  # noqa: E402
from elastune.data.prepare import DOC_SEPARATOR, stdlib_files  # noqa: E402
from elastune.recipes import load_recipe  # noqa: E402
from elastune.spec import load_spec, validate_spec  # noqa: E402
from elastune.train.driver import run_job  # noqa: E402
from elastune.train.run_dir import read_jsonl  # noqa: E402
from elastune.tune.driver import run_tune  # noqa: E402
from elastune.tune.lineage import read_lineage, stitched  # noqa: E402
from elastune.tune.population import member_spec  # noqa: E402

GRID = [0.001, 0.002, 0.004, 0.008, 0.016, 0.032]  # cosine peak lrs
VALIDATION_WINDOWS = 1024


def validation_windows(window: int, trained_bytes: int) -> torch.Tensor:
    """Windows of the whole stdlib files after the training data's first `trained_bytes`."""
    taken, text = 0, bytearray()
    for path in stdlib_files():
        data = path.read_bytes()
        if taken >= trained_bytes:
            text += data + DOC_SEPARATOR
            if len(text) >= VALIDATION_WINDOWS * window:
                break
        taken += len(data)
    rows = min(VALIDATION_WINDOWS, len(text) // window)
    if rows < VALIDATION_WINDOWS // 2:
        raise SystemExit(f"only {rows} validation windows after {trained_bytes:,} bytes of stdlib sources")
    return torch.frombuffer(bytes(text[: rows * window]), dtype=torch.uint8).view(rows, window).long()


def val_loss(spec, root: str, windows: torch.Tensor) -> float:
    """Validation loss of the newest checkpoint under `root`."""
    ckpt = Checkpointer(root)
    manifest = ckpt.latest()
    recipe = load_recipe(spec.model, str(ROOT))
    model = recipe.build_model()
    tensors = ckpt.load(manifest, [n for n in manifest.tensors if n.startswith("model/")])
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once, as in the checkpoint
            param.copy_(tensors[f"model/{name}"])
    model.eval()
    with torch.no_grad():
        return float(torch.cat([recipe.sample_losses(model, w) for w in windows.split(256)]).mean())


def to_target(rows: list[dict], target: float, window: int) -> int | None:
    """First samples count whose training-loss mean over the last `window` samples is <= target."""
    losses, seen = [], []
    for r in rows:
        losses.append(r["loss"])
        seen.append(r["samples_seen"])
        recent = [loss for loss, s in zip(losses, seen) if s > r["samples_seen"] - window]
        if r["samples_seen"] >= window and np.mean(recent) <= target:
            return r["samples_seen"]
    return None


def search(spec_raw: dict, windows: torch.Tensor, workdir: str) -> dict:
    spec = validate_spec({**spec_raw, "output_dir": workdir})
    outcome = run_tune(spec, str(ROOT), console=Console(quiet=True))
    if outcome.status != "succeeded":
        raise SystemExit(f"search {outcome.tune_dir} failed: {outcome.error}")
    lineage = read_lineage(outcome.tune_dir)
    members = sorted({s["member"] for s in lineage["segments"]})
    last = max(s["generation"] for s in lineage["segments"])
    finals = {m: next(s for s in lineage["segments"] if s["member"] == m and s["generation"] == last) for m in members}
    losses = {m: val_loss(spec, finals[m]["root"], windows) for m in members}
    best = min(losses, key=losses.get)
    rows = [dataclasses.asdict(r) for r in stitched(lineage, best)]
    return {
        "loss": losses[best],
        "rows": rows,
        "exploits": lineage["exploits"],
        "lineage": lineage,
        "tune_dir": outcome.tune_dir,
        "member": best,
        "seconds": outcome.seconds,
    }


@ray.remote(num_cpus=0.01)  # the run's workers ask for their own CPUs
def _grid_point(raw: dict) -> str:
    spec = validate_spec(raw)
    outcome = run_job(spec, str(ROOT), console=Console(quiet=True))
    if outcome.status != "succeeded":
        raise RuntimeError(f"grid run {outcome.run_dir} failed: {outcome.error}")
    return str(outcome.run_dir)


def grid_cosine(spec_raw: dict, windows: torch.Tensor, workdir: str) -> dict:
    raws = []
    for i, lr in enumerate(GRID):
        raw = member_spec({k: v for k, v in spec_raw.items() if k != "tune"}, {"optimizer.lr": lr, "schedule.name": "cosine"})
        raws.append({**raw, "name": f"cosine-{i}", "output_dir": workdir})
    run_dirs = ray.get([_grid_point.remote(raw) for raw in raws])
    out = []
    for lr, raw, run_dir in zip(GRID, raws, run_dirs):
        spec = validate_spec(raw)
        out.append(
            {"lr": lr, "loss": val_loss(spec, spec.checkpoint_path, windows), "rows": read_jsonl(Path(run_dir) / "metrics.jsonl")}
        )
    return min(out, key=lambda r: r["loss"])


def member_rows(lineage: dict, member: str) -> list[dict]:
    """A member's own metrics rows, every run directory it trained in (a later run's row of a step wins)."""
    dirs = dict.fromkeys(d for s in lineage["segments"] if s["member"] == member for d in s["run_dirs"])
    steps = {r["step"]: r for d in dirs for r in read_jsonl(Path(d) / "metrics.jsonl")}
    return [steps[k] for k in sorted(steps)]


def exploit_latencies(lineage: dict) -> list[tuple[float, float]]:
    """(seconds from the population's decision to the recipient's first step, that as a share
    of the wall time from the decision to the end of the interval the recipient then trains)."""
    decided = {c["boundary"]: c["decided"] for c in lineage["closes"]}
    out = []
    for e in lineage["exploits"]:
        after = [r for r in member_rows(lineage, e["recipient"]) if r["samples_seen"] > e["samples"]]
        end = next(b for b in lineage["boundaries"] if b > e["samples"])
        interval = [r for r in after if r["samples_seen"] <= end]
        first_start = interval[0]["time"] - interval[0]["step_seconds"]
        t0 = decided[e["samples"]]
        out.append((first_start - t0, (first_start - t0) / (interval[-1]["time"] - t0)))
    return out


def boundary_pauses(lineage: dict) -> tuple[list[float], list[float]]:
    """(every member's pause at every boundary but the last: its boundary step's end to its next
    step's start; the population's closes: all reported -> decided, in seconds)."""
    pauses = []
    for member in {s["member"] for s in lineage["segments"]}:
        rows = member_rows(lineage, member)
        for b in lineage["boundaries"][:-1]:
            at = next((i for i, r in enumerate(rows) if r["samples_seen"] == b), None)
            if at is not None and at + 1 < len(rows):
                pauses.append(rows[at + 1]["time"] - rows[at + 1]["step_seconds"] - rows[at]["time"])
    return pauses, [c["decided"] - c["started"] for c in lineage["closes"]]


def checkpoint_bytes(lineage: dict) -> tuple[int, int]:
    """(payload bytes the runs' checkpoints wrote, bytes the clones wrote: a manifest each)."""
    dirs = dict.fromkeys(d for s in lineage["segments"] for d in s["run_dirs"])
    saved = sum(ev["bytes"] for d in dirs for ev in read_jsonl(Path(d) / "events.jsonl") if ev["kind"] == "checkpoint")
    return saved, sum(e["clone_bytes"] or 0 for e in lineage["exploits"])


def search_wall_time(platform_dir: Path, raw: dict, workdir: str) -> float:
    """Seconds `elastune tune` takes for the search `raw` in a process of its own, importing the
    package from `platform_dir` (this checkout's, or another commit's worktree)."""
    spec_file = Path(workdir) / f"{raw['name']}.yaml"
    spec_file.write_text(yaml.safe_dump({**raw, "output_dir": workdir}))
    env = {**os.environ, "PYTHONPATH": str(platform_dir)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "elastune", "tune", str(spec_file)],
        env=env,
        cwd=platform_dir.parent,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"search with {platform_dir} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--budget", type=int, default=6400, help="samples each member trains")
    parser.add_argument("--interval", type=int, default=1600)
    parser.add_argument("--against", help="a commit whose whole-search wall time to measure beside this code's")
    args = parser.parse_args()
    base = load_spec(ROOT / "jobs" / "pbt.yaml").to_dict()
    base["data"]["path"] = str(ROOT / base["data"]["path"])
    base["stop"] = {"max_samples": args.budget}
    base["schedule"]["warmup_samples"] = args.budget // 16
    population = base["tune"]["population"]
    windows = validation_windows(base["data"]["window"], base["data"]["max_bytes"])
    print(
        f"quickstart byte_gpt, budget {args.budget:,} samples per member, interval {args.interval:,}, population {population}, "
        f"grid {len(GRID)} cosine lrs; {len(windows)} held-out validation windows"
    )
    start_local_ray(max(4, population + 1))
    ratios: dict[str, list[float]] = {"pbt": [], "random": []}
    fitness_window = args.interval // 4
    with tempfile.TemporaryDirectory(prefix="bench-pbt-") as workdir:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            pbt_raw = {**base, "seed": seed, "name": f"pbt-{seed}", "tune": {**base["tune"], "interval_samples": args.interval}}
            random_raw = {
                **base,
                "seed": seed,
                "name": f"random-{seed}",
                "tune": {**base["tune"], "interval_samples": args.budget},
            }
            grid = grid_cosine({**base, "seed": seed}, windows, f"{workdir}/grid-{seed}")
            pbt, rand = search(pbt_raw, windows, workdir), search(random_raw, windows, workdir)
            target = grid["loss"] * 1.05
            target_train = (
                min(np.mean([r["loss"] for r in grid["rows"] if r["samples_seen"] > args.budget - fitness_window]), np.inf) * 1.05
            )
            print(
                f"\nseed {seed}: target val loss {target:.4f} (grid cosine's best, lr {grid['lr']:g}, +5 %); "
                f"train-loss target {target_train:.4f}"
            )
            print(f"{'method':<12} {'val loss':>9} {'vs cosine':>9} {'to target':>10} {'exploits':>8} {'compute':>8}")
            for name, result, compute in (
                ("pbt", pbt, 1.0),
                ("random", rand, 1.0),
                ("grid cosine", grid, len(GRID) / population),
            ):
                ratio = result["loss"] / grid["loss"]
                if name in ratios:
                    ratios[name].append(ratio)
                reached = to_target(result["rows"], target_train, fitness_window)
                print(
                    f"{name:<12} {result['loss']:>9.4f} {ratio:>9.3f} {reached or '-':>10} "
                    f"{len(result.get('exploits', [])) or '-':>8} {compute:>7.2f}x"
                )
            latencies = exploit_latencies(pbt["lineage"])
            saved, cloned = checkpoint_bytes(pbt["lineage"])
            if latencies:
                print(
                    "exploit latency (decision -> the recipient's first step): "
                    + ", ".join(f"{s:.3f} s ({100 * f:.1f} %)" for s, f in latencies)
                )
            pauses, closes = boundary_pauses(pbt["lineage"])
            print(
                f"boundary pauses ({len(pauses)}): median {statistics.median(pauses):.3f} s, max {max(pauses):.3f} s; "
                f"closes: " + ", ".join(f"{c:.3f} s" for c in closes)
            )
            print(
                f"checkpoint bytes: the runs' checkpoints wrote {saved:,} payload bytes; the {len(pbt['exploits'])} clones wrote "
                f"{cloned:,} bytes of manifests and no payload ({(saved + cloned) / saved:.4f}x)"
            )
            print(
                f"search wall time: pbt {pbt['seconds']:.0f} s, random {rand['seconds']:.0f} s; "
                f"best pbt member {pbt['member']}: {json.dumps(pbt['lineage']['best']['history'])}"
            )
    ray.shutdown()
    if args.against:
        compare_wall_time(args, base)
    print()
    for name, values in ratios.items():
        print(f"{name}: val loss / grid-tuned cosine's, mean over seeds {statistics.mean(values):.3f} (max {max(values):.3f})")


def compare_wall_time(args, base: dict) -> None:
    """The whole PBT search through `elastune tune`, on this code and on `args.against`'s."""
    with tempfile.TemporaryDirectory(prefix="bench-pbt-wall-") as workdir:
        other = Path(workdir) / "against"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), args.against], check=True)
        try:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                raw = {**base, "seed": seed, "name": f"wall-{seed}", "tune": {**base["tune"], "interval_samples": args.interval}}
                now = search_wall_time(ROOT / "platform", {**raw, "name": f"now-{seed}"}, workdir)
                then = search_wall_time(other / "platform", {**raw, "name": f"then-{seed}"}, workdir)
                print(f"seed {seed}: whole search {now:.0f} s on this code, {then:.0f} s on {args.against} ({then / now:.2f}x)")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=False)


if __name__ == "__main__":
    main()
