import json
from pathlib import Path

import pytest
import yaml

import elastune.spec.load as spec_load
from elastune.cli.main import main
from elastune.errors import SpecError
from elastune.spec import URI_SCHEMES, check_uri, json_schema, load_spec, validate_spec
from elastune.spec.base import MAX_SAMPLES, MAX_SEED, MAX_WORKERS
from tests.helpers import minimal, spec_problems

ROOT = Path(__file__).resolve().parents[2]
JOBS = sorted((ROOT / "jobs").rglob("*.yaml"))


@pytest.mark.parametrize("path", JOBS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_jobs_validate(path):
    spec = load_spec(path)
    assert spec.max_steps >= 1


@pytest.mark.parametrize("path", JOBS, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_spec_travels_to_the_workers_unchanged(path):
    """Workers rebuild the spec from `to_dict`: whatever the user wrote must come back equal,
    including a null that turns something off (snapshot_every_steps: null)."""
    from elastune.spec.models import JobSpec

    spec = load_spec(path)
    assert JobSpec.model_validate(spec.to_dict()) == spec
    off = JobSpec.model_validate(minimal(**{"checkpoint.snapshot_every_steps": None}))
    assert off.checkpoint.snapshot_every_steps is None
    assert JobSpec.model_validate(off.to_dict()).checkpoint.snapshot_every_steps is None


def test_gpu_cluster_job_is_realistic():
    spec = load_spec(ROOT / "jobs" / "gpu-cluster.yaml")
    assert spec.scaling.gpus_per_worker >= 1 and spec.scaling.max_workers >= 8
    assert spec.checkpoint_path.startswith("s3://")
    assert spec.step.precision == "bf16" and spec.step.compile and spec.model.options.activation_checkpointing


def test_unknown_key_names_field_and_suggests():
    msg = spec_problems(minimal(**{"batch.global_batch_sise": 3}))
    assert "batch.global_batch_sise = 3" in msg and "did you mean 'global_batch_size'?" in msg


def test_unknown_key_in_union_member_lists_that_members_keys():
    msg = spec_problems(minimal(**{"optimizer.momentum": 0.9}))
    assert "optimizer.momentum = 0.9" in msg and "allowed keys here: betas, eps, grad_clip_norm, lr, name, weight_decay" in msg


def test_every_error_states_field_value_rule_and_fix():
    msg = spec_problems(minimal(**{"batch.micro_batch_size": 0, "optimizer.lr": -1, "name": "Bad Name"}))
    assert "(3 problems)" in msg
    for line in ("batch.micro_batch_size = 0", "optimizer.lr = -1", "name = 'Bad Name'"):
        assert line in msg
    assert msg.count("rule:") == 3 and msg.count("fix:") == 3


def test_cross_field_rule_blames_the_field():
    msg = spec_problems(minimal(**{"scaling.max_workers": 7}))
    assert "scaling.max_workers = 7" in msg
    assert "exceeds the number of micro-batches (6" in msg and "set max_workers <= 6" in msg


def test_window_must_match_context():
    msg = spec_problems(minimal(**{"data.window": 33}))
    assert "data.window = 33" in msg and "set data.window: 17" in msg


def test_warmup_beyond_horizon():
    msg = spec_problems(minimal(schedule={"name": "cosine", "warmup_samples": 10_000}))
    assert "schedule.warmup_samples = 10000" in msg


def test_unknown_schedule_name():
    msg = spec_problems(minimal(schedule={"name": "cosin"}))
    assert "schedule.name = 'cosin'" in msg and "'cosine'" in msg


def test_missing_stop():
    raw = minimal()
    raw["stop"] = {}
    assert "set stop.max_steps or stop.max_samples" in spec_problems(raw)


def test_budget_and_horizon():
    spec = validate_spec(minimal(**{"stop.max_samples": 100}))
    assert spec.budget_samples == 100 and spec.max_steps == 5  # min(10 * 24, 100) samples; ceil(100 / 24)
    spec = validate_spec(minimal(schedule={"name": "cosine", "horizon_samples": 480}))
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


# --------------------------------------------------------------------------- hostile files and values

QUICKSTART = (ROOT / "jobs" / "quickstart.yaml").read_text()


def _load_error(tmp_path, content: str | bytes) -> str:
    path = tmp_path / "job.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value.message


def test_a_non_utf8_file_names_the_offset_of_its_first_bad_byte(tmp_path, capsys):
    msg = _load_error(tmp_path, b"name: t\nseed: 1\n# caf\xe9\n")
    assert "is not UTF-8 text: byte 21 (line 3) is 0xe9" in msg and "save the file as UTF-8" in msg
    assert main(["validate", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Job spec") and "byte 21" in err and "Traceback" not in err


def test_a_utf8_byte_order_mark_is_fine(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + QUICKSTART.encode())
    assert load_spec(path).name == "quickstart"


@pytest.mark.parametrize(
    "content, said",
    [
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        ("- 1\n", "got a list"),
        ("42\n", "got a number"),
        ("just text\n", "got a string"),
    ],
)
def test_a_top_level_that_is_no_mapping_is_refused(tmp_path, content, said):
    assert said in _load_error(tmp_path, content)


def test_duplicate_keys_are_refused_with_the_key_and_both_lines(tmp_path):
    msg = _load_error(tmp_path, QUICKSTART + "seed: 3\n")
    last = QUICKSTART.count("\n") + 1
    assert "duplicate key 'seed' (first at line 4)" in msg and f"at line {last}, column 1" in msg and "keep one of them" in msg
    nested = QUICKSTART.replace("betas: [0.9, 0.95]", "betas: [0.9, 0.95], lr: 1")
    assert "duplicate key 'lr'" in _load_error(tmp_path, nested)


def test_merge_keys_may_override_what_they_merge():
    raw = spec_load.parse_yaml("base: &b {p: 1, q: 2}\nuse:\n  <<: *b\n  p: 3\n", Path("t.yaml"))
    assert raw["use"] == {"p": 3, "q": 2}


def test_a_yaml_bomb_is_refused_before_it_expands(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [{','.join(['*' + prev] * 9)}]")
    msg = _load_error(tmp_path, "\n".join(lines))
    assert "aliases expand this value to over 100,000 values (a YAML bomb?)" in msg and "line 6" in msg


def test_an_alias_inside_its_own_anchor_is_refused(tmp_path):
    assert "alias *x refers to a value that contains it" in _load_error(tmp_path, "a: &x [1, *x]\n")


def test_too_many_values_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(spec_load, "MAX_NODES", 50)
    assert "the file holds over 50 values" in _load_error(tmp_path, "a: [" + ", ".join(["1"] * 60) + "]\n")


def test_deep_nesting_is_refused_not_a_recursion_error(tmp_path):
    msg = _load_error(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "values nest deeper than 64 levels" in msg


def test_a_file_over_the_size_cap_is_refused_unread(tmp_path):
    msg = _load_error(tmp_path, b"#" * (spec_load.MAX_SPEC_BYTES + 1))
    assert "is over 1 MiB" in msg and "a job spec is a few KiB" in msg


def test_a_folder_is_not_a_spec(tmp_path):
    with pytest.raises(SpecError, match="is not a file"):
        load_spec(tmp_path)


@pytest.mark.parametrize(
    "content, said",
    [
        (b"\x00\x01\x02binary", "character U+0000 is not allowed"),
        (b"name: x\nmodel:\n\trecipe: byte_gpt\n", "indent with spaces"),
        (b"a: " + b"1" * 5000 + b"\n", "cannot be read as int: it has too many digits"),
        (b"a: 2020-13-45\n", "cannot be read as timestamp: month must be in 1..12"),
        (b"a: !!float x\n", "cannot be read as float"),
        (b"a: !!python/object:os.system x\n", "not valid YAML"),
        (b"a: 1\n---\nb: 2\n", "not valid YAML"),
    ],
)
def test_yaml_that_python_cannot_build_is_a_spec_error(tmp_path, content, said):
    assert said in _load_error(tmp_path, content)


@pytest.mark.parametrize(
    "dotted, value",
    [
        ("stop.max_steps", 99999999999999999999999),
        ("stop.max_samples", MAX_SAMPLES + 1),
        ("seed", MAX_SEED + 1),
        ("scaling.max_workers", MAX_WORKERS + 1),
        ("batch.global_batch_size", 2**24 + 1),
        ("checkpoint.keep_last", 10_001),
        ("scaling.max_failures", 10_001),
        ("data.max_bytes", 2**60),
        ("model.options.width", 2**20),
        ("checkpoint.every_steps", 2**60),
    ],
)
def test_integers_have_upper_bounds(dotted, value):
    msg = spec_problems(minimal(**{dotted: value}))
    assert f"{dotted} = {value}" in msg and "less than or equal to" in msg


def test_the_bounds_admit_their_own_limits():
    spec = validate_spec(minimal(seed=MAX_SEED, stop={"max_samples": MAX_SAMPLES}))
    assert spec.seed == MAX_SEED and spec.budget_samples == MAX_SAMPLES


def test_fault_ranks_stay_below_the_most_workers():
    fault = {"action": "kill_rank", "rank": MAX_WORKERS, "at_step": 1}
    assert f"faults.0.rank = {MAX_WORKERS}" in spec_problems(minimal(faults=[fault]))


def test_micro_batches_per_step_are_bounded():
    msg = spec_problems(minimal(batch={"global_batch_size": 2**24, "micro_batch_size": 1}))
    assert (
        "batch.micro_batch_size = 1" in msg
        and "16,777,216 micro-batches, over 65,536" in msg
        and "set micro_batch_size >= 256" in msg
    )


def test_steps_times_the_batch_stay_within_the_sample_bound():
    msg = spec_problems(minimal(**{"stop.max_steps": MAX_SAMPLES}))
    assert f"stop.max_steps = {MAX_SAMPLES}" in msg and "lower max_steps" in msg


def test_an_integer_too_long_to_print_is_shown_by_its_size(tmp_path):
    msg = _load_error(tmp_path, QUICKSTART.replace("seed: 0", "seed: 0x" + "f" * 4000))
    assert "seed = (an integer of about 4816 digits)" in msg


def test_every_integer_in_the_schema_has_an_upper_bound():
    def integers(node, path):
        if isinstance(node, dict):
            if node.get("type") == "integer":
                yield path, node
            for key, sub in node.items():
                yield from integers(sub, f"{path}.{key}")
        elif isinstance(node, list):
            for i, sub in enumerate(node):
                yield from integers(sub, f"{path}[{i}]")

    found = list(integers(json_schema(), "schema"))
    assert len(found) > 30
    assert [path for path, node in found if "maximum" not in node and "exclusiveMaximum" not in node] == []


@pytest.mark.parametrize("yaml_value", [".nan", ".inf", "-.inf", "1e999", ".NaN"])
def test_nan_and_infinity_are_refused(tmp_path, yaml_value):
    msg = _load_error(tmp_path, QUICKSTART.replace("lr: 0.003", f"lr: {yaml_value}"))
    assert "optimizer.lr = " in msg and "must be a finite number (not NaN or infinity)" in msg


@pytest.mark.parametrize(
    "dotted, value",
    [
        ("optimizer.betas", [float("nan"), 0.95]),
        ("scaling.resize_check_seconds", float("inf")),
        ("scaling.cpus_per_worker", float("inf")),
        ("model.options.dropout", float("nan")),
        ("schedule", {"name": "cosine", "min_lr_ratio": float("nan")}),
        ("faults", [{"action": "delay_rank", "rank": 0, "at_step": 1, "seconds": float("inf")}]),
    ],
)
def test_every_float_field_refuses_nan_and_infinity(dotted, value):
    assert "must be a finite number" in spec_problems(minimal(**{dotted: value}))


@pytest.mark.parametrize(
    "uri",
    [
        "s3://my-bucket/elastune/job",
        "s3://b",
        "s3://b/x?region=eu-west-1&endpoint_override=localhost:9000",
        "gs://b/ckpt",
        "gcs://b/ckpt",
        "hdfs://namenode:8020/ckpt",
        "hdfs:///ckpt",
        "viewfs://cluster/ckpt",
        "file:///tmp/ckpt",
        "file:///a%20b",
        "/abs/local path",
        "relative/dir",
        "~/ckpt",
    ],
)
def test_supported_locations_pass(uri):
    assert check_uri(uri) is None
    assert validate_spec(minimal(**{"checkpoint.path": uri})).checkpoint_path == uri


@pytest.mark.parametrize(
    "uri, said",
    [
        ("foo://bar", "URI scheme 'foo' is not supported"),
        ("abfs://c/x", "URI scheme 'abfs' is not supported"),
        ("S3://b/x", "not lower-case; write s3://"),
        ("s3://", "names no bucket"),
        ("s3:///x", "names no bucket"),
        ("gs://b//x", "empty path segment"),
        ("s3://b/x y", "percent-encode it as %20"),
        ("s3://b/x#1", "percent-encode it as %23"),
        ("s3://b/x\u00e9", "percent-encode it"),
        ("s3://b/x%zz", "not followed by two hex digits"),
        ("s3://key:secret@b/x", "holds credentials"),
        ("s3://b/x?secret_key=s", "holds credentials"),
        ("file://host/x", "names no host"),
        ("file://", "names no path"),
        ("file:///x?y=1", "takes no query"),
        ("hdfs://nn:port/x", "port is not a number"),
        ("s3:/b/x", "without '//'"),
        ("://x", "not a URI scheme"),
        ("", "is empty"),
        (" /x", "white space"),
        ("/x\ny", "control character (U+000A)"),
        ("/x\x00", "control character (U+0000)"),
    ],
)
def test_unknown_schemes_and_malformed_uris_are_refused(uri, said):
    problem = check_uri(uri)
    assert problem is not None and said in problem and "; " in problem  # "<rule>; <fix>"
    msg = spec_problems(minimal(**{"checkpoint.path": uri}))
    assert f"checkpoint.path = {uri!r}" in msg and "fix:" in msg


def test_the_refused_schemes_name_the_supported_ones(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(QUICKSTART.replace("checkpoint: {", 'checkpoint: {path: "foo://bar", '))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.path = 'foo://bar'" in err and "Traceback" not in err
    assert all(f"{scheme}://" in err for scheme in URI_SCHEMES)


def test_pyarrow_refuses_what_check_uri_refuses_for_local_uris():
    """check_uri is pure; for file:// (pyarrow opens nothing remote) it agrees with pyarrow itself."""
    pafs = pytest.importorskip("pyarrow.fs")
    for uri in ("file://host/x", "file://", "file:///x y", "file:///a%zz", "foo://bar", "file:///a|b"):
        assert check_uri(uri) is not None
        with pytest.raises(Exception):  # noqa: B017 (pyarrow raises several types; any refusal agrees)
            pafs.FileSystem.from_uri(uri)
    for uri in ("file:///tmp/x", "file:///a%20b"):
        assert check_uri(uri) is None
        pafs.FileSystem.from_uri(uri)


@pytest.mark.parametrize(
    "dotted, value, said",
    [
        ("data.path", "s3://b/data", "data.path = 's3://b/data'"),
        ("output_dir", "gs://b/runs", "output_dir = 'gs://b/runs'"),
        ("data.source", "s3://b/x.txt", "data.source = 's3://b/x.txt'"),
        ("data.source", ["a.txt", "s3://b/x.txt"], "item 1: datasets and run folders take local paths"),
        ("data.path", "", "the location is empty"),
    ],
)
def test_data_and_output_paths_are_local(dotted, value, said):
    msg = spec_problems(minimal(**{dotted: value}))
    assert said in msg and "fix:" in msg


@pytest.mark.parametrize(
    "where, key, said",
    [
        ((), 1, "1 = 1"),
        ((), None, "None = None"),
        (("model",), 2, "model.2 = 2"),
        (("model", "options"), 2.5, "model.options.2.5 = 2.5"),
        (("tune", "search"), 3, "tune.search.3 = 3"),
    ],
)
def test_keys_that_are_not_text_are_explained(tmp_path, where, key, said):
    raw = yaml.safe_load(QUICKSTART)
    node = raw
    for part in where:
        node = node.setdefault(part, {})
    node[key] = "x"
    msg = _load_error(tmp_path, yaml.safe_dump(raw))
    assert said in msg and "keys are text" in msg


def test_a_model_that_is_no_mapping_is_a_spec_error():
    for value in (5, [1], "byte_gpt", None):
        assert "model" in spec_problems(minimal(model=value))


def test_long_values_are_shown_cut_and_many_problems_counted():
    msg = spec_problems(minimal(name="x" * 10_000, **{f"k{i}": i for i in range(30)}))
    assert "name = 'xxx" in msg and max(map(len, msg.splitlines())) < 500
    assert "... and 11 more" in msg
    msg = spec_problems(minimal(**{"metrics.host": "h" * 10_000}))  # a rule that quotes the value
    assert "metrics.host = 'hhh" in msg and max(map(len, msg.splitlines())) < 500


def test_an_unknown_key_in_a_list_item_lists_that_items_keys():
    msg = spec_problems(minimal(faults=[{"action": "kill_rank", "rank": 0, "at_step": 1, "step": 2}]))
    assert "faults.0.step = 2" in msg and "allowed keys here: action, at_step, point, rank" in msg


def test_overrides_and_data_prepare_read_through_the_same_guards(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(QUICKSTART)
    with pytest.raises(SpecError, match=f"scaling.min_workers = {MAX_WORKERS + 1}"):
        load_spec(path, {"scaling.min_workers": MAX_WORKERS + 1, "scaling.max_workers": MAX_WORKERS + 1})
    path.write_bytes(b"name: \xff\n")
    assert main(["data", "prepare", "--job", str(path)]) == 2
    assert "not UTF-8" in capsys.readouterr().err
