"""Live recovery (`scaling.recovery: live`), the issue's 3 -> 2 -> 3 numerics test: three workers
train; rank 1 is SIGKILLed in the middle of step 10; the two survivors run step 10 again at once
with the same global batch; a straggling step 20 gives Ray Train's replacement time to start, and
from step 21 three workers train again. Against an uninterrupted 3-worker run: the same loss at
every step (1e-5 relative), the same final parameters (1e-5), and every step read exactly the
samples the stateless sampler puts there, once."""

from __future__ import annotations

import pytest

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.data.dataset import TokenWindows
from elastune.data.sampler import positions, sample_indices, tally
from tests.helpers import rel_err
from tests.ray.test_resume_world_size import run, spec_for

STEPS, KILL_AT, HOLD_AT = 28, 10, 20
G = 12  # spec_for's global batch


def live_spec(tmp, data, name, faults):
    raw = spec_for(tmp, data, name, 3, STEPS).to_dict()
    raw["scaling"] |= {"min_workers": 2, "max_workers": 3, "recovery": "live"}
    raw["schedule"]["horizon_samples"] = G * STEPS
    raw["faults"] = faults
    return spec_for(tmp, data, name, 3, STEPS).model_validate(raw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, stdlib_dataset):
    tmp = tmp_path_factory.mktemp("live")
    reference_spec = spec_for(tmp, stdlib_dataset, "uninterrupted", 3, STEPS)
    reference_spec = reference_spec.model_validate({**reference_spec.to_dict(), "schedule": {**reference_spec.to_dict()["schedule"], "horizon_samples": G * STEPS}})
    _, reference, _ = run(reference_spec)
    faults = [
        {"action": "kill_rank", "rank": 1, "at_step": KILL_AT, "point": "mid"},
        # A straggler long enough for the replacement to start (Ray Train notices the dead worker
        # within its 2 s health check and starts another in a few seconds): it joins after step 20.
        {"action": "delay_rank", "rank": 0, "at_step": HOLD_AT, "seconds": 20},
    ]
    spec = live_spec(tmp, stdlib_dataset, "live", faults)
    _, rows, events = run(spec)
    return tmp, stdlib_dataset, reference_spec, spec, reference, rows, events


def test_every_step_once_with_the_uninterrupted_losses(runs):
    *_, reference, rows, _ = runs
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["world_size"] for r in rows] == [3] * (KILL_AT - 1) + [2] * (HOLD_AT - KILL_AT + 1) + [3] * (STEPS - HOLD_AT)
    assert all(r["global_batch_size"] == G for r in rows)
    for want, got in zip(reference, rows):
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), f"step {got['step']}"


def test_every_sample_read_once_where_the_sampler_puts_it(runs):
    _, data, _, spec, _, rows, _ = runs
    n = len(TokenWindows(data))
    for r in rows:
        want = tally(sample_indices(positions(r["samples_seen"] - G, 0, G), n, spec.seed))
        assert tuple(r["sample_tally"]) == want, f"step {r['step']}: read {r['sample_tally']}, the sampler says {want}"


def test_final_parameters_match(runs):
    _, _, reference_spec, spec, *_ = runs
    want_manifest, want = Checkpointer(reference_spec.checkpoint_path).load_latest_valid()
    got_manifest, got = Checkpointer(spec.checkpoint_path).load_latest_valid()
    assert got_manifest.step == want_manifest.step == STEPS
    assert set(got) == set(want)
    for name in want:
        assert rel_err(got[name], want[name]) <= 1e-5, name


def test_survivors_carry_on_and_the_replacement_joins(runs):
    *_, events = runs
    joins = [e for e in events if e["kind"] == "join"]
    assert sorted(e["replica"] for e in joins) == [0, 1, 1, 2]  # survivors never restarted; one replacement for 1
    replacement = max((e for e in joins if e["replica"] == 1), key=lambda e: e["time"])
    assert replacement["resumed_from_tier"] == 0 and KILL_AT <= replacement["step"] <= HOLD_AT
    (recovery,) = [e for e in events if e["kind"] == "recovery"]
    assert recovery["recovery"] == "live" and recovery["cause"].startswith("fault: kill rank 1 at step 10")
    assert (recovery["world_size_before"], recovery["world_size_after"], recovery["resumed_from_step"]) == (3, 2, KILL_AT - 1)
    assert recovery["lost_steps"] == 0 and recovery["lost_samples"] == 0 and recovery["micro_batches"] == [3, 3]
    assert 0 <= recovery["detection_seconds"] <= recovery["mttr_seconds"]
    (resize,) = [e for e in events if e["kind"] == "resize"]
    assert (resize["world_size_before"], resize["world_size_after"], resize["step"]) == (2, 3, HOLD_AT)
    assert resize["micro_batches"] == [2, 2, 2] and resize["global_batch_size"] == G
