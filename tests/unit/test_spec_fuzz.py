"""Fuzz tier for job specs: whatever a spec holds, validation ends in a JobSpec or a SpecError, and
`elastune validate` exits 0 or 2 with no traceback.

Specs start from the shipped jobs/quickstart.yaml (plus the sections it leaves out, so every model
is reached) and are mutated: keys dropped and added, values replaced by others of other types,
huge and negative integers, NaN and infinity, control characters, nested lists and mappings where
scalars belong, keys that are not text. Files are the same specs dumped as YAML, the quickstart's
text cut and spliced, and raw bytes. Examples are derandomized and counted, so a run is
reproducible and fast: `pytest tests/unit/test_spec_fuzz.py --hypothesis-show-statistics` shows
how many were valid and how many refused.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from elastune.batch_plan import batch_plan
from elastune.cli.main import main
from elastune.errors import SpecError
from elastune.spec import JobSpec, validate_spec
from elastune.spec.load import MAX_PROBLEMS

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART_TEXT = (ROOT / "jobs" / "quickstart.yaml").read_text()
QUICKSTART = yaml.safe_load(QUICKSTART_TEXT)
EXTRA = {  # sections the quickstart leaves out, each valid there, so mutations reach every model
    "faults": [
        {"action": "kill_rank", "rank": 1, "at_step": 5},
        {"action": "delay_rank", "rank": 0, "at_step": 7, "seconds": 1.5},
    ],
    "phases": [{"from_samples": 3200, "lr": 0.001, "schedule": {"name": "cosine", "min_lr_ratio": 0.1}}],
    "tune": yaml.safe_load((ROOT / "jobs" / "pbt.yaml").read_text())["tune"],
    "metrics": {"enabled": True, "host": "127.0.0.1", "port": 9100, "noise_scale": False},
    "checkpoint": {"path": "s3://bucket/elastune/quickstart", "every_steps": 50, "keep_last": 2, "keep_best": 1},
}


def fuzz(examples: int) -> settings:
    """A fixed number of examples, the same on every run (CI is reproducible), with no deadline."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


HOSTILE = [
    -1,
    0,
    2**31,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    10**23,
    -(2**63) - 1,
    math.nan,
    math.inf,
    -math.inf,
    -0.0,
    1e308,
    5e-324,
    "",
    " ",
    "\x00",
    "\t",
    "a\nb",
    "\u202e",
    "\U0001f600",
    "://",
    "foo://bar",
    "s3://",
    "s3:///x",
    "file://host/x",
    "S3://b/x",
    "nan",
    ".inf",
    "1e999",
    "0x10",
    "${HOME}",
    "../../../etc/passwd",
    "\ud800",
    "kill_rank",
    "wsd",
]
HUGE = {"a 4,000-digit integer": 10**4000, "a 5,000-character string": "x" * 5000}


def huge(name: str):
    return HUGE[name]  # by name: Hypothesis's statistics print strategies, values and all


FIELD_NAMES = ["name", "lr", "path", "rank", "action", "recipe", "factory", "options", "schedule", "global_batch_size", "<<"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=6),
    st.sampled_from(HOSTILE),
    st.sampled_from(sorted(HUGE)).map(huge),
)
keys = st.one_of(
    st.text(max_size=10),
    st.sampled_from(FIELD_NAMES),
    st.integers(-3, 3),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False, width=16),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3), max_leaves=8)


def slots(node):
    """Every (container, key) in a spec tree: where a value can be dropped or replaced."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in list(items):
        yield node, key
        yield from slots(child)


def retyped(value):
    """`value` as another type: a string, a list, a mapping, a float, its negative."""
    return [
        str(value),
        [value],
        {"value": value},
        {1: value},
        float(value) if isinstance(value, int) and abs(value) < 2**1000 else 0.5,
        -value if isinstance(value, (int, float)) else None,
    ]


@st.composite
def hostile_specs(draw):
    spec = copy.deepcopy(QUICKSTART)
    for name in draw(st.lists(st.sampled_from(sorted(EXTRA)), unique=True, max_size=3)):
        spec[name] = copy.deepcopy(EXTRA[name])
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["drop", "replace", "retype", "hostile", "add_key", "add_top_key"]))
        if op == "add_top_key":
            spec[draw(keys)] = draw(values)
            continue
        container, key = draw(st.sampled_from(list(slots(spec))))
        if op == "drop":
            del container[key]
        elif op == "replace":
            container[key] = draw(values)
        elif op == "retype":
            container[key] = draw(st.sampled_from(retyped(container[key])))
        elif op == "hostile":
            container[key] = draw(st.sampled_from(HOSTILE) | st.sampled_from(sorted(HUGE)).map(huge))
        elif isinstance(container[key], dict):
            container[key][draw(keys)] = draw(values)
    return spec


def assert_explained(message: str, source: str) -> None:
    """A SpecError from validation: a header, then each problem as field = value, rule, fix."""
    header, *lines = message.splitlines()
    assert header.startswith(f"Invalid job spec {source} ("), header
    total = int(header.split("(")[1].split()[0])
    shown = min(total, MAX_PROBLEMS)
    assert sum(line.startswith("    rule: ") for line in lines) == shown, message
    assert sum(line.startswith("    fix:  ") for line in lines) == shown, message  # every problem says its fix
    assert (total > MAX_PROBLEMS) == lines[-1].startswith("  ... and "), message


def assert_sane(spec: JobSpec) -> None:
    """A spec that validates is usable: finite numbers, int64-sized integers, a batch plan, a hash."""
    data = spec.to_dict()
    data["model"].pop("options", None)  # a factory's own keyword arguments: its business
    for dim in (data.get("tune") or {}).get("search", {}).values():
        dim.pop("choices", None)
    json.dumps(data, allow_nan=False)
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, int):
            assert -(2**63) <= node < 2**63, node
    for workers in (spec.scaling.min_workers, spec.scaling.max_workers):
        batch_plan(spec.batch.global_batch_size, spec.batch.micro_batch_size, workers)
    assert spec.max_steps >= 1 and spec.horizon_samples >= 1 and len(spec.fingerprint()) == 16


def outcome_of(raw) -> str:
    try:
        spec = validate_spec(raw, source="fuzz.yaml")
    except SpecError as exc:
        assert_explained(exc.message, "fuzz.yaml")
        return "refused"
    assert isinstance(spec, JobSpec)
    assert_sane(spec)
    return "valid"


# --------------------------------------------------------------------------- validate_spec


@fuzz(800)
@given(hostile_specs())
def test_a_mutated_spec_validates_or_raises_spec_error(raw):
    event(outcome_of(raw))


@fuzz(200)
@given(values)
def test_any_top_level_value_validates_or_raises_spec_error(raw):
    event(outcome_of(raw))


def test_the_unmutated_base_and_every_extra_section_are_valid():
    assert outcome_of(copy.deepcopy(QUICKSTART)) == "valid"
    for name, section in EXTRA.items():
        raw = {**copy.deepcopy(QUICKSTART), name: copy.deepcopy(section)}
        if name == "phases":
            raw["stop"] = {"max_samples": 9600}
        assert outcome_of(raw) == "valid", name


# --------------------------------------------------------------------------- the CLI, in process


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "job.yaml"


def validate_file(path: Path, content: bytes, capsys) -> int:
    """`elastune validate` on `content`: exit 0 or 2, the output of each, never a traceback."""
    path.write_bytes(content)
    capsys.readouterr()
    code = main(["validate", str(path)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert code in (0, 2), (code, out, err)
    if code == 0:
        assert f"{path}: valid job" in out, out
    else:
        assert err.startswith("error: ") and not out, (out, err)
    event(f"exit {code}")
    return code


def encoded(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate makes bytes that are not UTF-8


@fuzz(150)
@given(spec=hostile_specs(), unicode=st.booleans())
def test_validate_exits_0_or_2_on_a_mutated_spec_file(spec_file, capsys, spec, unicode):
    validate_file(spec_file, encoded(yaml.safe_dump(spec, allow_unicode=unicode, sort_keys=False)), capsys)


SPLICES = [
    "\t",
    "\x00",
    "\x85",
    "\ufeff",
    " &a",
    " *a",
    " !!python/object:os.system",
    "{",
    "[",
    "]",
    "- ",
    ": ",
    ":",
    "---\n",
    "%YAML 1.1\n",
    "'",
    '"',
    "\\",
    "<<: *a\n",
    "? ",
    "|\n",
    "#",
    "\n  x: 1",
    "\ud800",
    "1e999",
    ".nan",
    "0x" + "f" * 40,
]


@st.composite
def mangled_texts(draw):
    """The quickstart's YAML text, cut and spliced: lines repeated, swapped and dropped, text inserted."""
    lines = QUICKSTART_TEXT.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["repeat", "drop", "swap", "tabs", "splice", "truncate"]))
        if op == "repeat":
            lines.insert(i, lines[i])
        elif op == "drop" and len(lines) > 1:
            del lines[i]
        elif op == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "tabs":
            lines[i] = lines[i].replace("  ", "\t")
        elif op == "splice":
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + draw(st.sampled_from(SPLICES) | st.text(max_size=4)) + lines[i][at:]
        elif op == "truncate":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
    text = "".join(lines)
    raw = encoded(text)
    if draw(st.booleans()):  # a bad byte somewhere
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xe9", b"\x80\x80", b"\xef\xbb\xbf"])) + raw[at:]
    return raw


@fuzz(250)
@given(content=mangled_texts())
def test_validate_exits_0_or_2_on_mangled_yaml_text(spec_file, capsys, content):
    validate_file(spec_file, content, capsys)


@fuzz(100)
@given(content=st.binary(max_size=300))
def test_validate_exits_2_on_raw_bytes(spec_file, capsys, content):
    validate_file(spec_file, content, capsys)


@fuzz(8)
@given(depth=st.integers(60, 1000), fanout=st.integers(2, 12), levels=st.integers(2, 9))
def test_validate_exits_2_on_deep_nesting_and_alias_bombs(spec_file, capsys, depth, fanout, levels):
    assert validate_file(spec_file, ("a: " + "[" * depth + "]" * depth + "\n").encode(), capsys) in (0, 2)
    bomb = [f"l0: &l0 [{', '.join(['x'] * fanout)}]"]
    bomb += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fanout)}]" for i in range(1, levels)]
    assert validate_file(spec_file, "\n".join(bomb).encode(), capsys) == 2


# --------------------------------------------------------------------------- the CLI, as a user runs it

BOMB = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x]"] + [f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("abcdefg", "bcdefgh")]
)
END_TO_END = {
    "the quickstart": (QUICKSTART_TEXT.encode(), 0, "valid job 'quickstart'"),
    "not UTF-8": (QUICKSTART_TEXT.encode().replace(b"quickstart:", b"quickst\xe4rt:", 1), 2, "is not UTF-8 text: byte"),
    "a YAML bomb": (BOMB.encode(), 2, "a YAML bomb?"),
    "NaN": (QUICKSTART_TEXT.replace("lr: 0.003", "lr: .nan").encode(), 2, "optimizer.lr = nan"),
    "an unknown scheme": (
        QUICKSTART_TEXT.replace("checkpoint: {", 'checkpoint: {path: "foo://bar", ').encode(),
        2,
        "URI scheme 'foo'",
    ),
    "a duplicate key": ((QUICKSTART_TEXT + "seed: 1\n").encode(), 2, "duplicate key 'seed'"),
}


@pytest.mark.parametrize("case", END_TO_END)
def test_the_exit_code_end_to_end(tmp_path, case):
    content, code, said = END_TO_END[case]
    path = tmp_path / "job.yaml"
    path.write_bytes(content)
    result = subprocess.run([sys.executable, "-m", "elastune", "validate", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == code, result.stderr
    assert said in (result.stdout if code == 0 else result.stderr) and "Traceback" not in result.stdout + result.stderr
