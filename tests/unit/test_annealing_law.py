"""The annealing loss law (tune.annealing) against its closed form: fitted to curves it made
itself, it recovers its constants and predicts where each schedule ends."""

from __future__ import annotations

import math

import numpy as np
import pytest

from elastune.spec.schedule import CosineSchedule, WSDSchedule
from elastune.train.schedules import lr_multiplier
from elastune.tune.annealing import AnnealingLaw, areas, fit, predicted_final_losses

N = 1000
TRUE = AnnealingLaw(l0=2.0, a=1.5, alpha=0.5, c=0.002)
WSD = [0.01 * lr_multiplier(WSDSchedule(name="wsd", decay_fraction=0.2), i, N) for i in range(1, N + 1)]
COSINE = [0.02 * lr_multiplier(CosineSchedule(name="cosine"), i, N) for i in range(1, N + 1)]


def test_areas_match_their_definitions():
    lrs = np.array([1.0, 1.0, 0.5, 0.25])
    s1, s2 = areas(lrs, momentum=0.5)
    assert s1.tolist() == [1.0, 2.0, 2.5, 2.75]
    # m: 0, 0, 0.5, 0.5*0.5 + 0.25 = 0.5; S2 sums them
    assert s2.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0])


def test_a_joint_fit_recovers_the_law_and_predicts_each_schedules_end():
    curves = {"wsd": (WSD[:500], list(TRUE.predict(WSD)[:500])), "cosine": (COSINE[:500], list(TRUE.predict(COSINE)[:500]))}
    law = fit(list(curves.values()))
    assert (law.l0, law.a, law.alpha, law.c) == pytest.approx((TRUE.l0, TRUE.a, TRUE.alpha, TRUE.c), rel=1e-6)
    # WSD has not decayed yet at step 500: the cosine member's curve tells how much its decay will give.
    predicted = predicted_final_losses(curves, {"wsd": WSD[500:], "cosine": COSINE[500:]})
    assert predicted["wsd"] == pytest.approx(TRUE.predict(WSD)[-1], rel=1e-6)
    assert predicted["cosine"] == pytest.approx(TRUE.predict(COSINE)[-1], rel=1e-6)


def test_a_diverged_member_ranks_last():
    good = (COSINE[:100], list(TRUE.predict(COSINE)[:100]))
    bad = (COSINE[:100], [math.nan] * 100)
    predicted = predicted_final_losses({"good": good, "bad": bad}, {"good": COSINE[100:], "bad": COSINE[100:]})
    assert predicted["bad"] == math.inf and math.isfinite(predicted["good"])
