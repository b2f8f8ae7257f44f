"""Shared test helpers: tiny models, specs, and independent reference computations."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from elastune.errors import SpecError
from elastune.recipes.gpt import GPT, sample_losses
from elastune.spec import validate_spec
from elastune.spec.models import ByteGPTOptions

ROOT = Path(__file__).resolve().parents[1]

TINY = ByteGPTOptions(num_layers=1, width=16, num_heads=2, context=16, dropout=0.0)


class RandomTokens:
    """A SampleSource of fixed random windows (deterministic from its seed)."""

    def __init__(self, n: int = 97, window: int = 17, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, 256, (n, window), generator=g)

    def __len__(self) -> int:
        return len(self.data)

    def take(self, indices: np.ndarray) -> torch.Tensor:
        return self.data[torch.as_tensor(indices)]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (a process group's store, a server under test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(options: ByteGPTOptions = TINY, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(options)


def adam_state(steps: int = 2) -> dict[str, torch.Tensor]:
    """A tiny model's state after `steps` AdamW updates, as named tensors (model/..., optim/...)."""
    from elastune.spec.models import AdamWSpec
    from elastune.train.optim import build_optimizer
    from elastune.train.state import TrainState, state_tensors

    model = tiny_model()
    opt = build_optimizer(model, AdamWSpec(name="adamw", lr=1e-2))
    for _ in range(steps):
        model(torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))).sum().backward()
        opt.step()
    return state_tensors(TrainState(model, opt))


def reference_sgd_update(model, source, indices: np.ndarray, lr: float) -> dict[str, torch.Tensor]:
    """Single process, one forward over the whole global batch, mean loss, plain SGD."""
    model.train()
    model.zero_grad()
    sample_losses(model, source.take(indices)).mean().backward()
    with torch.no_grad():
        return {n: p - lr * p.grad for n, p in model.named_parameters()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error |a - b| / |b| (elementwise relative error is meaningless near 0)."""
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()).clamp_min(1e-30))


def save_from_ranks(ckpt, manifest_args: tuple, tensors: dict[str, torch.Tensor], world: int):
    """Save as `world` ranks would, in one process: ranks 1.. write first, then rank 0 gathers
    their entries and commits. Returns rank 0's SaveReport."""
    from elastune.checkpoint.format import Manifest

    parts: dict[int, str] = {}
    for rank in range(world - 1, 0, -1):
        ckpt.save(Manifest(*manifest_args, {}, {}), tensors, rank, world, gather=lambda s, r=rank: parts.setdefault(r, s) and [])
    return ckpt.save(
        Manifest(*manifest_args, {}, {}), tensors, 0, world, gather=lambda s: [s] + [parts[r] for r in range(1, world)]
    )


def report_in_chromium(chromium: str, report_of: Path, tmp: Path) -> str:
    """`elastune report` of a run or search directory, opened in headless Chromium: the page
    fetches nothing, logs no console message and draws (its screenshot is not blank and holds
    the plots' colours). Returns the rendered DOM."""
    from PIL import Image

    page = tmp / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "elastune", "report", str(report_of), "--output", str(page)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    text = page.read_text()
    assert (
        "<script" not in text and "<link" not in text and not re.search(r'(src|href)="(https?:|file:|//)', text)
    )  # nothing to fetch
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    shot = subprocess.run(
        [chromium, *flags, "--window-size=1200,1800", f"--screenshot={tmp / 'report.png'}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "CONSOLE" not in dom.stderr + shot.stderr, "console messages: " + (dom.stderr + shot.stderr)[-2000:]
    image = Image.open(tmp / "report.png").convert("RGB")
    area = image.width * image.height
    drawn = sum(count for value, count in enumerate(image.convert("L").histogram()) if value < 200)
    assert drawn > 0.01 * area  # lines, axes and text, not a blank page
    saturation = image.convert("HSV").getchannel("S").histogram()
    assert sum(saturation[80:]) > 0.001 * area  # the plots' coloured lines drew (text and tables are grey)
    return dom.stdout


def start_ranks(fn, args: tuple, world: int) -> None:
    """Run fn(rank, *args) in `world` processes and wait for them (torch.multiprocessing), forked
    from a server process that imported torch and the training code once: a rank starts in tens
    of milliseconds instead of seconds of imports, and never inherits the test process's threads."""
    import multiprocessing

    import torch.multiprocessing as mp

    # Preloading only matters before the server starts (the first call); the caller's own module
    # is the one every test here runs its ranks from.
    # torch._dynamo: the first optimizer a process builds imports it (2 s).
    multiprocessing.set_forkserver_preload(
        ["torch", "torch._dynamo", "torch.distributed", "elastune.train.step", "tests.helpers", fn.__module__]
    )
    mp.start_processes(fn, args=args, nprocs=world, start_method="forkserver")


@contextlib.contextmanager
def small_disk(path: Path, size_bytes: int):
    """A real filesystem of `size_bytes` at `path` (tmpfs), to run out of space on; the test is
    skipped, saying why, where mounting is not allowed (it needs root or CAP_SYS_ADMIN)."""
    import pytest

    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a {size_bytes}-byte tmpfs to fill ({mounted.stderr.strip() or 'mount failed'}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def minimal(**changes):
    """A small valid job spec (a dict), with `changes` at dotted keys."""
    spec = {
        "name": "t",
        "model": {"recipe": "byte_gpt", "options": {"context": 16, "width": 16, "num_heads": 2}},
        "data": {"path": "d", "window": 17},
        "batch": {"global_batch_size": 24, "micro_batch_size": 4},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "stop": {"max_steps": 10},
    }
    for dotted, value in changes.items():
        node = spec
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return spec


def spec_problems(raw) -> str:
    """The message validate_spec refuses `raw` with (it must refuse it)."""
    with pytest.raises(SpecError) as info:
        validate_spec(raw, source="job.yaml")
    return info.value.message


def dashboard_queries(name: str) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target of dashboards/grafana/elastune-NAME.json,
    template variables matching everything."""
    d = json.loads((ROOT / "dashboards" / "grafana" / f"elastune-{name}.json").read_text())
    return [(p["title"], t["expr"].replace("$job", ".*").replace("$run", ".*")) for p in d["panels"] for t in p["targets"]]


def ev(kind: str, **fields):
    """A typed event from the fields a test names (the others None, as a version-1 line reads)."""
    from elastune.events import event_from_json

    return event_from_json({"kind": kind, **fields}, format=1)


def row(**fields):
    """A typed metrics row from the fields a test names (the others None)."""
    from elastune.events import row_from_json

    return row_from_json(fields, format=1)


def derived(tracker, events, rows):
    """What a RecoveryTracker adds to a drain: its output after the events it was given."""
    return tracker.observe(events, rows)[len(events) :]


class Clock:
    """An injected clock: returns the given times in turn, then the last one until `set`."""

    def __init__(self, *times: float):
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0) if len(self.times) > 1 else self.times[0]

    def set(self, t: float) -> None:
        self.times = [t]
