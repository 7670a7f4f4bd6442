"""DNS resolution through every resolver type, against real loopback DNS, DoT and DoH servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import dns.message
import pytest
import trustme

from probe.classify import DnsFailure
from probe.config import DIRECT_ROUTE, Config, Resolver, ResolverType, Target, TargetKind
from probe.context import ProbeContext
from probe.dns import judge
from probe.dns import lookup as probe_dns
from probe.models import Deadline, DnsResult, Outcome
from tests.dnsserver import (
    Behaviour,
    DnsServer,
    Transport,
    answer,
    delayed,
    garbage,
    nodata,
    nxdomain,
    refused,
    servfail,
    silent,
    truncated_over_udp,
)

NAME = "hk.storage.example"
V4 = ("198.51.100.20", "198.51.100.21")
V6 = ("2001:db8::20",)
GOOD = answer({NAME: [*V6, *V4]})  # IPv6 listed first on purpose: lookup orders IPv4 first
TRANSPORTS = ("udp", "tcp", "dot", "doh", "system")
GENEROUS = 1.5  # seconds a lookup may overrun its deadline on a loaded test machine


def by_type(a: Behaviour, aaaa: Behaviour) -> Behaviour:
    """Answer A queries as `a` does and AAAA queries as `aaaa` does."""

    async def behave(query: dns.message.Message, transport: Transport) -> Sequence[bytes | float]:
        return await (aaaa if query.question[0].rdtype == dns.rdatatype.AAAA else a)(query, transport)

    return behave


@dataclass(frozen=True)
class Scenario:
    id: str
    behaviour: Behaviour
    outcome: Outcome
    answers: tuple[str, ...] = ()
    says: str = ""  # in the evidence: what happened, after the resolver's name and address
    deadline: float = 3.0


SCENARIOS = [
    Scenario("answers-ipv4-first", GOOD, Outcome.OK, (*V4, *V6)),
    Scenario("follows-cname-chain", answer({"edge.cdn.example": V4}, cnames={NAME: "alias.cdn.example",
             "alias.cdn.example": "edge.cdn.example"}), Outcome.OK, V4),
    Scenario("ipv4-only-name", answer({NAME: V4}), Outcome.OK, V4),
    Scenario("slow-but-in-time", delayed(0.1, GOOD), Outcome.OK, (*V4, *V6)),
    Scenario("truncated-udp-then-tcp", truncated_over_udp(GOOD), Outcome.OK, (*V4, *V6)),
    Scenario("nxdomain", nxdomain(), Outcome.DNS_NXDOMAIN, says=f"NXDOMAIN for {NAME} A and AAAA"),
    Scenario("nodata", nodata(), Outcome.DNS_NXDOMAIN, says=f"no A or AAAA records for {NAME}"),
    Scenario("servfail", servfail(), Outcome.DNS_SERVFAIL, says=f"SERVFAIL for {NAME} A and AAAA"),
    Scenario("refused", refused(), Outcome.DNS_SERVFAIL, says=f"REFUSED for {NAME} A and AAAA"),
    Scenario("garbage-reply", garbage(), Outcome.DNS_SERVFAIL, says="an unparseable reply"),
    Scenario("silent-until-deadline", silent(), Outcome.DNS_TIMEOUT, says="no reply within", deadline=0.5),
    Scenario("answer-after-deadline", delayed(5, GOOD), Outcome.DNS_TIMEOUT, says="no reply within", deadline=0.5),
]


MakeContext = Callable[..., ProbeContext]


@pytest.fixture
async def make_context(tmp_path: Path) -> AsyncIterator[MakeContext]:
    """Yield a factory of ProbeContexts whose system resolver reads files under tmp_path."""
    made: list[ProbeContext] = []

    def make(
        *resolvers: Resolver,
        resolv_conf: str | None = "nameserver 127.0.0.1\n",
        hosts: str = "127.0.0.1 localhost\n",
        system_port: int = 53,
    ) -> ProbeContext:
        conf_path, hosts_path = tmp_path / "resolv.conf", tmp_path / "hosts"
        if resolv_conf is not None:
            conf_path.write_text(resolv_conf)
        hosts_path.write_text(hosts)
        config = Config(vantage="test", listen="127.0.0.1:0", resolvers=resolvers, routes=(DIRECT_ROUTE,), targets=())
        ctx = ProbeContext(
            config, resolv_conf=str(conf_path), hosts_file=str(hosts_path), system_dns_port=system_port
        )
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        await ctx.close()


def resolver_for(server: DnsServer, transport: str, ca_file: str, name: str = "test") -> Resolver:
    if transport == "system":
        return Resolver(name, ResolverType.SYSTEM)
    return server.resolver(name, ResolverType(transport), ca_file=ca_file, server_name="dns.test")


def target(*resolvers: str, host: str = NAME) -> Target:
    return Target(name="t", kind=TargetKind.TCP, host=host, port=443, resolvers=resolvers)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.id)
async def test_lookup_scenario(
    scenario: Scenario, transport: str, ca: trustme.CA, ca_file: str, make_context: MakeContext
) -> None:
    async with DnsServer(scenario.behaviour, tls=ca) as server:
        resolver = resolver_for(server, transport, ca_file)
        ctx = make_context(resolver, system_port=server.port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            found = await probe_dns.lookup(resolver, NAME, Deadline.after(scenario.deadline), ctx)
        except DnsFailure as failure:
            outcome, message = failure.outcome, str(failure)
        else:
            outcome, message = Outcome.OK, ""
            assert found.answers == scenario.answers
            assert found.replies == 2
            assert found.duration_seconds < scenario.deadline
        assert outcome is scenario.outcome, message
        assert loop.time() - started < scenario.deadline + GENEROUS
    if outcome is not Outcome.OK:
        assert message.startswith(f"{resolver.name} ("), message  # names the resolver and its address
        assert scenario.says in message


async def test_truncated_udp_reply_is_asked_again_over_tcp(make_context: MakeContext) -> None:
    async with DnsServer(truncated_over_udp(GOOD)) as server:
        resolver = server.resolver()
        found = await probe_dns.lookup(resolver, NAME, Deadline.after(3), make_context(resolver))
    assert found.answers == (*V4, *V6)
    assert sorted(server.queries) == [
        ("tcp", NAME, "A"), ("tcp", NAME, "AAAA"), ("udp", NAME, "A"), ("udp", NAME, "AAAA"),
    ]


async def test_udp_evidence_names_server_address_and_query_type(make_context: MakeContext) -> None:
    async with DnsServer(by_type(nxdomain(), GOOD)) as server:
        resolver = server.resolver("ali")
        with pytest.raises(DnsFailure) as caught:
            await probe_dns.lookup(resolver, "gone.example", Deadline.after(3), make_context(resolver))
    assert str(caught.value) == f"ali (127.0.0.1:{server.port}/udp): NXDOMAIN for gone.example A and AAAA"


async def test_resolver_dropping_aaaa_still_answers_before_the_deadline(make_context: MakeContext) -> None:
    async with DnsServer(by_type(GOOD, silent())) as server:
        resolver = server.resolver()
        found = await probe_dns.lookup(resolver, NAME, Deadline.after(10), make_context(resolver))
    assert found.answers == V4
    assert found.duration_seconds < probe_dns.OTHER_TYPE_GRACE + GENEROUS
    assert found.evidence == (
        f"test (127.0.0.1:{server.port}/udp): no reply within 1.0 s of the A answer for {NAME} AAAA",
    )


async def test_one_type_failing_with_the_other_empty_reports_the_failure(make_context: MakeContext) -> None:
    async with DnsServer(by_type(nodata(), servfail())) as server:
        resolver = server.resolver()
        with pytest.raises(DnsFailure) as caught:
            await probe_dns.lookup(resolver, NAME, Deadline.after(3), make_context(resolver))
    assert caught.value.outcome is Outcome.DNS_SERVFAIL
    assert f"no records for {NAME} A; SERVFAIL for {NAME} AAAA" in str(caught.value)


async def test_answers_are_capped(make_context: MakeContext) -> None:
    many = [f"198.51.100.{i}" for i in range(1, 101)]
    async with DnsServer(answer({NAME: many})) as server:
        resolver = server.resolver()
        found = await probe_dns.lookup(resolver, NAME, Deadline.after(3), make_context(resolver))
    assert ("tcp", NAME, "A") in server.queries  # too big for UDP: truncated, then asked over TCP
    assert len(found.answers) == probe_dns.MAX_ANSWERS
    assert set(found.answers) <= set(many)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_source_address_is_bound(
    transport: str, ca: trustme.CA, ca_file: str, make_context: MakeContext
) -> None:
    async with DnsServer(GOOD, tls=ca) as server:
        resolver = resolver_for(server, transport, ca_file)
        ctx = make_context(resolver, hosts="", system_port=server.port)
        found = await probe_dns.lookup(resolver, NAME, Deadline.after(3), ctx, source_address="127.0.0.2")
    assert found.answers == (*V4, *V6)
    assert server.clients and {source for _, source in server.clients} == {"127.0.0.2"}  # a loopback alias


@pytest.mark.parametrize("transport", ["udp", "tcp", "dot", "doh", "system"])
async def test_unusable_source_address_is_a_local_error(
    transport: str, ca: trustme.CA, ca_file: str, make_context: MakeContext
) -> None:
    async with DnsServer(GOOD, tls=ca) as server:
        resolver = resolver_for(server, transport, ca_file)
        ctx = make_context(resolver, system_port=server.port)
        with pytest.raises(DnsFailure) as caught:
            await probe_dns.lookup(resolver, NAME, Deadline.after(3), ctx, source_address="192.0.2.1")
    assert caught.value.outcome is Outcome.ERROR
    assert "local socket error" in str(caught.value)


# ---- DoT and DoH -----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["dot", "doh"])
async def test_untrusted_resolver_certificate_is_servfail(
    transport: str, ca: trustme.CA, make_context: MakeContext, tmp_path: Path
) -> None:
    stranger = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    async with DnsServer(GOOD, tls=ca) as server:
        resolver = resolver_for(server, transport, str(stranger))
        with pytest.raises(DnsFailure) as caught:
            await probe_dns.lookup(resolver, NAME, Deadline.after(3), make_context(resolver))
    assert caught.value.outcome is Outcome.DNS_SERVFAIL
    assert "TLS certificate rejected" in str(caught.value)


async def test_dot_certificate_for_another_name_is_servfail(
    ca: trustme.CA, ca_file: str, make_context: MakeContext
) -> None:
    async with DnsServer(GOOD, tls=ca) as server:
        resolver = server.resolver(type=ResolverType.DOT, ca_file=ca_file, server_name="dns.quad9.net")
        with pytest.raises(DnsFailure) as caught:
            await probe_dns.lookup(resolver, NAME, Deadline.after(3), make_context(resolver))
    assert caught.value.outcome is Outcome.DNS_SERVFAIL
    assert "TLS certificate rejected" in str(caught.value)


async def test_dot_without_server_name_checks_the_ip(
    ca: trustme.CA, ca_file: str, make_context: MakeContext
) -> None:
    async with DnsServer(GOOD, tls=ca) as server:
        resolver = server.resolver(type=ResolverType.DOT, ca_file=ca_file)
        found = await probe_dns.lookup(resolver, NAME, Deadline.after(3), make_context(resolver))
    assert found.answers == (*V4, *V6)


async def test_doh_http_error_status_is_servfail(ca: trustme.CA, ca_file: str, make_context: MakeContext) -> None:
    async with DnsServer(GOOD, tls=ca, doh_status=503) as server:
        resolver = server.resolver("cf-doh", ResolverType.DOH, ca_file=ca_file)
        with pytest.raises(DnsFailure) as caught:
            await probe_dns.lookup(resolver, NAME, Deadline.after(3), make_context(resolver))
    assert caught.value.outcome is Outcome.DNS_SERVFAIL
    assert str(caught.value).startswith(f"cf-doh ({server.doh_url}): HTTP 503")


async def test_refused_connection_to_tcp_resolver_is_servfail(make_context: MakeContext) -> None:
    async with DnsServer(GOOD) as server:
        resolver = server.resolver(type=ResolverType.TCP)
    with pytest.raises(DnsFailure) as caught:  # the server is gone: nothing listens on the port
        await probe_dns.lookup(resolver, NAME, Deadline.after(3), make_context(resolver))
    assert caught.value.outcome is Outcome.DNS_SERVFAIL
    assert "connection refused" in str(caught.value)


# ---- the system resolver ---------------------------------------------------------------------


async def test_system_resolver_answers_from_hosts_file_without_asking_dns(make_context: MakeContext) -> None:
    hosts = f"# comment\n127.0.0.1 localhost\n2001:db8::7 {NAME}\n198.51.100.7 other {NAME.upper()}. # x\n"
    async with DnsServer(GOOD) as server:
        resolver = Resolver("system", ResolverType.SYSTEM)
        ctx = make_context(resolver, hosts=hosts, system_port=server.port)
        found = await probe_dns.lookup(resolver, NAME, Deadline.after(3), ctx)
    assert found.answers == ("198.51.100.7", "2001:db8::7")
    assert found.replies == 0
    assert server.queries == []


async def test_system_resolver_rereads_changed_hosts_file(make_context: MakeContext, tmp_path: Path) -> None:
    async with DnsServer(GOOD) as server:
        resolver = Resolver("system", ResolverType.SYSTEM)
        ctx = make_context(resolver, hosts=f"198.51.100.7 {NAME}\n", system_port=server.port)
        first = await probe_dns.lookup(resolver, NAME, Deadline.after(3), ctx)
        Path(ctx.hosts_file).write_text("127.0.0.1 localhost localhost.localdomain\n")
        second = await probe_dns.lookup(resolver, NAME, Deadline.after(3), ctx)
    assert first.answers == ("198.51.100.7",)
    assert second.answers == (*V4, *V6)


async def test_system_resolver_applies_search_list_to_short_names(make_context: MakeContext) -> None:
    async with DnsServer(answer({"gw.corp.test": ["198.51.100.9"]})) as server:
        resolver = Resolver("system", ResolverType.SYSTEM)
        conf = "search corp.test\nnameserver 127.0.0.1\noptions ndots:1\n"
        ctx = make_context(resolver, resolv_conf=conf, system_port=server.port)
        found = await probe_dns.lookup(resolver, "gw", Deadline.after(3), ctx)
    assert found.answers == ("198.51.100.9",)


async def test_system_resolver_moves_on_from_a_silent_nameserver(make_context: MakeContext) -> None:
    async with DnsServer(silent()) as mute, DnsServer(GOOD, host="127.0.0.2", port=mute.port):
        resolver = Resolver("system", ResolverType.SYSTEM)
        conf = "nameserver 127.0.0.1\nnameserver 127.0.0.2\noptions timeout:1\n"
        ctx = make_context(resolver, resolv_conf=conf, system_port=mute.port)
        found = await probe_dns.lookup(resolver, NAME, Deadline.after(5), ctx)
    assert found.answers == (*V4, *V6)
    assert found.evidence == (f"system (127.0.0.1:{mute.port}/udp): no reply within 1.0 s for {NAME} A and AAAA",)


async def test_system_resolver_without_resolv_conf_is_a_local_error(make_context: MakeContext) -> None:
    resolver = Resolver("system", ResolverType.SYSTEM)
    ctx = make_context(resolver, resolv_conf=None)
    with pytest.raises(DnsFailure) as caught:
        await probe_dns.lookup(resolver, NAME, Deadline.after(3), ctx)
    assert caught.value.outcome is Outcome.ERROR
    assert ctx.resolv_conf in str(caught.value)


# ---- check_target: every resolver, and consistency with the controls -------------------------


async def check(servers: Sequence[tuple[DnsServer, str, bool]], make_context: MakeContext) -> dict[str, DnsResult]:
    resolvers = [s.resolver(name, control=control) for s, name, control in servers]
    ctx = make_context(*resolvers)
    results = await judge.check_target(target(*(r.name for r in resolvers)), Deadline.after(3), ctx)
    assert [r.resolver for r in results] == [r.name for r in resolvers]
    return {r.resolver: r for r in results}


async def test_consistency_is_unknown_without_an_answering_control(make_context: MakeContext) -> None:
    async with DnsServer(GOOD) as honest, DnsServer(servfail()) as broken:
        no_control = await check([(honest, "ali", False)], make_context)
        failed_control = await check([(honest, "ali", False), (broken, "cf-doh", True)], make_context)
    assert no_control["ali"].consistent is None
    assert failed_control["ali"].consistent is None
    assert failed_control["cf-doh"].consistent is None
    assert failed_control["cf-doh"].outcome is Outcome.DNS_SERVFAIL


async def test_check_target_reports_each_resolver_with_evidence(make_context: MakeContext) -> None:
    async with DnsServer(GOOD) as honest, DnsServer(nxdomain()) as liar, DnsServer(silent()) as mute:
        resolvers = [honest.resolver("a"), liar.resolver("b"), mute.resolver("c")]
        ctx = make_context(*resolvers)
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await judge.check_target(target("c", "b", "a"), Deadline.after(1), ctx)
        elapsed = loop.time() - started
    assert [r.resolver for r in results] == ["a", "b", "c"]  # config order
    assert [r.outcome for r in results] == [Outcome.OK, Outcome.DNS_NXDOMAIN, Outcome.DNS_TIMEOUT]
    a, b, c = results
    assert (a.answers, a.replies, a.evidence, a.error) == ((*V4, *V6), 2, (), None)
    assert b.replies == 2 and b.evidence == (f"b (127.0.0.1:{liar.port}/udp): NXDOMAIN for {NAME} A and AAAA",)
    assert c.replies == 0 and c.error is not None and "no reply within" in c.evidence[0]
    assert all(r.duration_seconds is not None and r.duration_seconds <= 1 + GENEROUS for r in results)
    assert elapsed < 1 + GENEROUS  # the resolvers ran concurrently


async def test_check_target_skips_ip_literal_targets(make_context: MakeContext) -> None:
    ctx = make_context(Resolver("system", ResolverType.SYSTEM))
    assert await judge.check_target(target("system", host="198.51.100.20"), Deadline.after(1), ctx) == ()
