"""Checkpoint costs against torch.distributed.checkpoint (DCP) and the disk itself, in one run.

State: ~200 MB of float32 (parameters and two Adam moments). Measured, each the median of
--repeats runs, on the disk holding --dir:
  - blocking time per checkpoint, like for like: a worker's `Snapshotter.take` handing the state
    to a real checkpoint service on a local Ray (the in-memory copy; checksums, hand-off and
    persist run behind it) vs the time dcp.async_save blocks before returning (it too goes on
    writing in the background); first calls counted on both sides, and reported apart; dcp.save
    (synchronous) for reference;
  - the per-step snapshot stall a training loop sees (a take every step of a given length), with
    the hand-over's xxh3 checksums on and off (off: a benchmark-only stand-in that skips them),
    for the quickstart's per-rank share and for the 200 MB state;
  - durable write throughput: the service's background persist (checksums, direct writes, commit)
    and the bare payload write, vs `dd oflag=direct` sequential write bandwidth;
  - reshard load: state saved by 4 ranks, read as rank 1 of a 3-rank job, replicated (all of it)
    and ZeRO-1 (parameters plus a third of the moments), vs dcp.load of the same state and vs
    `dd iflag=direct` read bandwidth. Page cache is dropped before each read where the kernel
    allows it; the output says whether it could.

    .venv/bin/python tests/bench/bench_checkpoint.py [--dir .elastune/bench] [--repeats 3] [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers import save_from_ranks

import ray
from elastune.checkpoint.checkpointer import Checkpointer, pack
from elastune.checkpoint.format import Piece
from elastune.checkpoint.layout import even_range
from elastune.checkpoint.retention import RetentionPolicy
from elastune.checkpoint.service import start_service
from elastune.checkpoint.snapshot import Snapshotter
from elastune.checkpoint.storage import Storage
from elastune.cluster import start_local_ray

MB = 1e6


def make_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"{kind}/layer{i}": torch.randn(1024, 4096, generator=g) for kind in ("model", "exp_avg", "exp_avg_sq") for i in range(4)
    }


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def dd(args: list[str]) -> float:
    out = subprocess.run(["dd", *args], capture_output=True, text=True, check=True).stderr
    nbytes, seconds = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out).groups()
    return int(nbytes) / float(seconds)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def snapshot_stall(service, state: dict[str, torch.Tensor], steps: int) -> None:
    """The stall a training loop sees when it snapshots every step: `take` after a step of a
    given length (matrix products on one thread: the core is busy and, as in training, torch
    releases the GIL for the background hand-over), checksums on and off, arms interleaved. The quickstart's per-rank share
    (0.73 MB, 35 ms steps measured) and the 200 MB state (a 400 ms step: a model that size trains slower)."""
    import elastune.checkpoint.snapshot as snapshot_module

    real = snapshot_module.block_digests

    def skipped(data, offset, length, block, algorithm):  # the "off" arm: digests of the right shape, nothing hashed
        return ["0" * 16] * max(1, -(-length // block))

    quick = {f"model/w{i}": torch.randn(n) for i, n in enumerate((49152, 16384, 32768, 65536, 17200))}  # 0.72 MB
    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    for label, held, step_s in (("quickstart share", quick, 0.035), ("200 MB state", state, 0.4)):
        pieces = {n: Piece.whole(t) for n, t in held.items()}
        size = sum(p.nbytes for p in pieces.values())
        got: dict[str, list[float]] = {"on": [], "off": []}
        snapshots = {arm: Snapshotter(service) for arm in got}
        for step in range(1, steps + 1):
            for arm in ("on", "off") if step % 2 else ("off", "on"):
                snapshot_module.block_digests = real if arm == "on" else skipped
                deadline = time.perf_counter() + step_s
                while time.perf_counter() < deadline:  # the step's compute
                    a @ a
                header = {
                    "step": step,
                    "samples_seen": step,
                    "spec_hash": "h",
                    "layout": "replicated",
                    "durable": False,
                    "meta": {},
                }
                got[arm].append(snapshots[arm].take(header, pieces, 0, 1))
        for s in snapshots.values():
            s.wait()
        snapshot_module.block_digests = real
        on, off = (statistics.median(got[a][2:]) for a in ("on", "off"))
        p90 = {a: statistics.quantiles(got[a][2:], n=10)[-1] for a in got}
        print(
            f"snapshot stall per step, {label} ({size / MB:.2f} MB, "
            f"{step_s * 1000:.0f} ms steps): checksums on {on * 1000:.3f} ms "
            f"(p90 {p90['on'] * 1000:.3f}), off {off * 1000:.3f} ms (p90 {p90['off'] * 1000:.3f}) -> on / off = {on / off:.3f} "
            f"(target <= 1.10)"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default=".elastune/bench")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60, help="steps per arm of the snapshot-stall measurement")
    args = parser.parse_args()
    root = Path(args.dir).resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29561", rank=0, world_size=1)
    state = make_state()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(f"state: {nbytes / MB:.0f} MB in {len(state)} tensors; disk of {root}")

    write_bw = statistics.median(
        dd(["if=/dev/zero", f"of={root}/dd.bin", "bs=8M", f"count={int(nbytes // 8e6)}", "oflag=direct", "conv=fsync"])
        for _ in range(args.repeats)
    )
    dcp_save, dcp_async_block = [], []
    for r in range(args.repeats + 1):  # the first async_save sets up DCP's background machinery: counted, and shown apart
        future = None

        def start_async():
            nonlocal future
            future = dcp.async_save(state, checkpoint_id=str(root / f"dcpa{r}"))

        dcp_async_block.append(timed(start_async))
        future.result()
        dcp_save.append(timed(lambda: dcp.save(state, checkpoint_id=str(root / f"dcp{r}"))))

    start_local_ray(num_cpus=2)
    service = start_service("bench", str(root / "ours"), RetentionPolicy(keep_last=1))
    snapshots = Snapshotter(service)
    held = {name: Piece.whole(t) for name, t in state.items()}
    stalls, busy_stalls, persists, parts = [], [], [], []
    for step in range(1, args.repeats + 2):  # the first take allocates the staging buffer: counted, and shown apart
        header = {"step": step, "samples_seen": step, "spec_hash": "h", "layout": "replicated", "durable": True, "meta": {}}
        stalls.append(snapshots.take(header, held, 0, 1))  # quiet machine: the copy alone
        snapshots.wait()
        report = ray.get(service.flush.remote())[-1]  # nothing else running
        persists.append(report["seconds"])
        parts.append((report["write_seconds"], report["commit_seconds"]))
        snapshots.take({**header, "step": 100 + step}, held, 0, 1)
        snapshots.wait()
        busy_stalls.append(snapshots.take({**header, "step": 200 + step}, held, 0, 1))  # while the previous one persists
        snapshots.wait()
        ray.get(service.flush.remote())
    persists = persists[1:]
    plan, buffer = pack(held)
    storage = Storage.from_uri(str(root / "raw"))
    raw_write = statistics.median(
        timed(lambda: storage.write_bytes("payload.safetensors", buffer.numpy())) for _ in range(args.repeats)
    )
    ours, first, block, block_first = (
        statistics.median(stalls[1:]),
        stalls[0],
        statistics.median(dcp_async_block[1:]),
        dcp_async_block[0],
    )
    ours_all, block_all = sum(stalls), sum(dcp_async_block)  # as many calls on each side, the first included
    sync, persist, busy = statistics.median(dcp_save), statistics.median(persists), statistics.median(busy_stalls[1:])
    print(
        f"blocking per checkpoint (both write behind): elastune {ours:.3f} s (first call {first:.3f} s; "
        f"{busy:.3f} s while the previous one persists) vs dcp.async_save {block:.3f} s (first call {block_first:.3f} s) "
        f"-> elastune / dcp.async_save = {ours / block:.3f} steady, "
        f"{ours_all / block_all:.3f} in total over every call, first calls included; "
        f"dcp.save (synchronous) {sync:.3f} s"
    )
    snapshot_stall(service, state, args.steps)
    print(
        f"durable write: dd direct {write_bw / MB:.0f} MB/s; service persist {nbytes / persist / MB:.0f} MB/s "
        f"-> {nbytes / persist / write_bw:.2f} of the disk (target >= 0.80); bare "
        f"payload write {plan.size / raw_write / MB:.0f} MB/s "
        f"-> {plan.size / raw_write / write_bw:.2f}; persist = write {statistics.median(p[0] for p in parts[1:]):.3f} s "
        f"+ commit {statistics.median(p[1] for p in parts[1:]):.3f} s"
    )
    ray.shutdown()

    save_from_ranks(Checkpointer(str(root / "resh"), keep_last=1), (1, 1, "h"), state, 4)
    dropped = drop_caches()
    read_bws = []
    whole = {n: (0, t.numel()) for n, t in state.items()}
    zero1 = {n: (0, t.numel()) if n.startswith("model/") else even_range(t.numel(), 1, 3) for n, t in state.items()}
    zero1_bytes = sum((hi - lo) * 4 for lo, hi in zero1.values())
    ours_load, ours_zero1, dcp_load = [], [], []
    for _ in range(args.repeats):
        ckpt = Checkpointer(str(root / "resh"))
        manifest = ckpt.latest()
        read_bws.append(dd([f"if={root}/dd.bin", "of=/dev/null", "bs=8M", "iflag=direct"]))
        drop_caches()
        ours_load.append(timed(lambda: ckpt.load_pieces(manifest, whole)))
        drop_caches()
        ours_zero1.append(timed(lambda: ckpt.load_pieces(manifest, zero1)))
        target = {k: torch.empty_like(v) for k, v in state.items()}
        drop_caches()
        dcp_load.append(timed(lambda: dcp.load(target, checkpoint_id=str(root / "dcp0"))))
    ol, oz, dl, read_bw = map(statistics.median, (ours_load, ours_zero1, dcp_load, read_bws))
    print(
        f"reshard load 4 -> rank 1 of 3: replicated elastune {ol:.3f} s ({nbytes / ol / MB:.0f} MB/s) vs dcp.load {dl:.3f} s "
        f"-> {dl / ol:.2f}x dcp's speed, {nbytes / ol / read_bw:.2f} of dd direct read {read_bw / MB:.0f} MB/s; "
        f"zero1 slice elastune {oz:.3f} s ({zero1_bytes / MB:.0f} MB, "
        f"{zero1_bytes / oz / MB:.0f} MB/s); page cache dropped: {dropped}"
    )
    dist.destroy_process_group()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
