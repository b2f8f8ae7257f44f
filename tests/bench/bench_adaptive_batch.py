"""An adaptive global batch (batch.adaptive) against the best fixed batch of a small grid, on the
quickstart model with held-out evaluation, at equal samples, in one invocation.

Every run trains through the system (`run_job`: Ray Train workers, checkpoint service) on one
embedded local Ray, 2 workers, the quickstart's model and WSD schedule, the same sample budget.

- Fixed: global batch in GRID, peak lr 0.003 at 32 scaled by sqrt(batch / 32) (the rule the
  adaptive batch uses too). The best fixed batch is the one with the lowest final held-out loss;
  that loss is the target.
- Adaptive: starts at the grid's smallest batch (its lr by the same rule), changes at most every
  `--every` samples, up to `--max`; one run per `--variants` entry: a number is the noise-scale
  rule's fraction (the batch follows fraction x the smoothed B_simple), `goodput` the goodput rule.

Held-out loss: `eval:` every EVAL_EVERY samples during training (each step that reaches a
multiple, of the parameters it starts from) and the final checkpoint's (train.evaluate, the same
windows). Reported per seed: each method's final held-out loss; for the adaptive run, the steps,
samples and wall time (from its first step) at its first evaluation at or below the target; the
best fixed batch's steps and wall time over the whole budget.

Also, `--quadratic`: the noisy-quadratic check, where the critical batch is known in closed form
(tests/unit/test_adaptive_batch.py's problem: per-sample gradients mu + e, B_simple rising 40 ->
400): the chosen batch's error against fraction x B_simple over 8 seeds.

    .venv/bin/python tests/bench/bench_adaptive_batch.py [--seeds 3] [--budget 12800] [--variants 0.25,0.5,goodput] [--every 640]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "platform"))
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from elastune.checkpoint.checkpointer import Checkpointer  # noqa: E402
from elastune.cluster import start_local_ray  # noqa: E402
from elastune.spec import validate_spec  # noqa: E402
from elastune.train.driver import run_job  # noqa: E402
from elastune.train.evaluate import checkpoint_eval_loss  # noqa: E402
from elastune.train.run_dir import read_jsonl  # noqa: E402

GRID = [16, 32, 64]
EVAL_EVERY = 640
EVAL_WINDOWS = 512
DATA = ROOT / ".elastune" / "data" / "stdlib-w65-eval"


def job(name: str, seed: int, batch: int, budget: int, out: Path, adaptive: dict | None = None) -> dict:
    return {
        "name": name,
        "seed": seed,
        "model": {"recipe": "byte_gpt", "options": {"num_layers": 2, "width": 64, "num_heads": 4, "context": 64, "dropout": 0.1}},
        "data": {"source": "stdlib", "path": str(DATA), "window": 65, "max_bytes": 8_000_000, "eval_fraction": 0.02},
        "batch": {"global_batch_size": batch, "micro_batch_size": 8, **({"adaptive": adaptive} if adaptive else {})},
        "optimizer": {
            "name": "adamw",
            "lr": 0.003 * math.sqrt(batch / 32),
            "weight_decay": 0.1,
            "betas": [0.9, 0.95],
            "grad_clip_norm": 1.0,
        },
        "schedule": {"name": "wsd", "warmup_samples": 1600, "decay_fraction": 0.2, "decay_shape": "sqrt", "min_lr_ratio": 0.1},
        "scaling": {"min_workers": 2, "max_workers": 2, "cpus_per_worker": 1},
        "checkpoint": {"path": str(out / name / "ckpt"), "every_steps": 100_000, "keep_last": 1},
        "eval": {"every_samples": EVAL_EVERY, "samples": EVAL_WINDOWS, "micro_batch_size": 64},
        "stop": {"max_samples": budget},
        "output_dir": str(out / "runs"),
    }


def train(raw: dict) -> dict:
    """Run one job; its evaluations as (steps before, samples before, seconds from the first
    step's start, held-out loss), the final checkpoint's last."""
    spec = validate_spec(raw)
    outcome = run_job(spec, str(ROOT), console=Console(quiet=True))
    assert outcome.status == "succeeded", outcome.error
    rows = read_jsonl(outcome.run_dir / "metrics.jsonl")
    t0 = rows[0]["time"] - rows[0]["step_seconds"]
    curve = [
        (r["step"] - 1, r["samples_seen"] - r["global_batch_size"], r["time"] - r["step_seconds"] - t0, r["eval_loss"])
        for r in rows
        if r.get("eval_loss") is not None
    ]
    ckpt = Checkpointer(spec.checkpoint_path)
    final = checkpoint_eval_loss(spec, str(ROOT), ckpt, ckpt.latest())
    last = rows[-1]
    curve.append((last["step"], last["samples_seen"], last["time"] - t0, final))
    return {
        "curve": curve,
        "final": final,
        "steps": last["step"],
        "samples": last["samples_seen"],
        "seconds": last["time"] - t0,
        "batches": sorted({r["global_batch_size"] for r in rows}),
        "changes": [
            (e["samples_seen"], e["global_batch_size"], round(e["b_simple"], 1))
            for e in read_jsonl(outcome.run_dir / "events.jsonl")
            if e["kind"] == "batch_change"
        ],
    }


def reach(curve: list, target: float) -> tuple | None:
    return next(((steps, samples, seconds) for steps, samples, seconds, loss in curve if loss <= target), None)


def quadratic() -> None:
    import numpy as np
    from tests.unit.test_adaptive_batch import feed, rising_noise_scale

    from elastune.train.adaptive import AdaptiveBatch

    spec, b_true = rising_noise_scale()
    for seed in range(8):
        a = AdaptiveBatch(spec)
        history = feed(a, b_true, 800, np.random.default_rng(seed), dim=200)
        errors = [batch / min(512, max(32, b_true(s))) - 1 for s, batch in history if 20_000 <= s <= 150_000]
        print(
            json.dumps(
                {
                    "seed": seed,
                    "changes": len(a.decisions),
                    "min_error": round(min(errors), 3),
                    "max_error": round(max(errors), 3),
                }
            )
        )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--budget", type=int, default=12800)
    p.add_argument("--variants", default="0.25,0.5,1.0,goodput")
    p.add_argument("--every", type=int, default=640)
    p.add_argument("--smoothing", type=int, default=None)
    p.add_argument("--max", type=int, default=256)
    p.add_argument("--quadratic", action="store_true")
    args = p.parse_args()
    if args.quadratic:
        quadratic()
        return
    os.chdir(ROOT)
    start_local_ray(num_cpus=4)
    out = Path(tempfile.mkdtemp(prefix="bench-adaptive-"))
    rules = {}
    for v in args.variants.split(","):
        rule = {"goodput": True} if v == "goodput" else {"fraction": float(v)}
        rules[v] = {"min": GRID[0], "max": args.max, "every_samples": args.every, **rule}
        if args.smoothing:
            rules[v]["smoothing_samples"] = args.smoothing
    print(json.dumps({"budget": args.budget, "grid": GRID, "variants": rules, "started": time.strftime("%F %T")}))
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        fixed = {g: train(job(f"fixed-{g}-s{seed}", seed, g, args.budget, out)) for g in GRID}
        best = min(GRID, key=lambda g: fixed[g]["final"])
        target = fixed[best]["final"]
        print(
            json.dumps(
                {
                    "seed": seed,
                    "fixed_final": {g: round(fixed[g]["final"], 4) for g in GRID},
                    "fixed_steps": {g: fixed[g]["steps"] for g in GRID},
                    "fixed_seconds": {g: round(fixed[g]["seconds"], 1) for g in GRID},
                    "best_fixed": best,
                }
            ),
            flush=True,
        )
        for name, rule in rules.items():
            ada = train(job(f"adaptive-{name.replace('.', 'p')}-s{seed}", seed, GRID[0], args.budget, out, rule))
            got = reach(ada["curve"], target)
            result = {
                "seed": seed,
                "variant": name,
                "final": round(ada["final"], 4),
                "final_ratio": round(ada["final"] / target, 4),
                "steps": ada["steps"],
                "seconds": round(ada["seconds"], 1),
                "changes": ada["changes"],
                "reached": None if got is None else {"steps": got[0], "samples": got[1], "seconds": round(got[2], 1)},
                "step_ratio": None if got is None else round(got[0] / fixed[best]["steps"], 3),
                "sample_ratio": None if got is None else round(got[1] / fixed[best]["samples"], 3),
                "wall_ratio": None if got is None else round(got[2] / fixed[best]["seconds"], 3),
            }
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
