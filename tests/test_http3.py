"""The HTTP/3 prober against a real aioquic server on loopback, and against hostile QUIC peers."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml

from probe import config
from probe.context import ProbeContext
from probe.models import Outcome, Phase, ProbeResult
from probe.runner import run_probe
from tests.quic_servers import (
    Answer,
    Seen,
    endless_retry,
    endless_version_negotiation,
    flood,
    free_udp_port,
    garbage,
    h3_server,
    raw_udp,
    version_negotiation_with_ours,
)
from tests.servers import Pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def h3_config(pki: Pki | None, url: str, **target: Any) -> config.Config:
    target = {"name": "h3", "url": url, "http_version": 3, **target}
    defaults: dict[str, Any] = {"timeout": "2s"}
    if pki is not None:
        defaults["ca_file"] = str(pki.ca_file)
    doc = {"vantage": "test", "defaults": defaults, "targets": [target]}
    return config.loads(yaml.safe_dump(doc))


async def probe_once(cfg: config.Config, ctx: ProbeContext | None = None) -> ProbeResult:
    ctx = ctx or ProbeContext(cfg)
    try:
        return await run_probe(cfg.targets[0], cfg.route("direct"), ctx)
    finally:
        await ctx.close()


async def test_http3_probe_reports_every_phase_and_the_certificate(pki: Pki) -> None:
    seen = Seen()
    async with h3_server(pki, seen=seen) as port:
        cfg = h3_config(pki, f"https://localhost:{port}/api/ping", expect={"body_contains": "pong", "status": [200]},
                        headers={"X-Probe": "1"})
        result = await probe_once(cfg)
    assert result.outcome is Outcome.OK, result
    assert list(result.phases) == [Phase.RESOLVE, Phase.TLS, Phase.PROCESSING, Phase.TRANSFER]
    assert all(seconds > 0 for seconds in result.phases.values())
    assert result.http_status == 200
    assert result.address == "127.0.0.1"
    assert result.tls is not None and result.tls.version == "TLS 1.3"
    assert result.tls.earliest_cert_expiry is not None and result.tls.earliest_cert_expiry > time.time()
    method, path, head = seen.requests[0]
    assert (method, path, head[":authority"], head["x-probe"]) == ("GET", "/api/ping", f"localhost:{port}", "1")
    assert result.sni_filtered is None


async def test_http3_status_and_body_expectations(pki: Pki) -> None:
    async with h3_server(pki, lambda m, p, h: Answer(status=403, body=b"<html>blocked</html>")) as port:
        result = await probe_once(h3_config(pki, f"https://127.0.0.1:{port}/"))
    assert result.outcome is Outcome.HTTP_UNEXPECTED
    assert result.http_status == 403
    assert "status 403, expected 2xx" in result.evidence[0]


async def test_http3_download_measures_throughput(pki: Pki) -> None:
    async with h3_server(pki) as port:
        cfg = h3_config(pki, f"https://127.0.0.1:{port}/", download={
            "url": f"https://127.0.0.1:{port}/blob", "min_bytes_per_second": 1000})
        result = await probe_once(cfg)
    assert result.outcome is Outcome.OK, result
    assert result.throughput_bytes_per_second is not None and result.throughput_bytes_per_second > 1000
    assert any("download: 262144 bytes" in line for line in result.evidence)


async def test_http3_max_body_bytes_stops_reading(pki: Pki) -> None:
    async with h3_server(pki) as port:
        result = await probe_once(h3_config(pki, f"https://127.0.0.1:{port}/blob", max_body_bytes=1000))
    assert result.outcome is Outcome.OK
    assert "stopped reading the body at 1000 bytes (max_body_bytes)" in result.evidence


@pytest.mark.parametrize(
    ("names", "trusted", "reason"),
    [
        (("other.example",), True, "doesn't match"),
        (("localhost", "127.0.0.1"), False, "unable to get local issuer certificate"),
    ],
    ids=["wrong-name", "unknown-authority"],
)
async def test_http3_bad_certificate_is_tls_cert_invalid(pki: Pki, names: tuple[str, ...], trusted: bool,
                                                        reason: str) -> None:
    async with h3_server(pki, names=names) as port:
        result = await probe_once(h3_config(pki if trusted else None, f"https://localhost:{port}/"))
    assert result.outcome is Outcome.TLS_CERT_INVALID, result
    assert reason in (result.error or "")
    assert Phase.TLS not in result.phases


async def test_http3_closed_port_icmp_is_tls_reset(pki: Pki) -> None:
    port = free_udp_port()  # nothing listens: the kernel answers the Initial with ICMP port unreachable
    result = await probe_once(h3_config(pki, f"https://127.0.0.1:{port}/"))
    assert result.outcome is Outcome.TLS_RESET
    assert "ConnectionRefusedError" in (result.error or "")


async def test_http3_silent_peer_is_tls_timeout_at_the_deadline(pki: Pki) -> None:
    async with raw_udp(lambda data, addr, transport: None) as port:
        begin = time.monotonic()
        result = await probe_once(h3_config(pki, f"https://127.0.0.1:{port}/", timeout="1s"))
        took = time.monotonic() - begin
    assert result.outcome is Outcome.TLS_TIMEOUT
    assert "stalled" in result.evidence[-1] and "sni=127.0.0.1" in result.evidence[-1]
    assert 0.95 < took < 1.5


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [(Answer(reset=True), Outcome.HTTP_RESET), (Answer(silent=True), Outcome.HTTP_TIMEOUT)],
    ids=["stream-reset", "no-answer"],
)
async def test_http3_request_failures(pki: Pki, answer: Answer, outcome: Outcome) -> None:
    async with h3_server(pki, lambda m, p, h: answer) as port:
        result = await probe_once(h3_config(pki, f"https://127.0.0.1:{port}/", timeout="1s"))
    assert result.outcome is outcome, result
    assert Phase.TLS in result.phases


HOSTILE = [
    pytest.param(garbage, Outcome.TLS_TIMEOUT, id="garbage-datagrams"),
    pytest.param(endless_retry, Outcome.TLS_TIMEOUT, id="endless-retry"),
    pytest.param(version_negotiation_with_ours, Outcome.TLS_TIMEOUT, id="version-negotiation-listing-ours"),
    pytest.param(endless_version_negotiation, Outcome.TLS_RESET, id="version-negotiation-no-common-version"),
    pytest.param(flood, Outcome.TLS_TIMEOUT, id="flood"),
]


@pytest.mark.parametrize(("behaviour", "outcome"), HOSTILE)
async def test_hostile_quic_peer_costs_bounded_time_and_memory(pki: Pki, behaviour: Any, outcome: Outcome) -> None:
    async with raw_udp(behaviour) as port:
        cfg = h3_config(pki, f"https://127.0.0.1:{port}/", timeout="1s")
        tracemalloc.start()
        begin = time.monotonic()
        try:
            result = await probe_once(cfg)
            took = time.monotonic() - begin
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert result.outcome is outcome, result
    assert took < 1.5
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes"


async def test_http3_source_address_route_binds_it(pki: Pki, tmp_path: Path) -> None:
    seen = Seen()
    async with h3_server(pki, seen=seen) as port:
        doc = {
            "vantage": "test", "defaults": {"ca_file": str(pki.ca_file), "timeout": "2s"},
            "routes": [{"name": "bound", "source_address": "127.0.0.3"},
                       {"name": "bad", "source_address": "192.0.2.77"}],
            "targets": [{"name": "h3", "url": f"https://127.0.0.1:{port}/", "http_version": 3,
                         "routes": ["bound", "bad"]}],
        }
        cfg = config.loads(yaml.safe_dump(doc))
        ctx = ProbeContext(cfg)
        try:
            bound = await run_probe(cfg.targets[0], cfg.route("bound"), ctx)
            bad = await run_probe(cfg.targets[0], cfg.route("bad"), ctx)
        finally:
            await ctx.close()
    assert bound.outcome is Outcome.OK, bound
    assert bad.outcome is Outcome.ERROR  # a source address this host does not have: our fault, not the network's
    assert "Cannot assign requested address" in (bad.error or "")


async def test_http3_deadline_bounds_a_slow_answer(pki: Pki) -> None:
    async with h3_server(pki, lambda m, p, h: Answer(delay=5.0)) as port:
        begin = time.monotonic()
        result = await probe_once(h3_config(pki, f"https://127.0.0.1:{port}/", timeout="500ms"))
        took = time.monotonic() - begin
    assert result.outcome is Outcome.HTTP_TIMEOUT
    assert took < 1.0
    await asyncio.sleep(0)
