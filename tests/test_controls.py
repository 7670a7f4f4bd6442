"""Control handshakes on loopback: name filter or address block, over QUIC and TCP, and the cost policy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import yaml
from aiohttp import web

from probe import config
from probe.context import ProbeContext
from probe.controls import ControlState, Endpoint, without_history
from probe.demo.border import Action, Inspect, Middlebox
from probe.demo.quic_border import QuicMiddlebox
from probe.demo.quic_sni import initial_sni
from probe.models import Outcome, ProbeResult
from probe.net import quic
from probe.runner import run_probe
from tests.quic_servers import h3_server, raw_udp
from tests.servers import Pki, aiohttp_server

BLOCKED, FREE, CONTROL = "blocked.example", "free.example", "control.example"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def target_config(pki: Pki, **target: Any) -> config.Config:
    target = {"name": "t", "control_sni": CONTROL, **target}
    doc = {"vantage": "test", "defaults": {"ca_file": str(pki.ca_file), "timeout": "1500ms"}, "targets": [target]}
    return config.loads(yaml.safe_dump(doc))


async def probe(cfg: config.Config, controls: ControlState | None = None) -> ProbeResult:
    ctx = ProbeContext(cfg, controls=controls or ControlState())
    try:
        return await run_probe(cfg.targets[0], cfg.route("direct"), ctx)
    finally:
        await ctx.close()


@asynccontextmanager
async def quic_border(pki: Pki, residual: float = 30.0) -> AsyncIterator[QuicMiddlebox]:
    async with h3_server(pki, names=(BLOCKED, FREE)) as server_port:
        box = QuicMiddlebox(server_port, {BLOCKED}, residual=residual)
        await box.start()
        try:
            yield box
        finally:
            box.close()


def h3(port: int, name: str, **extra: Any) -> dict[str, Any]:
    return {"url": f"https://127.0.0.1:{port}/", "http_version": 3, "server_name": name, **extra}


async def test_initial_sni_reads_the_name_of_a_real_client_initial() -> None:
    got: list[bytes] = []
    async with raw_udp(lambda data, addr, transport: got.append(data)) as port:
        session = await quic.open_session("127.0.0.1", port, quic.configuration(BLOCKED, None, verify=False,
                                                                                   idle_timeout=5))
        session.start()
        await asyncio.sleep(0.05)
        session.close()
    assert got and initial_sni(got[0]) == BLOCKED
    assert initial_sni(b"\x00" * 1200) is None and initial_sni(got[0][:40]) is None


async def test_quic_name_filter_is_tls_timeout_and_sni_filtered(pki: Pki) -> None:
    async with quic_border(pki) as box:
        result = await probe(target_config(pki, **h3(box.port, BLOCKED)))
    assert result.outcome is Outcome.TLS_TIMEOUT, result
    assert result.sni_filtered is True
    assert box.triggered == [("127.0.0.1", BLOCKED)]
    line = next(e for e in result.evidence if e.startswith("control handshake"))
    assert f"to 127.0.0.1:{box.port}/udp with sni={CONTROL}, sent first: handshake completed" in line
    assert f"sni={BLOCKED} got tls_timeout: the name is filtered, not the address" in line
    assert result.to_json()["sni_filtered"] is True


async def test_free_name_through_the_same_filter_is_ok_and_untested(pki: Pki) -> None:
    async with quic_border(pki) as box:
        result = await probe(target_config(pki, **h3(box.port, FREE)))
    assert result.outcome is Outcome.OK, result
    assert result.sni_filtered is None
    assert box.triggered == []


async def test_silent_address_is_tls_timeout_and_not_sni_filtered(pki: Pki) -> None:
    async with raw_udp(lambda data, addr, transport: None) as port:
        result = await probe(target_config(pki, **h3(port, BLOCKED)))
    assert result.outcome is Outcome.TLS_TIMEOUT
    assert result.sni_filtered is False
    assert any("no answer after" in e and "either: the address is blocked for any name" in e for e in result.evidence)


async def test_tcp_name_filter_is_sni_filtered(pki: Pki) -> None:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    async with aiohttp_server(app, pki.server_context(BLOCKED, FREE)) as server_port:
        box = Middlebox(inspect=Inspect.SNI, upstream=server_port, rules={BLOCKED: Action.STALL})
        await box.start()
        try:
            blocked = await probe(target_config(pki, url=f"https://127.0.0.1:{box.port}/", server_name=BLOCKED))
            free = await probe(target_config(pki, url=f"https://127.0.0.1:{box.port}/", server_name=FREE))
        finally:
            await box.close()
    assert (blocked.outcome, blocked.sni_filtered) == (Outcome.TLS_TIMEOUT, True), blocked
    assert any(f"127.0.0.1:{box.port}/tcp with sni={CONTROL}" in e for e in blocked.evidence)
    assert (free.outcome, free.sni_filtered) == (Outcome.OK, None)


async def test_with_history_the_control_waits_for_a_tls_failure_then_residual_is_named(pki: Pki) -> None:
    controls = ControlState(history=True)
    async with quic_border(pki, residual=30.0) as box:
        cfg = target_config(pki, **h3(box.port, BLOCKED))
        first = await probe(cfg, controls)
        second = await probe(cfg, controls)
    # First run: no history, so no control (it would cost a handshake on every healthy probe).
    assert (first.outcome, first.sni_filtered) == (Outcome.TLS_TIMEOUT, None)
    assert not any("control handshake" in e for e in first.evidence)
    # Second run: the control goes first, but the censor still blocks the triple: inconclusive, and said so.
    assert second.outcome is Outcome.TLS_TIMEOUT and second.sni_filtered is None
    assert any(e.startswith("control handshake") and "either" in e for e in second.evidence)
    residual = next(e for e in second.evidence if "residual blocking" in e)
    assert residual.startswith(f"the previous run on 127.0.0.1:{box.port}/udp failed at the TLS stage")
    assert residual.endswith("may explain this tls_timeout")


async def test_with_history_the_control_stops_once_a_run_passes(pki: Pki) -> None:
    controls = ControlState(history=True)
    controls.record("t", "direct", Endpoint("127.0.0.1", 1, "udp"), Outcome.TLS_TIMEOUT)
    assert controls.wants_control("t", "direct") and not controls.wants_control("t", "other")
    async with quic_border(pki) as box:
        passed = await probe(target_config(pki, **h3(box.port, FREE)), controls)
    assert passed.outcome is Outcome.OK
    assert not controls.wants_control("t", "direct")
    with without_history():
        assert controls.wants_control("t", "direct")  # /probe has no history: it always sends the control


def test_residual_window_is_180_seconds_and_only_before_the_run() -> None:
    now = [1000.0]
    controls = ControlState(history=True, clock=lambda: now[0])
    where = Endpoint("198.51.100.20", 443, "udp")
    controls.record("t", "direct", where, Outcome.TLS_TIMEOUT)
    assert controls.residual_age(where, 1000.0) is None  # not before this run
    assert controls.residual_age(where, 1100.0) == 100.0
    assert controls.residual_age(where, 1181.0) is None
    assert controls.residual_age(Endpoint("198.51.100.20", 443, "tcp"), 1100.0) is None
    # A run that began before another one ended, after that one began (they overlapped), may meet its block.
    controls.record("t", "direct", where, Outcome.TLS_TIMEOUT, started=1200.0)
    now[0] = 1210.0
    assert controls.residual_age(where, 1205.0) == 5.0
    assert str(Endpoint("2001:db8::1", 443, "tcp")) == "[2001:db8::1]:443/tcp"


def test_probe_sni_filtered_is_a_series_only_where_tested() -> None:
    from probe.exporter.metrics import render
    from probe.store import ResultStore

    doc = {"vantage": "v", "targets": [{"name": n, "url": "https://example.com/", "control_sni": CONTROL}
                                       for n in ("named", "address", "healthy")]}
    cfg = config.loads(yaml.safe_dump(doc))
    store = ResultStore(cfg)
    store.record(ProbeResult("named", "direct", Outcome.TLS_TIMEOUT, 1.8e9, 1.0, sni_filtered=True))
    store.record(ProbeResult("address", "direct", Outcome.TLS_TIMEOUT, 1.8e9, 1.0, sni_filtered=False))
    store.record(ProbeResult("healthy", "direct", Outcome.OK, 1.8e9, 0.1))
    lines = [line for line in render(store, cfg).decode().splitlines() if line.startswith("probe_sni_filtered{")]
    assert lines == [
        'probe_sni_filtered{vantage="v",target="named",route="direct"} 1.0',
        'probe_sni_filtered{vantage="v",target="address",route="direct"} 0.0',
    ]
