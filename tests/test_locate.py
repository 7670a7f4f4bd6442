"""Localisation without the lab: parsing, the policy (rate, proxy, residual, what is repeated), the hooks.

The TTL series itself needs routers: tests/test_locate_lab.py runs it in the chain lab.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from probe.config import Config, loads
from probe.context import ProbeContext
from probe.exporter.metrics import render
from probe.locate import RATE_SECONDS, Locator, fingerprint, trigger, ttl
from probe.locate.policy import plan_for
from probe.locate.search import DnsPlan, TcpPlan
from probe.models import DnsResult, Localisation, Outcome, ProbeResult
from probe.scheduler import Scheduler
from probe.store import ResultStore

CONFIG = """
vantage: v
defaults: {locate: true, interval: 200ms, timeout: 150ms}
resolvers: [{name: ali, type: udp, address: 198.51.100.53}, {name: doh, type: doh, url: "https://198.51.100.54/q"}]
routes: [{name: direct}, {name: cn2, source_address: 127.0.0.1}, {name: hk, proxy: "socks5://user:pw@10.0.0.5:1080"}]
targets:
  - {name: web, url: "https://blocked.example/ping", routes: [direct, cn2, hk]}
  - {name: plain, url: "http://blocked.example/ping"}
  - {name: quiet, url: "https://blocked.example/ping", locate: false}
"""


@pytest.fixture(autouse=True)
def _no_vantage_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROBE_VANTAGE", raising=False)


def config(extra: str = "") -> Config:
    return loads(CONFIG + extra)


def blocked(target: str, outcome: Outcome = Outcome.TLS_RESET, route: str = "direct", address: str | None = "127.0.0.1",
            dns: tuple[DnsResult, ...] = ()) -> ProbeResult:
    return ProbeResult(target, route, outcome, time.time(), 0.1, address=address, dns=dns)


# --- parsing ------------------------------------------------------------------------------


def test_icmp_time_exceeded_from_the_error_queue_names_the_router() -> None:
    offender = struct.pack("=HH4s8x", socket.AF_INET, 0, socket.inet_aton("192.0.2.6"))
    error = ttl.parse_error(struct.pack("=IBBBBII", 113, ttl.SO_EE_ORIGIN_ICMP, 11, 0, 0, 0, 0) + offender)
    assert error == ttl.IcmpError("192.0.2.6", expired=True)
    unreachable = ttl.parse_error(struct.pack("=IBBBBII", 111, ttl.SO_EE_ORIGIN_ICMP, 3, 3, 0, 0, 0) + offender)
    assert unreachable == ttl.IcmpError("192.0.2.6", expired=False)
    local = struct.pack("=IBBBBII", 90, 1, 0, 0, 0, 0, 0)  # SO_EE_ORIGIN_LOCAL: not from the network
    assert ttl.parse_error(local + offender) is None
    assert ttl.parse_error(b"short") is None


def test_forged_reset_headers_are_read_as_its_fingerprint() -> None:
    tcp = struct.pack("!HHIIBBHHH", 443, 50000, 1, 2, 5 << 4, 0x14, 1981, 0, 0) + b"\0" * 10
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 55, 6, 0,
                     socket.inet_aton("198.51.100.20"), socket.inet_aton("192.0.2.1"))
    seen = fingerprint.parse(ip + tcp, "198.51.100.20", 443, socket.IPPROTO_TCP)
    assert seen is not None
    found = fingerprint.injector("rst", 0.02, seen)
    fields = (found.ip_ttl, found.ip_id, found.tcp_window, found.tcp_flags, found.payload_bytes)
    assert fields == (55, 1, 1981, "RA", 10)
    assert fingerprint.parse(ip + tcp, "198.51.100.99", 443, socket.IPPROTO_TCP) is None  # another peer
    assert fingerprint.parse(ip + tcp, "198.51.100.20", 80, socket.IPPROTO_TCP) is None  # another port
    assert fingerprint.parse(b"\x60" + bytes(60), "198.51.100.20", 443, socket.IPPROTO_TCP) is None  # IPv6


def test_triggers_carry_what_censors_match() -> None:
    assert b"blocked.example" in trigger.client_hello("blocked.example")
    assert trigger.client_hello("x.example")[0] == 0x16  # a TLS handshake record
    assert trigger.http_request("http://blocked.example:8080/a?b=1") == (
        b"GET /a?b=1 HTTP/1.1\r\nHost: blocked.example:8080\r\nUser-Agent: probe\r\nAccept: */*\r\n\r\n")
    query, query_id = trigger.dns_query("blocked.example")
    assert not trigger.dns_reply_matches(query, query_id)  # a query is no answer
    assert not trigger.dns_reply_matches(b"garbage", query_id)


# --- what is repeated ---------------------------------------------------------------------


def test_tls_reset_repeats_the_client_hello_from_the_routes_source_address() -> None:
    cfg = config()
    plan = plan_for(cfg.target("web"), cfg.route("cn2"), blocked("web", route="cn2"), cfg, ProbeContext(cfg))
    assert isinstance(plan, TcpPlan)
    assert (plan.address, plan.port, plan.source) == ("127.0.0.1", 443, "127.0.0.1")
    assert b"blocked.example" in plan.payload and b"blocked.example" not in plan.control
    assert plan.what == "ClientHello (sni=blocked.example)"


def test_http_block_repeats_a_plain_request_but_not_one_inside_tls() -> None:
    cfg = config()
    ctx = ProbeContext(cfg)
    plan = plan_for(cfg.target("plain"), cfg.route("direct"), blocked("plain", Outcome.HTTP_UNEXPECTED), cfg, ctx)
    assert isinstance(plan, TcpPlan) and b"Host: blocked.example\r\n" in plan.payload
    assert b"Host: example.com\r\n" in plan.control
    why = plan_for(cfg.target("web"), cfg.route("direct"), blocked("web", Outcome.HTTP_RESET), cfg, ctx)
    assert why == ("http_reset inside TLS: the request travels encrypted, so a censor acting on it cannot be found "
                   "by repeating it TTL-limited; not localised")


def test_dns_injection_repeats_the_query_to_a_canary_first_then_the_udp_resolver_that_saw_it() -> None:
    injected = (DnsResult("doh", Outcome.OK), DnsResult("ali", Outcome.DNS_INJECTION))
    result = blocked("web", Outcome.DNS_INJECTION, address=None, dns=injected)
    cfg = config()
    plan = plan_for(cfg.target("web"), cfg.route("direct"), result, cfg, ProbeContext(cfg))
    assert isinstance(plan, DnsPlan) and (plan.server, plan.port, plan.canary) == ("198.51.100.53", 53, False)
    with_canary = config("canaries: [203.0.113.53]\n")
    plan = plan_for(with_canary.target("web"), with_canary.route("direct"), result, with_canary,
                    ProbeContext(with_canary))
    assert isinstance(plan, DnsPlan) and (plan.server, plan.canary) == ("203.0.113.53", True)
    only_doh = blocked("web", Outcome.DNS_INJECTION, address=None, dns=(DnsResult("doh", Outcome.DNS_INJECTION),))
    assert "cannot be repeated TTL-limited" in str(plan_for(cfg.target("web"), cfg.route("direct"), only_doh, cfg,
                                                             ProbeContext(cfg)))


# --- the policy ---------------------------------------------------------------------------


def test_only_locatable_blocks_of_targets_with_locate_are_wanted() -> None:
    cfg, locator = config(), Locator(wait_residual=False)
    assert locator.wanted(cfg.target("web"), blocked("web"))
    assert not locator.wanted(cfg.target("quiet"), blocked("quiet"))
    for outcome in (Outcome.OK, Outcome.TCP_REFUSED, Outcome.TCP_TIMEOUT, Outcome.TLS_TIMEOUT, Outcome.ERROR):
        assert not locator.wanted(cfg.target("web"), blocked("web", outcome)), outcome


async def test_one_localisation_per_pair_per_ten_minutes() -> None:
    cfg = config()
    now = [1000.0]
    locator = Locator(wait_residual=False, clock=lambda: now[0])
    hk = cfg.route("hk")
    first = await locator.locate(cfg.target("web"), hk, blocked("web", route="hk"), cfg, ProbeContext(cfg))
    assert first.packets == 0
    assert not locator.wanted(cfg.target("web"), blocked("web", route="hk"))
    assert locator.wanted(cfg.target("web"), blocked("web", route="direct"))  # another pair
    now[0] += RATE_SECONDS - 1
    assert not locator.wanted(cfg.target("web"), blocked("web", route="hk"))
    now[0] += 1
    assert locator.wanted(cfg.target("web"), blocked("web", route="hk"))


async def test_proxy_route_says_the_vantage_cannot_localise_and_hides_credentials() -> None:
    cfg = config()
    found = await Locator(wait_residual=False).locate(cfg.target("web"), cfg.route("hk"),
                                                      blocked("web", route="hk"), cfg, ProbeContext(cfg))
    assert found.hop is None and found.deferred is None
    assert found.evidence == ("not possible from the vantage: over route hk the packets leave from the proxy "
                              "(socks5://***@10.0.0.5:1080), whose path the vantage cannot see or TTL-limit",)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_probe_once_defers_when_the_address_refuses_a_fresh_connection() -> None:
    port = _closed_port()
    cfg = loads(f"vantage: v\ntargets:\n  - {{name: t, address: '127.0.0.1:{port}', tls: true, locate: true}}\n")
    found = await Locator(wait_residual=False).locate(cfg.target("t"), cfg.route("direct"), blocked("t"), cfg,
                                                      ProbeContext(cfg))
    assert found.hop is None and found.packets == 0
    assert found.deferred is not None and found.deferred.startswith(f"127.0.0.1:{port} does not answer a fresh "
                                                                    "connection (Connection refused after")
    assert found.to_json() == {"deferred": found.deferred, "evidence": []}


async def test_probe_run_waits_the_residual_block_out_then_localises() -> None:
    port = _closed_port()
    cfg = loads(f"vantage: v\ntargets:\n  - {{name: t, address: '127.0.0.1:{port}', tls: true, locate: true}}\n")
    server: list[asyncio.Server] = []

    async def accepted(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()  # the server never answers the trigger: no reset, no data

    async def lift(_seconds: float) -> None:  # the block lifts while the locator waits
        if not server:
            server.append(await asyncio.start_server(accepted, "127.0.0.1", port))

    locator = Locator(wait_residual=True, sleep=lift, recheck=30.0)
    try:
        found = await locator.locate(cfg.target("t"), cfg.route("direct"), blocked("t"), cfg, ProbeContext(cfg))
    finally:
        server[0].close()
        await server[0].wait_closed()
    assert found.deferred is None and found.packets > 0
    # Loopback is one hop: the first TTL already reaches the server, which draws no reset.
    assert found.hop is None and any("reached 127.0.0.1" in line for line in found.evidence), found.evidence


async def test_probe_run_gives_up_on_an_address_that_stays_blocked() -> None:
    port = _closed_port()
    cfg = loads(f"vantage: v\ntargets:\n  - {{name: t, address: '127.0.0.1:{port}', tls: true, locate: true}}\n")
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    locator = Locator(wait_residual=True, sleep=sleep, recheck=60.0, give_up=300.0)
    found = await locator.locate(cfg.target("t"), cfg.route("direct"), blocked("t"), cfg, ProbeContext(cfg))
    assert waits == [60.0] * 5 and found.hop is None and found.deferred is None
    assert found.evidence[0].endswith("still so after 300 s: the address is blocked outright, not for a while; "
                                      "not localised")


async def test_a_bug_in_the_localisation_is_said_as_ours(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config()

    def broken(*_: object) -> object:
        raise ValueError("boom")

    monkeypatch.setattr("probe.locate.policy.plan_for", broken)
    found = await Locator(wait_residual=False).locate(cfg.target("web"), cfg.route("direct"), blocked("web"), cfg,
                                                      ProbeContext(cfg))
    assert found.hop is None
    assert found.evidence == ("error: the localisation itself failed (ValueError: boom); no hop stated",)


# --- the hooks ----------------------------------------------------------------------------


class FakeLocator(Locator):
    def __init__(self, release: asyncio.Event) -> None:
        super().__init__(wait_residual=True)
        self.release, self.calls = release, 0

    async def locate(self, target, route, result, config, ctx):  # type: ignore[no-untyped-def]
        self.calls += 1
        await self.release.wait()
        return Localisation(hop=7, hops=("192.0.2.2", None), evidence=("reset at TTL 7, none at TTL 6",))


async def test_probe_run_localises_in_the_background_and_pauses_the_pair_meanwhile(tmp_path: Path) -> None:
    cfg = loads("vantage: v\ndefaults: {interval: 200ms, locate: true}\n"
                "targets:\n  - {name: t, address: 'blocked.example:443', tls: true}\n")
    probes = 0

    async def probe_fn(target, route, ctx):  # type: ignore[no-untyped-def]
        nonlocal probes
        probes += 1
        return blocked("t", address="198.51.100.20")

    async def dns_fn(target, deadline, ctx):  # type: ignore[no-untyped-def]
        return ()

    store, release = ResultStore(cfg), asyncio.Event()
    locator = FakeLocator(release)
    scheduler = Scheduler(cfg, ProbeContext(cfg), store, probe_fn=probe_fn, dns_fn=dns_fn, locator=locator)
    scheduler.start()
    try:
        while probes < 1:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.6)  # three intervals: the pair's probes wait for its localisation
        assert (probes, locator.calls) == (1, 1)
        assert b"probe_censor_hop{" not in render(store, cfg)
        release.set()
        while store.localisation("t", "direct") is None:
            await asyncio.sleep(0.01)
    finally:
        await scheduler.shutdown()
    assert probes >= 1
    hops = [(s.labels, s.value) for f in text_string_to_metric_families(render(store, cfg).decode())
            for s in f.samples if s.name == "probe_censor_hop"]
    assert hops == [({"vantage": "v", "target": "t", "route": "direct"}, 7.0)]
    latest = store.results()[0]
    assert latest.locate is not None and latest.to_json()["locate"] == {
        "hop": 7, "hops": ["192.0.2.2", None], "injector": None, "evidence": ["reset at TTL 7, none at TTL 6"],
        "packets": 0, "duration_seconds": 0.0, "finished_at": 0.0,
    }


def test_the_table_says_where_the_censor_is() -> None:
    from probe.output import results_table

    def row(found: Localisation | None) -> str:
        r = ProbeResult("t", "direct", Outcome.TLS_RESET, 0.0, 0.1,
                        evidence=("connection reset 1 ms after ClientHello",), locate=found)
        return next(line for line in results_table([r], color=False).splitlines() if "ClientHello" in line)

    assert row(Localisation(hop=4)).endswith("connection reset 1 ms after ClientHello; censor at hop 4")
    assert row(Localisation()).endswith("; censor not localised (see --json)")
    assert row(Localisation(deferred="x")).endswith("; localisation deferred (residual block)")
    assert row(None).endswith("connection reset 1 ms after ClientHello")


async def test_at_most_four_series_run_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = loads("vantage: v\ndefaults: {locate: true}\ntargets:\n"
                + "".join(f"  - {{name: t{i}, url: 'http://198.51.100.{i}/'}}\n" for i in range(10)))
    running = peak = 0

    async def series(plan: TcpPlan) -> Localisation:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        return Localisation(hop=3)

    async def answers(plan: TcpPlan) -> None:
        return None

    monkeypatch.setattr("probe.locate.policy.locate_tcp", series)
    monkeypatch.setattr("probe.locate.policy._residual", answers)
    results = [blocked(f"t{i}", Outcome.HTTP_RESET, address=f"198.51.100.{i}") for i in range(10)]
    located = await Locator(wait_residual=False).attach(results, cfg, ProbeContext(cfg))
    assert [r.locate.hop if r.locate else None for r in located] == [3] * 10
    assert peak == 4


def test_icmpv6_time_exceeded_names_the_router() -> None:
    offender = struct.pack("=HHI16sI", socket.AF_INET6, 0, 0, socket.inet_pton(socket.AF_INET6, "2001:db8::1"), 0)
    error = ttl.parse_error(struct.pack("=IBBBBII", 113, ttl.SO_EE_ORIGIN_ICMP6, 3, 0, 0, 0, 0) + offender)
    assert error == ttl.IcmpError("2001:db8::1", expired=True)


async def test_without_cap_net_raw_the_fingerprint_is_skipped_and_said(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.socket

    def no_raw(family: int = -1, kind: int = -1, proto: int = -1) -> socket.socket:
        if kind == socket.SOCK_RAW:
            raise PermissionError(1, "Operation not permitted")
        return real(family, kind, proto)

    monkeypatch.setattr(socket, "socket", no_raw)
    capture, why = fingerprint.Capture.open("198.51.100.20", 443, socket.IPPROTO_TCP)
    assert capture is None
    assert why == "no fingerprint: reading the forged packet's headers needs CAP_NET_RAW (root)"
    assert fingerprint.Capture.open("2001:db8::1", 443, socket.IPPROTO_TCP) == (
        None, "no fingerprint: the capture reads IPv4 headers only")


async def test_residual_check_sends_the_control_name_where_configured() -> None:
    async def reset_on_data(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # a censor that lets the handshake through and resets what follows
        writer.transport.abort()

    server = await asyncio.start_server(reset_on_data, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = loads(f"vantage: v\ntargets:\n  - {{name: t, address: '127.0.0.1:{port}', tls: true, locate: true,"
                f" server_name: blocked.example, control_sni: free.example}}\n")
    try:
        found = await Locator(wait_residual=False).locate(cfg.target("t"), cfg.route("direct"), blocked("t"), cfg,
                                                          ProbeContext(cfg))
    finally:
        server.close()
        await server.wait_closed()
    assert found.deferred is not None and found.deferred.startswith(
        f"127.0.0.1:{port} answers a fresh connection but not a ClientHello for the control name free.example "
        "(reset or closed after"), found


def test_an_http3_block_is_not_repeated_over_tcp() -> None:
    cfg = loads("vantage: v\ntargets:\n"
                "  - {name: h3, url: 'https://blocked.example/', http_version: 3, locate: true}\n")
    why = plan_for(cfg.target("h3"), cfg.route("direct"), blocked("h3"), cfg, ProbeContext(cfg))
    assert why == ("tls_reset of target kind http3: only TCP handshakes, plain-HTTP requests and UDP DNS queries are "
                   "repeated TTL-limited; not localised")
