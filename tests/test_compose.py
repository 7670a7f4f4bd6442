"""docker-compose.yml: no container engine runs here, so its structure is checked instead.

Every file it mounts exists and passes its own tool, every host name a config points at is a
service of the file on the port that service listens on, and the stand-in webhook's code runs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.test_fleet_e2e import free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
PORTS = {"probe": 9516, "probe-cn": 9516, "prometheus": 9090, "alertmanager": 9093, "alert-webhook": 8080}


def mounts(service: str) -> dict[str, Path]:
    """Return container path -> repository path of the service's bind mounts."""
    out = {}
    for volume in SERVICES[service].get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("./"):
            out[target] = ROOT / source
    return out


def mounted(service: str, container_path: str) -> Path:
    """Return the repository file the service sees at `container_path` (through a mounted directory too)."""
    for target, source in sorted(mounts(service).items(), key=lambda kv: -len(kv[0])):
        if container_path == target or container_path.startswith(target + "/"):
            return source / container_path[len(target):].lstrip("/")
    raise AssertionError(f"{service} has nothing mounted at {container_path}")


def flag(service: str, name: str) -> str:
    values = [a.split("=", 1)[1] for a in SERVICES[service]["command"] if a.startswith(f"--{name}=")]
    assert len(values) == 1, (service, name)
    return values[0]


def assert_service_address(address: str) -> None:
    host, _, port = address.partition(":")
    assert host in SERVICES, f"{address}: no service {host!r} in docker-compose.yml"
    assert int(port) == PORTS[host], f"{address}: {host} listens on {PORTS[host]}"


def test_brings_up_probe_prometheus_alertmanager_grafana_and_an_agent() -> None:
    assert {"probe", "prometheus", "alertmanager", "grafana", "agent-cn", "probe-cn"} <= set(SERVICES)


def test_every_mounted_file_exists() -> None:
    for service in SERVICES:
        for target, source in mounts(service).items():
            assert source.exists(), f"{service}: {source} (mounted at {target}) does not exist"


def test_central_prometheus_config_rules_and_targets() -> None:
    config_path = mounted("prometheus", flag("prometheus", "config.file"))
    assert "--web.enable-remote-write-receiver" in SERVICES["prometheus"]["command"]
    config = yaml.safe_load(config_path.read_text())
    for rule_file in config["rule_files"]:
        assert mounted("prometheus", "/etc/prometheus/" + rule_file).exists()
    for am in config["alerting"]["alertmanagers"]:
        for address in am["static_configs"][0]["targets"]:
            assert_service_address(address)
    (job,) = config["scrape_configs"]
    for address in job["static_configs"][0]["targets"]:
        assert_service_address(address)
    # the process metrics of the directly scraped probe get its vantage
    (relabel,) = job["metric_relabel_configs"]
    assert relabel["replacement"] == SERVICES["probe"]["environment"]["PROBE_VANTAGE"]


def test_agent_scrapes_its_probe_and_only_pushes_to_the_central_prometheus() -> None:
    agent = SERVICES["agent-cn"]
    assert "--enable-feature=agent" in agent["command"] or "--agent" in agent["command"]
    path = mounted("agent-cn", flag("agent-cn", "config.file"))
    promtool = shutil.which("promtool")
    assert promtool, "scripts/test installs promtool"
    subprocess.run([promtool, "check", "config", "--agent", str(path)], check=True, capture_output=True, timeout=60)
    config = yaml.safe_load(path.read_text())
    assert config["global"]["external_labels"]["vantage"] == SERVICES["probe-cn"]["environment"]["PROBE_VANTAGE"]
    for address in config["scrape_configs"][0]["static_configs"][0]["targets"]:
        assert_service_address(address)
    (remote,) = config["remote_write"]
    url = urlsplit(remote["url"])
    assert_service_address(url.netloc)
    assert url.path == "/api/v1/write"
    shipped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "agent.yml").read_text())
    assert remote["write_relabel_configs"] == shipped["remote_write"][0]["write_relabel_configs"]


def test_alertmanager_receivers_are_services() -> None:
    config = yaml.safe_load(mounted("alertmanager", flag("alertmanager", "config.file")).read_text())
    for receiver in config["receivers"]:
        for hook in receiver["webhook_configs"]:
            assert_service_address(urlsplit(hook["url"]).netloc)


def test_grafana_gets_the_provisioning_and_the_dashboards() -> None:
    datasources = mounted("grafana", "/etc/grafana/provisioning/datasources/prometheus.yml")
    (source,) = yaml.safe_load(datasources.read_text())["datasources"]
    assert_service_address(urlsplit(source["url"]).netloc)
    provider = yaml.safe_load(mounted("grafana", "/etc/grafana/provisioning/dashboards/probe.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert sorted(p.name for p in mounted("grafana", path).glob("*.json")) == sorted(
        p.name for p in (ROOT / "grafana" / "dashboards").glob("*.json"))
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounted("grafana", home).exists()


def test_probes_read_the_shipped_config() -> None:
    for name in ("probe", "probe-cn"):
        assert mounted(name, "/etc/probe/targets.yml") == ROOT / "targets.yml"
    assert SERVICES["probe"]["build"] == "."


@pytest.fixture
def webhook_port() -> Iterator[tuple[int, subprocess.Popen[str]]]:
    port = free_port()
    (code,) = SERVICES["alert-webhook"]["command"]
    proc = subprocess.Popen([sys.executable, "-c", code], env={"PORT": str(port)}, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        yield port, proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_stand_in_webhook_prints_each_alert(webhook_port: tuple[int, subprocess.Popen[str]]) -> None:
    port, proc = webhook_port
    body = json.dumps({"alerts": [{"status": "firing", "labels": {"alertname": "ProbeEndpointBlocked",
                                                                  "target": "oss"}}]}).encode()
    for _ in range(50):
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/probe/oncall", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=5) as r:
                assert r.status == 200
            break
        except urllib.error.URLError as e:
            if not isinstance(e.reason, ConnectionRefusedError):
                raise
            time.sleep(0.1)
    else:
        raise AssertionError("the webhook never listened")
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line == '/probe/oncall firing {"alertname": "ProbeEndpointBlocked", "target": "oss"}\n'
