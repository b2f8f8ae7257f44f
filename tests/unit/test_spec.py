import json
from pathlib import Path

import pytest
import yaml

from elastune.errors import SpecError
from elastune.spec import json_schema, load_spec, validate_spec

ROOT = Path(__file__).resolve().parents[2]
JOBS = sorted((ROOT / "jobs").rglob("*.yaml"))


def minimal(**changes):
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


@pytest.mark.parametrize("path", JOBS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_jobs_validate(path):
    spec = load_spec(path)
    assert spec.max_steps >= 1


def test_gpu_cluster_job_is_realistic():
    spec = load_spec(ROOT / "jobs" / "gpu-cluster.yaml")
    assert spec.scaling.gpus_per_worker >= 1 and spec.scaling.max_workers >= 8
    assert spec.checkpoint_path.startswith("s3://")


def _problems(raw) -> str:
    with pytest.raises(SpecError) as info:
        validate_spec(raw, source="job.yaml")
    return info.value.message


def test_unknown_key_names_field_and_suggests():
    msg = _problems(minimal(**{"batch.global_batch_sise": 3}))
    assert "batch.global_batch_sise = 3" in msg and "did you mean 'global_batch_size'?" in msg


def test_unknown_key_in_union_member_lists_that_members_keys():
    msg = _problems(minimal(**{"optimizer.momentum": 0.9}))
    assert "optimizer.momentum = 0.9" in msg and "allowed keys here: betas, eps, grad_clip_norm, lr, name, weight_decay" in msg


def test_every_error_states_field_value_rule_and_fix():
    msg = _problems(minimal(**{"batch.micro_batch_size": 0, "optimizer.lr": -1, "name": "Bad Name"}))
    assert "(3 problems)" in msg
    for line in ("batch.micro_batch_size = 0", "optimizer.lr = -1", "name = 'Bad Name'"):
        assert line in msg
    assert msg.count("rule:") == 3 and msg.count("fix:") == 3


def test_cross_field_rule_blames_the_field():
    msg = _problems(minimal(**{"scaling.max_workers": 7}))
    assert "scaling.max_workers = 7" in msg
    assert "exceeds the number of micro-batches (6" in msg and "set max_workers <= 6" in msg


def test_window_must_match_context():
    msg = _problems(minimal(**{"data.window": 33}))
    assert "data.window = 33" in msg and "set data.window: 17" in msg


def test_warmup_beyond_horizon():
    msg = _problems(minimal(**{"schedule": {"name": "cosine", "warmup_samples": 10_000}}))
    assert "schedule.warmup_samples = 10000" in msg


def test_unknown_schedule_name():
    msg = _problems(minimal(**{"schedule": {"name": "cosin"}}))
    assert "schedule.name = 'cosin'" in msg and "'cosine'" in msg


def test_missing_stop():
    raw = minimal()
    raw["stop"] = {}
    assert "set stop.max_steps or stop.max_samples" in _problems(raw)


def test_budget_and_horizon():
    spec = validate_spec(minimal(**{"stop.max_samples": 100}))
    assert spec.budget_samples == 100 and spec.max_steps == 5  # min(10 * 24, 100) samples; ceil(100 / 24)
    spec = validate_spec(minimal(**{"schedule": {"name": "cosine", "horizon_samples": 480}}))
    assert spec.horizon_samples == 480


def test_yaml_errors_name_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbatch: {global_batch_size: 3\n")
    with pytest.raises(SpecError, match=r"not valid YAML at line 3"):
        load_spec(bad)
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load_spec(tmp_path / "list.yaml")


def test_overrides_apply_before_validation(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(minimal()))
    spec = load_spec(path, {"scaling.min_workers": 3, "scaling.max_workers": 3, "stop.max_steps": 4})
    assert spec.scaling.min_workers == 3 and spec.max_steps == 4
    with pytest.raises(SpecError, match="scaling.max_workers = 9"):
        load_spec(path, {"scaling.min_workers": 9, "scaling.max_workers": 9})


def test_schema_is_the_models_and_rejects_extras():
    schema = json_schema()
    json.dumps(schema)
    assert schema["additionalProperties"] is False
    assert {"name", "model", "data", "batch", "optimizer", "stop"} <= set(schema["required"])
    assert "wsd" in json.dumps(schema)
