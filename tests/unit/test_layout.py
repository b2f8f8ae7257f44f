"""Architecture guards: platform/ stays a source root; import direction holds."""

import ast
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "platform" / "elastune"


def test_platform_is_a_source_root_not_a_package():
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert not list((ROOT / "platform").glob("*.py"))


def test_import_platform_is_still_the_stdlib_module():
    import platform
    import sysconfig

    assert Path(platform.__file__).resolve() == Path(sysconfig.get_paths()["stdlib"]).resolve() / "platform.py"
    assert platform.python_version()


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("elastune."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("elastune."))
    return out


# DESIGN.md: spec <- data, train, checkpoint <- tune <- submit, cli. errors is a leaf; nothing imports cli.
ALLOWED = {
    "errors": set(),
    "events": set(),  # the run's records (events and metrics rows): a leaf anyone may import
    "metrics": {"events"},  # a leaf anyone may import (DESIGN.md)
    "batch_plan": {"errors"},  # the batch arithmetic: the spec's checks and training read it alike
    "spec": {"errors", "metrics", "batch_plan"},
    "cluster": {"errors", "events", "spec"},  # Ray bring-up and capacity rules for train/ and tune/
    "data": {"errors", "spec", "metrics"},
    "checkpoint": {"errors", "events", "spec", "metrics"},
    "recipes": {"errors", "spec", "recipes", "metrics", "data"},  # gpt reads its vocabulary from the dataset's manifest
    "train": {"errors", "events", "spec", "batch_plan", "cluster", "data", "checkpoint", "recipes", "train", "metrics"},
    "tune": {"errors", "events", "spec", "batch_plan", "cluster", "data", "checkpoint", "recipes", "train", "metrics", "tune"},
    "report": {"errors", "events", "train", "tune", "metrics"},
    "submit": {"errors", "spec"},  # talks to a cluster; never trains here
    "kube": {"errors", "spec"},  # pure rules of the Kubernetes operator; never trains, never calls an API
    "cli": {
        "errors",
        "events",
        "spec",
        "batch_plan",
        "data",
        "checkpoint",
        "recipes",
        "train",
        "tune",
        "cli",
        "metrics",
        "report",
        "submit",
        "kube",
    },
}


def test_import_direction():
    bad = []
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).parts
        pkg = rel[0].removesuffix(".py") if len(rel) > 1 or rel[0] != "__init__.py" else "elastune"
        if pkg in ("__init__", "__main__", "elastune"):
            continue
        allowed = ALLOWED.get(pkg, set()) | {pkg}
        for dep in _imports(path):
            if dep not in allowed:
                bad.append(f"{path.relative_to(ROOT)} imports elastune.{dep}")
    assert not bad, "\n".join(bad)


def test_every_module_imports():
    for path in PKG.rglob("*.py"):
        if path.name == "__main__.py":
            continue
        name = ".".join(path.relative_to(ROOT / "platform").with_suffix("").parts).removesuffix(".__init__")
        importlib.import_module(name)
    assert "elastune" in sys.modules
