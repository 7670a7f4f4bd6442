"""The shipped Prometheus and Alertmanager files, checked by the real promtool and amtool.

The alert rules' unit tests (deploy/prometheus/rules/probe.rules.test.yml) run here, so a
rule change that breaks an alert fails the suite.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import trustme
import yaml

from tools import rules

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "probe.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "rules" / "probe.rules.test.yml"
DASHBOARDS = ROOT / "grafana" / "dashboards"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not installed: scripts/test installs it (APT_PACKAGES)"
    return path


def run(*args: str | Path) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def alert_rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def test_alert_rules_pass_promtool_check() -> None:
    out = run(tool("promtool"), "check", "rules", RULES)
    assert "SUCCESS" in out


def test_alert_rule_unit_tests_pass_promtool_test() -> None:
    out = run(tool("promtool"), "test", "rules", RULE_TESTS)
    assert "SUCCESS" in out


def test_every_alert_has_a_unit_test() -> None:
    tested = {a["alertname"] for t in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for a in t.get("alert_rule_test", []) if a.get("exp_alerts")}
    assert tested == {r["alert"] for r in alert_rules()}


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: str(r["alert"]))
def test_alert_waits_before_firing_and_says_what_to_look_at(rule: dict[str, object]) -> None:
    assert rules.parse_duration(str(rule["for"])) >= 300, "confirm for at least 5 minutes"
    annotations = rule["annotations"]
    assert isinstance(annotations, dict)
    assert {"summary", "description", "look_at"} <= annotations.keys()
    labels = rule["labels"]
    assert isinstance(labels, dict) and labels["severity"] in {"critical", "warning", "info"}


def test_dashboards_named_in_annotations_exist() -> None:
    shipped = {}
    for path in DASHBOARDS.glob("*.json"):
        doc = yaml.safe_load(path.read_text())
        shipped[doc["uid"]] = doc["title"]
    named = re.findall(r'"(Probe / [^"]+)" \(uid ([a-z-]+)\)', RULES.read_text())
    assert named
    for title, uid in named:
        assert shipped.get(uid) == title, f"annotation names {title!r} (uid {uid}); shipped: {shipped}"


def test_compressed_rules_divide_every_wait_and_stay_valid(tmp_path: Path) -> None:
    fast = tmp_path / "fast.rules.yml"
    fast.write_text(rules.compress(RULES.read_text(), 60))
    run(tool("promtool"), "check", "rules", fast)
    slow_rules = alert_rules()
    fast_rules = [r for g in yaml.safe_load(fast.read_text())["groups"] for r in g["rules"] if "alert" in r]
    assert [r["alert"] for r in fast_rules] == [r["alert"] for r in slow_rules]
    for slow, quick in zip(slow_rules, fast_rules, strict=True):
        assert rules.parse_duration(str(quick["for"])) * 60 == rules.parse_duration(str(slow["for"]))
        assert quick["expr"] == slow["expr"] and quick["annotations"] == slow["annotations"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m", 300), ("1h30m", 5400), ("250ms", 0.25), ("1d", 86400), ("0s", 0)],
    ids=["minutes", "compound", "millis", "day", "zero"],
)
def test_prometheus_durations_parse(text: str, seconds: float) -> None:
    assert rules.parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "5", "m5", "5m 3s", "1.5m"], ids=["empty", "no-unit", "unit-first", "space", "fraction"]
)
def test_bad_prometheus_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="bad Prometheus duration"):
        rules.parse_duration(text)


def test_compressed_durations_format_in_seconds_or_millis() -> None:
    assert [rules.format_duration(s) for s in (5.0, 0.25, 15.0, 10 / 60)] == ["5s", "250ms", "15s", "167ms"]


@pytest.mark.parametrize("name", ["prometheus.yml", "on-demand.yml"])
def test_prometheus_configs_pass_promtool(name: str) -> None:
    run(tool("promtool"), "check", "config", DEPLOY / "prometheus" / name)


def test_agent_config_passes_promtool_in_agent_mode() -> None:
    run(tool("promtool"), "check", "config", "--agent", DEPLOY / "prometheus" / "agent.yml")


def test_alertmanager_config_passes_amtool() -> None:
    run(tool("amtool"), "check-config", DEPLOY / "alertmanager" / "alertmanager.yml")


def test_web_config_passes_promtool_with_real_certificates(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("prometheus.example.net")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    text = (DEPLOY / "prometheus" / "web-config.yml").read_text().replace("/etc/prometheus/tls", str(tmp_path))
    (tmp_path / "web-config.yml").write_text(text)
    run(tool("promtool"), "check", "web-config", tmp_path / "web-config.yml")
