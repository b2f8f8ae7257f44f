"""Each schedule against its closed form, written out independently here."""

import math

import pytest

from elastune.spec.schedule import (
    ConstantSchedule,
    CosineSchedule,
    CyclicalSchedule,
    InverseSqrtSchedule,
    LinearSchedule,
    RexSchedule,
    WSDSchedule,
)
from elastune.train.schedules import lr_multiplier

H, W = 10_000, 1_000
POINTS = [0, 1, 500, 999, 1000, 1001, 2500, 5000, 7999, 8000, 8500, 9000, 9999, 10_000, 12_000]


def _t(s):
    return min(max((s - W) / (H - W), 0), 1)


CASES = {
    "constant": (ConstantSchedule(name="constant", warmup_samples=W), lambda s: 1.0),
    "cosine": (
        CosineSchedule(name="cosine", warmup_samples=W, min_lr_ratio=0.1),
        lambda s: 0.1 + 0.9 * (1 + math.cos(math.pi * _t(s))) / 2,
    ),
    "linear": (LinearSchedule(name="linear", warmup_samples=W), lambda s: 1 - _t(s)),
    "wsd-linear": (
        WSDSchedule(name="wsd", warmup_samples=W, decay_fraction=0.2),
        lambda s: 1.0 if _t(s) <= 0.8 else 1 - (_t(s) - 0.8) / 0.2,
    ),
    "wsd-cosine": (
        WSDSchedule(name="wsd", warmup_samples=W, decay_fraction=0.5, decay_shape="cosine", min_lr_ratio=0.2),
        lambda s: 1.0 if _t(s) <= 0.5 else 0.2 + 0.8 * (1 + math.cos(math.pi * (_t(s) - 0.5) / 0.5)) / 2,
    ),
    "wsd-sqrt": (
        WSDSchedule(name="wsd", warmup_samples=W, decay_fraction=0.2, decay_shape="sqrt"),
        lambda s: 1.0 if _t(s) <= 0.8 else 1 - math.sqrt((_t(s) - 0.8) / 0.2),
    ),
    "inverse_sqrt": (InverseSqrtSchedule(name="inverse_sqrt", warmup_samples=W), lambda s: (W / max(s, W)) ** 0.5),
    "cyclical": (
        CyclicalSchedule(name="cyclical", warmup_samples=W, cycle_samples=2000, min_lr_ratio=0.1),
        lambda s: 0.1 + 0.9 * (1 - abs(2 * (((s - W) % 2000) / 2000) - 1)),
    ),
    "rex": (RexSchedule(name="rex", warmup_samples=W), lambda s: (1 - _t(s)) / (0.5 + 0.5 * (1 - _t(s)))),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("samples", POINTS)
def test_schedule_matches_closed_form(case, samples):
    schedule, closed = CASES[case]
    expected = samples / W if samples < W else closed(samples)
    assert lr_multiplier(schedule, samples, H) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_spot_values():
    cos = CosineSchedule(name="cosine")
    assert lr_multiplier(cos, 0, 100) == 1.0
    assert lr_multiplier(cos, 50, 100) == pytest.approx(0.5)
    assert lr_multiplier(cos, 100, 100) == pytest.approx(0.0)
    rex = RexSchedule(name="rex")
    assert lr_multiplier(rex, 50, 100) == pytest.approx(0.5 / 0.75)
    tri = CyclicalSchedule(name="cyclical", cycle_samples=10, min_lr_ratio=0.0)
    assert [lr_multiplier(tri, s, 100) for s in (0, 5, 10)] == [0.0, 1.0, 0.0]
