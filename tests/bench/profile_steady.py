"""Where CPU and wall time go in a steady `elastune run` (the quickstart, world size 2).

Starts the run, waits until it is past its warmup, then for `--seconds`:
- CPU per process, from /proc (every process on the machine, grouped by what it is), as cores;
- what the training workers do, sampled by py-spy (100 Hz) and sorted into the phases of a step
  (the innermost Elastune or torch frame that names one).

    .venv/bin/python tests/bench/profile_steady.py [--seconds 15] [--set scaling.torch_threads=1 ...]

`--set key=value` changes the job (dotted keys, YAML values), e.g. metrics.noise_scale=false.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
JOB = ROOT / "jobs" / "quickstart.yaml"
TICK = os.sysconf("SC_CLK_TCK")

# Phase of a sampled stack: the first rule whose pattern matches a frame, innermost frame first.
PHASES = [
    ("optimizer", r"optimizer\.py|adamw?\.py|_multi_tensor_adam|\bstep \(.*elastune/train/zero"),
    ("reduction", r"all_reduce|distributed_c10d|\breduce \(.*elastune/train/(group|live)"),
    ("noise scale (fold)", r"\bu?n?fold \(.*elastune/train/step"),
    ("clip / grad norm", r"clip_grad|get_total_norm"),
    ("backward", r"\bbackward \(|_engine_run_backward"),
    ("forward (loss)", r"sample_losses|forward \("),
    ("data", r"\btake \(.*elastune/data|sample_indices|positions \(|tally \(|to_device"),
    ("rng seeding", r"seed_device|micro_batch_seed"),
    ("snapshot copy (take)", r"\btake \(.*elastune/checkpoint/snapshot|fill \(.*elastune/checkpoint"),
    ("snapshot checksum + hand-over", r"_hand_off|block_digests"),
    ("rows / events", r"Reporter|metrics_row|committed \(|\.remote \("),
    ("lr / plan", r"step_values|batch_plan|set_hyper"),
]


def processes() -> dict[int, tuple[str, int]]:
    """pid -> (what it is, CPU ticks so far), for every process we may read."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        out[int(d.name)] = (name_of(cmd, stat[stat.index("(") + 1 : stat.rindex(")")]), ticks)
    return out


def name_of(cmd: str, comm: str) -> str:
    m = re.match(r"ray::(\S+)", cmd)
    if m:
        return "ray::" + m.group(1).split(".")[0]
    for daemon in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env", "agent", "ray_client"):
        if daemon in cmd:
            return daemon
    if "elastune" in cmd and " run " in cmd:
        return "elastune driver"
    if "default_worker.py" in cmd:
        return "ray idle worker"
    return comm


def phase_of(stack: str) -> str:
    frames = stack.split(";")[::-1]  # innermost first
    for frame in frames:
        for name, pattern in PHASES:
            if re.search(pattern, frame):
                return name
    return "other (Ray Train, threads, idle)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--no-spy", action="store_true", help="CPU by process only (py-spy itself costs about 0.2 cores)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spec = yaml.safe_load(JOB.read_text())
        spec["data"]["path"] = str(ROOT / spec["data"]["path"])
        spec["output_dir"] = str(Path(tmp) / "runs")
        spec["checkpoint"] = {"every_steps": 10**9, "path": str(Path(tmp) / "ckpt")}
        spec["stop"] = {"max_steps": args.steps}
        for item in args.set:
            key, value = item.split("=", 1)
            *parents, leaf = key.split(".")
            node = spec
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = yaml.safe_load(value)
        job = Path(tmp) / "job.yaml"
        job.write_text(yaml.safe_dump(spec))
        run = subprocess.Popen(
            [sys.executable, "-m", "elastune", "run", str(job), "--fresh"],
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            metrics = wait_for_rows(Path(tmp) / "runs" / spec["name"], args.warmup)
            report(metrics, args.seconds, spy=not args.no_spy)
        finally:
            os.killpg(run.pid, signal.SIGINT)
            run.wait(120)


def wait_for_rows(runs: Path, count: int) -> Path:
    deadline = time.time() + 300
    while time.time() < deadline:
        for m in runs.glob("*/metrics.jsonl"):
            if sum(1 for _ in m.open()) >= count:
                return m
        time.sleep(0.5)
    raise SystemExit("the run did not get past its warmup in 300 s")


def report(metrics: Path, seconds: float, spy: bool) -> None:
    before, t0 = processes(), time.time()
    workers = [pid for pid, (name, _) in before.items() if name == "ray::RayTrainWorker" and spy]
    spies = []
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    for pid in workers:
        out = Path(tempfile.mkstemp(suffix=".txt")[1])
        spies.append(
            (
                out,
                subprocess.Popen(
                    [
                        py_spy,
                        "record",
                        "-p",
                        str(pid),
                        "-d",
                        str(int(seconds)),
                        "-r",
                        "100",
                        "-f",
                        "raw",
                        "-o",
                        str(out),
                        "--nonblocking",
                        "-t",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ),
            )
        )
    time.sleep(seconds)
    after, elapsed = processes(), time.time() - t0
    for _, spy in spies:
        spy.wait(60)
    time.sleep(2)  # rows reach the run directory in batches: let the window's last ones arrive
    times = [json.loads(line)["time"] for line in metrics.open()]
    inside = [t for t in times if t0 <= t <= t0 + elapsed]
    cores: collections.Counter[str] = collections.Counter()
    for pid, (name, ticks) in after.items():
        cores[name] += (ticks - before.get(pid, (name, 0))[1]) / TICK / elapsed
    rate = (len(inside) - 1) / (inside[-1] - inside[0]) if len(inside) > 1 else float("nan")
    print(f"steady window {elapsed:.1f} s: {rate:.2f} steps/s\n\nCPU by process (cores; 2 = the whole machine):")
    for name, c in cores.most_common():
        if c >= 0.005:
            print(f"  {c:6.3f}  {name}")
    print(f"  {sum(cores.values()):6.3f}  total")
    samples: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    for out, _ in spies:
        for line in out.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not stack:
                continue
            thread = stack.split(";", 1)[0]
            threads[thread] += int(n)
            if "train_fn" in stack or "run_worker" in stack:
                samples[phase_of(stack)] += int(n)
        out.unlink(missing_ok=True)
    if not spies:
        return
    total = sum(samples.values())
    print(f"\nTraining thread of the {len(spies)} workers, by phase of the step (py-spy, share of {total} samples):")
    for name, n in samples.most_common():
        print(f"  {n / max(total, 1):6.1%}  {name}")
    print("\nWorker threads seen busy (py-spy samples, all workers):")
    for name, n in threads.most_common(8):
        print(f"  {n:6d}  {name[:100]}")


if __name__ == "__main__":
    main()
