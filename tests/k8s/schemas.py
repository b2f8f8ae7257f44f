"""Validate Kubernetes objects the way an API server would, without one.

Built-in kinds: the Kubernetes API's own schemas (kubernetes-validate, strict: unknown fields are
errors, as `kubectl apply --validate=strict` makes them). Custom resources: the openAPIV3Schema
of their CRD (KubeRay's files in ../shared/k8s-schemas/kuberay, Elastune's generated one), read
with OpenAPI's meaning (nullable, int-or-string, preserved unknown fields, unknown fields refused
elsewhere), and their x-kubernetes-validations CEL rules evaluated (rules on oldSelf compare two
versions of an object and are left out).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT.parent / "shared" / "k8s-schemas" / "kuberay"
K8S_VERSION = "1.32.0"
NO_SCHEMA = {  # kinds whose CRD is not on this machine: checked field by field in test_manifests
    ("monitoring.coreos.com/v1", "PodMonitor"),
}


class Invalid(Exception):
    pass


def validate(obj: dict[str, Any]) -> None:
    """Raise Invalid naming the object and what is wrong with it."""
    name = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
    schema = crd_schemas().get((obj.get("apiVersion"), obj.get("kind")))
    if schema is None:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise Invalid(f"{name}: {'.'.join(map(str, exc.path))}: {exc.message}") from None
        return
    errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
    if errors:
        raise Invalid("; ".join(f"{name}: {'.'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in errors[:5]))
    for path, rule, message in cel_failures(schema, obj):
        raise Invalid(f"{name}: {path or '(root)'}: {message} (rule {rule})")


def crds() -> Iterator[dict[str, Any]]:
    from elastune.kube.crd import crd

    paths = sorted(KUBERAY.glob("*.yaml"))
    assert paths, f"KubeRay's CRD files are missing: expected {KUBERAY}/ray.io_*.yaml (the shared test data beside the checkout)"
    for path in paths:
        yield from (d for d in yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader) if d)
    yield crd()


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for crd in crds():
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            out[(f"{group}/{version['name']}", kind)] = json_schema(version["schema"]["openAPIV3Schema"])
    return out


def json_schema(node: Any) -> Any:
    """OpenAPI v3 (as CRDs write it) -> JSON Schema draft 4 (boolean exclusiveMinimum, as OpenAPI)."""
    if not isinstance(node, dict):
        return node
    out = {
        k: json_schema(v) if isinstance(v, dict) else [json_schema(i) for i in v] if k in ("allOf", "anyOf", "oneOf") else v
        for k, v in node.items()
        if k not in ("properties", "additionalProperties", "items")
    }
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("x-kubernetes-preserve-unknown-fields") and not node.get("properties"):
        out.pop("type", None)  # any value
    if "properties" in node:
        out["properties"] = {k: json_schema(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False  # the API server prunes them; strict validation refuses them
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = json_schema(node["additionalProperties"])
    if "items" in node:
        out["items"] = json_schema(node["items"])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _rules_and_values(schema: dict[str, Any], value: Any, path: str) -> Iterator[tuple[str, dict[str, Any], Any]]:
    for rule in schema.get("x-kubernetes-validations", []):
        yield path, rule, value
    if isinstance(value, dict):
        for key, sub in value.items():
            if key in schema.get("properties", {}):
                yield from _rules_and_values(schema["properties"][key], sub, f"{path}.{key}".lstrip("."))
            elif isinstance(schema.get("additionalProperties"), dict):
                yield from _rules_and_values(schema["additionalProperties"], sub, f"{path}.{key}".lstrip("."))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, sub in enumerate(value):
            yield from _rules_and_values(schema["items"], sub, f"{path}[{i}]")


def cel_failures(schema: dict[str, Any], obj: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    env = celpy.Environment()
    for path, rule, value in _rules_and_values(schema, obj, ""):
        if "oldSelf" in rule["rule"]:
            continue
        ok = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})
        if not (isinstance(ok, celpy.celtypes.BoolType) and bool(ok)):
            yield path, rule["rule"], rule.get("message", "rule failed")
