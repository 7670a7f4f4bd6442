"""Who a DNS verdict affects: route kind x verdict, through the one round (`probe once`, `/probe`).

The verdict of the DNS check acts in exactly one place, a probe's resolve step: routes that
connect to a local resolver's answers (direct, a bound source address, a route's own
resolver) take it; routes that hand the name to their proxy (socks5, http) never do,
whatever the local resolvers answered. The target is a TLS endpoint named `localhost`: the real proxies
(microsocks, tinyproxy) resolve it from the host's /etc/hosts, while the probe's own
resolvers are the test's DNS servers, which answer honestly, forge, or deny it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from probe.config import DIRECT_ROUTE, Config, Route, Target, TargetKind, parse_proxy
from probe.context import ProbeContext
from probe.models import Outcome
from probe.runner import run_round
from tests.dnsserver import Behaviour, DnsServer, answer, nxdomain, racing
from tests.proxies import RunningProxy, microsocks, tinyproxy
from tests.test_integrity import tls_server

NAME = "localhost"
HONEST, FORGED = "127.0.0.1", "127.0.0.66"
ROUTES = ("direct", "bound", "own-resolver", "socks5", "http-proxy")


@dataclass(frozen=True)
class Case:
    verdict: Outcome  # what the DNS check finds for the local resolvers
    local: Behaviour  # how the system resolver and the route's own resolver answer


CASES = {
    "ok": Case(Outcome.OK, answer({NAME: [HONEST]})),
    "injection": Case(Outcome.DNS_INJECTION, racing(answer({NAME: [FORGED]}), answer({NAME: [HONEST]}))),
    "mismatch": Case(Outcome.DNS_MISMATCH, answer({NAME: [FORGED]})),
    "nxdomain": Case(Outcome.DNS_NXDOMAIN, nxdomain()),
}
# The routes that connect to a local resolver's answers take the verdict; the proxy routes do not.
TAKES_THE_VERDICT = {"direct", "bound", "own-resolver"}


@pytest.fixture(scope="module")
def socks() -> Iterator[RunningProxy]:
    with microsocks(bind="127.0.0.5") as proxy:
        yield proxy


@pytest.fixture(scope="module")
def http_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProxy]:
    with tinyproxy(tmp_path_factory.mktemp("tinyproxy"), bind="127.0.0.6") as proxy:
        yield proxy


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as s:
        yield s


@pytest.mark.parametrize("verdict", list(CASES), ids=list(CASES))
async def test_a_verdict_affects_exactly_the_routes_that_use_local_answers(
    verdict: str, tmp_path: Path, ca: trustme.CA, socks: RunningProxy, http_proxy: RunningProxy,
    stack: AsyncExitStack,
) -> None:
    case = CASES[verdict]
    port = await stack.enter_async_context(tls_server(ca, HONEST, NAME))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    system = await stack.enter_async_context(DnsServer(case.local))
    own = await stack.enter_async_context(DnsServer(case.local))
    control = await stack.enter_async_context(DnsServer(answer({NAME: [HONEST]})))
    routes = (
        DIRECT_ROUTE,
        Route("bound", source_address="127.0.0.2"),
        Route("own-resolver", resolver="ali"),
        Route("socks5", proxy=parse_proxy(socks.url)),
        Route("http-proxy", proxy=parse_proxy(http_proxy.url)),
    )
    ca_file = str(tmp_path / "ca.pem")
    target = Target(name="t", kind=TargetKind.TLS, host=NAME, port=port, routes=ROUTES, ca_file=ca_file,
                    resolvers=("system", "ali", "control"), dns_reply_window=0.2, timeout=4.0)
    config = Config(vantage="test", listen="127.0.0.1:0", routes=routes, targets=(target,), bogons=(),
                    resolvers=(own.resolver("ali"), control.resolver("control", control=True)))
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    (tmp_path / "hosts").write_text("")  # `localhost` is the test resolvers' to answer, not a hosts file's
    ctx = ProbeContext(config, resolv_conf=str(tmp_path / "resolv.conf"), hosts_file=str(tmp_path / "hosts"),
                       system_dns_port=system.port, tls_check_timeout=1.0)
    try:
        results = {r.route: r for r in await run_round(config, ctx)}
    finally:
        await ctx.close()

    checks = {d.resolver: d.outcome for d in results["direct"].dns}
    assert checks == {"system": case.verdict, "ali": case.verdict, "control": Outcome.OK}, checks
    outcomes = {route: results[route].outcome for route in ROUTES}
    expected = {route: case.verdict if route in TAKES_THE_VERDICT else Outcome.OK for route in ROUTES}
    assert outcomes == expected, {r: (results[r].outcome, results[r].evidence) for r in ROUTES}
    for route in ROUTES:
        assert [d.resolver for d in results[route].dns] == ["system", "ali", "control"]  # the round's check
    if verdict in ("injection", "mismatch"):
        # Refused at the resolve step, before any connection: the forged address is named, never dialled.
        for route in TAKES_THE_VERDICT:
            r = results[route]
            assert r.address is None and "connect" not in r.phases
            assert f"answered {FORGED} for {NAME}, which the DNS check 0 s ago judged {case.verdict}" in r.evidence[-1]
