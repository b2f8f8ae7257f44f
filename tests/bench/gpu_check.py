"""Every GPU check and GPU benchmark in one invocation: `make gpu-check` (about 8 minutes on one GPU).

1. tests/dist/test_gpu.py: the step in fp32, bf16 and fp16 on CUDA against single-process
   references, compiled, checkpoints from bf16 GPU training loading bit-exact on the CPU.
2. Throughput: a GPT-2-small-shaped byte GPT (12 layers, 768 wide, 12 heads, context 1024; 85M
   parameters with the 256-byte vocabulary) in bf16 + torch.compile on one GPU, Elastune's step
   (buckets, noise-scale norms, its optimizer) against a plain PyTorch bf16 loop of the same
   model and batch written here, alternating, with the model FLOPs utilisation of both.
3. Snapshot stall: the same step with an in-memory snapshot of the whole state (parameters and
   AdamW moments, 1 GB) every step, through the worker side of the real Snapshotter (its copy
   into pinned host memory, the checksums); the service's side is a stand-in that takes the
   payload, so only what the training loop pays is measured. Reported: the stall per step, as a
   share of the step, and the snapshot interval that keeps it under 2 %.

Prints a summary table (and `--json PATH` writes it). Without CUDA it says so and exits 0.
`--device cpu --tiny` runs the same code on a tiny model: a check of this script, not a figure.

    PYTHONPATH=platform python tests/bench/gpu_check.py [--json gpu-check.json] [--skip-tests]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}  # dense bf16 FLOP/s


class Tokens:
    """Random token windows held on the host, as a prepared dataset is."""

    def __init__(self, n: int, window: int):
        self.data = torch.randint(0, 256, (n, window), generator=torch.Generator().manual_seed(0))
        if torch.cuda.is_available():
            self.data = self.data.pin_memory()

    def __len__(self) -> int:
        return len(self.data)

    def take(self, indices) -> torch.Tensor:
        return self.data[torch.as_tensor(indices)]


def options(tiny: bool):
    from elastune.spec.models import ByteGPTOptions

    if tiny:
        return ByteGPTOptions(num_layers=2, width=64, num_heads=4, context=64, dropout=0.0)
    return ByteGPTOptions(num_layers=12, width=768, num_heads=12, context=1024, dropout=0.0)


def flops_per_token(o) -> float:
    """Model FLOPs per trained token (forward + backward): 6 x matmul parameters (blocks and the
    tied head) + 12 x layers x width x context for attention scores and values."""
    matmul = o.num_layers * 12 * o.width**2 + o.width * 256
    return 6 * matmul + 12 * o.num_layers * o.width * o.context


def elastune_step(o, device: str, g: int, m: int, snapshot: bool):
    """A closure running one Elastune step (bf16, compiled), optionally snapshotting after it;
    returns (step, stalls)."""
    from elastune.batch_plan import batch_plan
    from elastune.checkpoint import snapshot as snapshot_module
    from elastune.recipes import Recipe
    from elastune.recipes.gpt import GPT, sample_losses
    from elastune.spec.models import AdamWSpec
    from elastune.train.optim import build_optimizer, set_hyper
    from elastune.train.precision import compile_model
    from elastune.train.state import Progress, TrainState, state_pieces
    from elastune.train.step import GradBuffer, StepContext, train_step

    torch.manual_seed(0)
    model = GPT(o).to(device)
    opt = build_optimizer(model, AdamWSpec(name="adamw", lr=3e-4, weight_decay=0.1, grad_clip_norm=1.0))
    set_hyper(opt, 3e-4, 0.1)
    grads = GradBuffer(model, micro_batch_norms=True)
    forward = compile_model(model)
    recipe = Recipe(build_model=lambda: model, sample_losses=sample_losses)
    source, plan = Tokens(4096, o.context + 1), batch_plan(g, m, 1)
    # The service's side of a hand-over, stood in for: it takes the payload and answers at once.
    snapshot_module.ray = types.SimpleNamespace(get=lambda value: value)
    service = types.SimpleNamespace(stage=types.SimpleNamespace(remote=lambda *args: []))
    snapshots = snapshot_module.Snapshotter(service)
    stalls: list[float] = []
    counter = {"step": 0}

    def step() -> None:
        s = counter["step"]
        train_step(
            StepContext(forward, recipe, source, 0, 1.0, precision="bf16"),
            TrainState(forward, opt),
            grads,
            plan,
            0,
            Progress(s, s * g),
        )
        counter["step"] += 1
        if snapshot:
            header = {
                "step": s + 1,
                "samples_seen": (s + 1) * g,
                "spec_hash": "bench",
                "layout": "replicated",
                "meta": {},
                "durable": False,
            }
            stalls.append(snapshots.take(header, state_pieces(TrainState(model, opt)), 0, 1))

    return step, stalls, snapshots


def plain_step(o, device: str, g: int, m: int):
    """The anchor: the same model and batch in a plain PyTorch bf16 loop."""
    from elastune.recipes.gpt import GPT, sample_losses
    from elastune.train.precision import compile_model

    torch.manual_seed(0)
    model = GPT(o).to(device)
    forward = compile_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    source = Tokens(4096, o.context + 1)
    gen = torch.Generator().manual_seed(1)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for _ in range(g // m):
            batch = source.take(torch.randint(0, len(source), (m,), generator=gen)).to(device, non_blocking=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = sample_losses(forward, batch).float().sum() / g
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def timed(step, device: str, warmup: int, steps: int) -> float:
    """Seconds per step after `warmup` steps (compilation included there)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - started) / steps


def run_tests(rows: list[tuple[str, str, str]]) -> bool:
    report = ROOT / ".elastune" / "gpu-tests.xml"
    report.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/dist/test_gpu.py", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    import xml.etree.ElementTree as ET

    for case in ET.parse(report).getroot().iter("testcase"):
        outcome = (
            "failed"
            if case.find("failure") is not None or case.find("error") is not None
            else "skipped"
            if case.find("skipped") is not None
            else "passed"
        )
        rows.append((f"test {case.get('name')}", outcome, f"{float(case.get('time', 0)):.1f} s"))
    if done.returncode not in (0, 5):
        print(done.stdout[-6000:], done.stderr[-2000:])
    return done.returncode == 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device on this machine; nothing to check (tests/dist/test_gpu.py skips here too)")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    rows: list[tuple[str, str, str]] = []
    ok = True
    if not args.skip_tests:
        ok = run_tests(rows)
    o = options(args.tiny)
    g, m = (16, 8) if args.tiny else (32, 8)
    tokens = g * o.context
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    ours_step, _, _ = elastune_step(o, args.device, g, m, snapshot=False)
    theirs_step = plain_step(o, args.device, g, m)
    ours, theirs = [], []
    for _ in range(2):  # alternate, so drift hits both
        ours.append(timed(ours_step, args.device, args.warmup, args.steps))
        theirs.append(timed(theirs_step, args.device, args.warmup, args.steps))
    a, b = min(ours), min(theirs)
    mfu = lambda s: "" if peak is None else f", MFU {tokens * flops_per_token(o) / s / peak:.1%}"  # noqa: E731
    rows.append(("throughput: plain PyTorch bf16 + compile", f"{tokens / b:,.0f} tokens/s", f"{b * 1e3:.1f} ms/step{mfu(b)}"))
    rows.append(("throughput: Elastune step bf16 + compile", f"{tokens / a:,.0f} tokens/s", f"{a * 1e3:.1f} ms/step{mfu(a)}"))
    rows.append(
        (
            "  ratio Elastune / plain (target >= 0.95)",
            f"{b / a:.3f}",
            f"rounds {[round(x * 1e3, 1) for x in ours]} vs {[round(x * 1e3, 1) for x in theirs]} ms",
        )
    )
    snap_step, stalls, snapshots = elastune_step(o, args.device, g, m, snapshot=True)
    with_snap = timed(snap_step, args.device, args.warmup, args.steps)
    snapshots.wait()
    share = max(0.0, with_snap / a - 1.0)
    rows.append(
        (
            "snapshot every step: step time",
            f"{with_snap * 1e3:.1f} ms",
            f"{share:+.1%} against no snapshot; {snapshots.plan.size / 2**30:.2f} GiB a snapshot",
        )
    )
    rows.append(
        (
            "snapshot: take() stall (median)",
            f"{sorted(stalls)[len(stalls) // 2] * 1e3:.2f} ms",
            "the loop's own wait: copy issued, previous hand-over done",
        )
    )
    from elastune.checkpoint.interval import snapshot_interval

    rows.append(
        ("snapshot interval for <= 2 % of step time", f"{max(1, math.ceil(share / 0.02))} steps", "from the step times above")
    )
    cost = sorted(snapshots.drain_costs())
    auto = snapshot_interval(cost[len(cost) // 2], a, cap=1 << 20) if cost else None
    rows.append(
        (
            "snapshot_every_steps: auto would take",
            f"{auto} steps",
            f"median cost {cost[len(cost) // 2] * 1e3:.1f} ms (stall + hand-off CPU)" if cost else "no hand-over measured",
        )
    )
    width = max(len(r[0]) for r in rows)
    print(f"\ngpu-check on {name} (torch {torch.__version__})")
    for check, result, note in rows:
        print(f"{check:<{width}}  {result:<18}  {note}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
