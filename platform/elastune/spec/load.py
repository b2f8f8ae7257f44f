"""Load a job spec from YAML, apply command-line overrides, and explain every error.

A bad spec never starts anything: `load_spec` raises SpecError whose message lists each
problem as the field path, the bad value, the rule it breaks and how to fix it.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from elastune.errors import SpecError
from elastune.spec.models import FactoryModel, JobSpec, RecipeModel


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> JobSpec:
    """Read, override and validate the spec at `path`.

    `overrides` maps dotted field paths to values ("scaling.min_workers": 3); they are applied
    before validation so errors still name the field.
    """
    path = Path(path)
    raw = read_yaml(path)
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return validate_spec(raw, source=str(path))


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SpecError(f"Job spec {path} does not exist; pass the path of a YAML job spec, e.g. jobs/quickstart.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"Job spec {path} is not valid YAML{where}: {problem}; fix the YAML syntax there") from None
    if not isinstance(raw, dict):
        raise SpecError(
            f"Job spec {path} must be a YAML mapping of fields (name, model, data, batch, ...), got {type(raw).__name__}"
        )
    return raw


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set raw["a"]["b"] = value for dotted "a.b", creating mappings on the way; None deletes."""
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = value


def validate_spec(raw: dict[str, Any], source: str = "<spec>") -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        problems = [explain(err) for err in exc.errors(include_url=False)]
        lines = [f"Invalid job spec {source} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"]
        for field, value, rule, fix in problems:
            lines.append(f"  {field} = {value}")
            lines.append(f"    rule: {rule}")
            if fix:
                lines.append(f"    fix:  {fix}")
        raise SpecError("\n".join(lines)) from None


def explain(err: dict[str, Any]) -> tuple[str, str, str, str]:
    """(field path, shown value, rule, fix) for one pydantic error."""
    loc = [str(p) for p in err["loc"]]
    # Discriminated unions insert the tag ("adamw") into the path; drop it for the user.
    loc = [p for i, p in enumerate(loc) if not (i > 0 and p in _TAGS.get(loc[i - 1], ()))]
    field = ".".join(loc) or "(top level)"
    kind = err["type"]
    value = _show(err.get("input"))
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        allowed = _allowed_keys(err["loc"][:-1])
        near = difflib.get_close_matches(loc[-1], allowed, n=1)
        fix = f"did you mean '{near[0]}'? " if near else ""
        return field, value, "unknown key", fix + f"allowed keys here: {', '.join(allowed)}"
    if kind == "missing":
        return field, "(missing)", "required field", f"add {field}"
    tag = str(ctx.get("discriminator", "'name'")).strip("'")  # "name" for optimizers and schedules, "action" for faults
    if kind == "union_tag_invalid":
        return f"{field}.{tag}", _show(ctx.get("tag")), f"unknown {tag}; expected one of {ctx.get('expected_tags')}", f"use one of those {tag}s"
    if kind == "union_tag_not_found":
        return field, value, f"needs a '{tag}' that picks its kind", f"add {field}.{tag}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return field, value, msg.lower(), f"set {field} to a value that {msg.lower().replace('input should be', 'is')}"
    if kind == "string_pattern_mismatch":
        return field, value, f"must match {ctx.get('pattern')}", _pattern_fix(field)
    if kind == "literal_error":
        return field, value, msg.lower(), "use one of the listed values"
    if kind.endswith("_parsing") or kind.endswith("_type"):
        return field, value, msg.lower(), f"give {field} a value of that type"
    # Our own validators write "<rule>; <fix>", and rules over several fields start with the one
    # they blame, relative to where the validator sits: "micro_batch_size (16) exceeds ...".
    rule, _, fix = msg.partition("; ")
    blamed = _BLAMED.match(rule)
    if blamed:
        return ".".join(loc + [blamed["field"]]), blamed["value"], rule, fix
    return field, value, rule, fix


_BLAMED = re.compile(r"^(?P<field>[a-z_]+(\.([a-z_]+|\d+))*) \((?P<value>[^)]*)\) ")


def _pattern_fix(field: str) -> str:
    if field == "name":
        return "use lower-case letters, digits and '-', starting and ending with a letter or digit (at most 63)"
    if field.endswith("factory"):
        return "write it as 'pkg.module:function'"
    return "change it to match the pattern"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _allowed_keys(parent_loc: tuple) -> list[str]:
    """Field names allowed at `parent_loc`, following union tags ("optimizer.adamw")."""
    candidates: list[type[BaseModel]] = [JobSpec]
    for part in map(str, parent_loc):
        tagged = [m for m in candidates if _tag(m) == part]
        if tagged:
            candidates = tagged
            continue
        candidates = [sub for m in candidates if part in m.model_fields for sub in _models_in(m.model_fields[part].annotation)]
    return sorted({key for m in candidates for key in m.model_fields})


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _tag(model: type[BaseModel]) -> str | None:
    """The tag that picks `model` inside its union: its `name` literal, or recipe/factory."""
    if model is RecipeModel:
        return "recipe"
    if model is FactoryModel:
        return "factory"
    field = model.model_fields.get("name")
    if field is None or typing.get_origin(field.annotation) is not typing.Literal:
        return None
    return typing.get_args(field.annotation)[0]


# Per union field, the tags pydantic inserts into error paths (dropped when shown to the user).
_TAGS = {
    section: {t for m in _models_in(JobSpec.model_fields[section].annotation) if (t := _tag(m))}
    for section in ("model", "optimizer", "schedule")
}


def spec_dir_of(path: str | Path) -> str:
    """The folder a spec's own files (custom model code) are found from."""
    return str(Path(path).resolve().parent)
