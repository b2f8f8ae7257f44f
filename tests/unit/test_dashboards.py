"""Grafana dashboards and Prometheus rules read only what the metric catalogue defines.

Every metric name in every panel query and every rule is a series the exporter serves
(metrics.catalogue) or a recording rule of dashboards/rules; every panel queries the dashboard's
`$datasource` and filters on the `job` and `run` variables.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from elastune.metrics.catalogue import series_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "dashboards" / "grafana").glob("*.json"))
RULES = yaml.safe_load((ROOT / "dashboards" / "rules" / "elastune.rules.yml").read_text())
NAME = re.compile(r"\belastune[a-z0-9_:]*")


def recorded() -> set[str]:
    return {r["record"] for g in RULES["groups"] for r in g["rules"] if "record" in r}


def exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_there_are_the_four_dashboards():
    assert [p.name for p in DASHBOARDS] == [f"elastune-{n}.json" for n in ("checkpoints", "elasticity", "training", "tuning")]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_query_reads_catalogued_metrics_through_the_variables(path):
    d = json.loads(path.read_text())
    names = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "job", "run"} <= names
    known = series_names() | recorded()
    for panel in d["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(NAME.findall(target["expr"]))
            assert used and used <= known, f"{path.name} {panel['title']}: {sorted(used - known)} not in the catalogue"
            assert 'job=~"$job"' in target["expr"] and 'run=~"$run"' in target["expr"], target["expr"]
    assert len({p["id"] for p in d["panels"]}) == len(d["panels"])


def test_rules_read_catalogued_metrics_and_each_other():
    known = series_names() | recorded()
    for group in RULES["groups"]:
        for rule in group["rules"]:
            used = set(NAME.findall(rule["expr"])) - {rule.get("record")}
            assert used <= known, f"{rule.get('record') or rule.get('alert')}: {sorted(used - known)}"
            assert "record" in rule or set(rule["labels"]) == {"severity"}


def test_all_uids_differ_and_provisioning_points_at_them():
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids)
    providers = yaml.safe_load((ROOT / "dashboards" / "provisioning" / "dashboards" / "elastune.yml").read_text())
    assert providers["providers"][0]["type"] == "file"
    sources = yaml.safe_load((ROOT / "dashboards" / "provisioning" / "datasources" / "elastune-prometheus.yml").read_text())
    assert sources["datasources"][0]["type"] == "prometheus"
