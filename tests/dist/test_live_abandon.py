"""A live participant that gives up on a step's reduction does not leave the others waiting.

When a peer dies mid-reduction, the survivor whose transfer touched it errors and gives up; the
other survivor may be waiting for data from the first, not from the dead peer. Unless the one that
gave up closes its connections at once, the other learns only by the collective timeout (30 s,
measured in a node-loss benchmark run). Here three live groups (real torchft lighthouse and
Managers, real gloo) reduce; one of them errors before its reduction, as a survivor would. The
other two must fail the step within seconds, not the timeout, and the next quorum's step must
commit everywhere with the same reduced gradient.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import pytest
import torch

from tests.helpers import free_port

torchft = pytest.importorskip("torchft")

WORLD = 3
GIVES_UP = 1


def participant(replica: int, lighthouse: str, port: int, out) -> None:
    os.environ.update(TORCHFT_LIGHTHOUSE=lighthouse, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # Each worker is its own replica group; its store is what Ray Train's process group set-up makes.
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    from elastune.train.live import LiveGroup
    from elastune.train.state import Progress
    from elastune.train.step import GradBuffer

    model = torch.nn.Linear(64, 64)
    grads = GradBuffer(model)
    group = LiveGroup(replica, 2, None, None, None, None, Progress())
    outcomes = []
    for attempt in range(2):
        _, _, world = group.begin(Progress())
        grads.zero()
        for b in grads.buffers:
            b.fill_(float(replica + 1))
        if attempt == 0 and replica == GIVES_UP:
            group.manager.report_error(RuntimeError("a peer's connection closed"))  # what a survivor sees
        started = time.monotonic()
        committed = group.reduce(grads)
        outcomes.append((world, committed, time.monotonic() - started, grads.buffers[0][0].item()))
    out.put((replica, outcomes))
    group.close()
    del store  # held until the group is done with it


def test_a_participant_that_gives_up_fails_the_step_everywhere_at_once():
    from torchft._torchft import LighthouseServer

    from elastune.train.live import LIGHTHOUSE, TIMEOUT

    lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=WORLD, **LIGHTHOUSE)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=participant, args=(r, lighthouse.address(), free_port(), out)) for r in range(WORLD)]
    try:
        for p in procs:
            p.start()
        results = dict(out.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        lighthouse.shutdown()
    for replica, (failed, retried) in sorted(results.items()):
        world, committed, seconds, _ = failed
        assert (world, committed) == (WORLD, False), (replica, failed)
        # Well under the collective timeout: the step failed because the connections closed.
        assert seconds < 5.0 < TIMEOUT.total_seconds(), (replica, failed)
        assert retried[:2] == (WORLD, True), (replica, retried)
        assert retried[3] == sum(range(1, WORLD + 1)), (replica, retried)
