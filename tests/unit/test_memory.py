"""train.memory: the bytes of training state a worker reports, against closed forms (fp32
parameters of a tiny model; AdamW's two moments and a float32 step count per tensor)."""

from __future__ import annotations

import torch

from elastune.spec.models import AdamWSpec
from elastune.train.memory import Held, held, nbytes
from elastune.train.state import TrainState
from elastune.train.step import GradBuffer
from tests.helpers import tiny_model

ADAMW = AdamWSpec(name="adamw", lr=1e-3)


def _stepped(layout: str, rank: int = 0, world: int = 1, noise: bool = False):
    model = tiny_model()
    state = TrainState.build(model, ADAMW, layout, rank, world)
    grads = GradBuffer(model, micro_batch_norms=noise)
    state.step()  # zero gradients: the moments exist from the first step
    return model, state, grads


def test_replicated_holds_the_whole_model_gradients_and_moments():
    model, state, grads = _stepped("replicated")
    params = list(model.parameters())  # the tied head counted once
    n = sum(p.numel() for p in params)
    assert held(model, state.optimizer, grads.flats) == Held(params=4 * n, grads=4 * n, optimizer=8 * n + 4 * len(params))
    # The noise scale keeps a second gradient buffer: it is memory too.
    model, state, grads = _stepped("replicated", noise=True)
    assert held(model, state.optimizer, grads.storage).grads == 8 * n


def test_zero1_divides_the_moments_and_nothing_else():
    world, n = 3, sum(p.numel() for p in tiny_model().parameters())
    moments = []
    for rank in range(world):
        model, state, grads = _stepped("zero1", rank, world)
        h = held(model, state.optimizer, grads.flats)
        assert (h.params, h.grads) == (4 * n, 4 * n)
        moments.append(h.optimizer - 4 * len(state.optimizer.inner.state))  # less a step count per slice
    assert sum(moments) == 8 * n  # each moment element on exactly one rank
    assert max(moments) <= 8 * (-(-n // world))  # and evenly: at most one rank's even share


def test_a_tensor_under_two_names_or_views_of_one_storage_count_once():
    t = torch.zeros(10)
    assert nbytes([t, t]) == 40
    assert nbytes([t[:5], t[5:]]) == 40  # two views at different offsets: both parts held
