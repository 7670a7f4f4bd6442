"""The shipped Grafana dashboards and provisioning: generated, consistent, and valid PromQL."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from probe.models import Outcome
from tools import dashboards

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
COMMITTED = sorted((GRAFANA / "dashboards").glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


def variables(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in doc["templating"]["list"]}


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in doc["panels"] if p["type"] != "row"]


def test_committed_json_is_the_generators_output() -> None:
    generated = dashboards.rendered()
    assert sorted(generated) == [p.name for p in COMMITTED]
    for path in COMMITTED:
        assert path.read_text() == generated[path.name], f"{path.name} is stale: run python -m tools.dashboards"


def test_check_mode_reports_a_stale_dashboard(tmp_path: Path) -> None:
    assert dashboards.main(["--out", str(tmp_path)]) == 0
    assert dashboards.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "routes.json").write_text("{}\n")
    assert dashboards.main(["--check", "--out", str(tmp_path)]) == 1


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("overview", {"datasource", "vantage", "target", "route"}),
        ("latency", {"datasource", "vantage", "target", "route", "phase"}),
        ("routes", {"datasource", "vantage", "target", "route"}),
        ("path", {"datasource", "vantage", "target", "route"}),
        ("dns", {"datasource", "vantage", "target", "resolver"}),
        ("health", {"datasource", "vantage"}),
    ],
)
def test_dashboard_variables(name: str, expected: set[str]) -> None:
    found = variables(load(GRAFANA / "dashboards" / f"{name}.json"))
    assert set(found) == expected
    for var in found.values():
        if var["type"] == "query":
            assert var["allValue"] == ".*" and var["multi"] and var["includeAll"]


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.stem)
def test_every_panel_queries_the_datasource_variable_with_the_selected_labels(path: Path) -> None:
    doc = load(path)
    for panel in panels(doc):
        if panel["type"] == "text":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'vantage=~"$vantage"' in target["expr"], (panel["title"], target["expr"])
            if "target" in variables(doc):
                assert 'target=~"$target"' in target["expr"], (panel["title"], target["expr"])


def test_panels_do_not_overlap() -> None:
    for path in COMMITTED:
        cells: set[tuple[int, int]] = set()
        for panel in panels(load(path)):
            g = panel["gridPos"]
            assert g["x"] + g["w"] <= 24
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & mine, f"{path.name}: {panel['title']} overlaps"
            cells |= mine


def test_outcome_matrix_colours_every_outcome() -> None:
    matrix = next(p for p in panels(load(GRAFANA / "dashboards" / "overview.json")) if p["type"] == "table")
    options = matrix["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert set(options) == {o.value for o in Outcome}
    assert {k for k, v in options.items() if v["color"] == "red"} == {o.value for o in Outcome if o.blocked}


def test_every_expression_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each expression (variables substituted) as a recording rule."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool not installed: scripts/test installs it"
    values = {"datasource": "prometheus", "vantage": ".*", "target": ".*", "route": ".*", "resolver": ".*",
              "phase": "connect"}
    exprs = [dashboards.substitute(e, values) for p in COMMITTED for e in dashboards.expressions(load(p))]
    assert len(exprs) > 30
    assert not [e for e in exprs if "$" in e]
    rules = {"groups": [{"name": "dashboards", "rules": [
        {"record": f"dashboard:expr_{i}", "expr": e} for i, e in enumerate(exprs)
    ]}]}
    path = tmp_path / "exprs.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_provisioning_points_grafana_at_the_dashboards_and_the_datasource() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    for path in COMMITTED:
        assert variables(load(path))["datasource"]["current"]["value"] == source["uid"]
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "probe.yml").read_text())
    (p,) = provider["providers"]
    assert p["type"] == "file" and p["options"]["path"] == "/var/lib/grafana/dashboards/probe"


def test_variable_queries_narrow_by_the_variables_before_them() -> None:
    for path in COMMITTED:
        names: list[str] = []
        for var in load(path)["templating"]["list"]:
            for later in ("target", "route", "resolver"):
                assert f"${later}" not in str(var.get("query", "")) or later in names
            names.append(var["name"])


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.stem)
def test_committed_json_decodes_into_the_sdk_schema_without_losing_anything(path: Path) -> None:
    """Every panel, query and option decodes into the SDK's typed models: nothing unknown is dropped.

    Decoding may add the panel plugin's defaults (e.g. `custom.lineWidth`), so the check is that the
    committed document is contained in the re-encoded one.
    """
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    def contained(small: Any, big: Any, where: str) -> None:
        if isinstance(small, dict):
            assert isinstance(big, dict), where
            for key, value in small.items():
                assert key in big, f"{where}/{key} lost in decoding"
                contained(value, big[key], f"{where}/{key}")
        elif isinstance(small, list):
            assert isinstance(big, list) and len(big) == len(small), where
            for i, (a, b) in enumerate(zip(small, big, strict=True)):
                contained(a, b, f"{where}[{i}]")
        else:
            assert small == big, f"{where}: {small!r} became {big!r}"

    register_default_plugins()
    doc = load(path)
    contained(doc, json.loads(JSONEncoder().encode(Dashboard.from_json(doc))), path.name)
