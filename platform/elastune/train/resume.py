"""What a run does with the newest checkpoint at its root: start afresh (there is none), resume
it (saying which spec fields differ from the spec that saved it), stop at once (it already holds
the whole budget), or refuse (it belongs to another model or optimizer: not corrupt, and not to
be written over). Pure rules: the driver applies them before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from elastune.checkpoint.format import Manifest
from elastune.errors import IncompatibleCheckpoint
from elastune.spec.models import JobSpec

# Fields whose change says nothing about the state a checkpoint holds: where things go, how
# much to train, how many workers, what to rehearse or search.
UNCOMPARED = ("name", "output_dir", "checkpoint", "metrics", "faults", "tune", "stop", "scaling")


@dataclass(frozen=True)
class ResumePlan:
    """What a run does with the newest checkpoint at its root: resume at `step`, or nothing is left to train."""

    step: int
    samples_seen: int
    changes: tuple[str, ...]  # "optimizer.lr 0.001 -> 0.002", for the fields that differ
    complete: bool  # the checkpoint already holds the spec's whole budget


def saved_spec(spec: JobSpec) -> dict[str, Any]:
    """The spec as a checkpoint records it (meta.spec): every section, the schedule's horizon resolved."""
    raw = spec.to_dict()
    raw["schedule"] = {**raw["schedule"], "horizon_samples": spec.horizon_samples}
    return raw


def plan_resume(manifest: Manifest | None, model: ModelState, spec: JobSpec, where: str) -> ResumePlan | None:
    """None: nothing to resume. IncompatibleCheckpoint: the checkpoint at `where` does not fit
    this job's model or optimizer."""
    if manifest is None:
        return None
    check_fits(manifest, model, spec, where)
    saved = manifest.meta.get("spec")
    changes = spec_changes(saved, saved_spec(spec)) if isinstance(saved, dict) else ()
    return ResumePlan(manifest.step, manifest.samples_seen, changes, manifest.samples_seen >= spec.budget_samples)


@dataclass(frozen=True)
class ModelState:
    """A model's state tensors by name with their shapes, and the names that alias a tied
    parameter (saved once, under the other name; checkpoints from other tools may carry them)."""

    shapes: dict[str, list[int]]
    aliases: frozenset[str] = frozenset()


def check_fits(manifest: Manifest, model: ModelState, spec: JobSpec, where: str) -> None:
    fixes = (
        "it is not corrupt, and this run will not write over it. To start over at this location, run with --fresh "
        "(it deletes the checkpoints there); to keep them, set checkpoint.path to another location"
    )
    model_shapes = model.shapes
    saved = {k[len("model/") :]: v for k, v in manifest.shapes.items() if k.startswith("model/")}
    missing, extra = sorted(set(model_shapes) - set(saved)), sorted(set(saved) - set(model_shapes) - model.aliases)
    if missing or extra:
        raise IncompatibleCheckpoint(
            f"{where} was saved from another model: this model's {_names(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not in it{', and it holds ' + _names(extra) if extra else ''}; {fixes}"
        )
    differ = [n for n in sorted(model_shapes) if list(saved[n]) != list(model_shapes[n])]
    if differ:
        first = differ[0]
        more = f" (and {len(differ) - 1} more tensor(s) differ)" if len(differ) > 1 else ""
        raise IncompatibleCheckpoint(
            f"{where} does not fit this job's model: tensor model/{first} has shape {list(saved[first])} in "
            f"the checkpoint and {list(model_shapes[first])} in the model{more}; {fixes}"
        )
    was = (manifest.meta.get("optimizer") or {}).get("name") if isinstance(manifest.meta.get("optimizer"), dict) else None
    if was is not None and was != spec.optimizer.name:
        raise IncompatibleCheckpoint(
            f"{where} holds {was} optimizer state and this job's optimizer.name is {spec.optimizer.name}: "
            f"the saved state does not fit it; set optimizer.name: {was}, or {fixes}"
        )


def spec_changes(saved: dict[str, Any], now: dict[str, Any]) -> tuple[str, ...]:
    """'path old -> new' for each field that differs between two spec dicts (sections in
    UNCOMPARED left out); a section or field only one side has shows as '(unset)'."""
    a, b = _flat(saved), _flat(now)
    out = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[0] in UNCOMPARED or a.get(key, _UNSET) == b.get(key, _UNSET):
            continue
        out.append(f"{key} {_show(a.get(key, _UNSET))} -> {_show(b.get(key, _UNSET))}")
    return tuple(out)


_UNSET = object()


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out |= _flat(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: node}


def _show(value: Any) -> str:
    return "(unset)" if value is _UNSET else repr(value) if isinstance(value, str) else str(value)


def _names(names: list[str]) -> str:
    shown = ", ".join(f"model/{n}" for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")
