"""The population's bookkeeping (tune.population) and the phases that replay a lineage
(JobSpec.phases, train.schedules.step_values): closed forms and hand-worked cases."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch

from elastune.checkpoint.checkpointer import Checkpointer
from elastune.checkpoint.format import Manifest
from elastune.errors import SpecError
from elastune.spec import validate_spec
from elastune.train.schedules import lr_multiplier, step_values
from elastune.tune.lineage import read_lineage
from elastune.tune.population import Member, base_values, check_space, decide, fitness, initial_values, member_spec, replay_spec
from tests.helpers import minimal, row, spec_problems


def tuned(**search):
    raw = minimal(stop={"max_samples": 2400}, schedule={"name": "wsd", "warmup_samples": 48, "decay_fraction": 0.3})
    raw["tune"] = {"population": 4, "interval_samples": 480, "quantile": 0.25, "search": search}
    return validate_spec(raw)


LR = {"scale": "log", "low": 1e-4, "high": 1e-2}


def test_initial_values_draw_every_searched_value_in_range_and_keep_the_rest():
    spec = tuned(**{"optimizer.lr": LR, "schedule.name": {"scale": "choice", "choices": ["cosine", "rex"]}})
    members = initial_values(spec, random.Random(0))
    assert len(members) == 4
    for values in members:
        assert 1e-4 <= values["optimizer.lr"] <= 1e-2 and values["schedule.name"] in ("cosine", "rex")
        assert values["batch.global_batch_size"] == 24
    assert initial_values(spec, random.Random(0)) == members  # seeded: a search replays


def test_a_family_change_keeps_warmup_and_drops_fields_the_family_lacks():
    spec = tuned(
        **{
            "schedule.name": {"scale": "choice", "choices": ["cosine", "wsd"]},
            "schedule.decay_fraction": {"scale": "linear", "low": 0.1, "high": 0.5},
        }
    )
    raw = spec.to_dict()
    cosine = member_spec(raw, base_values(spec) | {"schedule.name": "cosine", "schedule.decay_fraction": 0.4})
    assert cosine["schedule"] == {"name": "cosine", "warmup_samples": 48}
    wsd = member_spec(raw, base_values(spec) | {"schedule.name": "wsd", "schedule.decay_fraction": 0.4})
    assert wsd["schedule"]["decay_fraction"] == 0.4 and wsd["schedule"]["warmup_samples"] == 48
    assert "tune" not in wsd
    validate_spec(cosine), validate_spec(wsd)


def test_fitness_is_the_mean_loss_over_the_window_and_infinite_when_diverged():
    rows = [row(samples_seen=24 * s, global_batch_size=24, loss=float(s)) for s in range(1, 11)]
    # The last 96 samples: steps that started at 144, 168, 192, 216 -> steps 7..10.
    assert fitness(rows, 240, 96) == pytest.approx((7 + 8 + 9 + 10) / 4)
    assert fitness([*rows[:-1], replace(rows[-1], loss=math.nan)], 240, 96) == math.inf
    assert fitness([], 240, 96) == math.inf


def test_decide_explores_from_the_donor_and_scales_lr_with_a_changed_batch():
    spec = tuned(**{"batch.global_batch_size": {"scale": "choice", "choices": [24, 48, 96]}})
    values = base_values(spec)
    members = {m: Member(m, dict(values), f"/r/{m}") for m in ("a", "b", "c", "d")}
    members["a"].values["batch.global_batch_size"] = 48
    scores = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 9.0}
    for seed in range(20):
        (exploit,) = decide(members, scores, 480, spec.tune, random.Random(seed))
        assert (exploit.recipient, exploit.donor, exploit.samples) == ("d", "a", 480)
        new_batch = exploit.values["batch.global_batch_size"]
        assert new_batch in (24, 48, 96)
        # sqrt rule (tune.lr_scaling's default, for Adam): lr follows the batch from the donor's 48.
        assert exploit.values["optimizer.lr"] == pytest.approx(1e-3 * math.sqrt(new_batch / 48), rel=1e-5)
        assert set(exploit.diff) == {k for k in values if exploit.values[k] != members["a"].values[k]}


def test_replay_spec_trains_each_value_from_its_sample_count():
    spec = tuned(**{"optimizer.lr": LR, "schedule.name": {"scale": "choice", "choices": ["cosine", "wsd"]}})
    base = base_values(spec)
    history = [
        {"from_samples": 0, "values": base | {"optimizer.lr": 0.002, "schedule.name": "cosine"}},
        {"from_samples": 480, "values": base | {"optimizer.lr": 0.003, "schedule.name": "wsd"}},
        {"from_samples": 960, "values": base | {"optimizer.lr": 0.001, "schedule.name": "wsd"}},
    ]
    replay = validate_spec(replay_spec(spec.to_dict(), history))
    assert replay.name == "t-best" and replay.tune is None and replay.checkpoint.path is None
    horizon = spec.horizon_samples
    for samples in (0, 240, 456, 480, 720, 960, 2376):
        entry = [h for h in history if h["from_samples"] <= samples][-1]
        member = validate_spec(member_spec(spec.to_dict(), entry["values"]))
        assert step_values(replay, samples).lr == pytest.approx(
            entry["values"]["optimizer.lr"] * lr_multiplier(member.schedule, samples, horizon), rel=1e-12
        )


def test_phases_change_batch_and_weight_decay_at_their_sample_counts():
    raw = minimal(stop={"max_samples": 480})
    raw["phases"] = [{"from_samples": 96, "global_batch_size": 48, "weight_decay": 0.3}, {"from_samples": 240, "lr": 0.01}]
    spec = validate_spec(raw)
    assert step_values(spec, 72) == step_values(spec, 0)
    assert (step_values(spec, 96).global_batch_size, step_values(spec, 96).weight_decay, step_values(spec, 96).lr) == (
        48,
        0.3,
        1e-3,
    )
    assert (step_values(spec, 240).global_batch_size, step_values(spec, 240).weight_decay, step_values(spec, 240).lr) == (
        48,
        0.3,
        0.01,
    )


@pytest.mark.parametrize(
    "phases, words",
    [
        ([{"from_samples": 96}, {"from_samples": 96}], ["phases.1.from_samples", "above the previous"]),
        ([{"from_samples": 96, "global_batch_size": 2}], ["phases.0.global_batch_size", "micro_batch_size"]),
        (
            [{"from_samples": 96, "schedule": {"name": "cosine", "horizon_samples": 10}}],
            ["phases.0.schedule.horizon_samples", "remove it"],
        ),
    ],
)
def test_bad_phases_are_refused_with_the_field(phases, words):
    raw = minimal(stop={"max_samples": 480})
    raw["phases"] = phases
    problems = spec_problems(raw)
    assert all(w in problems for w in words), problems


def test_a_batch_phase_needs_a_budget_in_samples():
    raw = minimal()
    raw["phases"] = [{"from_samples": 96, "global_batch_size": 48}]
    assert "stop.max_samples" in spec_problems(raw)


def test_check_space_refuses_ranges_that_reach_an_invalid_job():
    with pytest.raises(SpecError, match=r"tune.search.schedule.warmup_samples reaches 5000"):
        check_space(tuned(**{"schedule.warmup_samples": {"scale": "int", "low": 0, "high": 5000}}))
    with pytest.raises(SpecError, match=r"not a multiple of global batch \[36\].*multiple of 72"):
        check_space(tuned(**{"batch.global_batch_size": {"scale": "choice", "choices": [24, 36]}}))
    check_space(tuned(**{"optimizer.lr": LR}))


@pytest.mark.parametrize(
    "search, words",
    [
        ({"optimizer.momentum": LR}, ["optimizer.momentum cannot be searched", "searchable"]),
        ({"schedule.name": LR}, ["schedule.name takes scale: choice"]),
        ({"optimizer.lr": {"scale": "log", "low": 0, "high": 1}}, ["low > 0"]),
        ({"optimizer.lr": {"scale": "linear", "low": 1, "high": 0.5}}, ["must be below high"]),
    ],
)
def test_bad_search_ranges_are_refused(search, words):
    raw = minimal()
    raw["tune"] = {"interval_samples": 240, "search": search}
    problems = spec_problems(raw)
    assert all(w in problems for w in words), problems


# --------------------------------------------------------------------------- the population, on real storage


def _save(root: str, step: int, samples: int, value: float) -> Checkpointer:
    ckpt = Checkpointer(root)
    ckpt.save(Manifest(step, samples, "h", {}, {}), {"model/w": torch.full((4,), value)})
    return ckpt


def _report_all(pop, scores: dict[str, float | None]) -> bool:
    """Every member reports at the current boundary (None: its trial failed)."""
    closed = False
    for m, score in scores.items():
        closed = pop.report(m, None if score is None else {"fitness": score, "service": f"svc-{m}", "run_dir": f"/runs/{m}"})
    return closed


def test_the_population_closes_synchronous_intervals_and_exploits_by_clone(tmp_path):
    from elastune.tune.search import Population, SearchPlan

    pop = Population(SearchPlan(tuned(**{"optimizer.lr": LR}).to_dict(), str(tmp_path)))
    assert pop.span() == (0, 480) and pop.ends == [480, 960, 1440, 1920, 2400]
    assert not _report_all(pop, {"m0": None, "m1": 2.0, "m2": 3.0})  # m3 still trains; m0's trial failed
    assert not _report_all(pop, {"m0": 1.0})  # m0, started again, got there after all: its report replaces the failure
    assert _report_all(pop, {"m3": 4.0, "m0": 9.0})  # a second report (a restarted worker's) does not count
    (exploit,) = pop.close()
    assert (exploit.recipient, exploit.donor, exploit.samples) == ("m3", "m0", 480)
    decisions = {m: pop.decision(m, 480) for m in pop.members}
    assert decisions["m3"].donor == "m0" and decisions["m3"].donor_service == "svc-m0"
    assert decisions["m3"].values == exploit.values != pop.members["m0"].values  # explored from the donor's
    assert all(decisions[m].donor is None and decisions[m].values == pop.members[m].values for m in ("m0", "m1", "m2"))
    assert pop.members["m3"].history == [*pop.members["m0"].history, {"from_samples": 480, "values": exploit.values}]
    assert pop.members["m3"].values_at(480) == exploit.values and pop.span() == (480, 960)

    # The clone the coordinator has the recipient's service make (Checkpointer.adopt): the donor's
    # step 20 (480 samples at batch 24), while the recipient's own older checkpoint numbers higher
    # (step 40 at 240 samples, batch 6) and must not look newer.
    donor = _save(pop.members["m0"].root, 20, 480, 480.0)
    own = _save(pop.members["m3"].root, 40, 240, -1.0)
    clone = own.adopt(donor.uri, 20, {"exploit": {"donor": "m0"}})
    assert own.committed_steps() == [20] and own.latest().samples_seen == 480  # its old lineage is gone
    assert own.content_hash(clone) == donor.content_hash(donor.latest())
    assert own.load(own.latest())["model/w"].tolist() == [480.0] * 4  # the donor's tensor, read through the clone
    assert not list((tmp_path / "checkpoints" / "m3" / "step-000000020").glob("*.safetensors"))  # no byte copied
    assert own.adopt(donor.uri, 20, {}).to_json() == clone.to_json()  # carried out again: nothing changes
    donor.prune(replace(donor.policy, keep_last=0))
    assert donor.committed_steps() == [20]  # kept while the clone reads it

    pop.exploited(exploit, {"content_hash": "d"}, {"content_hash": "d"}, 0.001)
    pop.write()
    lineage = read_lineage(tmp_path)
    assert [(e["recipient"], e["donor"], e["generation"]) for e in lineage["exploits"]] == [("m3", "m0", 0)]
    assert [s["member"] for s in lineage["segments"]] == ["m0", "m1", "m2", "m3"]
    assert _report_all(pop, dict.fromkeys(pop.members))  # every member fails
    assert pop.close() == [] and pop.done
    assert "every member failed interval 2" in pop.lineage["error"]
    assert all(pop.decision(m, 960).stop for m in pop.members)


def test_a_resumed_population_decides_as_the_uninterrupted_one(tmp_path):
    """The driver dies after the first interval's lineage.json: the population rebuilt from it
    makes the second interval's decisions (who, whom, the explored values: the random state) as
    the population that went on."""
    from elastune.tune.search import Population, SearchPlan

    plan = SearchPlan(
        tuned(**{"optimizer.lr": LR, "optimizer.weight_decay": {"scale": "linear", "low": 0, "high": 0.1}}).to_dict(),
        str(tmp_path),
    )
    on = Population(plan)
    _report_all(on, {"m0": 1.0, "m1": 2.0, "m2": 3.0, "m3": 4.0})
    on.close()
    on.write()
    resumed = Population.resume(plan, read_lineage(tmp_path))
    assert resumed.span() == on.span() == (480, 960)
    assert {m: r.values for m, r in resumed.members.items()} == {m: r.values for m, r in on.members.items()}
    for pop in (on, resumed):
        _report_all(pop, {"m0": 4.0, "m1": 3.0, "m2": 2.0, "m3": 1.0})
    went_on, again = on.close(), resumed.close()
    assert went_on == again and went_on[0].recipient == "m0" and went_on[0].donor == "m3"
    assert resumed.decision("m3", 480) == on.decision("m3", 480)  # a member arriving again gets the same answer
    assert resumed.lineage["segments"] == on.lineage["segments"]


def test_a_population_needs_all_its_members_at_once():
    raw = tuned(**{"optimizer.lr": LR}).to_dict()
    raw["tune"]["max_concurrent_trials"] = 2
    problems = spec_problems(raw)
    assert "max_concurrent_trials (2) is below tune.population (4)" in problems and "remove max_concurrent_trials" in problems


def test_ranking_by_predicted_final_loss_prefers_the_member_that_will_anneal(tmp_path):
    """Three members following the annealing law exactly: after the first interval the constant
    lr is ahead and the cosine one last, but at the end cosine (decaying all along) is ahead and the
    constant one last (WSD's decay is still to come; the cosine member's curve shows the fit what
    decay gives). Ranked by loss, the cosine member takes the constant one's state; ranked by the
    law, the reverse."""
    import json

    from elastune.tune.annealing import AnnealingLaw
    from elastune.tune.search import Population, SearchPlan

    law = AnnealingLaw(2.0, 1.5, 0.5, 5.0, skip=2)  # skip: tuned()'s 48-sample warmup, 2 steps
    values = {"m0": ("wsd", 0.01), "m1": ("constant", 0.012), "m2": ("cosine", 0.01)}

    def interval(rank_by: str) -> tuple[str, str]:
        spec = tuned(**{"optimizer.lr": LR, "schedule.name": {"scale": "choice", "choices": ["constant", "wsd", "cosine"]}})
        raw = spec.to_dict()
        raw["tune"] |= {"population": 3, "quantile": 0.5, "rank_by": rank_by}
        folder = tmp_path / rank_by
        pop = Population(SearchPlan(raw, str(folder)))
        for m, member in pop.members.items():
            member.values = base_values(spec) | {"schedule.name": values[m][0], "optimizer.lr": values[m][1]}
            plan = validate_spec(member_spec(raw, member.values))
            lrs = [step_values(plan, 24 * i).lr for i in range(20)]
            after = law.predict(lrs)  # loss after each step; a row holds the loss before its step
            rows = [
                {
                    "step": i + 1,
                    "samples_seen": 24 * (i + 1),
                    "global_batch_size": 24,
                    "lr": lrs[i],
                    "loss": float(after[i - 1]) if i else 9.0,
                }
                for i in range(20)
            ]
            run_dir = folder / "runs" / m
            run_dir.mkdir(parents=True)
            (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            pop.report(m, {"fitness": fitness([row(**r) for r in rows], 480, 120), "run_dir": str(run_dir)})
        (exploit,) = pop.close()
        return exploit.recipient, exploit.donor

    assert interval("loss") == ("m2", "m1")
    assert interval("predicted_final_loss") == ("m1", "m2")


def test_fitness_is_held_out_loss_by_default_where_the_job_evaluates():
    spec = tuned(**{"optimizer.lr": LR})
    assert spec.search_fitness == "loss"  # no eval section
    raw = spec.to_dict() | {"eval": {"every_samples": 480, "samples": 64}}
    assert validate_spec(raw).search_fitness == "eval_loss"
    for tune in ({"fitness": "loss"}, {"rank_by": "predicted_final_loss"}):  # chosen, or a ranking held-out loss does not feed
        assert validate_spec(raw | {"tune": raw["tune"] | tune}).search_fitness == "loss"


def test_an_unfinished_search_of_the_same_spec_is_found_to_resume(tmp_path):
    """`elastune tune JOB` again resumes the newest search directory of the same spec that has a
    population's state, no result, and no driver still running; anything else starts anew."""
    import dataclasses
    import json

    import yaml

    from elastune.checkpoint.lease import this_process
    from elastune.tune.driver import DRIVER, unfinished_search

    raw = tuned(**{"optimizer.lr": LR}).to_dict() | {"output_dir": str(tmp_path)}
    spec = validate_spec(raw)
    dead = dataclasses.asdict(this_process("x", "job")) | {"pid": 2**22 + 7, "pid_started": "1"}  # no such process

    def search(name: str, job: dict, lineage: dict | None, driver: dict | None = dead, result: bool = False):
        folder = tmp_path / raw["name"] / name
        folder.mkdir(parents=True)
        (folder / "spec.yaml").write_text(yaml.safe_dump(job))
        if lineage is not None:
            (folder / "lineage.json").write_text(json.dumps(lineage))
        if driver is not None:
            (folder / DRIVER).write_text(json.dumps(driver))
        if result:
            (folder / "result.json").write_text("{}")
        return folder

    assert unfinished_search(spec) is None
    state = {"state": {"generation": 1}}
    wanted = search("tune-20260101-000000-aaaa", raw, state)
    search("tune-20260102-000000-bbbb", raw, state, result=True)  # finished
    search("tune-20260103-000000-cccc", raw, {"segments": []})  # written before populations kept their state
    search("tune-20260104-000000-dddd", raw | {"seed": 99}, state)  # another spec
    search("tune-20260105-000000-eeee", raw, state, driver=dataclasses.asdict(this_process("y", "job")))  # driven now
    assert unfinished_search(spec) == wanted
