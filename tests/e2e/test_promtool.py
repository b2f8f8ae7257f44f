"""The Prometheus rules and the local Prometheus config pass Prometheus's own checks
(`promtool check rules`, `promtool test rules`, `promtool check config`); a broken rule fails."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "dashboards" / "rules"


def run(*args: str, cwd: Path = RULES) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120)


def test_rules_check_and_their_unit_tests_pass(promtool):
    checked = run(promtool, "check", "rules", "elastune.rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run(promtool, "test", "rules", "elastune.rules.test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_the_local_prometheus_config_is_valid(promtool):
    checked = run(promtool, "check", "config", "prometheus.yml", cwd=ROOT / "dashboards")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_broken_rule_fails_the_check(promtool, tmp_path):
    broken = (
        (RULES / "elastune.rules.yml")
        .read_text()
        .replace("rate(elastune_samples_total[1m])", "rate(elastune_samples_total[1m]", 1)
    )
    (tmp_path / "broken.yml").write_text(broken)
    assert run(promtool, "check", "rules", "broken.yml", cwd=tmp_path).returncode != 0
