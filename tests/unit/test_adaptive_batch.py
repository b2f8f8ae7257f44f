"""The adaptive batch's rules (train.adaptive) against closed forms, its decisions against a
problem whose critical batch is known, and the spec's refusals of what it cannot do."""

from __future__ import annotations

import math

import numpy as np
import pytest

from elastune.cli.main import main
from elastune.metrics.noise import noise_estimates
from elastune.spec import validate_spec
from elastune.train.adaptive import (
    AdaptiveBatch,
    Decision,
    Smoothed,
    Speed,
    efficiency,
    goodput_batch,
    lr_factor,
    replay_spec,
    smoothed_noise_scale,
    target_batch,
    with_decisions,
)
from elastune.train.schedules import step_values
from tests.helpers import minimal, row, spec_problems

ADAPTIVE = {"max": 96, "fraction": 1.0, "every_samples": 48}


def adaptive_job(**changes):
    """`minimal`'s job with an adaptive batch and a budget in samples, then `changes` (dotted keys)."""
    return minimal(**({"batch.adaptive": dict(ADAPTIVE), "stop": {"max_samples": 2400}} | changes))


# ---------------------------------------------------------------- the rules, in closed form


@pytest.mark.parametrize("batch", [24, 48, 96, 200])
def test_lr_factors(batch):
    s = batch / 24
    assert lr_factor("linear", 24, batch) == pytest.approx(s, rel=1e-15)
    assert lr_factor("sqrt", 24, batch) == pytest.approx(math.sqrt(s), rel=1e-15)
    assert lr_factor("none", 24, batch) == 1.0
    # AdaScale's gain (sigma^2 + mu^2) / (sigma^2 / S + mu^2) with sigma^2 = tr / 24, mu^2 = |G|^2
    trace, g2 = 37.0, 0.5
    b = trace / g2
    want = (trace / 24 + g2) / (trace / 24 / s + g2)
    assert lr_factor("adascale", 24, batch, b) == pytest.approx(want, rel=1e-12)
    assert lr_factor("adascale", 24, batch, 1e-12) == pytest.approx(1.0, rel=1e-9)  # all signal: no gain
    assert lr_factor("adascale", 24, batch, 1e15) == pytest.approx(s, rel=1e-9)  # all noise: linear
    with pytest.raises(ValueError):
        lr_factor("adascale", 24, batch)


def test_the_target_is_whole_micro_batches_within_the_bounds():
    assert target_batch(50.0, 1.0, 8, 16, 128) == 48  # 6.25 micro-batches -> 6
    assert target_batch(54.0, 1.0, 8, 16, 128) == 56  # 6.75 -> 7
    assert target_batch(50.0, 0.5, 8, 16, 128) == 24
    assert target_batch(3.0, 1.0, 8, 16, 128) == 16  # the floor
    assert target_batch(1e6, 1.0, 8, 16, 128) == 128  # the ceiling
    assert target_batch(math.inf, 1.0, 8, 16, 128) == 128


def test_smoothing_weighs_samples_not_steps():
    """One step of 2B samples moves the averages exactly as two steps of B with the same
    estimates: (1 - w)^2 = exp(-2B / tau)."""
    one, two = Smoothed(), Smoothed()
    for s in (one, two):
        s.update((10.0, 1.0), 8, 100)
    one.update((30.0, 2.0), 16, 100)
    two.update((30.0, 2.0), 8, 100)
    two.update((30.0, 2.0), 8, 100)
    assert one.trace == pytest.approx(two.trace, rel=1e-14) and one.grad_sq == pytest.approx(two.grad_sq, rel=1e-14)
    w = 1 - math.exp(-16 / 100)
    assert one.trace == pytest.approx(10 + w * 20, rel=1e-14)
    assert one.b_simple == pytest.approx(one.trace / one.grad_sq)
    assert Smoothed(trace=5.0, grad_sq=-1.0).b_simple is None  # the gradient lost in its noise: no estimate
    one.update((math.nan, 1.0), 8, 100)  # a diverged step's estimates move nothing
    one.update((1.0, math.inf), 8, 100)
    assert one.trace == pytest.approx(10 + w * 20, rel=1e-14)
    rows = [row(samples_seen=8 * i, global_batch_size=8, noise=(10.0, 1.0)) for i in (1, 2)]
    assert smoothed_noise_scale(rows, 100) == [(8, 10.0), (16, 10.0)]


# ---------------------------------------------------------------- decisions


def feed(adaptive: AdaptiveBatch, b_true, steps: int, rng, dim: int = 20, start: int = 0):
    """Steps of the batch `adaptive` trains, each measuring the noise estimates of per-sample
    gradients mu + e (|mu|^2 = 1, tr(Sigma) = b_true(samples)) split into its micro-batches, as a
    step measures them. Returns [(samples, batch)] after each step."""
    samples, out = start, []
    mu = np.ones(dim) / math.sqrt(dim)
    for _ in range(steps):
        G = step_values(adaptive.trains, samples).global_batch_size
        sigma = math.sqrt(b_true(samples) / dim)
        per_sample = mu + rng.normal(size=(G, dim)) * sigma
        m = adaptive.job.batch.micro_batch_size
        parts = [per_sample[i : i + m].mean(axis=0) for i in range(0, G, m)]
        g = per_sample.mean(axis=0)
        est = noise_estimates(sum(float(p @ p) for p in parts), len(parts) / m, len(parts), float(g @ g), G)
        samples += G
        adaptive.observe(samples, G, 1, est)
        out.append((samples, G))
    return out


def rising_noise_scale():
    """The problem whose critical batch is known: B_simple rising 40 -> 400 over 120,000 samples,
    and a job whose batch follows it (fraction 1, 32 -> 512, changes and averages over 2,000)."""
    spec = validate_spec(
        adaptive_job(
            **{
                "batch.global_batch_size": 32,
                "batch.micro_batch_size": 8,
                "batch.adaptive": {"max": 512, "fraction": 1.0, "every_samples": 2000, "smoothing_samples": 2000},
                "stop": {"max_samples": 200_000},
            }
        )
    )
    return spec, lambda s: 40 + 360 * min(1.0, s / 120_000)


def test_the_batch_tracks_a_known_critical_batch():
    """B_simple rises from 40 to 400 over the run (a loss falling); fraction 1 must follow it:
    from 20,000 samples on (ten smoothing spans), the batch within 20 % of fraction x B_simple.
    What bounds the error: the lag of averages over 2,000 samples behind a rising value, the
    rounding to micro-batches of 8, and the estimates' own noise, which an upward-only rule
    ratchets on (over 8 seeds -13 % to +10 %: tests/bench/bench_adaptive_batch.py --quadratic;
    with 1,000-sample averages in 20 dimensions, +80 %: the smoothing must span enough steps)."""
    spec, b_true = rising_noise_scale()
    adaptive = AdaptiveBatch(spec)
    history = feed(adaptive, b_true, 800, np.random.default_rng(0), dim=200)
    assert len(adaptive.decisions) >= 4
    checked = 0
    for samples, batch in history:
        if samples < 20_000 or samples > 150_000:
            continue
        want = min(512, max(32, b_true(samples)))
        assert batch == pytest.approx(want, rel=0.2), f"at {samples}"
        checked += 1
    assert checked > 100
    gaps = np.diff([0] + [d.from_samples for d in adaptive.decisions])
    assert gaps.min() >= 2000  # at most one change per every_samples
    assert all(b.global_batch_size > a.global_batch_size for a, b in zip(adaptive.decisions, adaptive.decisions[1:]))


def test_only_upward_unless_decrease():
    raw = adaptive_job(**{"batch.global_batch_size": 24, "batch.adaptive.every_samples": 48})
    falling = lambda s: 90.0 if s < 480 else 20.0  # noqa: E731
    up = AdaptiveBatch(validate_spec(raw))
    feed(up, falling, 60, np.random.default_rng(1))
    assert [d.global_batch_size for d in up.decisions][-1] >= 72  # never back down
    raw["batch"]["adaptive"]["decrease"] = True
    both = AdaptiveBatch(validate_spec(raw))
    feed(both, falling, 60, np.random.default_rng(1))
    sizes = [d.global_batch_size for d in both.decisions]
    assert max(sizes) >= 72 and sizes[-1] <= 32


def test_a_restored_state_decides_as_the_uninterrupted_rule():
    spec = validate_spec(adaptive_job(**{"batch.global_batch_size": 24}))
    b = lambda s: 30 + s / 20  # noqa: E731
    whole = AdaptiveBatch(spec)
    feed(whole, b, 80, np.random.default_rng(2))
    first = AdaptiveBatch(spec)
    cut = feed(first, b, 30, np.random.default_rng(2))
    resumed = AdaptiveBatch(spec, first.state())
    rng = np.random.default_rng(2)
    feed(AdaptiveBatch(spec), b, 30, rng)  # the same random draws up to the cut
    feed(resumed, b, 50, rng, start=cut[-1][0])
    assert resumed.decisions == whole.decisions and len(whole.decisions) >= 2


# ---------------------------------------------------------------- goodput


def test_efficiency_is_pollux_closed_form():
    assert efficiency(100.0, 16, 16) == 1.0
    assert efficiency(100.0, 16, 116) == pytest.approx(116 / 216)
    assert efficiency(0.0, 16, 64) == pytest.approx(0.25)  # no noise: a 4x batch makes a quarter of the progress per sample


@pytest.mark.parametrize("overhead, per_micro, b", [(0.1, 0.01, 400.0), (0.05, 0.02, 1000.0), (0.5, 0.001, 60.0)])
def test_goodput_picks_the_optimum_of_its_closed_form(overhead, per_micro, b):
    """goodput(M) = M / (a + g M) x (b + M0) / (b + M), g = per_micro / (m W), peaks at
    M* = sqrt(a b / g); the choice is the candidate (whole micro-batches on every rank) nearest
    it from either side, whichever has more goodput."""
    m, world, low, high = 8, 2, 16, 4096
    got = goodput_batch(b, 16, m, world, low, high, overhead, per_micro)
    best = math.sqrt(overhead * b * m * world / per_micro)
    step = m * world
    below, above = max(low, int(best // step) * step), math.ceil(best / step) * step

    def value(batch):
        return batch / (overhead + per_micro * math.ceil(batch / m / world)) * efficiency(b, 16, batch)

    assert got in (below, above) and value(got) == max(value(below), value(above))
    assert goodput_batch(b, 16, m, world, low, high, 0.0, per_micro) == low  # nothing to amortise: the smallest
    assert goodput_batch(b, 16, m, world, low, 64, overhead, per_micro) <= 64


def test_speed_is_read_from_every_ranks_figures():
    s = Speed()
    s.update([0.0, 0.0, 0.0, 0.0], 2, 32, 100)  # no figures yet
    assert s.overhead is None
    # two ranks, 3 and 2 micro-batches of 0.1 s each, steps of 0.4 s: the busiest does 0.3 s of passes
    s.update([0.8, 0.5, 5.0, 2.0], 2, 40, 100)
    assert s.per_micro == pytest.approx(0.1) and s.overhead == pytest.approx(0.1)
    s.update([0.8, 0.5, 5.0, 2.0], 3, 40, 100)  # a third rank joined: two ranks' figures of a step at 2, started over
    assert s.world == 3 and s.overhead is None


def test_goodput_decides_from_the_measured_speed():
    raw = adaptive_job(
        **{
            "batch.global_batch_size": 16,
            "batch.micro_batch_size": 8,
            "batch.adaptive": {"max": 256, "goodput": True, "every_samples": 64},
        }
    )
    a = AdaptiveBatch(validate_spec(raw))
    samples = 0
    moved = None
    for _ in range(10):  # per micro-batch 0.01 s, 0.1 s more per step; B_simple 400
        samples += 16
        moved = a.observe(samples, 16, 2, (400.0, 1.0), [2 * 0.12, 2 * 0.01, 2.0, 2.0]) or moved
    assert moved is not None and moved.global_batch_size == goodput_batch(400.0, 16, 8, 2, 16, 256, 0.1, 0.01)
    assert moved.global_batch_size > 16


# ---------------------------------------------------------------- decisions as phases


def test_decisions_merge_into_the_jobs_phases():
    raw = adaptive_job(
        **{
            "optimizer.lr": 0.01,
            "phases": [
                {"from_samples": 96, "weight_decay": 0.2},
                {"from_samples": 480, "lr": 0.004},
                {"from_samples": 960, "schedule": {"name": "cosine"}},
            ],
        }
    )
    spec = validate_spec(raw)
    decisions = [Decision(96, 48, 2.0, 50.0), Decision(720, 96, 4.0, 99.0)]
    merged = with_decisions(spec, decisions)
    got = [p.model_dump(exclude_none=True) for p in merged.phases]
    assert got[0] == {"from_samples": 96, "weight_decay": 0.2, "global_batch_size": 48, "lr": 0.02}
    assert got[1] == {"from_samples": 480, "lr": 0.004 * 2.0}  # the job's own lr, under the factor in force
    assert got[2] == {"from_samples": 720, "global_batch_size": 96, "lr": 0.004 * 4.0}
    assert got[3]["from_samples"] == 960 and "lr" not in got[3] and got[3]["schedule"]["name"] == "cosine"
    assert merged.batches.at(95) == 24 and merged.batches.at(96) == 48 and merged.batches.at(720) == 96
    replay = validate_spec(replay_spec(spec, decisions))
    assert replay.batch.adaptive is None and replay.name == "t-replay" and replay.phases == merged.phases
    for samples in (0, 100, 500, 800, 1000, 2000):
        assert step_values(replay, samples) == step_values(merged, samples)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "changes, field, fix",
    [
        ({"batch.adaptive.max": 42}, "batch.adaptive.max = 42", "use 40 or 44"),
        ({"batch.adaptive.min": 64, "batch.adaptive.max": 48}, "batch.adaptive.min = 64", "raise adaptive.max or lower"),
        ({"batch.adaptive.min": 48}, "batch.global_batch_size = 24", "start at adaptive.min or lower it"),
        ({"batch.adaptive.min": 8, "batch.adaptive.max": 16}, "batch.global_batch_size = 24", "or raise adaptive.max"),
        ({"batch.global_batch_size": 26, "batch.adaptive.min": 24}, "batch.global_batch_size = 26", "use 24 or 28"),
        ({"stop": {"max_steps": 10}}, "stop.max_steps = 10", "set stop.max_samples instead"),
        ({"phases": [{"from_samples": 48, "global_batch_size": 48}]}, "phases.0.global_batch_size = 48", "remove one"),
        ({"metrics.noise_scale": False}, "metrics.noise_scale = false", "remove metrics.noise_scale: false"),
        ({"scaling.layout": "fsdp"}, "scaling.layout = fsdp", "set scaling.layout: replicated or zero1"),
        ({"batch.adaptive.min": 4, "batch.global_batch_size": 4}, "batch.adaptive.min = 4", "raise batch.adaptive.min to 8"),
        (
            {"scaling.max_workers": 4, "batch.global_batch_size": 32, "batch.micro_batch_size": 8, "batch.adaptive.min": 16},
            "batch.adaptive.min = 16",
            "raise batch.adaptive.min to 32",
        ),
        (
            {"tune": {"interval_samples": 96, "search": {"batch.global_batch_size": {"scale": "choice", "choices": [24, 48]}}}},
            "tune.search.batch.global_batch_size = searched",
            "search batch.adaptive.fraction or batch.adaptive.max instead",
        ),
        (
            {"tune": {"mode": "wsd_branches", "budgets": [480]}, "schedule": {"name": "wsd"}},
            "tune.mode = wsd_branches",
            "use tune.mode: pbt",
        ),
        ({"batch.adaptive.lr_scaling": "cubic"}, "batch.adaptive.lr_scaling = 'cubic'", "use one of the listed values"),
    ],
)
def test_what_an_adaptive_batch_cannot_do_is_refused_with_the_fix(changes, field, fix):
    msg = spec_problems(adaptive_job(**changes))
    assert field in msg and fix in msg, msg


@pytest.mark.parametrize("missing", ["fraction", "every_samples", "max"])
def test_a_rule_without_its_parameters_exits_2_naming_them(tmp_path, capsys, missing):
    import yaml

    raw = adaptive_job()
    del raw["batch"]["adaptive"][missing]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    assert main(["validate", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr()
    text = err.out + err.err
    assert f"batch.adaptive.{missing} = " in text and "fix:" in text and "Traceback" not in text


def test_searching_the_rule_needs_the_rule():
    raw = minimal(tune={"interval_samples": 96, "search": {"batch.adaptive.fraction": {"scale": "log", "low": 0.1, "high": 1}}})
    msg = spec_problems(raw)
    assert "tune.search.batch.adaptive.fraction = searched" in msg and "add batch.adaptive" in msg


def test_max_steps_on_the_command_line_is_refused_for_an_adaptive_job(tmp_path, capsys):
    import yaml

    (tmp_path / "job.yaml").write_text(yaml.safe_dump(adaptive_job()))
    assert main(["run", str(tmp_path / "job.yaml"), "--max-steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "--max-steps (5) cannot stop a job with batch.adaptive" in err and "lower stop.max_samples" in err


def test_goodput_takes_no_fraction():
    raw = adaptive_job(**{"batch.adaptive.goodput": True})
    msg = spec_problems(raw)
    assert "batch.adaptive.fraction = 1.0" in msg and "remove fraction, or goodput" in msg
    del raw["batch"]["adaptive"]["fraction"]
    assert validate_spec(raw).batch.adaptive.goodput


def test_the_default_lr_rule_follows_the_optimizer():
    from elastune.train.adaptive import lr_rule

    assert lr_rule(validate_spec(adaptive_job())) == "sqrt"
    assert lr_rule(validate_spec(adaptive_job(optimizer={"name": "sgd", "lr": 0.1}))) == "linear"
    assert lr_rule(validate_spec(adaptive_job(**{"batch.adaptive.lr_scaling": "adascale"}))) == "adascale"


# ---------------------------------------------------------------- a search member's adaptive batch


def test_a_member_changes_its_batch_only_at_boundaries_to_batches_that_divide_them():
    from elastune.train.adaptive import aligned

    assert aligned(50, 8, 16, 256, 960) == 48  # 960's divisors among 16, 24, ..., 256: 16, 24, 32, 40, 48, 64, 80, 96, ...
    assert aligned(56, 8, 16, 256, 960) == 48  # 56 and 72 do not divide it: 48 and 64 are nearest, the smaller on a tie
    assert aligned(500, 8, 16, 256, 960) == 240
    spec = validate_spec(adaptive_job(**{"batch.global_batch_size": 24, "stop": {"max_samples": 2880}}))
    a = AdaptiveBatch(spec, boundaries=(960, 1920, 2880))
    history = feed(a, lambda s: 30 + s / 10, 110, np.random.default_rng(3))
    assert a.decisions and all(d.from_samples in (960, 1920) for d in a.decisions)
    assert all(960 % d.global_batch_size == 0 for d in a.decisions)
    assert all(s % 960 == 0 for s, _ in history if s in (960, 1920)) and {960, 1920} <= {s for s, _ in history}


def test_a_member_follows_its_values_and_its_history_replays():
    """The population's values (a searched fraction and peak lr) rebase the member's phases; the
    best lineage's spec (tune.population.replay_spec) trains the batches and lrs it did."""
    from elastune.tune.population import member_spec, replay_spec

    raw = validate_spec(
        adaptive_job(
            **{
                "batch.global_batch_size": 24,
                "stop": {"max_samples": 2880},
                "tune": {"interval_samples": 960, "search": {"batch.adaptive.fraction": {"scale": "log", "low": 0.5, "high": 2}}},
            }
        )
    ).to_dict()
    first = {"optimizer.lr": 0.001, "batch.global_batch_size": 24, "batch.adaptive.fraction": 1.0}
    later = {"optimizer.lr": 0.002, "batch.global_batch_size": 24, "batch.adaptive.fraction": 0.5}
    member = validate_spec(member_spec(raw, first))
    assert member.batch.adaptive.fraction == 1.0 and member.tune is None
    a = AdaptiveBatch(member, base=member, boundaries=(960, 1920, 2880))
    a.decisions = [Decision(960, 48, math.sqrt(2), 51.0)]
    trains = a.rebase(validate_spec(member_spec(raw, later)))
    assert a.a.fraction == 0.5 and {p.from_samples: p.lr for p in trains.phases} == {960: pytest.approx(0.002 * math.sqrt(2))}
    history = [{"from_samples": 0, "values": first}, {"from_samples": 1920, "values": later}]
    replay = validate_spec(replay_spec(raw, history, [[960, 48, math.sqrt(2), 51.0]]))
    assert replay.batch.adaptive is None and replay.name == "t-best"
    assert replay.batches.at(959) == 24 and replay.batches.at(960) == 48 and replay.batches.at(2000) == 48
    phase = {p.from_samples: p for p in replay.phases}
    assert phase[960].lr == pytest.approx(0.001 * math.sqrt(2)) and phase[1920].lr == pytest.approx(0.002 * math.sqrt(2))
