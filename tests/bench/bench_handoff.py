"""What one snapshot hand-off costs, by transport: CPU on the worker's side and the service's side
per call, and wall time, for a payload of the quickstart's size (one rank's share, 724 KB).

- "object store": the payload as one argument (Ray puts it in the object store) that the service
  copies into an object of its own (what the service did before payloads travelled inline);
- "inline chunks": snapshot.chunks_of, arguments below Ray's inline limit, joined in the
  service's memory (what it does now up to snapshot.INLINE_BYTES);
- "empty call": the same call without a payload: the floor any per-step call pays.

    .venv/bin/python tests/bench/bench_handoff.py [--calls 300]
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import ray
from elastune.checkpoint.snapshot import chunks_of

PAYLOAD_BYTES = 724_004


@ray.remote(num_cpus=0)
class Holder:
    def __init__(self) -> None:
        self.kept = None

    def stage(self, meta: dict, *chunks) -> None:
        if len(chunks) == 1:
            self.kept = ray.put(chunks[0])
        elif chunks:
            self.kept = b"".join(chunks)

    def cpu(self) -> float:
        return sum(os.times()[:2])


def measure(holder, meta: dict, chunks: tuple, calls: int) -> tuple[float, float, float]:
    import time

    for _ in range(20):
        ray.get(holder.stage.remote(meta, *chunks))
    theirs, ours, t = ray.get(holder.cpu.remote()), sum(os.times()[:2]), time.perf_counter()
    for _ in range(calls):
        ray.get(holder.stage.remote(meta, *chunks))
    wall = time.perf_counter() - t
    return wall / calls * 1e3, (sum(os.times()[:2]) - ours) / calls * 1e3, (ray.get(holder.cpu.remote()) - theirs) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    holder = Holder.remote()
    payload = np.zeros(PAYLOAD_BYTES, dtype=np.uint8)
    meta = {"step": 1, "entries": {f"t{i}": {"fragments": [{"xxh3": ["0" * 16]}]} for i in range(30)}}
    print(f"{'transport':<16} {'wall ms':>8} {'worker CPU ms':>14} {'service CPU ms':>15}")
    for name, chunks in (("object store", (payload,)), ("inline chunks", chunks_of(payload, PAYLOAD_BYTES)), ("empty call", ())):
        wall, ours, theirs = measure(holder, meta, chunks, args.calls)
        print(f"{name:<16} {wall:8.2f} {ours:14.2f} {theirs:15.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
