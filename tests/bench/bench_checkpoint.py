"""Checkpoint costs against torch.distributed.checkpoint (DCP) and the disk itself, in one run.

State: ~200 MB of float32 (parameters and two Adam moments). Measured, each the median of
--repeats runs, on the disk holding --dir:
  - blocking time per checkpoint: Elastune's save (synchronous in this version) vs dcp.save and
    the time dcp.async_save blocks before returning;
  - durable write throughput of Elastune's save vs `dd oflag=direct` sequential write bandwidth;
  - load: state saved by 4 ranks, read back as a 3-rank job reads it (every rank reads the whole
    replicated state) vs dcp.load, and vs `dd iflag=direct` read bandwidth. Page cache is dropped
    before each read where the kernel allows it; the output says whether it could.

    .venv/bin/python tests/bench/bench_checkpoint.py [--dir .elastune/bench] [--repeats 3]
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
from elastune.checkpoint.checkpointer import Checkpointer  # noqa: E402
from tests.helpers import save_from_ranks  # noqa: E402

MB = 1e6


def make_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"{kind}/layer{i}": torch.randn(1024, 4096, generator=g) for kind in ("model", "exp_avg", "exp_avg_sq") for i in range(4)}


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default=".elastune/bench")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(args.dir).resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29561", rank=0, world_size=1)
    state = make_state()
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(f"state: {nbytes / MB:.0f} MB in {len(state)} tensors; disk of {root}")

    write_bw = statistics.median(dd(["if=/dev/zero", f"of={root}/dd.bin", "bs=8M", f"count={int(nbytes // 8e6)}", "oflag=direct", "conv=fsync"]) for _ in range(args.repeats))
    ours_save, dcp_save, dcp_async_block = [], [], []
    for r in range(args.repeats):
        ckpt = Checkpointer(str(root / f"ours{r}"), keep_last=1)
        ours_save.append(timed(lambda: save_from_ranks(ckpt, (1, 1, "h"), state, 1)))
        dcp_save.append(timed(lambda: dcp.save(state, checkpoint_id=str(root / f"dcp{r}"))))
        future = None

        def start_async():
            nonlocal future
            future = dcp.async_save(state, checkpoint_id=str(root / f"dcpa{r}"))

        dcp_async_block.append(timed(start_async))
        future.result()
    ours, sync, block = map(statistics.median, (ours_save, dcp_save, dcp_async_block))
    print(f"blocking per checkpoint: elastune {ours:.3f} s, dcp.save {sync:.3f} s, dcp.async_save {block:.3f} s "
          f"-> elastune / dcp.save = {ours / sync:.2f} (target <= 0.10)")  # fmt: skip
    print(f"write: elastune {nbytes / ours / MB:.0f} MB/s, dd direct {write_bw / MB:.0f} MB/s -> {nbytes / ours / write_bw:.2f} of the disk (target >= 0.80)")

    save_from_ranks(Checkpointer(str(root / "resh"), keep_last=1), (1, 1, "h"), state, 4)
    dropped = drop_caches()
    read_bw = dd([f"if={root}/dd.bin", "of=/dev/null", "bs=8M", "iflag=direct"])
    ours_load, dcp_load = [], []
    for _ in range(args.repeats):
        drop_caches()
        ckpt = Checkpointer(str(root / "resh"))
        ours_load.append(timed(lambda: ckpt.load(ckpt.latest())))
        target = {k: torch.empty_like(v) for k, v in state.items()}
        drop_caches()
        dcp_load.append(timed(lambda: dcp.load(target, checkpoint_id=str(root / "dcp0"))))
    ol, dl = statistics.median(ours_load), statistics.median(dcp_load)
    print(f"load (saved by 4, read by one of 3 ranks): elastune {ol:.3f} s ({nbytes / ol / MB:.0f} MB/s), dcp.load {dl:.3f} s, "
          f"dd direct read {read_bw / MB:.0f} MB/s -> {nbytes / ol / read_bw:.2f} of the disk; page cache dropped: {dropped}")  # fmt: skip
    dist.destroy_process_group()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
