"""The fleet end to end, with the real programs: probe, Prometheus (agent and central), Alertmanager.

Two `probe run` processes with different vantages probe the same target names. At vantage
cn-test, target `storage` goes through a relay that the test switches to "blocked" (a reset
right after the ClientHello, as an SNI filter does); at de-test the same name points at the
healthy HTTPS server. Each probe is scraped by its own Prometheus in agent mode, which
remote-writes to a central Prometheus running the shipped rules with every `for:` divided by
60 (tools/rules.py); Alertmanager, with the shipped routing, delivers to a webhook served
here. Every config is derived from the shipped one in deploy/, so the test exercises it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.dnsserver import DnsServer, answer
from tests.servers import Pki, aiohttp_server, raw_server, reset_after_client_hello
from tools import dashboards, rules

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BLOCKED_VANTAGE, HEALTHY_VANTAGE = "cn-test", "de-test"
ROUTES = ("direct", "bound")
TARGETS = ("storage", "api")
DELIVERY_LIMIT = 60.0  # seconds from the block to the webhook, at most


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def agent_flag(prometheus: str) -> str:
    """Return the agent-mode flag of this Prometheus: a feature flag before 3.0, `--agent` since."""
    out = subprocess.run([prometheus, "--version"], capture_output=True, text=True, timeout=30)
    match = re.search(r"version (\d+)\.", out.stdout + out.stderr)
    assert match, out.stdout + out.stderr
    return "--agent" if int(match.group(1)) >= 3 else "--enable-feature=agent"


class Processes:
    """Child processes with their output in files; all stopped (TERM, then KILL) on exit."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    async def start(self, name: str, *argv: str | Path, env: dict[str, str] | None = None) -> None:
        log = (self.directory / f"{name}.log").open("wb")
        self.procs[name] = await asyncio.create_subprocess_exec(
            *map(str, argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=self.directory,
        )
        log.close()

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")

    def tails(self) -> str:
        return "\n".join(f"--- {n} (rc={p.returncode}):\n{self.log(n)[-3000:]}" for n, p in self.procs.items())

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.returncode is not None}
        assert not dead, f"exited early: {dead}\n{self.tails()}"

    async def stop(self) -> None:
        for p in self.procs.values():
            if p.returncode is None:
                p.terminate()
        for p in self.procs.values():
            try:
                await asyncio.wait_for(p.wait(), 10)
            except TimeoutError:
                p.kill()
                await p.wait()


async def wait_for(what: str, check: Callable[[], Awaitable[bool]], procs: Processes, limit: float = 30) -> float:
    """Poll `check` every 200 ms until true; return when it became true (time.time())."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        procs.check_alive()
        if await check():
            return time.time()
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {limit}s waiting for {what}\n{procs.tails()}")


class Relay:
    """TCP relay to the healthy HTTPS server; once `blocked`, it resets after the ClientHello."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.blocked = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.blocked:
            await reset_after_client_hello(reader, writer)
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()

        tasks = [asyncio.create_task(pipe(reader, up_writer)), asyncio.create_task(pipe(up_reader, writer))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            up_writer.transport.abort()


def healthy_app() -> web.Application:
    async def ping(request: web.Request) -> web.Response:
        return web.Response(text="pong")

    async def blob(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 65536, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/ping", ping)
    app.router.add_get("/blob", blob)
    return app


class Webhook:
    """Alertmanager's webhook receiver: every notification, with its arrival time."""

    def __init__(self) -> None:
        self.received: list[tuple[float, str, dict[str, Any]]] = []

    def app(self) -> web.Application:
        async def receive(request: web.Request) -> web.Response:
            self.received.append((time.time(), request.match_info["receiver"], await request.json()))
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/probe/{receiver}", receive)
        return app

    def alerts(self, status: str | None = None) -> list[tuple[float, dict[str, Any]]]:
        return [(at, a) for at, _, n in self.received for a in n["alerts"] if status in (None, a["status"])]


def probe_config(vantage: str, storage_port: int, api_port: int, ca_file: Path, dns_port: int) -> dict[str, Any]:
    def target(name: str, port: int) -> dict[str, Any]:
        return {
            "name": name,
            "url": f"https://localhost:{port}/ping",
            "expect": {"status": [200], "body_contains": "pong"},
            "routes": list(ROUTES),
            "group": "blobs",  # two endpoints of the same content: the group ranking picks one
            "download": {"url": f"https://localhost:{port}/blob", "min_bytes_per_second": 1000},
            "path": {"samples": 2, "spread": "100ms"},  # for the path dashboard and its hour-of-day rules
            # probe_phase_seconds is opt-in (the series budget): on for storage, so the latency
            # dashboard's heatmap and quantiles have data; api keeps the default.
            "histograms": name == "storage",
        }

    return {
        "vantage": vantage,
        "defaults": {"interval": "1s", "timeout": "900ms", "ca_file": str(ca_file)},
        "resolvers": [
            {"name": "system", "type": "system"},
            {"name": "control", "type": "udp", "address": f"127.0.0.1:{dns_port}", "control": True},
        ],
        "bogons": [],  # the loopback answers are the lab's stand-in for public addresses
        "routes": [{"name": "direct"}, {"name": "bound", "source_address": "127.0.0.1"}],
        "targets": [target("storage", storage_port), target("api", api_port)],
    }


def agent_config(vantage: str, probe: str, central: str) -> dict[str, Any]:
    """The shipped agent.yml, pointed at this probe and this central Prometheus, at 1 s."""
    cfg: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus" / "agent.yml").read_text())
    cfg["global"]["scrape_interval"] = "1s"
    cfg["global"]["external_labels"]["vantage"] = vantage
    (job,) = cfg["scrape_configs"]
    job["static_configs"] = [{"targets": [probe]}]
    (remote,) = cfg["remote_write"]
    remote["url"] = f"http://{central}/api/v1/write"
    remote["queue_config"].update(batch_send_deadline="500ms", min_backoff="100ms", max_backoff="1s")
    return cfg


def central_config(rules_file: Path, alertmanager: str) -> dict[str, Any]:
    """The shipped prometheus.yml with the fast rules (and the path rules), this Alertmanager, 1 s evaluation."""
    cfg: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(rules_file), str(DEPLOY / "prometheus" / "rules" / "path.rules.yml")]
    cfg["alerting"]["alertmanagers"] = [{"static_configs": [{"targets": [alertmanager]}]}]
    cfg["scrape_configs"] = []  # every sample arrives by remote_write, as from vantages behind a border
    return cfg


def alertmanager_config(webhook: str) -> dict[str, Any]:
    """The shipped alertmanager.yml, its waits in seconds and its receivers at the test's webhook."""
    cfg: dict[str, Any] = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    cfg["route"].update(group_wait="1s", group_interval="1s")
    for receiver in cfg["receivers"]:
        for hook in receiver["webhook_configs"]:
            hook["url"] = hook["url"].replace("http://alert-webhook:8080", webhook)
    return cfg


def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Central:
    """HTTP API of the central Prometheus."""

    def __init__(self, session: aiohttp.ClientSession, address: str) -> None:
        self.session, self.base = session, f"http://{address}"

    async def get(self, path: str, **params: str) -> Any:
        async with self.session.get(self.base + path, params=params) as r:
            body = await r.json()
            assert r.status == 200 and body["status"] == "success", (path, params, body)
            return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query_range", query=expr, start=str(start), end=str(end), step="1")
        result: list[dict[str, Any]] = data["result"]
        return result


async def ready(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url) as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def start_server(
    procs: Processes, session: aiohttp.ClientSession, name: str, argv: Callable[[str], list[str | Path]]
) -> str:
    """Start a Prometheus or Alertmanager on a free port (`argv(address)`), ready; return its address.

    A port found free can be taken by someone else before the server binds it: then try another.
    """
    for _ in range(3):
        address = f"127.0.0.1:{free_port()}"
        await procs.start(name, *argv(address))
        proc = procs.procs[name]
        deadline = time.monotonic() + 30
        while proc.returncode is None and time.monotonic() < deadline:
            if await ready(session, f"http://{address}/-/ready"):
                return address
            await asyncio.sleep(0.2)
        if proc.returncode is None or "address already in use" not in procs.log(name):
            break
    raise AssertionError(f"{name} did not become ready\n{procs.tails()}")


async def start_probe(procs: Processes, name: str, config: Path, *extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PROBE_VANTAGE"}
    await procs.start(name, sys.executable, "-m", "probe", "run", "-c", config, "--listen", "127.0.0.1:0", *extra,
                      env=env)

    async def listening() -> bool:
        return "listening on http://127.0.0.1:" in procs.log(name)

    await wait_for(f"{name} to listen", listening, procs)
    match = re.search(r"listening on http://(127\.0\.0\.1:\d+)", procs.log(name))
    assert match
    return match.group(1)


@asynccontextmanager
async def fleet(tmp_path: Path) -> AsyncIterator[tuple[Relay, Webhook, Central, Processes, aiohttp.ClientSession]]:
    prometheus, alertmanager = shutil.which("prometheus"), shutil.which("prometheus-alertmanager")
    assert prometheus and alertmanager, "scripts/test installs prometheus and prometheus-alertmanager"
    pki = Pki(tmp_path)
    webhook = Webhook()
    procs = Processes(tmp_path)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(procs.stop)
        https_port = await stack.enter_async_context(aiohttp_server(healthy_app(), pki.server_context()))
        relay = Relay(https_port)
        relay_port = await stack.enter_async_context(raw_server(relay.handle))
        dns = await stack.enter_async_context(DnsServer(answer({"localhost": ["127.0.0.1"]})))
        hook_port = await stack.enter_async_context(aiohttp_server(webhook.app()))
        session = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)))

        probes = {}
        for vantage, storage_port in ((BLOCKED_VANTAGE, relay_port), (HEALTHY_VANTAGE, https_port)):
            cfg = write_yaml(tmp_path / f"{vantage}.targets.yml",
                             probe_config(vantage, storage_port, https_port, pki.ca_file, dns.port))
            probes[vantage] = await start_probe(procs, f"probe-{vantage}", cfg)

        write_yaml(tmp_path / "alertmanager.yml", alertmanager_config(f"http://127.0.0.1:{hook_port}"))
        am = await start_server(procs, session, "alertmanager", lambda address: [
            alertmanager, "--config.file=alertmanager.yml", f"--storage.path={tmp_path / 'am'}",
            f"--web.listen-address={address}", "--cluster.listen-address="])
        fast_rules = tmp_path / "fast.rules.yml"
        fast_rules.write_text(rules.compress((DEPLOY / "prometheus" / "rules" / "probe.rules.yml").read_text(), 60))
        write_yaml(tmp_path / "central.yml", central_config(fast_rules, am))
        central = await start_server(procs, session, "central", lambda address: [
            prometheus, "--config.file=central.yml", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={address}", "--web.enable-remote-write-receiver"])
        flag = agent_flag(prometheus)
        for vantage, probe in probes.items():
            write_yaml(tmp_path / f"agent-{vantage}.yml", agent_config(vantage, probe, central))
            await start_server(procs, session, f"agent-{vantage}", lambda address, v=vantage: [
                prometheus, flag, f"--config.file=agent-{v}.yml", f"--storage.agent.path={tmp_path / ('wal-' + v)}",
                f"--web.listen-address={address}"])
        try:
            yield relay, webhook, Central(session, central), procs, session
        except BaseException:
            print(procs.tails(), file=sys.stderr)
            raise


def firing_blocked(webhook: Webhook) -> list[tuple[float, dict[str, Any]]]:
    return [(at, a) for at, a in webhook.alerts("firing") if a["labels"]["alertname"] == "ProbeEndpointBlocked"]


async def test_blocked_from_one_vantage_alerts_through_agents_central_and_alertmanager(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], record_property: Callable[[str, object], None]
) -> None:
    async with fleet(tmp_path) as (relay, webhook, central, procs, session):
        started = time.time()
        pairs = len(TARGETS) * len(ROUTES) * 2

        async def all_pairs_ok() -> bool:
            result = await central.query(f"sum(probe_success) and count(probe_success) == {pairs}")
            return bool(result) and float(result[0]["value"][1]) == pairs

        # Healthy everywhere first: every pair of both vantages arrives through the agents, all ok.
        await wait_for("every pair ok at the central Prometheus", all_pairs_ok, procs)
        assert webhook.received == [], "nothing may page while everything is healthy"

        relay.blocked = True
        blocked_at = time.time()

        async def delivered() -> bool:
            return bool(firing_blocked(webhook))

        delivered_at = await wait_for("ProbeEndpointBlocked at the webhook", delivered, procs, DELIVERY_LIMIT)
        took = delivered_at - blocked_at
        record_property("alert_delivery_seconds", round(took, 2))
        with capsys.disabled():
            print(f"\n[fleet e2e] block -> webhook delivery of ProbeEndpointBlocked: {took:.1f} s "
                  f"(for: 5m compressed to 5s; scrape, remote write and evaluation every 1 s)")
        # Confirmed before firing: not before the (compressed) for: has passed.
        assert took >= 5.0

        fired = {(a["labels"]["vantage"], a["labels"]["target"], a["labels"]["route"])
                 for _, a in firing_blocked(webhook)}
        assert fired <= {(BLOCKED_VANTAGE, "storage", r) for r in ROUTES} and fired
        # routed by the shipped Alertmanager config: critical alerts go to the on-call receiver
        assert {r for _, r, n in webhook.received if n["status"] == "firing"} == {"oncall"}
        assert {tuple(sorted(n["groupLabels"])) for _, _, n in webhook.received} == {("alertname", "target", "vantage")}
        (_, first), *_ = firing_blocked(webhook)
        assert first["labels"]["severity"] == "critical"
        assert "blocked from cn-test" in first["annotations"]["summary"]
        assert "tls_reset" in first["annotations"]["description"]

        # No other alert, for the healthy target or any vantage: at the webhook and at Prometheus.
        others = [a["labels"] for _, a in webhook.alerts() if a["labels"]["alertname"] != "ProbeEndpointBlocked"]
        assert others == []
        active = (await central.get("/api/v1/alerts"))["alerts"]
        assert {(a["labels"]["alertname"], a["labels"]["vantage"], a["labels"]["target"]) for a in active} == {
            ("ProbeEndpointBlocked", BLOCKED_VANTAGE, "storage")
        }, active

        await check_dashboards(central, started)

        # The block ends: the alert resolves and Alertmanager says so (send_resolved).
        relay.blocked = False

        async def resolved() -> bool:
            return any(a["labels"]["alertname"] == "ProbeEndpointBlocked" for _, a in webhook.alerts("resolved"))

        await wait_for("the resolved notification", resolved, procs, 30)
        assert not [a for _, a in webhook.alerts() if a["labels"]["target"] == "api"]


async def check_dashboards(central: Central, start: float) -> None:
    """Run every expression of every dashboard: for "All" and for one healthy pair, each must return data."""
    end = time.time()
    selections = {
        "All": {"vantage": ".*", "target": ".*", "route": ".*", "resolver": ".*"},
        "one pair": {"vantage": HEALTHY_VANTAGE, "target": "storage", "route": "direct", "resolver": "control"},
    }
    empty, count = [], 0
    for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
        doc = json.loads(path.read_text())
        for var in doc["templating"]["list"]:
            if var["type"] == "query":
                match = re.fullmatch(r"label_values\((.*), (\w+)\)", var["query"])
                assert match, var["query"]
                for label, values in selections.items():
                    expr = dashboards.substitute(f"count by ({match.group(2)}) ({match.group(1)})", values)
                    count += 1
                    if not await central.query(expr):
                        empty.append((path.name, f"variable {var['name']}", label, expr))
        for panel in doc["panels"]:
            for target in panel.get("targets", []):
                for label, values in selections.items():
                    expr = dashboards.substitute(target["expr"], {**values, "phase": "connect"})
                    count += 1
                    if target.get("instant"):
                        result = await central.query(expr)
                    else:
                        result = await central.query_range(expr, start, end)
                    if not result:
                        empty.append((path.name, panel["title"], label, expr))
    assert count > 60
    assert empty == [], "\n".join(map(str, empty))


async def test_prometheus_driven_probes_through_the_on_demand_scrape_config(tmp_path: Path) -> None:
    """deploy/prometheus/on-demand.yml scrapes /probe?target=NAME: configured names only, probed per scrape."""
    prometheus = shutil.which("prometheus")
    assert prometheus, "scripts/test installs prometheus"
    pki = Pki(tmp_path)
    procs = Processes(tmp_path)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(procs.stop)
        https_port = await stack.enter_async_context(aiohttp_server(healthy_app(), pki.server_context()))
        dns = await stack.enter_async_context(DnsServer(answer({"localhost": ["127.0.0.1"]})))
        session = await stack.enter_async_context(aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)))
        config = probe_config(HEALTHY_VANTAGE, https_port, https_port, pki.ca_file, dns.port)
        config["defaults"]["interval"] = "1h"  # its own schedule stays out of the way: Prometheus decides
        # Scrapes come every second here (30 s as shipped): /probe's reuse of young results shrinks alike.
        probe = await start_probe(procs, "probe", write_yaml(tmp_path / "targets.yml", config),
                                  "--web.probe-reuse", "100ms")

        cfg: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus" / "on-demand.yml").read_text())
        cfg["global"].update(scrape_interval="1s", scrape_timeout="1s")
        (job,) = cfg["scrape_configs"]
        job["static_configs"] = [{"targets": ["api", "not-configured"]}]
        job["relabel_configs"][-1]["replacement"] = probe
        write_yaml(tmp_path / "prometheus.yml", cfg)
        address = await start_server(procs, session, "prometheus", lambda address: [
            prometheus, "--config.file=prometheus.yml", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address={address}"])
        central = Central(session, address)

        async def scraped_twice() -> bool:
            result = await central.query(
                'count_over_time(probe_last_run_timestamp_seconds{job="probe-on-demand",instance="api"}[1m])')
            return len(result) == len(ROUTES) and all(float(r["value"][1]) >= 2 for r in result)

        await wait_for("two on-demand scrapes of api", scraped_twice, procs)
        ok = await central.query('probe_success{job="probe-on-demand",instance="api"}')
        assert {r["metric"]["route"] for r in ok} == set(ROUTES)
        assert all(r["metric"]["vantage"] == HEALTHY_VANTAGE and r["value"][1] == "1" for r in ok)
        # each scrape runs the probe now: the finish times move from one scrape to the next
        moved = await central.query(
            'changes(probe_last_run_timestamp_seconds{job="probe-on-demand",instance="api"}[1m])')
        assert all(float(r["value"][1]) >= 1 for r in moved)
        # a name that is not in targets.yml is refused (404), so the scrape fails: no open proxy
        targets = (await central.get("/api/v1/targets"))["activeTargets"]
        refused = next(t for t in targets if t["labels"]["instance"] == "not-configured")
        assert refused["health"] == "down" and "404" in refused["lastError"], refused
        assert not await central.query('probe_success{instance="not-configured"}')
