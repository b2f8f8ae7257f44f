"""What the Ray-tier tests share: the small job they train (`spec_for`) and running it (`run`).
The horizon is the uninterrupted reference run's (`STEPS`), so a shorter or interrupted run
follows the same schedule."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

from elastune.spec import validate_spec
from elastune.train.driver import run_job
from elastune.train.run_dir import read_jsonl

STEPS = 28  # steps of the uninterrupted reference run (conftest `uninterrupted`)
# Every run evaluates 24 held-out windows each 36 samples: with the global batch of 12, steps
# 1, 4, 7, ... (step s trains samples [12(s-1), 12s), which holds a multiple of 36 when s-1 is one of 3).
EVAL_EVERY = 36


def spec_for(tmp: Path, data: Path, name: str, workers: int, max_steps: int, layout: str = "replicated"):
    return validate_spec(
        {
            "name": name,
            "seed": 5,
            "model": {
                "recipe": "byte_gpt",
                "options": {"num_layers": 1, "width": 16, "num_heads": 2, "context": 16, "dropout": 0.1},
            },
            "data": {"path": str(data), "window": 17},
            "batch": {"global_batch_size": 12, "micro_batch_size": 2},
            "optimizer": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
            # A fixed horizon: stopping halfway must not bend the schedule.
            "schedule": {"name": "cosine", "warmup_samples": 48, "horizon_samples": 12 * STEPS, "min_lr_ratio": 0.1},
            "scaling": {"min_workers": workers, "max_workers": workers, "layout": layout},
            # Every step in tier 0: a failure or resize loses no step (the `observed` run spaces them).
            "checkpoint": {"path": str(tmp / name / "ckpt"), "every_steps": 10, "snapshot_every_steps": 1},
            "eval": {"every_samples": EVAL_EVERY, "samples": 24, "micro_batch_size": 4},
            "stop": {"max_steps": max_steps},
            "output_dir": str(tmp / "runs"),
        }
    )


def run(spec, **kw):
    outcome = run_job(spec, os.getcwd(), console=Console(width=200), **kw)
    assert outcome.status == "succeeded", outcome.error
    return outcome, read_jsonl(outcome.run_dir / "metrics.jsonl"), read_jsonl(outcome.run_dir / "events.jsonl")
