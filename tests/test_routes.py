"""Every route kind carries every stage of the probe, against real proxies and bound source addresses.

Source addresses are loopback aliases (127.0.0.2, 127.0.0.3: no root needed); the far end
records who connected. The proxies are Debian's microsocks (SOCKS5) and tinyproxy (HTTP
CONNECT), each binding its outgoing connections to an address of its own, so the far end
can tell traffic that went through the proxy from traffic that did not.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from probe import config
from probe.context import ProbeContext
from probe.exporter.api import routes_json
from probe.exporter.metrics import render
from probe.models import Outcome, Phase, ProbeResult
from probe.runner import run_probe
from probe.store import ResultStore
from tests.dnsserver import DnsServer, answer, nxdomain
from tests.proxies import (
    PeerServer,
    RunningProxy,
    bind_same_port,
    free_port,
    localhost_addresses,
    microsocks,
    peer_server,
    tinyproxy,
)
from tests.servers import Pki, closed_port, raw_server, reset_after_client_hello, silent

SOCKS_OUT, HTTP_OUT = "127.0.0.5", "127.0.0.6"  # where each proxy's outgoing connections come from
USER = "probe"
PASSWORD = "s3cret:p@ss"  # characters that need quoting in a URL
HTTP_PASSWORD = "s3cret.pw"  # tinyproxy's BasicAuth line takes no ':' or '@'


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def socks() -> Iterator[RunningProxy]:
    with microsocks(bind=SOCKS_OUT) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def http_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    with tinyproxy(tmp_path_factory.mktemp("tinyproxy"), bind=HTTP_OUT) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def socks_plain() -> Iterator[RunningProxy]:
    """microsocks without a bind address: `localhost` may resolve to ::1 at the proxy."""
    with microsocks() as proxy:
        yield proxy


@pytest.fixture(scope="module")
def socks_auth() -> Iterator[RunningProxy]:
    with microsocks(user=USER, password=PASSWORD) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def http_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    with tinyproxy(tmp_path_factory.mktemp("tinyproxy-auth"), user=USER, password=HTTP_PASSWORD) as proxy:
        yield proxy


@pytest.fixture
def proxies(socks: RunningProxy, http_proxy: RunningProxy) -> dict[str, str]:
    """Proxy URL per scheme; socks5 and socks5h go to the same microsocks."""
    return {
        "socks5": socks.url,
        "socks5h": socks.url_with(None, None, scheme="socks5h"),
        "http": http_proxy.url,
    }


OUT_ADDRESS = {"socks5": SOCKS_OUT, "socks5h": SOCKS_OUT, "http": HTTP_OUT}

MakeContext = Callable[..., ProbeContext]


@pytest.fixture
async def make_context(tmp_path: Path) -> AsyncIterator[MakeContext]:
    """Yield a factory of ProbeContexts whose `system` resolver reads files the test wrote."""
    made: list[ProbeContext] = []

    def make(cfg: config.Config, *, hosts: str = "", nameserver_port: int = 53) -> ProbeContext:
        (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        (tmp_path / "hosts").write_text(hosts)
        ctx = ProbeContext(
            cfg, resolv_conf=str(tmp_path / "resolv.conf"), hosts_file=str(tmp_path / "hosts"),
            system_dns_port=nameserver_port,
        )
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        await ctx.close()


def make_config(pki: Pki, routes: list[dict[str, Any]], target: dict[str, Any], **top: Any) -> config.Config:
    target = {"name": "storage", "routes": [r["name"] for r in routes], **target}
    doc = {
        "vantage": "lab-cn",
        "defaults": {"ca_file": str(pki.ca_file), "timeout": "3s"},
        "routes": routes,
        "targets": [target],
        **top,
    }
    return config.loads(yaml.safe_dump(doc))


def target_of(kind: str, host: str, port: int) -> dict[str, Any]:
    """Return a target of `kind` (tcp, tls, http) at host:port whose certificate is for localhost."""
    match kind:
        case "tcp":
            return {"address": f"{host}:{port}"}
        case "tls":
            return {"address": f"{host}:{port}", "tls": True, "server_name": "localhost"}
    return {"url": f"https://{host}:{port}/ping", "server_name": "localhost", "expect": {"body_contains": "pong"}}


PHASES = {
    "tcp": ["resolve", "connect"],
    "tls": ["resolve", "connect", "tls"],
    "http": ["resolve", "connect", "tls", "processing", "transfer"],
}


async def probe_routes(cfg: config.Config, ctx: ProbeContext, server: PeerServer | None = None) -> list[ProbeResult]:
    """Probe the target over each of its routes, one after the other (see `probe`)."""
    return [await probe(cfg, name, ctx, server) for name in cfg.targets[0].routes]


async def probe(cfg: config.Config, route: str, ctx: ProbeContext, server: PeerServer | None = None) -> ProbeResult:
    """Probe the target over `route`; after a success, wait until `server` has seen the connection.

    A TCP probe hangs up right after the handshake, maybe before the server's accept ran.
    """
    seen = len(server.peers) if server is not None else 0
    result = await run_probe(cfg.targets[0], cfg.route(route), ctx)
    for _ in range(100):
        if server is None or result.outcome is not Outcome.OK or len(server.peers) > seen:
            break
        await asyncio.sleep(0.01)
    return result


def gauges(text: str, name: str) -> dict[tuple[str, str], float]:
    return {
        (s.labels["target"], s.labels["route"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


# ---- source_address -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tcp", "tls", "http"])
async def test_source_address_routes_connect_from_their_address(
    kind: str, pki: Pki, make_context: MakeContext
) -> None:
    routes = [{"name": "direct"}, {"name": "cn2", "source_address": "127.0.0.2"},
              {"name": "cn3", "source_address": "127.0.0.3"}]
    tls = pki.server_context("localhost") if kind != "tcp" else None
    async with peer_server(tls=tls, hosts=["127.0.0.1"]) as server:
        cfg = make_config(pki, routes, target_of(kind, "127.0.0.1", server.port))
        results = await probe_routes(cfg, make_context(cfg), server)
    assert [(r.route, r.outcome) for r in results] == [("direct", "ok"), ("cn2", "ok"), ("cn3", "ok")]
    assert server.peers == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert [list(r.phases) for r in results] == [PHASES[kind]] * 3


@pytest.mark.parametrize("transport", ["udp", "tcp", "dot", "doh", "system"])
async def test_source_address_routes_send_their_dns_queries_from_their_address(
    transport: str, pki: Pki, make_context: MakeContext
) -> None:
    async with DnsServer(answer({"storage.test": ["127.0.0.1"]}), tls=pki.ca) as dns, \
            peer_server(hosts=["127.0.0.1"]) as server:
        resolvers = {
            "udp": {"type": "udp", "address": f"127.0.0.1:{dns.port}"},
            "tcp": {"type": "tcp", "address": f"127.0.0.1:{dns.port}"},
            "dot": {"type": "dot", "address": f"127.0.0.1:{dns.dot_port}", "server_name": "dns.test",
                    "ca_file": str(pki.ca_file)},
            "doh": {"type": "doh", "url": dns.doh_url, "ca_file": str(pki.ca_file)},
        }
        lab = [{"name": "lab", **resolvers[transport]}] if transport != "system" else []
        via = {"resolver": "lab"} if lab else {}  # system: the route's default resolver
        routes = [{"name": "cn2", "source_address": "127.0.0.2", **via}, {"name": "plain", **via}]
        extra = {"resolvers": lab} if lab else {}
        cfg = make_config(pki, routes, {"address": f"storage.test:{server.port}"}, **extra)
        ctx = make_context(cfg, nameserver_port=dns.port)
        bound = await probe(cfg, "cn2", ctx, server)
        bound_clients = list(dns.clients)
        plain = await probe(cfg, "plain", ctx, server)
    assert bound.outcome is Outcome.OK and plain.outcome is Outcome.OK, (bound.evidence, plain.evidence)
    assert "resolve" in bound.phases and bound.address == "127.0.0.1"
    wire = "udp" if transport == "system" else transport
    assert bound_clients and all(c == (wire, "127.0.0.2") for c in bound_clients), bound_clients
    assert all(source == "127.0.0.1" for _, source in dns.clients[len(bound_clients):])  # the unbound route
    assert server.peers == ["127.0.0.2", "127.0.0.1"]


async def test_an_unusable_source_address_is_a_local_error_not_a_network_verdict(
    pki: Pki, make_context: MakeContext
) -> None:
    routes = [{"name": "gone", "source_address": "192.0.2.77"}]  # not an address of this host
    async with peer_server(hosts=["127.0.0.1"]) as server:
        cfg = make_config(pki, routes, {"address": f"127.0.0.1:{server.port}"})
        [result] = await probe_routes(cfg, make_context(cfg), server)
    assert result.outcome is Outcome.ERROR and not result.blocked
    assert server.peers == []


# ---- proxies --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tcp", "tls", "http"])
@pytest.mark.parametrize("scheme", ["socks5", "socks5h", "http"])
async def test_proxy_routes_carry_every_stage_to_the_target(
    scheme: str, kind: str, pki: Pki, proxies: dict[str, str], make_context: MakeContext
) -> None:
    routes = [{"name": "direct"}, {"name": "hk", "proxy": proxies[scheme]}]
    tls = pki.server_context("localhost") if kind != "tcp" else None
    async with peer_server(tls=tls, hosts=["127.0.0.1"]) as server:
        cfg = make_config(pki, routes, target_of(kind, "127.0.0.1", server.port))
        direct, proxied = await probe_routes(cfg, make_context(cfg), server)
    assert (direct.route, direct.outcome, proxied.route, proxied.outcome) == ("direct", "ok", "hk", "ok"), (
        proxied.evidence
    )
    assert server.peers == ["127.0.0.1", OUT_ADDRESS[scheme]]  # the second came out of the proxy
    assert list(proxied.phases) == PHASES[kind]  # an IP literal: `resolve` is recorded, as on direct
    if kind != "tcp":  # the handshake was end to end: the target's certificate, verified
        assert proxied.tls is not None and proxied.tls.earliest_cert_expiry is not None


@pytest.mark.parametrize("scheme", ["socks5", "http"])
async def test_phases_through_a_proxy_mean_what_they_mean_direct(
    scheme: str, pki: Pki, proxies: dict[str, str], make_context: MakeContext
) -> None:
    """The server thinks for 0.3 s before answering: that is `processing` on both routes, not `connect`."""

    async def slow_pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(0.3)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\npong")
        await writer.drain()

    routes = [{"name": "direct"}, {"name": "hk", "proxy": proxies[scheme]}]
    async with peer_server(slow_pong, tls=pki.server_context("localhost"), hosts=["127.0.0.1"]) as server:
        cfg = make_config(pki, routes, target_of("http", "127.0.0.1", server.port))
        results = await probe_routes(cfg, make_context(cfg), server)
    for r in results:
        assert r.outcome is Outcome.OK, r.evidence
        assert r.phases[Phase.PROCESSING] >= 0.3 > r.phases[Phase.CONNECT] + r.phases[Phase.TLS], r.phases
    assert server.peers == ["127.0.0.1", OUT_ADDRESS[scheme]]


@pytest.mark.parametrize("scheme", ["socks5", "socks5h", "http"])
async def test_proxy_routes_resolve_the_name_at_the_proxy(
    scheme: str, pki: Pki, socks_auth: RunningProxy, http_auth: RunningProxy, make_context: MakeContext
) -> None:
    """The probe's own resolver cannot resolve `localhost` (NXDOMAIN, empty hosts file); the proxy can."""
    proxy = socks_auth if scheme.startswith("socks") else http_auth
    url = proxy.url_with(USER, proxy.password, scheme=scheme)  # no bind: localhost may be ::1 at the proxy
    routes = [{"name": "direct"}, {"name": "hk", "proxy": url}]
    async with DnsServer(nxdomain()) as dns, peer_server() as server:
        web = {"url": f"http://localhost:{server.port}/ping", "expect": {"body_contains": "pong"}}
        cfg = make_config(pki, routes, web)
        ctx = make_context(cfg, nameserver_port=dns.port)
        direct = await run_probe(cfg.targets[0], cfg.route("direct"), ctx)
        asked_direct = list(dns.queries)
        proxied = await run_probe(cfg.targets[0], cfg.route("hk"), ctx)
    assert direct.outcome is Outcome.DNS_NXDOMAIN and ("udp", "localhost", "A") in asked_direct
    assert proxied.outcome is Outcome.OK, proxied.evidence
    assert dns.queries == asked_direct  # the proxy route asked the probe's resolver nothing
    assert proxied.address == "localhost" and "resolve" not in proxied.phases
    assert list(proxied.phases) == ["connect", "processing", "transfer"]
    assert len(server.peers) == 1 and server.peers[0] in localhost_addresses()


async def test_a_proxy_route_with_a_resolver_resolves_here_and_hands_the_proxy_the_address(
    pki: Pki, socks: RunningProxy, make_context: MakeContext
) -> None:
    async with DnsServer(answer({"storage.test": ["127.0.0.1"]})) as dns, peer_server(hosts=["127.0.0.1"]) as server:
        routes = [{"name": "hk", "proxy": socks.url, "resolver": "lab"}]
        resolvers = [{"name": "lab", "type": "udp", "address": f"127.0.0.1:{dns.port}"}]
        cfg = make_config(pki, routes, {"address": f"storage.test:{server.port}"}, resolvers=resolvers)
        [result] = await probe_routes(cfg, make_context(cfg), server)
    assert result.outcome is Outcome.OK, result.evidence
    assert ("udp", "storage.test", "A") in dns.queries
    assert result.address == "127.0.0.1" and list(result.phases) == ["resolve", "connect"]
    assert server.peers == [SOCKS_OUT]


async def test_a_proxy_route_with_a_source_address_reaches_the_proxy_from_it(
    pki: Pki, http_proxy: RunningProxy, socks: RunningProxy, make_context: MakeContext
) -> None:
    routes = [
        {"name": "cn2-hk", "source_address": "127.0.0.2", "proxy": http_proxy.url},
        {"name": "gone-hk", "source_address": "192.0.2.77", "proxy": socks.url},  # not an address of this host
    ]
    async with peer_server(hosts=["127.0.0.1"]) as server:
        cfg = make_config(pki, routes, {"address": f"127.0.0.1:{server.port}"})
        uplink, gone = await probe_routes(cfg, make_context(cfg), server)
    assert uplink.outcome is Outcome.OK and server.peers == [HTTP_OUT]
    assert "Connect (file descriptor" in http_proxy.log() and "): 127.0.0.2" in http_proxy.log()
    assert gone.outcome is Outcome.ERROR and not gone.blocked
    assert f"cannot connect to proxy {socks.url} from 192.0.2.77" in gone.evidence[-1]


CREDENTIALS = {  # user, password (None: the proxy's own), outcome, what the evidence says
    "right": (USER, None, Outcome.OK, None),
    "wrong": (USER, "not-it", Outcome.ERROR, "rejected the credentials"),
    "none": (None, None, Outcome.ERROR, "requires credentials"),
}


@pytest.mark.parametrize("case", CREDENTIALS)
@pytest.mark.parametrize("scheme", ["socks5", "http"])
async def test_proxy_credentials_are_used_and_a_refusal_names_the_proxy_not_the_secret(
    scheme: str, case: str, pki: Pki, socks_auth: RunningProxy, http_auth: RunningProxy, make_context: MakeContext
) -> None:
    user, password, outcome, says = CREDENTIALS[case]
    proxy = socks_auth if scheme == "socks5" else http_auth
    routes = [{"name": "hk", "proxy": proxy.url_with(user, password or proxy.password)}]
    async with peer_server(hosts=["127.0.0.1"]) as server:
        cfg = make_config(pki, routes, {"address": f"127.0.0.1:{server.port}"})
        [result] = await probe_routes(cfg, make_context(cfg), server)
    assert result.outcome is outcome, result.evidence
    assert server.peers == ([] if says else ["127.0.0.1"])
    if says is not None:
        auth = "***@" if user is not None else ""
        assert f"proxy {scheme}://{auth}127.0.0.1:{proxy.port} {says}" in result.evidence[-1]
    text = json.dumps(result.to_json())
    assert "not-it" not in text and "s3cret" not in text


@pytest.mark.parametrize("scheme", ["socks5", "http"])
async def test_a_proxy_that_is_down_is_tcp_refused_and_says_the_proxy_is_unreachable(
    scheme: str, pki: Pki, make_context: MakeContext
) -> None:
    port = closed_port()
    routes = [{"name": "hk", "proxy": f"{scheme}://{USER}:{PASSWORD.replace('@', '%40')}@127.0.0.1:{port}"}]
    cfg = make_config(pki, routes, {"address": "127.0.0.1:443"})
    [result] = await probe_routes(cfg, make_context(cfg))
    assert result.outcome is Outcome.TCP_REFUSED and result.route == "hk"
    assert f"proxy {scheme}://***@127.0.0.1:{port}" in result.evidence[-1]
    assert "the proxy itself is unreachable" in result.evidence[-1]
    assert "s3cret" not in json.dumps(result.to_json())


@pytest.mark.parametrize("scheme", ["socks5", "http"])
async def test_a_proxy_that_never_answers_its_handshake_is_bounded_by_the_probe_deadline(
    scheme: str, pki: Pki, make_context: MakeContext
) -> None:
    async with raw_server(silent) as port:
        routes = [{"name": "hk", "proxy": f"{scheme}://127.0.0.1:{port}"}]
        cfg = make_config(pki, routes, {"address": "127.0.0.1:443", "timeout": "500ms"})
        [result] = await probe_routes(cfg, make_context(cfg))
    assert result.outcome is Outcome.TCP_TIMEOUT and 0.5 <= result.duration_seconds < 2.0
    assert f"via {scheme}://127.0.0.1:{port}" in result.evidence[-1]


@pytest.mark.parametrize("scheme", ["socks5", "http"])
async def test_a_proxy_refusing_the_target_is_tcp_refused_with_the_proxys_answer(
    scheme: str, pki: Pki, proxies: dict[str, str], make_context: MakeContext
) -> None:
    routes = [{"name": "hk", "proxy": proxies[scheme]}]
    cfg = make_config(pki, routes, {"address": f"127.0.0.1:{closed_port()}"})
    [result] = await probe_routes(cfg, make_context(cfg))
    assert result.outcome is Outcome.TCP_REFUSED, result.evidence
    assert f"via {proxies[scheme]} refused" in result.evidence[-1] and "the proxy answered" in result.evidence[-1]
    assert list(result.phases) == ["resolve"]  # `connect` did not complete


# ---- labels in results and metrics ------------------------------------------------------------------


async def test_every_route_kind_is_labelled_in_results_metrics_and_the_routes_api(
    pki: Pki, proxies: dict[str, str], make_context: MakeContext
) -> None:
    routes = [
        {"name": "direct"},
        {"name": "cn2", "source_address": "127.0.0.2"},
        {"name": "hk-socks", "proxy": proxies["socks5h"]},
        {"name": "hk-http", "proxy": proxies["http"]},
    ]
    async with peer_server(tls=pki.server_context("localhost"), hosts=["127.0.0.1"]) as server:
        cfg = make_config(pki, routes, target_of("http", "127.0.0.1", server.port))
        results = await probe_routes(cfg, make_context(cfg), server)
    assert server.peers == ["127.0.0.1", "127.0.0.2", SOCKS_OUT, HTTP_OUT]
    store = ResultStore(cfg)
    for r in results:
        store.record(r)
    text = render(store, cfg).decode()
    names = ["direct", "cn2", "hk-socks", "hk-http"]
    assert gauges(text, "probe_success") == {("storage", n): 1.0 for n in names}
    assert sorted(gauges(text, "probe_route_rank").values()) == [1.0, 2.0, 3.0, 4.0]
    assert set(gauges(text, "probe_route_score")) == {("storage", n) for n in names}
    doc = routes_json(store, cfg)
    assert sorted(r["route"] for r in doc["routes"]["storage"]) == sorted(names)  # type: ignore[index]


# ---- the loopback version of "blocked direct, working proxy" ------------------------------------------


@asynccontextmanager
async def blocked_direct_working_proxy(pki: Pki, socks: RunningProxy, tmp_path: Path) -> AsyncIterator[Path]:
    """Yield a config where the local route meets a reset after the ClientHello and the proxy route works.

    `localhost` resolves, through the local route's resolver `isp`, to 127.0.0.2, where a server
    resets every connection after the ClientHello (the Great Firewall's SNI reset); the proxy
    resolves it itself, to 127.0.0.1 (or ::1), where an honest HTTPS server answers on the same port.
    A second endpoint of the group, mirror-sh, refuses every connection.
    """
    listening = bind_same_port([*localhost_addresses(), "127.0.0.2"])
    async with DnsServer(answer({"localhost": ["127.0.0.2"]})) as isp, \
            peer_server(tls=pki.server_context("localhost"), sockets=listening[:-1]) as honest, \
            peer_server(reset_after_client_hello, sockets=listening[-1:]) as resetter:
        doc = {
            "vantage": "lab-cn",
            "defaults": {"ca_file": str(pki.ca_file), "interval": "1s", "timeout": "1s"},
            "resolvers": [{"name": "isp", "type": "udp", "address": f"127.0.0.1:{isp.port}"}],
            "routes": [{"name": "local", "resolver": "isp"}, {"name": "hk-socks", "proxy": socks.url}],
            "targets": [
                {"name": "mirror-hk", "url": f"https://localhost:{honest.port}/ping", "group": "sesame-storage",
                 "routes": ["local", "hk-socks"], "resolvers": ["isp"], "expect": {"body_contains": "pong"}},
                {"name": "mirror-sh", "address": f"127.0.0.1:{closed_port()}", "group": "sesame-storage",
                 "routes": ["local"]},
            ],
        }
        path = tmp_path / "targets.yml"
        path.write_text(yaml.safe_dump(doc))
        yield path
    assert resetter.peers and honest.peers  # each route reached its own server


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "probe", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_probe_routes_ranks_a_direct_route_reset_after_client_hello_below_a_working_proxy_route(
    pki: Pki, socks_plain: RunningProxy, tmp_path: Path
) -> None:
    async with blocked_direct_working_proxy(pki, socks_plain, tmp_path) as path:
        code, out, err = await run_cli("routes", "-c", str(path), "--json")
        table_code, table, _ = await run_cli("routes", "-c", str(path))
    assert (code, table_code) == (1, 1), err  # one probe failed
    doc = json.loads(out)
    [proxy, local] = doc["routes"]["mirror-hk"]
    assert (proxy["route"], proxy["rank"], proxy["tier"], proxy["recommended"]) == ("hk-socks", 1, "working", True)
    assert (local["route"], local["rank"], local["tier"], local["last_outcome"]) == ("local", 2, "blocked", "tls_reset")
    best = doc["groups"]["sesame-storage"][0]
    assert (best["target"], best["route"], best["recommended"]) == ("mirror-hk", "hk-socks", True)
    lines = table.splitlines()
    assert lines[1].split()[:4] == ["mirror-hk", "1", "hk-socks", "working"] and lines[1].endswith("<- use")
    assert lines[2].split()[:3] == ["2", "local", "blocked"] and "tls_reset" in lines[2]
    group = lines[next(i for i, line in enumerate(lines) if line.startswith("GROUP")) + 1].split()
    assert group[:5] == ["sesame-storage", "1", "mirror-hk", "hk-socks", "working"] and group[-2:] == ["<-", "use"]


async def test_probe_run_serves_the_ranking_at_api_routes_and_in_metrics(
    pki: Pki, socks_plain: RunningProxy, tmp_path: Path
) -> None:
    port = free_port()
    async with blocked_direct_working_proxy(pki, socks_plain, tmp_path) as path:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "probe", "run", "-c", str(path), "--listen", f"127.0.0.1:{port}",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with aiohttp.ClientSession() as http:
                doc = await _poll_routes(http, f"http://127.0.0.1:{port}/api/routes", runs=2)
                text = await (await http.get(f"http://127.0.0.1:{port}/metrics")).text()
        finally:
            proc.terminate()
            _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    ranked = [(r["route"], r["tier"]) for r in doc["routes"]["mirror-hk"]]
    assert ranked == [("hk-socks", "working"), ("local", "blocked")]
    assert doc["groups"]["sesame-storage"][0]["route"] == "hk-socks"
    assert gauges(text, "probe_route_rank")[("mirror-hk", "hk-socks")] == 1.0
    assert gauges(text, "probe_route_rank")[("mirror-hk", "local")] == 2.0
    score = gauges(text, "probe_route_score")
    assert score[("mirror-hk", "local")] >= 3000 > score[("mirror-hk", "hk-socks")]


async def _poll_routes(http: aiohttp.ClientSession, url: str, runs: int) -> dict[str, Any]:
    """Return /api/routes once every route of mirror-hk has `runs` runs (within 20 s)."""
    doc: dict[str, Any] = {}
    for _ in range(100):
        await asyncio.sleep(0.2)
        try:
            async with http.get(url) as resp:
                doc = await resp.json()
        except aiohttp.ClientConnectionError:
            continue  # not listening yet
        if all(r["runs"] >= runs for r in doc["routes"]["mirror-hk"]):
            return doc
    raise AssertionError(f"mirror-hk did not reach {runs} runs per route: {doc}")
