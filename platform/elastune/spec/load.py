"""Load a job spec from YAML, apply command-line overrides, and explain every error.

A bad spec never starts anything: `load_spec` raises SpecError whose message lists each
problem as the field path, the bad value, the rule it breaks and how to fix it. Whatever the
file holds (binary, another encoding, a YAML bomb, duplicate keys), reading it ends in a
JobSpec or a SpecError.
"""

from __future__ import annotations

import codecs
import difflib
import re
import typing
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

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


# Limits on what a spec file may hold; a real spec is a few KiB, a few levels deep, alias-free.
# PyYAML's safe loader is pure Python (about 0.1-0.3 MB/s), so the size cap also bounds how long a
# wrong file (a dataset, a binary) keeps `validate` busy: a few seconds at worst.
MAX_SPEC_BYTES = 2**20
MAX_DEPTH = 64  # nesting; keeps the YAML composer and pydantic far from Python's recursion limit
MAX_NODES = 100_000  # values, also once aliases are expanded: refuses a "billion laughs" YAML bomb
MAX_PROBLEMS = 20  # problems listed in one error; the rest are counted


def read_yaml(path: Path) -> dict[str, Any]:
    """The spec at `path` as a mapping, or SpecError saying what keeps it from being one."""
    raw = parse_yaml(decode_spec(read_bytes(path), path), path)
    if raw is None:
        raise SpecError(
            f"Job spec {path} is empty; write the job's fields (name, model, data, batch, ...), e.g. copy jobs/quickstart.yaml"
        )
    if not isinstance(raw, dict):
        raise SpecError(
            f"Job spec {path} must be a YAML mapping of fields (name, model, data, batch, ...), got "
            f"{_KINDS.get(type(raw), type(raw).__name__)}; start from jobs/quickstart.yaml"
        )
    return raw


_KINDS = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def read_bytes(path: Path) -> bytes:
    """The file's bytes, at most MAX_SPEC_BYTES of them."""
    try:
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise SpecError(f"Job spec {path} {what}; pass the path of a YAML job spec, e.g. jobs/quickstart.yaml")
        with path.open("rb") as f:
            data = f.read(MAX_SPEC_BYTES + 1)  # read no more than the cap, whatever the file claims
    except (OSError, ValueError) as exc:  # unreadable, a name too long, a NUL in the name
        reason = getattr(exc, "strerror", None) or str(exc)
        raise SpecError(f"Job spec {path} cannot be read ({reason}); check the path and its permissions") from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(
            f"Job spec {path} is over {MAX_SPEC_BYTES // 2**20} MiB, and a job spec is a few KiB of YAML; "
            f"pass the job spec's path (not a dataset or a binary)"
        )
    return data


def decode_spec(data: bytes, path: Path) -> str:
    """UTF-8 text (a leading byte-order mark dropped), or SpecError at the first bad byte."""
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data.count(b"\n", 0, offset) + 1
        raise SpecError(
            f"Job spec {path} is not UTF-8 text: byte {offset} (line {line}) is 0x{data[offset]:02x} "
            f"({exc.reason}); save the file as UTF-8"
        ) from None


def parse_yaml(text: str, path: Path) -> Any:
    """YAML's safe load under the guards of _SpecLoader; SpecError names the line of a problem."""
    try:
        loader = _SpecLoader(text)  # its reader refuses NUL and other control characters right here
    except yaml.YAMLError as exc:
        raise SpecError(_yaml_problem(exc, text, path)) from None
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise SpecError(_yaml_problem(exc, text, path)) from None
    finally:
        loader.dispose()


class _Refused(yaml.MarkedYAMLError):
    """Well-formed YAML no job spec holds (a duplicate key, a bomb), with its fix."""

    def __init__(self, problem: str, mark: Any, fix: str):
        super().__init__(problem=problem, problem_mark=mark)
        self.fix = fix


class _SpecLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys, deep nesting, alias bombs and values Python
    cannot build (month 13, a 5,000-digit integer) as YAML errors, with their line."""

    def __init__(self, text: str):
        super().__init__(text)
        self._depth = 0
        self._composed = 0  # values written out in the file
        self._sizes: dict[int, int] = {}  # id(node) -> values in it once aliases are expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"values nest deeper than {MAX_DEPTH} levels", event.start_mark, "flatten it")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(event, yaml.AliasEvent):  # counted where it was anchored, unless it is still being read
            if id(node) not in self._sizes:
                raise _Refused(f"alias *{event.anchor} refers to a value that contains it", event.start_mark, "remove the alias")
            return node
        self._composed += 1
        if self._composed > MAX_NODES:
            raise _Refused(
                f"the file holds over {MAX_NODES:,} values",
                node.start_mark,
                "a job spec holds a few hundred: check that this is the job spec",
            )
        self._count(node)
        return node

    def _count(self, node: Any) -> None:
        if id(node) in self._sizes:
            return
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        size = 1 + sum(self._sizes[id(child)] for child in children)
        if size > MAX_NODES:
            raise _Refused(
                f"aliases expand this value to over {MAX_NODES:,} values (a YAML bomb?)",
                node.start_mark,
                "write the values out: a job spec needs no aliases",
            )
        self._sizes[id(node)] = size

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:  # PyYAML lets these through from int(), float(), date()
            kind = node.tag.rsplit(":", 1)[-1]
            reason = "it has too many digits" if kind == "int" else str(exc)
            problem = f"{_show(node.value)} cannot be read as {kind}: {reason}"
            raise _Refused(problem, node.start_mark, "correct the value") from None

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            self._refuse_duplicate_keys(node)
        return super().construct_mapping(node, deep)

    def _refuse_duplicate_keys(self, node: Any) -> None:
        """PyYAML keeps the last of two equal keys silently; a spec would lose a value unseen."""
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # SafeLoader refuses it with its own message
            if key in seen:
                raise _Refused(
                    f"duplicate key {_show(key)} (first at line {seen[key].line + 1})",
                    key_node.start_mark,
                    "keep one of them: YAML would silently use the last",
                )
            seen[key] = key_node.start_mark


def _yaml_problem(exc: yaml.YAMLError, text: str, path: Path) -> str:
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow (NUL, most control characters)
        line = text.count("\n", 0, exc.position) + 1
        return f"Job spec {path} is not valid YAML at line {line}: character U+{exc.character:04X} is not allowed; remove it"
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    if isinstance(exc, _Refused):
        return f"Job spec {path} is refused{where}: {problem}; {exc.fix}"
    fix = "indent with spaces: YAML does not allow tabs there" if "'\\t'" in problem else "fix the YAML syntax there"
    return f"Job spec {path} is not valid YAML{where}: {problem}; {fix}"


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
        errors = exc.errors(include_url=False)
        lines = [f"Invalid job spec {source} ({len(errors)} problem{'s' if len(errors) != 1 else ''}):"]
        for field, value, rule, fix in map(explain, errors[:MAX_PROBLEMS]):
            lines.append(f"  {field} = {value}")
            lines.append(f"    rule: {rule}")
            if fix:
                lines.append(f"    fix:  {fix}")
        if len(errors) > MAX_PROBLEMS:
            lines.append(f"  ... and {len(errors) - MAX_PROBLEMS} more")
        raise SpecError("\n".join(lines)) from None


def explain(err: ErrorDetails) -> tuple[str, str, str, str]:
    """(field path, shown value, rule, fix) for one pydantic error."""
    loc = [_clip(str(p)) for p in err["loc"]]  # keys may be numbers or null, and long
    # Discriminated unions insert the tag ("adamw") into the path; drop it for the user.
    loc = [p for i, p in enumerate(loc) if p not in _TAGS.get(_section_of(loc, i), ())]
    kind = err["type"]
    if loc[-1:] == ["[key]"]:  # a mapping's key, not its value, is wrong: name the key
        loc, kind = loc[:-1], "invalid_key"
    field = ".".join(loc) or "(top level)"
    value = _show(err.get("input"))
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        allowed = _allowed_keys(err["loc"][:-1])
        near = difflib.get_close_matches(loc[-1], allowed, n=1)
        fix = f"did you mean '{near[0]}'? " if near else ""
        return field, value, "unknown key", fix + f"allowed keys here: {', '.join(allowed)}"
    if kind == "missing":
        return field, "(missing)", "required field", f"add {field}"
    if kind == "invalid_key":
        allowed = _allowed_keys(err["loc"][:-1]) if err["loc"][-1:] != ("[key]",) else []
        fix = "write the key as text" + (f"; allowed keys here: {', '.join(allowed)}" if allowed else " (a quoted string)")
        return field, value, "keys are text", fix
    if kind == "finite_number":
        return field, value, "must be a finite number (not NaN or infinity)", f"give {field} a finite number"
    tag = str(ctx.get("discriminator", "'name'")).strip("'")  # "name" for optimizers and schedules, "action" for faults
    if kind == "union_tag_invalid":
        return (
            f"{field}.{tag}",
            _show(ctx.get("tag")),
            f"unknown {tag}; expected one of {ctx.get('expected_tags')}",
            f"use one of those {tag}s",
        )
    if kind == "union_tag_not_found":
        return field, value, f"needs a '{tag}' that picks its kind", f"add {field}.{tag}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return field, value, msg.lower(), f"set {field} to a value that {msg.lower().replace('input should be', 'is')}"
    if kind == "string_pattern_mismatch":
        return field, value, f"must match {ctx.get('pattern')}", _pattern_fix(field)
    if kind == "literal_error":
        return field, value, msg.lower(), "use one of the listed values"
    if kind.endswith(("_parsing", "_type", "_parsing_size", "_from_float")):
        return field, value, msg.lower(), f"give {field} a value of that type"
    # Our own validators write "<rule>; <fix>", and rules over several fields start with the one
    # they blame, relative to where the validator sits: "micro_batch_size (16) exceeds ...".
    rule, _, fix = msg.partition("; ")
    rule, fix = _clip(rule, 400), _clip(fix, 400)  # a rule may quote the value, however long
    blamed = _BLAMED.match(rule)
    if blamed:
        return ".".join([*loc, blamed["field"]]), _clip(blamed["value"]), rule, fix
    return field, value, rule, fix or f"change {field} to follow the rule"


_BLAMED = re.compile(r"^(?P<field>[a-z_]+(\.([a-z_]+|\d+))*) \((?P<value>[^)]*)\) ")


def _pattern_fix(field: str) -> str:
    if field == "name":
        return "use lower-case letters, digits and '-', starting and ending with a letter or digit (at most 63)"
    if field.endswith("factory"):
        return "write it as 'pkg.module:function'"
    return "change it to match the pattern"


def _show(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an integer beyond Python's 4,300-digit limit on int -> str
        text = f"(an integer of about {int(value.bit_length() * 0.30103)} digits)" if isinstance(value, int) else "(unshowable)"
    except RecursionError:
        text = f"(a {type(value).__name__} nested too deeply to show)"
    return _clip(text)


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _section_of(loc: list[str], i: int) -> str | None:
    """The field whose union tag loc[i] would be: the one before it, or before a list index."""
    if i > 1 and loc[i - 1].isdigit():
        return loc[i - 2]
    return loc[i - 1] if i > 0 else None


def _allowed_keys(parent_loc: tuple) -> list[str]:
    """Field names allowed at `parent_loc`, following union tags ("optimizer.adamw")."""
    candidates: list[type[BaseModel]] = [JobSpec]
    for part in map(str, parent_loc):
        tagged = [m for m in candidates if _tag(m) == part]
        if tagged:
            candidates = tagged
            continue
        fields = [sub for m in candidates if part in m.model_fields for sub in _models_in(m.model_fields[part].annotation)]
        if fields or not any(part in m.model_fields for m in candidates):  # else a list index or a mapping's key: same models
            candidates = fields or candidates
    return sorted({key for m in candidates for key in m.model_fields})


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _tag(model: type[BaseModel]) -> str | None:
    """The tag that picks `model` inside its union: its `name` or `action` literal, or recipe/factory."""
    if model is RecipeModel:
        return "recipe"
    if model is FactoryModel:
        return "factory"
    field = model.model_fields.get("name") or model.model_fields.get("action")
    if field is None or typing.get_origin(field.annotation) is not typing.Literal:
        return None
    return typing.get_args(field.annotation)[0]


# Per union field, the tags pydantic inserts into error paths (dropped when shown to the user);
# looked up with None too, for a path's first part (_section_of).
_TAGS: dict[str | None, set[str]] = {
    section: {t for m in _models_in(JobSpec.model_fields[section].annotation) if (t := _tag(m))}
    for section in ("model", "optimizer", "schedule", "faults")
}


def spec_dir_of(path: str | Path) -> str:
    """The folder a spec's own files (custom model code) are found from."""
    return str(Path(path).resolve().parent)
