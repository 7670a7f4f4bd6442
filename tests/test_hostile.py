"""Hostile servers and middleboxes: every probe ends by its deadline, with a proper outcome, in bounded memory.

Each case runs the real prober (or `probe.dns.lookup`) against a loopback server from
tests/hostile_servers.py, under tracemalloc, and asserts the outcome, that the probe
returned by its deadline (plus a small scheduling slack), and the peak of Python memory
allocated while it ran.
"""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from probe import config
from probe.classify import DnsFailure
from probe.context import ProbeContext
from probe.dns import lookup as probe_dns
from probe.models import Deadline, Outcome, ProbeResult
from probe.runner import run_probe
from tests import hostile_servers as hostile
from tests.dnsserver import DnsServer
from tests.servers import Handler, Pki, raw_server

T = TypeVar("T")
TIMEOUT = 1.0
SLACK = 0.5  # seconds past the deadline a probe may take to unwind (loaded CI machine)
MiB = 2**20
DNS_OUTCOMES = {Outcome.DNS_TIMEOUT, Outcome.DNS_SERVFAIL, Outcome.DNS_NXDOMAIN}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Bounded:
    seconds: float
    peak_bytes: int


async def bounded(work: Awaitable[T]) -> tuple[T, Bounded]:
    """Await `work` under tracemalloc; return its value, the wall time and the allocation peak."""
    loop = asyncio.get_running_loop()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        started = loop.time()
        value = await work
        elapsed = loop.time() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return value, Bounded(elapsed, peak)


def target_config(pki: Pki, target: dict[str, Any], routes: list[dict[str, Any]] | None = None) -> config.Config:
    doc: dict[str, Any] = {
        "vantage": "test",
        "defaults": {"ca_file": str(pki.ca_file), "timeout": f"{TIMEOUT}s"},
        "targets": [{"name": "t", **target}],
    }
    if routes:
        doc["routes"] = routes
    return config.loads(yaml.safe_dump(doc))


async def probe_with(cfg: config.Config, route: str = "direct") -> tuple[ProbeResult, Bounded]:
    ctx = ProbeContext(cfg)
    try:
        return await bounded(run_probe(cfg.targets[0], cfg.route(route), ctx))
    finally:
        await ctx.close()


@asynccontextmanager
async def serving(handler: Handler, pki: Pki | None = None) -> AsyncIterator[int]:
    async with raw_server(handler, pki.server_context() if pki is not None else None) as port:
        yield port


@dataclass(frozen=True)
class HttpCase:
    id: str
    handler: Handler
    outcome: Outcome
    evidence: str
    max_mib: float
    tls: bool = False  # probe with https:// (the handler itself speaks, or breaks, TLS)
    max_body_bytes: int | None = None
    server_tls: bool = False  # the handler speaks HTTP inside a real TLS server


HTTP_CASES = [
    HttpCase("endless-body", hostile.endless_body, Outcome.OK, "stopped reading the body at 262144 bytes", 3,
             max_body_bytes=256 * 1024),
    HttpCase("endless-chunked-body", hostile.endless_chunked_body, Outcome.OK, "stopped reading the body", 3,
             max_body_bytes=256 * 1024),
    HttpCase("endless-chunk-size-line", hostile.endless_chunk_size, Outcome.HTTP_UNEXPECTED,
             "chunk header or trailer larger than 65536 bytes", 3),
    HttpCase("endless-body-default-limit", hostile.endless_body, Outcome.OK, "at 1048576 bytes", 6),
    HttpCase("body-trickled-a-byte-a-second", hostile.trickled_body, Outcome.HTTP_TIMEOUT,
             "response body incomplete after", 2),
    HttpCase("headers-never-end", hostile.endless_headers, Outcome.HTTP_UNEXPECTED,
             "response head larger than 65536 bytes", 3),
    HttpCase("headers-trickled", hostile.trickled_headers, Outcome.HTTP_TIMEOUT, "no response head", 2),
    HttpCase("header-of-8-mib", hostile.huge_header, Outcome.HTTP_UNEXPECTED, "response head larger than", 3),
    HttpCase("redirect-loop", hostile.redirect_loop, Outcome.HTTP_UNEXPECTED, "redirect loop", 2),
    HttpCase("redirects-without-end", hostile.redirect_forever, Outcome.HTTP_UNEXPECTED, "more than 10 redirects", 2),
    # Over TLS the probe reads through its own SSLObject: a flood must still cost bounded memory.
    HttpCase("endless-body-over-tls", hostile.endless_body, Outcome.OK, "stopped reading the body at 262144 bytes",
             3, tls=True, max_body_bytes=256 * 1024, server_tls=True),
    HttpCase("header-of-8-mib-over-tls", hostile.huge_header, Outcome.HTTP_UNEXPECTED, "response head larger than",
             3, tls=True, server_tls=True),
    HttpCase("body-trickled-over-tls", hostile.trickled_body, Outcome.HTTP_TIMEOUT, "response body incomplete after",
             2, tls=True, server_tls=True),
    HttpCase("tls-garbage", hostile.tls_garbage, Outcome.TLS_RESET, "after ClientHello", 2, tls=True),
    HttpCase("tls-stall-mid-handshake", hostile.tls_stall_mid_handshake, Outcome.TLS_TIMEOUT, "stalled", 2,
             tls=True),
]


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c.id for c in HTTP_CASES])
async def test_hostile_http_server_ends_by_the_deadline_with_its_outcome(case: HttpCase, pki: Pki) -> None:
    async with serving(case.handler, pki if case.server_tls else None) as port:
        scheme = "https" if case.tls else "http"
        target: dict[str, Any] = {"url": f"{scheme}://127.0.0.1:{port}/", "server_name": "localhost"}
        if case.max_body_bytes is not None:
            target["max_body_bytes"] = case.max_body_bytes
        result, spent = await probe_with(target_config(pki, target))
    assert result.outcome is case.outcome, result
    assert case.evidence in " | ".join(result.evidence), result.evidence
    assert spent.seconds <= TIMEOUT + SLACK
    assert spent.peak_bytes <= case.max_mib * MiB, f"peak {spent.peak_bytes / MiB:.1f} MiB"


@pytest.mark.parametrize(
    ("scheme", "handler", "outcome"),
    [
        ("socks5h", hostile.never_relay, Outcome.TCP_TIMEOUT),
        ("http", hostile.never_relay, Outcome.TCP_TIMEOUT),
        ("http", hostile.connect_then_never_relay, Outcome.HTTP_TIMEOUT),
    ],
    ids=["socks-accepts-and-never-answers", "http-accepts-and-never-answers", "http-connect-200-then-silence"],
)
async def test_proxy_that_never_relays_ends_by_the_deadline(
    scheme: str, handler: Handler, outcome: Outcome, pki: Pki
) -> None:
    async with serving(handler) as proxy_port:
        cfg = target_config(
            pki, {"url": "http://storage.example/ping", "routes": ["hk"]},
            routes=[{"name": "hk", "proxy": f"{scheme}://127.0.0.1:{proxy_port}"}],
        )
        result, spent = await probe_with(cfg, "hk")
    assert result.outcome is outcome, result
    assert spent.seconds <= TIMEOUT + SLACK
    assert spent.peak_bytes <= 2 * MiB


@pytest.mark.parametrize("scheme", ["socks5h", "http"])
async def test_tls_through_a_proxy_that_never_relays_is_a_timeout(scheme: str, pki: Pki) -> None:
    async with serving(hostile.connect_then_never_relay if scheme == "http" else hostile.never_relay) as port:
        cfg = target_config(
            pki, {"address": "storage.example:443", "tls": True, "routes": ["hk"]},
            routes=[{"name": "hk", "proxy": f"{scheme}://127.0.0.1:{port}"}],
        )
        result, spent = await probe_with(cfg, "hk")
    assert result.outcome in {Outcome.TCP_TIMEOUT, Outcome.TLS_TIMEOUT}, result
    assert spent.seconds <= TIMEOUT + SLACK


# --- DNS ------------------------------------------------------------------------------

DNS_CASES: list[tuple[str, Callable[[], Any], set[Outcome] | None]] = [
    ("malformed-packets", hostile.malformed, DNS_OUTCOMES),
    ("wrong-ids", hostile.wrong_id, DNS_OUTCOMES),
    ("wrong-question", hostile.wrong_question, DNS_OUTCOMES),
    ("compression-loop", hostile.compression_loop, DNS_OUTCOMES),
    ("thousands-of-records", hostile.thousands_of_records, None),  # None: answers, bounded
    ("reply-flood", hostile.flood, None),
]


@pytest.mark.parametrize(("case", "behaviour", "outcomes"), DNS_CASES, ids=[c[0] for c in DNS_CASES])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_hostile_dns_server_gives_a_proper_outcome_by_the_deadline(
    case: str, behaviour: Callable[[], Any], outcomes: set[Outcome] | None, transport: str, pki: Pki
) -> None:
    cfg = target_config(pki, {"address": "127.0.0.1:1"})
    async with DnsServer(behaviour()) as server:
        resolver = server.resolver("hostile", config.ResolverType(transport))
        ctx = ProbeContext(cfg)
        try:
            # Time without tracemalloc (it slows parsing thousands of records severalfold), then memory.
            started = asyncio.get_running_loop().time()
            await _lookup_outcome(resolver, ctx)
            seconds = asyncio.get_running_loop().time() - started
            found, spent = await bounded(_lookup_outcome(resolver, ctx))
        finally:
            await ctx.close()
    assert seconds <= TIMEOUT + SLACK
    assert spent.peak_bytes <= 16 * MiB, f"peak {spent.peak_bytes / MiB:.1f} MiB"
    if outcomes is None:
        assert isinstance(found, probe_dns.Lookup), found
        assert found.answers and len(found.answers) <= 3000
        assert all(a.startswith("198.51.") for a in found.answers)
    else:
        assert isinstance(found, DnsFailure), found
        assert found.outcome in outcomes, found


async def _lookup_outcome(resolver: config.Resolver, ctx: ProbeContext) -> probe_dns.Lookup | DnsFailure:
    try:
        return await probe_dns.lookup(resolver, "storage.example", Deadline.after(TIMEOUT), ctx)
    except DnsFailure as e:
        return e


async def test_a_canary_answering_everything_is_misconfigured_not_injection(tmp_path: Path) -> None:
    """A canary that answers even the control name is misconfigured: it is said so, and nobody is accused."""
    import os

    from tests.test_cli import run_cli

    if os.geteuid() != 0:
        pytest.skip("a canary listens on port 53, which needs root")
    async with DnsServer(hostile.flood(3), host="127.0.0.77", port=53) as canary, \
            DnsServer(hostile.flood(1)) as honest:
        cfg = tmp_path / "t.yml"
        cfg.write_text(yaml.safe_dump({
            "vantage": "test",
            "defaults": {"timeout": f"{TIMEOUT}s"},
            "resolvers": [{"name": "r", "type": "udp", "address": f"127.0.0.1:{honest.port}"}],
            "canaries": ["127.0.0.77"],
            "targets": [{"name": "t", "url": "http://storage.example:1/"}],
        }))
        code, out, err = await asyncio.wait_for(run_cli("once", "-c", str(cfg), "--json"), TIMEOUT + 30)
    assert code == 1, err
    assert canary.queries, "the DNS check never asked the canary"
    dns = yaml.safe_load(out)["results"][0]["dns"]
    assert [d["outcome"] for d in dns] == ["ok"], dns
    evidence = " ".join(dns[0]["evidence"])
    assert "canary 127.0.0.77:53 answered the control name" in evidence and "misconfigured" in evidence, evidence
