"""The ElastuneJob CustomResourceDefinition, generated from the pydantic models.

The job part of its schema is the job spec's own JSON Schema (`elastune schema`), rewritten into
the structural OpenAPI v3 subset the Kubernetes API server accepts: references inlined,
`null` options turned into `nullable`, tuples into bounded arrays, unions of objects merged into
one object whose variant-only fields are guarded by CEL rules (so `decay_fraction` with
`name: cosine` is refused by the API server), an integer-or-string union as Kubernetes'
int-or-string, other unions of differing scalars left to the operator's validation. Defaults
are left out on purpose: a stored ElastuneJob says what its author wrote, and the operator
applies the defaults the job spec defines.
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from elastune.kube.models import ElastuneJobSpec, ElastuneJobStatus

GROUP, VERSION, KIND, PLURAL = "elastune.io", "v1alpha1", "ElastuneJob", "elastunejobs"
DROP = {"title", "default", "discriminator", "$schema", "additionalProperties", "examples"}
REWRITTEN = {"$defs", "properties", "items", "prefixItems", "const", "exclusiveMinimum", "exclusiveMaximum"}
PRESERVE = {"x-kubernetes-preserve-unknown-fields": True}


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON Schema as a Kubernetes structural schema (see the module docstring)."""
    return _convert(schema, schema.get("$defs", {}))


def _convert(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[1]]
        return _convert({**target, **{k: v for k, v in node.items() if k != "$ref"}}, defs)
    options = node.get("oneOf") or node.get("anyOf")
    if options is not None:
        return _union(node, [_convert(o, defs) for o in options])
    out: dict[str, Any] = {k: v for k, v in node.items() if k not in DROP | REWRITTEN}
    if not node.get("type") and "const" not in node and "enum" not in node:
        return {**_described(node), **PRESERVE}  # Any: the operator's validation decides
    if "const" in node:
        out["enum"] = [node["const"]]
        out.setdefault("type", _json_type(node["const"]))
    if "exclusiveMinimum" in node:  # JSON Schema 2020 numbers -> OpenAPI v3 booleans
        out.update(minimum=node["exclusiveMinimum"], exclusiveMinimum=True)
    if "exclusiveMaximum" in node:
        out.update(maximum=node["exclusiveMaximum"], exclusiveMaximum=True)
    if out.get("type") == "object":
        if "properties" in node:
            out["properties"] = {k: _convert(v, defs) for k, v in node["properties"].items()}
        elif isinstance(node.get("additionalProperties"), dict) and node["additionalProperties"]:
            out["additionalProperties"] = _convert(node["additionalProperties"], defs)
        else:
            out.update(PRESERVE)
    if out.get("type") == "array":
        if "prefixItems" in node:  # a tuple: a bounded array of its item type (or of anything)
            items = [_convert(i, defs) for i in node["prefixItems"]]
            out["items"] = items[0] if all(i == items[0] for i in items) else dict(PRESERVE)
            out.update(minItems=len(items), maxItems=len(items))
        else:
            out["items"] = _convert(node.get("items", {}), defs)
    return out


def _union(node: dict[str, Any], options: list[dict[str, Any]]) -> dict[str, Any]:
    nullable = any(o.get("type") == "null" for o in options)
    options = [o for o in options if o.get("type") != "null"]
    extra = {"nullable": True} if nullable else {}
    if len(options) == 1:
        return {**options[0], **_described(node), **extra}
    if all(o.get("type") == "object" and "properties" in o for o in options):
        return {**_merge_objects(options), **_described(node), **extra}
    if sorted(o["type"] for o in options) == ["integer", "string"]:  # a count or a word (auto)
        return {**_described(node), "x-kubernetes-int-or-string": True, **extra}
    # Differing scalar or array types (a path or a list of paths): any value here, checked by
    # the operator with the job spec's own rules.
    return {**_described(node), **PRESERVE}


def _merge_objects(variants: list[dict[str, Any]]) -> dict[str, Any]:
    """One object holding every variant's fields; CEL rules refuse a field its variant lacks."""
    key = _discriminator(variants)
    props: dict[str, Any] = {}
    for v in variants:
        for name, prop in v["properties"].items():
            if name not in props:
                props[name] = prop
            elif name == key:
                props[name] = {**props[name], "enum": props[name]["enum"] + prop["enum"]}
            elif props[name] != prop:  # the same field, typed differently per variant
                props[name] = {**_described(prop), **PRESERVE}
    required = set.intersection(*(set(v.get("required", [])) for v in variants))
    rules = []
    if key is None:  # variants told apart by a field only each has: exactly one of them
        marks = [_own_required(v, variants) for v in variants]
        rules.append(
            {
                "rule": " + ".join(f"(has(self.{m}) ? 1 : 0)" for m in marks) + " == 1",
                "message": "give exactly one of " + ", ".join(marks),
            }
        )
    for name in props:
        owners = [v for v in variants if name in v["properties"]]
        if len(owners) == len(variants):
            continue
        if key is not None:
            allowed = [o["properties"][key]["enum"][0] for o in owners]
            which = f"self.{key} in {json.dumps(allowed)}"
            said = f"{key} {' or '.join(map(str, allowed))}"
        else:
            marks = [_own_required(o, variants) for o in owners]
            if name in marks:  # the field that tells this variant apart: the rule above holds it
                continue
            which = " || ".join(f"has(self.{m})" for m in marks)
            said = " or ".join(marks)
        rules.append({"rule": f"!has(self.{name}) || {which}", "message": f"{name} applies only with {said}"})
    if key is not None:  # what one variant requires beyond the rest
        for v in variants:
            tag = v["properties"][key]["enum"][0]
            for name in sorted(set(v.get("required", [])) - required):
                rules.append(
                    {"rule": f"self.{key} != {json.dumps(tag)} || has(self.{name})", "message": f"{key} {tag} needs {name}"}
                )
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = sorted(required)
    if rules:
        out["x-kubernetes-validations"] = rules
    return out


def _discriminator(variants: list[dict[str, Any]]) -> str | None:
    for name in variants[0]["properties"]:
        if all(len(v["properties"].get(name, {}).get("enum", [])) == 1 and name in v.get("required", [name]) for v in variants):
            return name
    return None


def _own_required(variant: dict[str, Any], variants: list[dict[str, Any]]) -> str:
    others = set().union(*(set(v["properties"]) for v in variants if v is not variant))
    return next(r for r in variant.get("required", []) if r not in others)


def _described(node: dict[str, Any]) -> dict[str, Any]:
    return {"description": node["description"]} if "description" in node else {}


def _json_type(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string"}[type(value)]


def spec_schema() -> dict[str, Any]:
    schema = structural(ElastuneJobSpec.model_json_schema())
    schema["description"] = "An Elastune job spec (docs: `elastune schema`) plus the shape of its Ray cluster."
    return schema


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object (`elastune schema --crd` prints it as YAML)."""
    column = lambda name, path, kind="integer": {"name": name, "type": kind, "jsonPath": path}  # noqa: E731
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/name": "elastune"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "plural": PLURAL,
                "singular": KIND.lower(),
                "listKind": f"{KIND}List",
                "shortNames": ["ej"],
                "categories": ["elastune"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        column("Phase", ".status.phase", "string"),
                        column("Step", ".status.step"),
                        column("Samples", ".status.samples"),
                        column("Workers", ".status.worldSize"),
                        column("Eval loss", ".status.evalLoss", "number"),
                        column("Checkpoint", ".status.lastDurableCheckpoint.step"),
                        column("Age", ".metadata.creationTimestamp", "date"),
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "An Elastune training job run on its own KubeRay cluster by the Elastune operator.",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": structural(ElastuneJobStatus.model_json_schema()),
                            },
                            "required": ["spec"],
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `elastune schema --crd` from the job spec models; do not edit (a test holds it equal).\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)
