"""WSD decay branches (tune.branches): fork points, the schedule equivalence that makes a branch
the WSD run of its budget (closed form), and the searcher's trunk -> clone -> branch flow on
real storage."""

from __future__ import annotations

import pytest
import torch

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.format import Manifest
from elastune.errors import SpecError
from elastune.spec import validate_spec
from elastune.train.schedules import step_values
from elastune.tune.branches import BranchSearcher, branch_spec, fork_points
from elastune.tune.search import SearchPlan
from tests.helpers import minimal, spec_problems

G = 24


def branched(budgets, warmup=48, fraction=0.25):
    raw = minimal(stop={"max_samples": 2400}, schedule={"name": "wsd", "warmup_samples": warmup, "decay_fraction": fraction})
    raw["tune"] = {"mode": "wsd_branches", "budgets": budgets}
    return validate_spec(raw)


def test_fork_points_are_the_last_step_boundary_before_each_decay():
    # decay starts at 48 + 0.75 * (budget - 48): 768 -> 588 (fork 576), 1536 -> 1164 (fork 1152), 2400 -> 1812 (fork 1800)
    assert fork_points(branched([768, 1536, 2400])) == [(576, 768), (1152, 1536), (1800, 2400)]
    with pytest.raises(SpecError, match="within the warmup"):
        fork_points(branched([72], warmup=48, fraction=0.9))


def test_trunk_then_branch_follow_the_wsd_schedule_of_the_branchs_budget():
    spec = branched([768, 1536, 2400])
    plan = SearchPlan(spec.to_dict(), "/nowhere")
    wsd = spec.to_dict()["schedule"]
    trunk = validate_spec(branch_spec(plan, "trunk", "/r", 1800, {"name": "constant", "warmup_samples": wsd["warmup_samples"]}))
    for fork, budget in fork_points(spec):
        branch = validate_spec(branch_spec(plan, f"b{budget}", "/r", budget, {**wsd, "horizon_samples": budget}))
        alone = validate_spec({**spec.to_dict(), "tune": None, "stop": {"max_samples": budget}})  # the WSD run of this budget
        for samples in range(0, budget, G):
            got = trunk if samples < fork else branch
            assert step_values(got, samples).lr == pytest.approx(step_values(alone, samples).lr, rel=1e-12), (budget, samples)


def test_the_searcher_forks_each_branch_from_a_clone_of_the_trunk(tmp_path):
    spec = branched([768, 1536])
    searcher = BranchSearcher(SearchPlan(spec.to_dict(), str(tmp_path)))
    (trunk,) = [searcher.suggest("t0")]
    assert searcher.suggest("t1") is None  # nothing else until the trunk reaches the first fork
    assert (trunk["member"], trunk["from_samples"], trunk["to_samples"]) == ("trunk", 0, 576)

    def finish(trial, config):
        root = Checkpointer(config["spec"]["checkpoint"]["path"])
        root.save(
            Manifest(config["to_samples"] // G, config["to_samples"], "h", {}, {}),
            {"model/w": torch.full((3,), float(config["to_samples"]))},
        )
        searcher.on_trial_complete(trial, {"fitness": 1.0 / config["to_samples"], "loss": 0.0, "run_dir": "/runs/x"})

    finish("t0", trunk)
    branch, trunk2 = searcher.suggest("b0"), searcher.suggest("t1")
    assert (branch["member"], branch["from_samples"], branch["to_samples"]) == ("b768", 576, 768)
    assert (trunk2["member"], trunk2["from_samples"], trunk2["to_samples"]) == ("trunk", 576, 1152)
    clone = Checkpointer(branch["spec"]["checkpoint"]["path"])
    assert clone.latest().samples_seen == 576 and clone.load(clone.latest())["model/w"].tolist() == [576.0] * 3
    assert not list((tmp_path / "checkpoints" / "branch-768").rglob("*.safetensors"))  # a clone: no byte copied
    assert branch["spec"]["schedule"]["horizon_samples"] == 768 and trunk2["spec"]["schedule"]["name"] == "constant"
    finish("b0", branch)
    finish("t1", trunk2)
    last = searcher.suggest("b1")
    assert (last["member"], last["from_samples"], last["to_samples"]) == ("b1536", 1152, 1536)
    assert searcher.suggest("x") is None
    finish("b1", last)
    assert searcher.suggest("y") == "FINISHED"
    record = searcher.record
    assert [b["budget"] for b in record["branches"]] == [768, 1536]
    # trained: trunk 1152 + decays 192 + 384 = 1728 samples, 1.125x one run of 1536
    assert (record["samples_trained"], record["cost_vs_one_run"]) == (1728, 1.125)


@pytest.mark.parametrize(
    "tune, words",
    [
        ({"mode": "wsd_branches"}, ["needs tune.budgets"]),
        ({"mode": "wsd_branches", "budgets": [960, 480]}, ["must ascend"]),
        (
            {"mode": "wsd_branches", "budgets": [480], "search": {"optimizer.lr": {"scale": "log", "low": 0.001, "high": 0.01}}},
            ["remove tune.search"],
        ),
        ({"mode": "wsd_branches", "budgets": [4800]}, ["beyond the job's stop"]),
    ],
)
def test_bad_branch_searches_are_refused(tune, words):
    raw = minimal(stop={"max_samples": 2400}, schedule={"name": "wsd"})
    raw["tune"] = tune
    problems = spec_problems(raw)
    assert all(w in problems for w in words), problems


def test_branches_need_a_wsd_schedule():
    raw = minimal(stop={"max_samples": 2400}, schedule={"name": "cosine"})
    raw["tune"] = {"mode": "wsd_branches", "budgets": [480]}
    assert "set schedule.name: wsd" in spec_problems(raw)
