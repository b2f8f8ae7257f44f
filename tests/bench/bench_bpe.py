"""Byte tokens against a BPE at the same compute, scored on held-out text in bits per byte, and
what held-out evaluation costs.

Both arms train the quickstart's model size (2 layers, 64 wide, context 64) for the same steps,
global batch and windows of 65 tokens (so the same tokens per step and, but for the embedding,
the same FLOPs) on this Python's standard library sources, 5 % of the files held out (the same
files in both arms: the split depends on a document's bytes alone). The byte arm is jobs/
quickstart.yaml with `recipe: byte_gpt`; the BPE arm is jobs/bpe.yaml (`recipe: gpt`, a 4096-id
BPE). Held-out bits per byte = eval loss (nats per token) x tokens / UTF-8 bytes of the held-out
windows / ln 2, bytes counted by decoding the windows the evaluation reads.

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

from elastune.data.dataset import TokenWindows  # noqa: E402
from elastune.data.tokenize import BYTE_TOKENS, read_bpe  # noqa: E402


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
        results = {}
        for spec in (byte, bpe):
            spec["data"]["path"] = str(ROOT / spec["data"]["path"])
            spec["output_dir"] = str(tmp / "runs")
            spec["stop"] = {"max_steps": args.steps}
            spec["checkpoint"] = {"every_steps": 10**9}
            rows = run(spec, tmp)
            evals = [r for r in rows if r.get("eval_loss") is not None]
            plain = statistics.median(r["step_seconds"] for r in rows[5:] if r.get("eval_loss") is None)
            extra = [r["step_seconds"] - plain for r in evals[1:]]  # the first step also compiles and warms up
            per_token = bytes_per_token(spec["data"]["path"], spec["eval"]["samples"])
            last = evals[-1]
            results[spec["name"]] = {
                "eval_loss": last["eval_loss"],
                "at_samples": last["samples_seen"] - last["global_batch_size"],
                "bytes_per_token": per_token,
                "bits_per_byte": last["eval_loss"] / per_token / math.log(2),
                "eval_seconds": statistics.median(extra),
                "eval_share": sum(extra) / (rows[-1]["time"] - rows[0]["time"]),
            }
            r = results[spec["name"]]
            print(
                f"{spec['name']:<10} held-out loss {r['eval_loss']:.4f} nats/token at {r['at_samples']:,} samples, "
                f"{r['bytes_per_token']:.2f} bytes/token -> {r['bits_per_byte']:.3f} bits/byte; "
                f"an evaluation of {spec['eval']['samples']} windows {r['eval_seconds'] * 1000:.0f} ms, "
                f"{r['eval_share'] * 100:.1f} % of the run's wall time",
                flush=True,
            )
    ratio = results["bpe"]["bits_per_byte"] / results["bytes-eval"]["bits_per_byte"]
    print(f"BPE / bytes, held-out bits per byte at equal steps and tokens: {ratio:.3f}")
    print(json.dumps(results))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
