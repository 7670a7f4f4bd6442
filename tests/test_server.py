"""HTTP endpoints over real loopback sockets, reloads, and `probe run` under signals."""

from __future__ import annotations

import asyncio
import gzip
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from probe import config as config_module
from probe.config import Route, Target
from probe.context import ProbeContext
from probe.exporter.server import create_app
from probe.models import Deadline, DnsResult, Outcome, Phase, ProbeResult
from probe.service import Service

CONFIG = """
vantage: test-vantage
resolvers: [{name: system, type: system}]
routes:
  - {name: direct}
  - {name: hk-socks, proxy: "socks5://user:hunter2@127.0.0.1:1080"}
targets:
  - {name: web, url: "https://web.example/ping", routes: [direct, hk-socks], interval: 1h}
  - {name: ssh, address: "127.0.0.1:22", interval: 1h}
"""

CHILD = """
import asyncio, logging, sys, time
from probe.models import Outcome, ProbeResult
from probe.service import serve

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s: %(message)s")

async def fake_probe(target, route, ctx):
    return ProbeResult(target.name, route.name, Outcome.OK, time.time(), 0.01)

async def fake_dns(target, deadline, ctx):
    return ()

sys.exit(asyncio.run(serve(sys.argv[1], "127.0.0.1:0", probe_fn=fake_probe, dns_fn=fake_dns)))
"""


@pytest.fixture(autouse=True)
def _no_vantage_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROBE_VANTAGE", raising=False)


class Fakes:
    def __init__(self) -> None:
        self.calls: Counter[tuple[str, str]] = Counter()
        self.dns_calls: Counter[str] = Counter()

    async def probe(self, target: Target, route: Route, ctx: ProbeContext) -> ProbeResult:
        self.calls[(target.name, route.name)] += 1
        outcome = Outcome.TLS_RESET if route.name == "direct" and target.name == "web" else Outcome.OK
        status = 200 if target.url and outcome is Outcome.OK else None
        return ProbeResult(target.name, route.name, outcome, time.time(), 0.05,
                           phases={Phase.RESOLVE: 0.001, Phase.CONNECT: 0.02}, http_status=status)

    async def dns(self, target: Target, deadline: Deadline, ctx: ProbeContext) -> tuple[DnsResult, ...]:
        self.dns_calls[target.name] += 1
        return tuple(DnsResult(r, Outcome.OK, ("198.51.100.20",), replies=1, consistent=True)
                     for r in target.resolvers)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "targets.yml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def fakes() -> Fakes:
    return Fakes()


@pytest.fixture
async def service(config_file: Path, fakes: Fakes) -> AsyncIterator[Service]:
    svc = Service(str(config_file), config_module.load(config_file), probe_fn=fakes.probe, dns_fn=fakes.dns)
    svc.start()
    try:
        yield svc
    finally:
        await svc.close()


@pytest.fixture
async def client(service: Service) -> AsyncIterator[TestClient[aiohttp.web.Request, aiohttp.web.Application]]:
    async with TestClient(TestServer(create_app(service), host="127.0.0.1")) as c:
        yield c


Client = TestClient[aiohttp.web.Request, aiohttp.web.Application]


def gauge(text: str, name: str, **labels: str) -> list[float]:
    return [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


async def test_metrics_endpoint_serves_the_text_exposition(client: Client, service: Service) -> None:
    await service.probe_target("web")
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    text = await response.text()
    assert gauge(text, "probe_success", target="web", route="hk-socks", vantage="test-vantage") == [1.0]
    assert gauge(text, "probe_outcome", target="web", route="direct", outcome="tls_reset") == [1.0]
    assert gauge(text, "probe_outcome", target="web", route="direct") == [1.0]  # one series: the last outcome
    assert gauge(text, "probe_outcome", target="ssh", route="direct") == []  # not probed yet
    assert gauge(text, "prober_config_last_reload_successful") == [1.0]
    assert "process_cpu_seconds_total" in text
    assert "hunter2" not in text


async def test_metrics_are_gzipped_when_the_scraper_accepts_it_identity_otherwise(
    client: Client, service: Service
) -> None:
    await service.probe_target("web")
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        async with raw.get(client.make_url("/metrics"), headers={"Accept-Encoding": "gzip"}) as r:
            assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
            assert r.headers["Vary"] == "Accept-Encoding" and r.headers["Content-Type"] == CONTENT_TYPE_LATEST
            zipped = await r.read()
        async with raw.get(client.make_url("/metrics"), headers={"Accept-Encoding": "identity"}) as r:
            assert "Content-Encoding" not in r.headers
            plain = await r.read()
    text = gzip.decompress(zipped)
    assert len(zipped) < len(text) / 3

    def pairs(body: bytes) -> bytes:  # the per-pair families: the process' own figures move between scrapes
        return body.split(b"# HELP probe_dns_")[0]

    assert pairs(text) == pairs(plain) and b'probe_outcome{vantage="test-vantage",target="web"' in text


async def test_api_results_has_the_design_json_shape(client: Client, service: Service) -> None:
    await service.probe_target("web")
    await service.probe_target("ssh")
    doc = await (await client.get("/api/results")).json()
    assert doc["vantage"] == "test-vantage"
    assert [(r["target"], r["route"]) for r in doc["results"]] == [("web", "direct"), ("web", "hk-socks"),
                                                                   ("ssh", "direct")]
    first = doc["results"][0]
    assert first["outcome"] == "tls_reset" and first["blocked"] is True and first["success"] is False
    assert first["phases"] == {"resolve": 0.001, "connect": 0.02}
    assert first["dns"][0]["resolver"] == "system"
    assert doc["routes"] == {"web": ["hk-socks", "direct"], "ssh": ["direct"]}


async def test_api_routes_ranks_routes_best_first(client: Client, service: Service) -> None:
    await service.probe_target("web")
    doc = await (await client.get("/api/routes")).json()
    web = doc["routes"]["web"]
    assert [(r["route"], r["rank"]) for r in web] == [("hk-socks", 1), ("direct", 2)]
    assert web[0]["score"] < web[1]["score"]
    assert doc["vantage"] == "test-vantage"


async def test_probe_runs_the_configured_target_now_and_returns_only_its_metrics(
    client: Client, fakes: Fakes
) -> None:
    response = await client.get("/probe", params={"target": "web"})
    assert response.status == 200
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST
    text = await response.text()
    assert fakes.calls == Counter({("web", "direct"): 1, ("web", "hk-socks"): 1})
    assert fakes.dns_calls == Counter({"web": 1})
    assert gauge(text, "probe_success", route="hk-socks") == [1.0]
    assert gauge(text, "probe_dns_replies", resolver="system") == [1.0]
    assert 'target="ssh"' not in text and "prober_" not in text


async def test_probe_without_a_target_is_400(client: Client, fakes: Fakes) -> None:
    response = await client.get("/probe")
    assert response.status == 400
    assert "target" in await response.text()
    assert not fakes.calls


@pytest.mark.parametrize("name", ["example.com", "127.0.0.1:22", "http://web.example/", "WEB"])
async def test_probe_refuses_anything_not_configured(client: Client, fakes: Fakes, name: str) -> None:
    response = await client.get("/probe", params={"target": name})
    assert response.status == 404
    assert not fakes.calls and not fakes.dns_calls


async def test_healthy_and_landing_page(client: Client) -> None:
    response = await client.get("/-/healthy")
    assert response.status == 200 and await response.text() == "OK"
    page = await (await client.get("/")).text()
    for path in ("/metrics", "/api/results", "/api/routes", "/probe?target=NAME", "/-/healthy", "/-/reload"):
        assert path in page


async def test_reload_needs_post(client: Client) -> None:
    assert (await client.get("/-/reload")).status == 405


async def test_bad_reload_keeps_the_running_config_then_a_fixed_file_applies(
    client: Client, service: Service, config_file: Path
) -> None:
    config_file.write_text(CONFIG.replace("routes: [direct, hk-socks]", "routes: [direct, hk]"))
    response = await client.post("/-/reload")
    assert response.status == 400
    assert "targets[0].routes[1]: unknown route 'hk'" in await response.text()
    text = await (await client.get("/metrics")).text()
    assert gauge(text, "prober_config_last_reload_successful") == [0.0]
    assert gauge(text, "probe_route_rank", target="web", route="hk-socks") == [2.0]  # old config still runs
    assert service.scheduler.job_ids() >= {"probe:web:hk-socks"}

    config_file.write_text(CONFIG.replace("  - {name: ssh, address: \"127.0.0.1:22\", interval: 1h}\n",
                                          "  - {name: db, address: \"127.0.0.1:5432\", interval: 1h}\n"))
    response = await client.post("/-/reload")
    assert response.status == 200
    text = await (await client.get("/metrics")).text()
    assert gauge(text, "prober_config_last_reload_successful") == [1.0]
    assert 'target="ssh"' not in text
    assert gauge(text, "probe_route_rank", target="db", route="direct") == [1.0]
    assert "probe:db:direct" in service.scheduler.job_ids() and "probe:ssh:direct" not in service.scheduler.job_ids()
    assert (await client.get("/probe", params={"target": "ssh"})).status == 404


async def test_reload_keeps_results_of_unchanged_pairs(client: Client, service: Service, config_file: Path) -> None:
    await service.probe_target("web")
    config_file.write_text(CONFIG.replace("interval: 1h}\n", "interval: 2h}\n", 1))
    assert (await client.post("/-/reload")).status == 200
    assert service.store.latest("web", "hk-socks") is not None
    assert service.config.target("web").interval == 7200.0


async def _read_stderr(stream: asyncio.StreamReader, lines: list[str]) -> None:
    while line := await stream.readline():
        lines.append(line.decode(errors="replace").rstrip())


async def _wait_for(condition: object, timeout: float = 10.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_probe_run_reloads_on_sighup_and_exits_zero_on_sigterm(config_file: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROBE_VANTAGE"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(config_file), stderr=asyncio.subprocess.PIPE, env=env
    )
    assert proc.stderr is not None
    lines: list[str] = []
    reader = asyncio.create_task(_read_stderr(proc.stderr, lines))
    try:
        async def listening() -> bool:
            return any("listening on http://127.0.0.1:" in line for line in lines)

        await _wait_for(listening)
        port = re.search(r"listening on http://127\.0\.0\.1:(\d+)", "\n".join(lines))
        assert port is not None
        base = f"http://127.0.0.1:{port.group(1)}"
        async with aiohttp.ClientSession() as http:
            async def metrics() -> str:
                async with http.get(f"{base}/metrics") as response:
                    return await response.text()

            assert gauge(await metrics(), "prober_config_last_reload_successful") == [1.0]

            config_file.write_text(CONFIG + "  - {name: db, address: \"127.0.0.1:5432\", interval: 1h}\n")
            proc.send_signal(signal.SIGHUP)

            async def has_db() -> bool:
                return 'target="db"' in await metrics()

            await _wait_for(has_db)

            config_file.write_text("targets: [")
            proc.send_signal(signal.SIGHUP)

            async def reload_failed() -> bool:
                return gauge(await metrics(), "prober_config_last_reload_successful") == [0.0]

            await _wait_for(reload_failed)
            assert 'target="db"' in await metrics()  # the running config stays

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        await reader
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        reader.cancel()
    log = "\n".join(lines)
    assert "config reloaded" in log and "keeping the running config" in log and "stopped" in log
    assert "Traceback" not in log and "hunter2" not in log


async def test_dns_verdicts_outlive_a_reload(client: Client, service: Service, config_file: Path) -> None:
    forged = DnsResult("ali", Outcome.DNS_INJECTION, ("203.0.113.66",), replies=2, evidence=("two replies",))
    service.ctx.verdicts.remember("hk.storage.example", [forged], valid_for=600.0)
    before = service.ctx
    config_file.write_text(CONFIG.replace("interval: 1h}\n", "interval: 2h}\n", 1))
    assert (await client.post("/-/reload")).status == 200
    assert service.ctx is not before  # a new context for the new config ...
    kept = service.ctx.verdicts.get("hk.storage.example", "ali")  # ... with the verdicts of the old one
    assert kept is not None and kept.result == forged
