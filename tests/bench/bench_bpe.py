"""Byte tokens against a BPE, scored on held-out text in bits per byte, at equal steps and at
equal compute, and what held-out evaluation costs.

All arms train the quickstart's model size (2 layers, 64 wide, context 64) with the same global
batch and windows of 65 tokens (so the same tokens per step) on this Python's standard library
sources, 5 % of the files held out (the same files in every arm: the split depends on a
document's bytes alone). The byte arms are jobs/quickstart.yaml with `recipe: byte_gpt`; the BPE
arm is jobs/bpe.yaml (`recipe: gpt`, a 4096-id BPE). The BPE model's 4096-wide embedding and head
cost more FLOPs per token (the recipes' `flops_per_token`), so a second byte arm trains that many
times more steps: the same compute. Each arm's final checkpoint is evaluated on the first 512
held-out windows (train.evaluate.checkpoint_eval_loss: one process, the windows and sums a run's
evaluation takes). Held-out bits per byte = eval loss (nats per token) x tokens / UTF-8 bytes of
those windows / ln 2, bytes counted by decoding them.

Evaluation cost: the steps that evaluate against the median step without, per evaluation and as a
share of the run's wall time at the job's interval (every 50 steps, 512 windows).

    .venv/bin/python tests/bench/bench_bpe.py [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "platform"))

from elastune.checkpoint.checkpointer import Checkpointer  # noqa: E402
from elastune.data.dataset import TokenWindows  # noqa: E402
from elastune.data.tokenize import BYTE_TOKENS, read_bpe  # noqa: E402
from elastune.recipes import load_recipe  # noqa: E402
from elastune.spec import validate_spec  # noqa: E402
from elastune.train.evaluate import checkpoint_eval_loss  # noqa: E402


def run(spec: dict, tmp: Path) -> list[dict]:
    job = tmp / f"{spec['name']}.yaml"
    job.write_text(yaml.safe_dump(spec))
    subprocess.run([sys.executable, "-m", "elastune", "run", str(job), "--fresh"], cwd=tmp, check=True, capture_output=True)
    (metrics,) = Path(spec["output_dir"], spec["name"]).glob("*/metrics.jsonl")
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def bytes_per_token(path: str, samples: int) -> float:
    """UTF-8 bytes per token over the held-out windows one evaluation reads (separators excluded)."""
    windows = TokenWindows(path, "eval")
    manifest = windows.manifest
    tokens = BYTE_TOKENS if manifest.tokenizer == "bytes" else read_bpe(Path(path) / "tokenizer.json")
    ids = windows.take(np.arange(min(samples, len(windows))))[:, 1:]  # the predicted tokens
    kept = [int(t) for t in ids.reshape(-1) if int(t) != tokens.separator]
    return len(tokens.decode(kept).encode("utf-8")) / ids.numel()


def final_eval_loss(spec: dict) -> float:
    job = validate_spec(spec)
    ckpt = Checkpointer(job.checkpoint_path)
    latest = ckpt.latest()
    assert latest is not None
    return checkpoint_eval_loss(job, str(ROOT), ckpt, latest)


def flops(spec: dict) -> int:
    job = validate_spec(spec)
    per_token = load_recipe(job.model, str(ROOT), job.data.path).flops_per_token
    assert per_token is not None
    return per_token()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    bpe = yaml.safe_load((ROOT / "jobs" / "bpe.yaml").read_text())
    byte = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    byte["name"] = "bytes-eval"
    byte["data"] = {**byte["data"], "path": ".elastune/data/stdlib-w65-eval5", "eval_fraction": bpe["data"]["eval_fraction"]}
    byte["eval"] = bpe["eval"]
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        for spec in (byte, bpe):
            spec["data"]["path"] = str(ROOT / spec["data"]["path"])
            spec["output_dir"] = str(tmp / "runs")
            spec["stop"] = {"max_steps": args.steps}
            spec["checkpoint"] = {"path": str(tmp / "ckpt" / spec["name"]), "every_steps": 10**9}
        rows_of = {"bpe": run(bpe, tmp)}  # first: it prepares the BPE dataset, whose vocabulary the FLOPs need
        ratio = flops(bpe) / flops(byte)
        longer = {**byte, "name": "bytes-eq-flops", "stop": {"max_steps": round(args.steps * ratio)}}
        longer["checkpoint"] = {**byte["checkpoint"], "path": str(tmp / "ckpt" / "bytes-eq-flops")}
        print(
            f"FLOPs per token: BPE / bytes = {ratio:.3f}; the equal-compute byte arm trains {longer['stop']['max_steps']} steps"
        )
        results = {}
        for spec in (byte, bpe, longer):
            rows = rows_of.get(spec["name"]) or run(spec, tmp)
            evals = [r for r in rows if r.get("eval_loss") is not None]
            plain = statistics.median(r["step_seconds"] for r in rows[5:] if r.get("eval_loss") is None)
            extra = [r["step_seconds"] - plain for r in evals[1:]]  # the first step also compiles and warms up
            per_token = bytes_per_token(spec["data"]["path"], spec["eval"]["samples"])
            loss = final_eval_loss(spec)
            results[spec["name"]] = {
                "steps": spec["stop"]["max_steps"],
                "final_eval_loss": loss,
                "bytes_per_token": per_token,
                "bits_per_byte": loss / per_token / math.log(2),
                "eval_seconds": statistics.median(extra),
                "eval_share": sum(extra) / (rows[-1]["time"] - rows[0]["time"]),
            }
            r = results[spec["name"]]
            print(
                f"{spec['name']:<15} {r['steps']} steps: final held-out loss {loss:.4f} nats/token, "
                f"{per_token:.2f} bytes/token -> {r['bits_per_byte']:.3f} bits/byte; "
                f"an evaluation of {spec['eval']['samples']} windows {r['eval_seconds'] * 1000:.0f} ms, "
                f"{r['eval_share'] * 100:.1f} % of the run's wall time",
                flush=True,
            )
    bpb = {name: r["bits_per_byte"] for name, r in results.items()}
    print(f"BPE / bytes, held-out bits per byte at equal steps and tokens: {bpb['bpe'] / bpb['bytes-eval']:.3f}")
    print(f"BPE / bytes, held-out bits per byte at equal compute:          {bpb['bpe'] / bpb['bytes-eq-flops']:.3f}")
    print(json.dumps(results))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
