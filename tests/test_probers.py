"""Probers against real loopback servers: each outcome from a server that really behaves so."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from probe import config
from probe.context import ProbeContext
from probe.models import Outcome, Phase, ProbeResult
from probe.runner import run_probe
from tests.servers import (
    Pki,
    aiohttp_server,
    closed_port,
    raw_server,
    reset,
    reset_after_client_hello,
    reset_after_request,
    silent,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def make_config(pki: Pki, **target: Any) -> config.Config:
    target.setdefault("name", "t")
    doc = {"vantage": "test", "defaults": {"ca_file": str(pki.ca_file), "timeout": "2s"}, "targets": [target]}
    return config.loads(yaml.safe_dump(doc))


async def probe_once(cfg: config.Config) -> ProbeResult:
    ctx = ProbeContext(cfg)
    try:
        return await run_probe(cfg.targets[0], cfg.route("direct"), ctx)
    finally:
        await ctx.close()


def storage_app(delay: float = 0.0) -> web.Application:
    async def ping(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        return web.Response(text="pong from storage")

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500, text="internal error")

    async def blob(request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("size", "1048576"))
        resp = web.StreamResponse()
        resp.content_length = size
        await resp.prepare(request)
        chunk = b"x" * 65536
        sent = 0
        while sent < size:
            piece = chunk[: min(len(chunk), size - sent)]
            await resp.write(piece)
            sent += len(piece)
            rate = float(request.query.get("rate", "0"))
            if rate:
                await asyncio.sleep(len(piece) / rate)
        return resp

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(location="/ping")

    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound(location="/loop")

    app = web.Application()
    app.router.add_get("/ping", ping)
    app.router.add_get("/broken", broken)
    app.router.add_get("/blob", blob)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/loop", loop)
    return app


async def test_https_target_trusted_through_ca_file_is_ok_with_all_five_phases(pki: Pki) -> None:
    async with aiohttp_server(storage_app(), pki.server_context()) as port:
        cfg = make_config(pki, url=f"https://127.0.0.1:{port}/ping", server_name="localhost",
                          expect={"status": [200], "body_contains": "pong"})
        result = await probe_once(cfg)
    assert result.outcome is Outcome.OK, result.evidence
    assert set(result.phases) == set(Phase)
    assert result.http_status == 200
    assert result.tls is not None and result.tls.version.startswith("TLS 1.")
    assert result.tls.earliest_cert_expiry is not None and result.tls.earliest_cert_expiry > 0
    doc = result.to_json()
    assert list(doc["phases"]) == ["resolve", "connect", "tls", "processing", "transfer"]  # type: ignore[arg-type]
    assert doc["blocked"] is False and doc["success"] is True
    json.dumps(doc)


async def test_closed_port_is_tcp_refused_not_blocked(pki: Pki) -> None:
    result = await probe_once(make_config(pki, url=f"http://127.0.0.1:{closed_port()}/"))
    assert result.outcome is Outcome.TCP_REFUSED
    assert not result.blocked
    assert "refused" in result.evidence[-1]


async def test_silent_server_stalls_the_tls_handshake_as_tls_timeout(pki: Pki) -> None:
    async with raw_server(silent) as port:
        cfg = make_config(pki, url=f"https://127.0.0.1:{port}/", server_name="localhost", timeout="300ms")
        result = await probe_once(cfg)
    assert result.outcome is Outcome.TLS_TIMEOUT
    assert result.blocked
    assert "sni=localhost" in result.evidence[-1]
    assert result.duration_seconds < 1.5


async def test_silent_plain_http_server_is_http_timeout(pki: Pki) -> None:
    async with raw_server(silent) as port:
        result = await probe_once(make_config(pki, url=f"http://127.0.0.1:{port}/", timeout="300ms"))
    assert result.outcome is Outcome.HTTP_TIMEOUT
    assert not result.blocked


async def test_reset_after_client_hello_is_tls_reset(pki: Pki) -> None:
    async with raw_server(reset_after_client_hello) as port:
        cfg = make_config(pki, url=f"https://127.0.0.1:{port}/", server_name="blocked.example")
        result = await probe_once(cfg)
    assert result.outcome is Outcome.TLS_RESET
    assert result.blocked
    assert "after ClientHello (sni=blocked.example)" in result.evidence[-1]
    assert Phase.CONNECT in result.phases and Phase.TLS not in result.phases


async def test_reset_after_request_is_http_reset(pki: Pki) -> None:
    async with raw_server(reset_after_request) as port:
        result = await probe_once(make_config(pki, url=f"http://127.0.0.1:{port}/x"))
    assert result.outcome is Outcome.HTTP_RESET
    assert result.blocked
    assert f"Host: 127.0.0.1:{port}" in result.evidence[-1]


async def test_wrong_host_certificate_is_tls_cert_invalid(pki: Pki) -> None:
    async with aiohttp_server(storage_app(), pki.server_context("other.example")) as port:
        cfg = make_config(pki, url=f"https://127.0.0.1:{port}/ping", server_name="storage.example")
        result = await probe_once(cfg)
    assert result.outcome is Outcome.TLS_CERT_INVALID
    assert "Hostname mismatch" in result.evidence[-1]


async def test_untrusted_certificate_is_tls_cert_invalid(pki: Pki, tmp_path: Path) -> None:
    other = Pki(tmp_path)  # a CA the probe does not trust
    async with aiohttp_server(storage_app(), other.server_context()) as port:
        cfg = make_config(pki, url=f"https://127.0.0.1:{port}/ping", server_name="localhost")
        result = await probe_once(cfg)
    assert result.outcome is Outcome.TLS_CERT_INVALID
    assert "unable to get local issuer certificate" in result.evidence[-1]


async def test_status_500_is_http_unexpected(pki: Pki) -> None:
    async with aiohttp_server(storage_app()) as port:
        result = await probe_once(make_config(pki, url=f"http://127.0.0.1:{port}/broken"))
    assert result.outcome is Outcome.HTTP_UNEXPECTED
    assert result.http_status == 500
    assert "status 500, expected 2xx" in result.evidence[-1]
    assert "internal error" in result.evidence[-1]


async def test_missing_body_text_is_http_unexpected(pki: Pki) -> None:
    async with aiohttp_server(storage_app()) as port:
        cfg = make_config(pki, url=f"http://127.0.0.1:{port}/ping", expect={"body_contains": "PONG-v2"})
        result = await probe_once(cfg)
    assert result.outcome is Outcome.HTTP_UNEXPECTED
    assert "does not contain 'PONG-v2'" in result.evidence[-1]


async def test_body_regex_and_header_expectations(pki: Pki) -> None:
    async with aiohttp_server(storage_app()) as port:
        ok = await probe_once(make_config(
            pki, url=f"http://127.0.0.1:{port}/ping",
            expect={"body_regex": r"^pong from \w+$", "headers": {"Content-Type": "^text/plain"}}))
        bad = await probe_once(make_config(
            pki, url=f"http://127.0.0.1:{port}/ping", expect={"headers": {"Server": "^nginx"}}))
    assert ok.outcome is Outcome.OK, ok.evidence
    assert bad.outcome is Outcome.HTTP_UNEXPECTED
    assert "header server:" in bad.evidence[-1]


async def test_slow_server_past_the_timeout_is_http_timeout(pki: Pki) -> None:
    async with aiohttp_server(storage_app(delay=1.0), pki.server_context()) as port:
        cfg = make_config(pki, url=f"https://127.0.0.1:{port}/ping", server_name="localhost", timeout="400ms")
        result = await probe_once(cfg)
    assert result.outcome is Outcome.HTTP_TIMEOUT
    assert not result.blocked
    assert result.duration_seconds < 1.5
    assert {Phase.CONNECT, Phase.TLS} <= set(result.phases)


async def test_redirect_is_followed_and_a_loop_is_http_unexpected(pki: Pki) -> None:
    async with aiohttp_server(storage_app()) as port:
        ok = await probe_once(make_config(pki, url=f"http://127.0.0.1:{port}/redirect"))
        looped = await probe_once(make_config(pki, url=f"http://127.0.0.1:{port}/loop"))
    assert ok.outcome is Outcome.OK and ok.http_status == 200
    assert looped.outcome is Outcome.HTTP_UNEXPECTED
    assert "redirect loop" in looped.evidence[-1]


async def test_endless_body_is_read_only_up_to_max_body_bytes(pki: Pki) -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"10000\r\n" + b"a" * 0x10000 + b"\r\n")
            await writer.drain()

    async with raw_server(endless) as port:
        cfg = make_config(pki, url=f"http://127.0.0.1:{port}/", max_body_bytes=100000)
        result = await probe_once(cfg)
    assert result.outcome is Outcome.OK, result.evidence
    assert any("stopped reading the body at 100000 bytes" in e for e in result.evidence)


async def test_download_above_the_minimum_rate_reports_throughput(pki: Pki) -> None:
    async with aiohttp_server(storage_app()) as port:
        cfg = make_config(pki, url=f"http://127.0.0.1:{port}/ping", download={
            "url": f"http://127.0.0.1:{port}/blob?size=2000000", "min_bytes_per_second": 1000})
        result = await probe_once(cfg)
    assert result.outcome is Outcome.OK, result.evidence
    assert result.throughput_bytes_per_second is not None and result.throughput_bytes_per_second > 1000


async def test_slow_download_is_throttled(pki: Pki) -> None:
    async with aiohttp_server(storage_app()) as port:
        cfg = make_config(pki, url=f"http://127.0.0.1:{port}/ping", timeout="1s", download={
            "url": f"http://127.0.0.1:{port}/blob?size=10000000&rate=200000", "min_bytes_per_second": 1000000})
        result = await probe_once(cfg)
    assert result.outcome is Outcome.THROTTLED, result.evidence
    assert result.blocked
    rate = result.throughput_bytes_per_second
    assert rate is not None and 50_000 < rate < 1_000_000
    assert "below min_bytes_per_second" in result.evidence[-1]


async def test_tcp_target_connects_and_tls_target_handshakes(pki: Pki) -> None:
    async with aiohttp_server(storage_app(), pki.server_context()) as port:
        tcp = await probe_once(make_config(pki, address=f"127.0.0.1:{port}"))
        tls = await probe_once(make_config(pki, address=f"127.0.0.1:{port}", tls=True, server_name="localhost"))
        wrong = await probe_once(make_config(pki, address=f"127.0.0.1:{port}", tls=True,
                                             server_name="elsewhere.example"))
    assert tcp.outcome is Outcome.OK and set(tcp.phases) == {Phase.RESOLVE, Phase.CONNECT}
    assert tls.outcome is Outcome.OK and tls.tls is not None
    assert set(tls.phases) == {Phase.RESOLVE, Phase.CONNECT, Phase.TLS}
    assert wrong.outcome is Outcome.TLS_CERT_INVALID


async def test_reset_right_after_connect_on_tls_target_is_tls_reset(pki: Pki) -> None:
    async def hard_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reset(writer)

    async with raw_server(hard_close) as port:
        cfg = make_config(pki, address=f"127.0.0.1:{port}", tls=True, server_name="x.example")
        result = await probe_once(cfg)
    assert result.outcome in (Outcome.TLS_RESET, Outcome.TCP_RESET)
    assert result.blocked


async def test_garbage_instead_of_tls_is_tls_reset_with_the_reason(pki: Pki) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(5)
        writer.write(b"HTTP/1.1 403 Forbidden\r\n\r\nblocked")
        await writer.drain()
        await asyncio.sleep(1)

    async with raw_server(garbage) as port:
        cfg = make_config(pki, address=f"127.0.0.1:{port}", tls=True, server_name="x.example")
        result = await probe_once(cfg)
    assert result.outcome is Outcome.TLS_RESET
    assert "broken" in result.evidence[-1] and "WRONG_VERSION_NUMBER" in result.evidence[-1]
