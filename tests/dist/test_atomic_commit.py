"""Killing the writer at any moment never leaves a checkpoint that loads as valid but torn.

A forked child saves checkpoint 2 (several MB, fsynced) over a root that holds checkpoint 1;
the parent SIGKILLs it after a random delay spanning the whole save (and a little after), 60 times. After every kill,
the newest loadable checkpoint is either 1 or 2 and its tensors are exactly what was saved.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time

import torch

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.format import step_dir
from tests.helpers import save_from_ranks

KILLS = 60


def state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {f"t{i}": torch.randn(64, 1024, generator=g) for i in range(12)}  # 3 MB


def save(root: str, step: int) -> None:
    save_from_ranks(Checkpointer(root, keep_last=1), (step, step, "h"), state(step), world=3)


def test_kill_at_random_points_never_tears(tmp_path):
    ctx = mp.get_context("fork")
    rng = random.Random(0)
    # Time a whole child save (fork included) so the kills spread over all of it on this machine.
    save(str(tmp_path / "timing"), 1)
    started = time.perf_counter()
    child = ctx.Process(target=save, args=(str(tmp_path / "timing"), 2))
    child.start()
    child.join()
    duration = time.perf_counter() - started
    outcomes = {1: 0, 2: 0}
    for trial in range(KILLS):
        root = str(tmp_path / f"r{trial}")
        save(root, 1)
        child = ctx.Process(target=save, args=(root, 2))
        child.start()
        time.sleep(rng.uniform(0, duration * 1.5))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        manifest, tensors = Checkpointer(root).load_latest_valid()
        assert manifest.step in (1, 2)
        expected = state(manifest.step)
        assert set(tensors) == set(expected)
        for name, t in expected.items():
            assert torch.equal(tensors[name], t), (trial, manifest.step, name)
        outcomes[manifest.step] += 1
        assert not any(p.endswith(".tmp") for p in os.listdir(os.path.join(root, step_dir(manifest.step))))
    # The kills really landed on both sides of the commit.
    assert outcomes[1] >= 5 and outcomes[2] >= 5, outcomes
