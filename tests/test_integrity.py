"""DNS integrity: each method against the project's DNS server on loopback, and what must not fire.

Every address a test makes a resolver answer and the TLS check connects to is on 127.0.0.0/8
(with `bogons: []`, so loopback is not a bogon there); tests of bogons and the documented forged
set never reach the TLS check, which is skipped once an answer is known forged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import dns.message
import dns.rdatatype
import dns.rrset
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from probe import loop
from probe.config import DIRECT_ROUTE, Config, Resolver, ResolverType, Route, Target, TargetKind
from probe.context import ProbeContext
from probe.dns import checks as dns_checks
from probe.dns import judge as integrity
from probe.exporter import metrics
from probe.models import Deadline, DnsResult, Outcome
from probe.runner import run_probe, run_round
from probe.scheduler import Scheduler
from probe.store import ResultStore
from tests.dnsserver import (
    Behaviour,
    DnsServer,
    SignedZones,
    Transport,
    answer,
    delayed,
    nxdomain,
    only_for,
    racing,
    rewriting_nxdomain,
    servfail,
    silent,
    truncated_over_udp,
)
from tests.servers import closed_port
from tests.test_cli import run_cli, write_config

NAME = "hk.storage.example"
REAL = ("198.51.100.20", "198.51.100.21")  # the controls' answer; nothing ever connects to it
FORGED = "203.0.113.66"
GENEROUS = 1.5


@pytest.fixture(autouse=True)
def _tls_checks_stay_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail a test whose TLS check would leave the machine (the real check runs otherwise)."""
    real = dns_checks.tls_check

    async def guarded(address: str, *args: Any) -> dns_checks.TlsCheck:
        assert ipaddress.ip_address(address).is_loopback, f"a TLS check to {address} would leave the machine"
        return await real(address, *args)

    monkeypatch.setattr(dns_checks, "tls_check", guarded)


Make = Callable[..., ProbeContext]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Make]:
    """Yield a factory of contexts: resolvers, canaries, bogons, routes, targets, trust anchors."""
    made: list[ProbeContext] = []

    def build(
        *resolvers: Resolver,
        canaries: Sequence[str] = (),
        bogons: Sequence[str] | None = None,
        canary_port: int = 53,
        routes: Sequence[Route] = (),
        targets: Sequence[Target] = (),
        trust_anchors: tuple[dns.rrset.RRset, ...] = (),
        resolv_conf: str = "nameserver 127.0.0.1\n",
        system_port: int | None = None,
    ) -> ProbeContext:
        (tmp_path / "resolv.conf").write_text(resolv_conf)
        (tmp_path / "hosts").write_text("127.0.0.1 localhost\n")
        config = Config(
            vantage="test", listen="127.0.0.1:0", resolvers=resolvers, routes=(DIRECT_ROUTE, *routes),
            targets=tuple(targets), canaries=tuple(canaries), bogons=None if bogons is None else tuple(bogons),
        )
        ctx = ProbeContext(
            config, resolv_conf=str(tmp_path / "resolv.conf"), hosts_file=str(tmp_path / "hosts"),
            canary_port=canary_port, canary_wait=0.5, tls_check_timeout=1.0, trust_anchors=trust_anchors,
            system_dns_port=system_port or closed_port(),  # by default the system resolver asks no real server
        )
        made.append(ctx)
        return ctx

    yield build
    for ctx in made:
        await ctx.close()


def target(*resolvers: str, port: int = 443, window: float = 0.2, dnssec: bool = False, host: str = NAME,
           ca_file: str | None = None, routes: tuple[str, ...] = ("direct",)) -> Target:
    return Target(name="t", kind=TargetKind.TLS, host=host, port=port, resolvers=resolvers, routes=routes,
                  dns_reply_window=window, dnssec=dnssec, ca_file=ca_file, timeout=4.0)


async def check(ctx: ProbeContext, t: Target, within: float = 4.0) -> dict[str, DnsResult]:
    results = await integrity.check_target(t, Deadline.after(within), ctx)
    return {r.resolver: r for r in results}


@asynccontextmanager
async def tls_server(ca: trustme.CA, host: str, *names: str) -> AsyncIterator[int]:
    """Accept TLS on host with a certificate for `names`; yield the port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(context)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    server = await asyncio.start_server(handle, host, 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def doh_control(server: DnsServer, ca_file: str) -> Resolver:
    return server.resolver("cf-doh", ResolverType.DOH, control=True, ca_file=ca_file)


def udp(server: DnsServer, name: str) -> str:
    return f"{name} ({server.host}:{server.port}/udp)"


CONTROL: Behaviour = answer({NAME: REAL})


# ---- 1. reply counting -----------------------------------------------------------------------


async def test_two_differing_replies_to_one_query_are_injection(make: Make) -> None:
    async with (
        DnsServer(racing(answer({NAME: [FORGED]}, ttl=60), answer({NAME: REAL}, ttl=300))) as raced,
    ):
        ali = raced.resolver("ali")
        results = await check(make(ali), target("ali"))
    r = results["ali"]
    assert r.outcome is Outcome.DNS_INJECTION
    assert r.answers == (FORGED,)  # the first reply: what a stub resolver would have used
    assert r.replies == 4  # A: forged + genuine; AAAA: two NODATA replies, which agree
    assert r.consistent is False
    [line] = [e for e in r.evidence if "differing replies" in e]
    assert line.startswith(f"{udp(raced, 'ali')}: 2 differing replies to one A query for {NAME} within 200 ms")
    assert f"[{FORGED}] (TTL 60) from 127.0.0.1 after " in line
    assert f"[{', '.join(REAL)}] (TTL 300) from 127.0.0.1 after " in line
    assert line.index(FORGED) < line.index(REAL[0])  # in arrival order


async def test_an_aaaa_reply_carrying_an_a_record_is_injection_even_alone(make: Make) -> None:
    zone = answer({NAME: REAL})

    async def aaaa_as_a(query: dns.message.Message, transport: Transport) -> Sequence[bytes | float]:
        if query.question[0].rdtype != dns.rdatatype.AAAA:
            return await zone(query, transport)
        reply = dns.message.make_response(query)  # the only reply: the genuine one was dropped
        reply.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", FORGED))
        return [reply.to_wire()]

    async with DnsServer(aaaa_as_a) as poisoned:
        results = await check(make(poisoned.resolver("ali")), target("ali"))
    r = results["ali"]
    assert (r.outcome, r.consistent, r.replies) == (Outcome.DNS_INJECTION, False, 2)
    assert r.evidence[0].startswith(f"{udp(poisoned, 'ali')}: the AAAA reply for {NAME} carries A records "
                                    f"{FORGED} (from 127.0.0.1 after ")
    assert r.evidence[0].endswith(" ms): no DNS server answers that way, a known injector's mistake")


async def test_reply_window_is_bounded_by_its_setting(make: Make) -> None:
    async with DnsServer(racing(answer({NAME: [FORGED]}), answer({NAME: REAL}), gap=0.5)) as raced:
        ali = raced.resolver("ali")
        results = await check(make(ali), target("ali", window=0.1))
    r = results["ali"]
    assert r.outcome is Outcome.OK  # the genuine reply came after the window closed: not seen
    assert r.replies == 2
    assert r.duration_seconds is not None and r.duration_seconds < 0.3  # the window is not in the lookup time


@pytest.mark.parametrize(
    ("behaviour", "replies"),
    [
        pytest.param(delayed(0.4, CONTROL), 2, id="slow-but-honest"),
        pytest.param(answer({NAME: list(reversed(REAL))}), 2, id="answers-in-another-order"),
        pytest.param(racing(answer({NAME: REAL}), answer({NAME: list(reversed(REAL))})), 4, id="same-set-twice"),
        pytest.param(truncated_over_udp(CONTROL), 2, id="truncated-udp-then-tcp"),
        pytest.param(answer({NAME: [REAL[1], "192.0.2.1"]}), 2, id="shares-one-address"),
    ],
)
async def test_honest_resolvers_are_ok_and_consistent(behaviour: Behaviour, replies: int, make: Make,
                                                      ca: trustme.CA, ca_file: str) -> None:
    async with (
        DnsServer(behaviour) as isp,
        DnsServer(CONTROL, tls=ca) as control,
        DnsServer(silent(), host="127.0.0.53") as canary,  # every method is on: a canary too
    ):
        ctx = make(isp.resolver("isp"), doh_control(control, ca_file), canaries=["127.0.0.53"],
                   canary_port=canary.port)
        results = await check(ctx, target("isp", "cf-doh"))
    r = results["isp"]
    assert (r.outcome, r.consistent, r.evidence) == (Outcome.OK, True, ())
    assert set(r.answers) & set(REAL)
    assert r.replies == replies  # one per type (a truncated reply and its TCP retry: one); every duplicate counted
    assert results["cf-doh"].outcome is Outcome.OK and results["cf-doh"].consistent is True


async def test_truncated_reply_retried_over_tcp_counts_once_per_type(make: Make) -> None:
    async with DnsServer(truncated_over_udp(CONTROL)) as isp:
        results = await check(make(isp.resolver("isp")), target("isp"))
    assert (results["isp"].outcome, results["isp"].replies) == (Outcome.OK, 2)
    assert ("tcp", NAME, "A") in isp.queries


async def test_system_resolver_moving_on_to_its_next_nameserver_is_not_injection(make: Make) -> None:
    async with DnsServer(servfail()) as broken, DnsServer(CONTROL, host="127.0.0.2", port=broken.port):
        ctx = make(Resolver("system", ResolverType.SYSTEM), resolv_conf="nameserver 127.0.0.1\nnameserver 127.0.0.2\n",
                   system_port=broken.port)
        results = await check(ctx, target("system"))
    r = results["system"]
    assert (r.outcome, r.replies, set(r.answers)) == (Outcome.OK, 4, set(REAL))
    assert r.evidence == (f"system (127.0.0.1:{broken.port}/udp): SERVFAIL for {NAME} A and AAAA",)


# ---- 2. canaries -----------------------------------------------------------------------------


async def test_a_canary_that_answers_is_injection_for_plain_resolvers(make: Make, ca: trustme.CA,
                                                                      ca_file: str) -> None:
    async with (
        DnsServer(only_for([NAME], answer({NAME: [FORGED]}, ttl=77)), host="127.0.0.53") as canary,
        DnsServer(answer({NAME: ["203.0.113.67"]})) as isp,
        DnsServer(CONTROL, tls=ca) as control,
    ):
        ctx = make(isp.resolver("isp"), doh_control(control, ca_file),
                   canaries=["127.0.0.53"], canary_port=canary.port)
        results = await check(ctx, target("isp", "cf-doh"))
    r = results["isp"]
    assert r.outcome is Outcome.DNS_INJECTION and r.consistent is False
    assert any(e.startswith(f"canary 127.0.0.53:{canary.port} runs no DNS server, yet the A query for {NAME} "
                            f"sent there was answered: [{FORGED}] (TTL 77) from 127.0.0.53 after ")
               and e.endswith("injected on the path; the answers of isp (203.0.113.67) are not the control's")
               for e in r.evidence), r.evidence
    assert results["cf-doh"].outcome is Outcome.OK  # encrypted: not what a canary speaks for
    assert ("udp", "example.com", "A") in canary.queries  # the control name was asked too


async def test_a_canary_answer_is_noted_beside_a_resolver_failure(make: Make) -> None:
    async with (
        DnsServer(only_for([NAME], answer({NAME: [FORGED]})), host="127.0.0.53") as canary,
        DnsServer(silent()) as isp,
    ):
        ctx = make(isp.resolver("isp"), canaries=["127.0.0.53"], canary_port=canary.port)
        results = await check(ctx, target("isp"), within=1.5)
    r = results["isp"]
    assert r.outcome is Outcome.DNS_TIMEOUT  # the failure class stands; the canary line says why it may be
    assert r.evidence[0].startswith(f"{udp(isp, 'isp')}: no reply within")
    assert r.evidence[1].startswith(f"canary 127.0.0.53:{canary.port} runs no DNS server, yet the A query for {NAME}")


async def test_a_canary_answering_the_control_name_is_misconfigured_not_injection(make: Make) -> None:
    async with (
        DnsServer(answer({NAME: [FORGED], "example.com": ["127.0.0.9"]}), host="127.0.0.53") as canary,
        DnsServer(CONTROL) as isp,
    ):
        ctx = make(isp.resolver("isp"), canaries=["127.0.0.53"], canary_port=canary.port)
        results = await check(ctx, target("isp"))
    r = results["isp"]
    assert r.outcome is Outcome.OK
    assert r.evidence == (
        f"canary 127.0.0.53:{canary.port} answered the control name example.com too ([127.0.0.9] (TTL 60) from "
        f"127.0.0.53 after {_ms(r.evidence[0])} ms): it is misconfigured (something there answers DNS), so its "
        f"replies are not counted as injection",
    )


async def test_a_silent_canary_accuses_nobody(make: Make) -> None:
    async with DnsServer(silent(), host="127.0.0.53") as canary, DnsServer(CONTROL) as isp:
        ctx = make(isp.resolver("isp"), canaries=["127.0.0.53"], canary_port=canary.port)
        results = await check(ctx, target("isp"))
    assert (results["isp"].outcome, results["isp"].evidence) == (Outcome.OK, ())
    assert ("udp", NAME, "A") in canary.queries


async def test_a_canary_that_cannot_be_asked_is_noted(make: Make) -> None:
    async with DnsServer(CONTROL) as isp:
        # A UDP socket may not be connected to the broadcast address without SO_BROADCAST: nothing is sent.
        ctx = make(isp.resolver("isp"), canaries=["255.255.255.255"])
        results = await check(ctx, target("isp"))
    r = results["isp"]
    assert r.outcome is Outcome.OK
    assert r.evidence == (
        "canary 255.255.255.255:53 could not be asked (PermissionError: [Errno 13] Permission denied)",
    )


def _ms(line: str) -> str:
    return line.split(" after ")[1].split(" ms")[0]


# ---- 3. known-forged answers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("forged", "why"),
    [
        ("127.0.0.1", "a bogon (loopback 127.0.0.0/8)"),
        ("2001::5efe:1", "in the documented GFW forged set (Teredo 2001::/32)"),
        ("8.7.198.45", "in the documented GFW forged set"),
    ],
)
async def test_known_forged_answer_where_the_control_differs_is_injection(
    forged: str, why: str, make: Make, ca: trustme.CA, ca_file: str
) -> None:
    async with DnsServer(answer({NAME: [forged, *REAL[:1]] if ":" in forged else [forged]})) as isp, \
            DnsServer(CONTROL, tls=ca) as control:
        ctx = make(isp.resolver("isp"), doh_control(control, ca_file))
        results = await check(ctx, target("isp", "cf-doh"))
    r = results["isp"]
    assert r.outcome is Outcome.DNS_INJECTION and r.consistent is False
    assert f"{udp(isp, 'isp')}: answer {forged} for {NAME} is {why}, while the control answered " \
           f"{', '.join(REAL)} (cf-doh)" in r.evidence


async def test_known_forged_answer_the_control_gives_too_is_not_held_against_it(
    make: Make, ca: trustme.CA, ca_file: str
) -> None:
    internal = answer({NAME: ["10.1.2.3"]})  # a private name: the control says the same
    async with DnsServer(internal) as isp, DnsServer(internal, tls=ca) as control:
        ctx = make(isp.resolver("isp"), doh_control(control, ca_file))
        results = await check(ctx, target("isp", "cf-doh"))
    assert (results["isp"].outcome, results["isp"].consistent, results["isp"].evidence) == (Outcome.OK, True, ())


async def test_known_forged_answer_without_a_control_is_only_noted(make: Make) -> None:
    async with DnsServer(answer({NAME: ["127.0.0.1"]})) as isp:
        results = await check(make(isp.resolver("isp")), target("isp"))
    r = results["isp"]
    assert (r.outcome, r.consistent) == (Outcome.OK, None)
    assert r.evidence == (f"{udp(isp, 'isp')}: answer 127.0.0.1 for {NAME} is a bogon (loopback 127.0.0.0/8); "
                          f"no control answer to compare it with",)


# ---- 4. control comparison with a TLS check ----------------------------------------------------


async def test_cdn_answer_with_a_valid_certificate_is_ok_and_consistent(
    make: Make, ca: trustme.CA, ca_file: str
) -> None:
    async with (
        tls_server(ca, "127.0.0.2", NAME) as port,
        DnsServer(answer({NAME: ["127.0.0.2"]})) as geo,
        DnsServer(CONTROL, tls=ca) as control,
        DnsServer(silent(), host="127.0.0.53") as canary,
    ):
        ctx = make(geo.resolver("geo"), doh_control(control, ca_file), bogons=[], canaries=["127.0.0.53"],
                   canary_port=canary.port)
        results = await check(ctx, target("geo", "cf-doh", port=port, ca_file=ca_file))
    r = results["geo"]
    assert (r.outcome, r.consistent) == (Outcome.OK, True)
    assert r.evidence == (
        f"{udp(geo, 'geo')}: answers 127.0.0.2 for {NAME} share nothing with the control answers "
        f"{', '.join(REAL)} (cf-doh)",
        f"{udp(geo, 'geo')}: TLS check of 127.0.0.2:{port} with SNI {NAME}: certificate valid for {NAME}: "
        f"a CDN or GeoDNS answer, not a forged one",
    )


@pytest.mark.parametrize("server", ["wrong-name", "nothing-listening"])
async def test_divergent_answer_failing_the_tls_check_is_mismatch(
    server: str, make: Make, ca: trustme.CA, ca_file: str
) -> None:
    async with (
        tls_server(ca, "127.0.0.4", "blockpage.example") as port,
        DnsServer(answer({NAME: ["127.0.0.4" if server == "wrong-name" else "127.0.0.5"]})) as isp,
        DnsServer(CONTROL, tls=ca) as control,
    ):
        ctx = make(isp.resolver("isp"), doh_control(control, ca_file), bogons=[])
        results = await check(ctx, target("isp", "cf-doh", port=port, ca_file=ca_file))
    r = results["isp"]
    assert (r.outcome, r.consistent) == (Outcome.DNS_MISMATCH, False)
    address = "127.0.0.4" if server == "wrong-name" else "127.0.0.5"
    assert r.evidence[0] == (f"{udp(isp, 'isp')}: answers {address} for {NAME} share nothing with the control "
                             f"answers {', '.join(REAL)} (cf-doh)")
    expected = {
        "wrong-name": f"{udp(isp, 'isp')}: TLS check of 127.0.0.4:{port} with SNI {NAME}: certificate rejected "
                      f"(Hostname mismatch, certificate is not valid for '{NAME}'.)",
        "nothing-listening": f"{udp(isp, 'isp')}: TLS check of 127.0.0.5:{port} with SNI {NAME}: unreachable "
                             f"(Connection refused)",
    }
    assert r.evidence[1] == expected[server]


async def test_target_without_tls_unreachable_on_443_is_inconclusive_not_mismatch(
    make: Make, ca: trustme.CA, ca_file: str
) -> None:
    async with DnsServer(answer({NAME: ["127.0.0.5"]})) as isp, DnsServer(CONTROL, tls=ca) as control:
        ctx = make(isp.resolver("isp"), doh_control(control, ca_file), bogons=[])
        plain = Target(name="t", kind=TargetKind.TCP, host=NAME, port=22, resolvers=("isp", "cf-doh"))
        results = await check(ctx, plain)
    r = results["isp"]
    assert (r.outcome, r.consistent) == (Outcome.OK, None)
    assert r.evidence[-1] == (f"{udp(isp, 'isp')}: TLS check of 127.0.0.5:443 with SNI {NAME}: unreachable "
                              f"(Connection refused): inconclusive for a target without TLS")


async def test_hosts_file_pin_is_local_config_not_forgery(make: Make, ca: trustme.CA, ca_file: str,
                                                          tmp_path: Path) -> None:
    async with DnsServer(CONTROL, tls=ca) as control:
        ctx = make(Resolver("system", ResolverType.SYSTEM), doh_control(control, ca_file))
        Path(ctx.hosts_file).write_text(f"127.0.0.1 localhost\n127.0.0.1 {NAME}\n")
        results = await check(ctx, target("system", "cf-doh"))
    r = results["system"]
    assert (r.outcome, r.consistent, r.replies) == (Outcome.OK, False, 0)
    assert r.evidence == (f"system: {NAME} is listed in {ctx.hosts_file}",)


async def test_consistency_is_unknown_without_an_answering_control(make: Make, ca: trustme.CA,
                                                                   ca_file: str) -> None:
    async with DnsServer(answer({NAME: ["127.0.0.2"]})) as isp, DnsServer(servfail(), tls=ca) as control:
        ctx = make(isp.resolver("isp"), doh_control(control, ca_file))
        results = await check(ctx, target("isp", "cf-doh"))
    assert (results["isp"].outcome, results["isp"].consistent) == (Outcome.OK, None)
    assert (results["cf-doh"].outcome, results["cf-doh"].consistent) == (Outcome.DNS_SERVFAIL, None)


# ---- 5. failure classes against the control --------------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "outcome", "says"),
    [
        (nxdomain(), Outcome.DNS_NXDOMAIN, f"NXDOMAIN for {NAME} A and AAAA"),
        (servfail(), Outcome.DNS_SERVFAIL, f"SERVFAIL for {NAME} A and AAAA"),
        (silent(), Outcome.DNS_TIMEOUT, "no reply within"),
    ],
    ids=["nxdomain", "servfail", "timeout"],
)
async def test_failure_while_the_control_resolves_says_so(
    behaviour: Behaviour, outcome: Outcome, says: str, make: Make, ca: trustme.CA, ca_file: str
) -> None:
    async with DnsServer(behaviour) as isp, DnsServer(CONTROL, tls=ca) as control:
        ctx = make(isp.resolver("isp"), doh_control(control, ca_file))
        results = await check(ctx, target("isp", "cf-doh"), within=2.0)
    r = results["isp"]
    assert (r.outcome, r.consistent) == (outcome, False)
    assert r.evidence[0].startswith(f"{udp(isp, 'isp')}: ") and says in r.evidence[0]
    assert r.evidence[1] == f"{udp(isp, 'isp')}: {outcome} for {NAME}, while the control answered " \
                            f"{', '.join(REAL)} (cf-doh)"


async def test_nxdomain_everywhere_is_consistent(make: Make, ca: trustme.CA, ca_file: str) -> None:
    async with DnsServer(nxdomain()) as isp, DnsServer(nxdomain(), tls=ca) as control:
        ctx = make(isp.resolver("isp"), doh_control(control, ca_file))
        results = await check(ctx, target("isp", "cf-doh"))
    r = results["isp"]
    assert (r.outcome, r.consistent) == (Outcome.DNS_NXDOMAIN, True)
    assert r.evidence[-1] == f"the controls fail the same way: cf-doh ({control.doh_url}): NXDOMAIN for {NAME} " \
                             f"A and AAAA"


async def test_nxdomain_rewriting_resolver_is_flagged_without_blaming_the_target(
    make: Make, ca: trustme.CA, ca_file: str
) -> None:
    gone = "gone.storage.example"  # the control says it does not exist
    zone = answer({NAME: REAL})
    async with DnsServer(rewriting_nxdomain(zone, "127.0.0.9")) as isp, DnsServer(zone, tls=ca) as control:
        ctx = make(isp.resolver("isp"), doh_control(control, ca_file), bogons=[])
        missing = await check(ctx, target("isp", "cf-doh", host=gone))
        present = await check(ctx, target("isp", "cf-doh"))
    flag = next(e for e in missing["isp"].evidence if "rewrites NXDOMAIN: the random name probe-nx-" in e)
    assert flag.startswith(f"{udp(isp, 'isp')}: rewrites NXDOMAIN: the random name probe-nx-")
    assert flag.endswith(".example.com answered 127.0.0.9; its answers for names that do not exist are its own, "
                         "not the target's")
    r = missing["isp"]
    assert (r.outcome, r.consistent, r.answers) == (Outcome.DNS_NXDOMAIN, False, ("127.0.0.9",))
    assert f"{udp(isp, 'isp')}: answered 127.0.0.9 for {gone}, which does not exist (the control cf-doh says " \
           f"NXDOMAIN): this resolver rewrites NXDOMAIN" in r.evidence
    # A name that exists is judged as usual; the resolver still carries its flag.
    assert (present["isp"].outcome, present["isp"].consistent) == (Outcome.OK, True)
    assert present["isp"].evidence == (flag,)
    assert sorted(q[2] for q in isp.queries if q[1].startswith("probe-nx-")) == ["A", "AAAA"]  # once, then kept


# ---- 6. DNSSEC ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zones() -> SignedZones:
    return SignedZones({"example": {}, "storage.example": {NAME: ["127.0.0.20", "2001:db8::20"]}})


@pytest.mark.parametrize(
    ("served", "outcome", "says"),
    [
        ({}, Outcome.OK, "validates: signed by storage.example. (key "),
        ({"forged": {NAME: ["127.0.0.66"]}, "signatures": "kept"}, Outcome.DNS_INJECTION, "does not validate: bad "
         f"signature on {NAME}. A by storage.example. (key "),
        ({"forged": {NAME: ["127.0.0.66"]}, "signatures": "none"}, Outcome.DNS_INJECTION,
         f"is unsigned ({NAME}. A carries no RRSIG), in a zone that is signed"),
        ({"signatures": "none"}, Outcome.OK, "is unsigned (hk.storage.example. A carries no RRSIG): the resolver "
         "strips DNSSEC records, but its answers are the control's validated ones"),
    ],
    ids=["signed", "forged-with-replayed-signature", "forged-unsigned", "stripped-but-true"],
)
async def test_dnssec_validation_of_each_resolver(
    served: dict[str, object], outcome: Outcome, says: str, zones: SignedZones, make: Make
) -> None:
    async with DnsServer(zones.behaviour(**served)) as isp, DnsServer(zones.behaviour()) as control:  # type: ignore[arg-type]
        ctx = make(isp.resolver("isp"), control.resolver("q9", control=True), bogons=[],
                   trust_anchors=(zones.anchor("example"),))
        results = await check(ctx, target("isp", "q9", dnssec=True))
    assert results["q9"].outcome is Outcome.OK
    assert any("validates" in e for e in results["q9"].evidence)
    r = results["isp"]
    assert r.outcome is outcome, r.evidence
    [line] = [e for e in r.evidence if e.startswith(f"{udp(isp, 'isp')}: DNSSEC: the A answer for {NAME}")]
    assert says in line


async def test_dnssec_signed_regional_answer_is_authentic_without_a_tls_check(zones: SignedZones, make: Make) -> None:
    regional = zones.behaviour(forged={NAME: ["127.0.0.30"]}, signatures="regional")
    async with DnsServer(regional) as isp, DnsServer(zones.behaviour()) as control:
        ctx = make(isp.resolver("isp"), control.resolver("q9", control=True), bogons=[],
                   trust_anchors=(zones.anchor("example"),))
        results = await check(ctx, target("isp", "q9", dnssec=True))
    r = results["isp"]
    assert (r.outcome, r.consistent, r.answers) == (Outcome.OK, True, ("127.0.0.30",))
    assert r.evidence[0].startswith(f"{udp(isp, 'isp')}: DNSSEC: the A answer for {NAME} validates: signed by "
                                    f"storage.example. (key ")
    assert r.evidence[-1] == (f"{udp(isp, 'isp')}: answers 127.0.0.30 for {NAME} share nothing with the control "
                              f"answers 127.0.0.20, 2001:db8::20 (q9)")
    assert not any("TLS check" in e for e in r.evidence)


async def test_dnssec_chain_that_cannot_be_fetched_is_noted_not_injection(zones: SignedZones, make: Make) -> None:
    signed = zones.behaviour()

    async def no_keys(query: dns.message.Message, transport: Transport) -> Sequence[bytes | float]:
        return [] if query.question[0].rdtype == dns.rdatatype.DNSKEY else await signed(query, transport)

    async with DnsServer(no_keys) as isp:
        ctx = make(isp.resolver("isp"), bogons=[], trust_anchors=(zones.anchor("example"),))
        results = await check(ctx, target("isp", dnssec=True), within=1.5)
    r = results["isp"]
    assert r.outcome is Outcome.OK
    assert r.evidence[0].startswith(f"{udp(isp, 'isp')}: DNSSEC: the A answer for {NAME} could not be validated: "
                                    f"cannot fetch storage.example. DNSKEY: {udp(isp, 'isp')}: no reply within ")


async def test_dnssec_with_an_anchor_that_does_not_match_is_injection(zones: SignedZones, make: Make) -> None:
    other = SignedZones({"example": {}})
    async with DnsServer(zones.behaviour()) as isp:
        ctx = make(isp.resolver("isp"), bogons=[], trust_anchors=(other.anchor("example"),))
        results = await check(ctx, target("isp", dnssec=True))
    r = results["isp"]
    assert r.outcome is Outcome.DNS_INJECTION
    assert f"{udp(isp, 'isp')}: DNSSEC: the A answer for {NAME} does not validate: no DNSKEY of example. matches " \
           f"its trust anchor" in r.evidence


# ---- the probe's outcome ---------------------------------------------------------------------------


@asynccontextmanager
async def tcp_listener(host: str) -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    server = await asyncio.start_server(handle, host, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def test_round_outcome_takes_the_dns_verdict_of_the_routes_resolver(make: Make) -> None:
    async with (
        tcp_listener("127.0.0.66") as port,
        DnsServer(racing(answer({NAME: ["127.0.0.66"]}), answer({NAME: ["127.0.0.20"]}))) as raced,
        DnsServer(answer({NAME: ["127.0.0.20"]})) as honest,
    ):
        via = Route("via-ali", resolver="ali")
        t = Target(name="t", kind=TargetKind.TCP, host=NAME, port=port, resolvers=("ali", "honest"),
                   routes=("via-ali", "via-honest"), dns_reply_window=0.2, timeout=3.0)
        ctx = make(raced.resolver("ali"), honest.resolver("honest"), bogons=[],
                   routes=[via, Route("via-honest", resolver="honest")], targets=[t])
        by_route = {r.route: r for r in await run_round(ctx.config, ctx)}
    forged = by_route["via-ali"]
    assert forged.outcome is Outcome.DNS_INJECTION and forged.blocked
    assert any("2 differing replies to one A query" in e for e in forged.evidence)
    # The round's DNS check ran first: the probe refuses the forged answer before connecting to it.
    assert forged.evidence[-1] == (f"ali answered 127.0.0.66 for {NAME}, which the DNS check 0 s ago judged "
                                   f"dns_injection")
    assert forged.address is None
    assert [d.resolver for d in forged.dns] == ["ali", "honest"]
    # The other route connects to the other resolver's answers (nothing listens there: refused).
    assert by_route["via-honest"].outcome is Outcome.TCP_REFUSED


async def test_a_later_probe_refuses_answers_the_last_check_found_forged(make: Make) -> None:
    async with (
        tcp_listener("127.0.0.66") as port,
        DnsServer(racing(answer({NAME: ["127.0.0.66"]}), answer({NAME: ["127.0.0.20"]}))) as raced,
    ):
        route = Route("via-ali", resolver="ali")
        t = Target(name="t", kind=TargetKind.TCP, host=NAME, port=port, resolvers=("ali",), routes=("via-ali",),
                   dns_reply_window=0.2, timeout=3.0)
        ctx = make(raced.resolver("ali"), bogons=[], routes=[route], targets=[t])
        before = await run_probe(t, route, ctx)  # no check yet: connects to the forged answer
        await integrity.check_target(t, Deadline.after(3), ctx)
        after = await run_probe(t, route, ctx)
    assert before.outcome is Outcome.OK
    assert after.outcome is Outcome.DNS_INJECTION and after.address is None
    assert after.evidence[-1] == (f"ali answered 127.0.0.66 for {NAME}, which the DNS check 0 s ago judged "
                                  f"dns_injection")
    assert any("2 differing replies" in e for e in after.evidence)


async def test_probe_endpoint_path_exports_the_verdict_per_resolver(make: Make) -> None:
    async with (
        tcp_listener("127.0.0.66") as port,
        DnsServer(racing(answer({NAME: ["127.0.0.66"]}), answer({NAME: ["127.0.0.20"]}))) as raced,
        DnsServer(answer({NAME: ["127.0.0.20"]})) as honest,
    ):
        route = Route("via-ali", resolver="ali")
        t = Target(name="t", kind=TargetKind.TCP, host=NAME, port=port, resolvers=("ali", "honest"),
                   routes=("via-ali",), dns_reply_window=0.2, timeout=3.0)
        ctx = make(raced.resolver("ali"), honest.resolver("honest"), bogons=[], routes=[route], targets=[t])
        store = ResultStore(ctx.config)
        scheduler = Scheduler(ctx.config, ctx, store)
        [result] = await scheduler.run_target("t")  # what GET /probe?target=t runs
    assert result.outcome is Outcome.DNS_INJECTION
    series = {(f.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(metrics.render(store, ctx.config).decode())
              for s in f.samples}

    def value(name: str, **labels: str) -> float:
        return series[(name, tuple(sorted({"vantage": "test", "target": "t", **labels}.items())))]

    assert value("probe_outcome", route="via-ali", outcome="dns_injection") == 1.0
    assert value("probe_dns_outcome", resolver="ali", outcome="dns_injection") == 1.0
    assert value("probe_dns_outcome", resolver="honest", outcome="ok") == 1.0
    assert value("probe_dns_replies", resolver="ali") == 4.0
    assert value("probe_dns_replies", resolver="honest") == 2.0
    assert value("probe_dns_consistent", resolver="ali") == 0.0
    assert ("probe_dns_consistent", (("resolver", "honest"), ("target", "t"), ("vantage", "test"))) not in series
    assert 0 < value("probe_dns_lookup_time_seconds", resolver="ali") < 0.2  # without the listening window


async def test_once_json_shows_dns_injection_for_a_resolver_receiving_two_differing_replies(
    tmp_path: Path,
) -> None:
    async with (
        tcp_listener("127.0.0.66") as port,
        DnsServer(racing(answer({NAME: ["127.0.0.66"]}), answer({NAME: ["127.0.0.20"]}))) as raced,
    ):
        cfg = write_config(tmp_path / "t.yml", {
            "vantage": "lab-cn",
            "resolvers": [{"name": "ali", "type": "udp", "address": f"127.0.0.1:{raced.port}"}],
            "routes": [{"name": "via-ali", "resolver": "ali"}],
            "bogons": [],
            "targets": [{"name": "blocked", "address": f"{NAME}:{port}", "routes": ["via-ali"],
                         "resolvers": ["ali"], "dns_reply_window": "200ms", "timeout": "3s"}],
        })
        code, out, err = await run_cli("once", "-c", cfg, "--json")
    assert code == 1, err
    [result] = json.loads(out)["results"]
    # Refused at the resolve step: no connection, the forged answer named in the evidence.
    assert (result["outcome"], result["blocked"], result["address"]) == ("dns_injection", True, None)
    assert f"ali answered 127.0.0.66 for {NAME}" in result["evidence"][-1]
    [ali] = result["dns"]
    assert (ali["resolver"], ali["outcome"], ali["answers"], ali["replies"], ali["consistent"]) == (
        "ali", "dns_injection", ["127.0.0.66"], 4, False)
    assert ali["evidence"][0].startswith(
        f"ali (127.0.0.1:{raced.port}/udp): 2 differing replies to one A query for {NAME} within 200 ms")
    assert result["evidence"][0] == ali["evidence"][0]


# ---- the monitor's own stall: never blamed on the network ----------------------------------------


@asynccontextmanager
async def watching_the_loop() -> AsyncIterator[None]:
    loop.watch.start()
    try:
        yield
    finally:
        await loop.watch.stop()


def stall_the_loop(after: float, seconds: float) -> None:
    """Hold the event loop for `seconds` from `after` s from now, as a callback that never yields would."""
    asyncio.get_running_loop().call_later(after, time.sleep, seconds)


async def test_a_lookup_timing_out_across_a_stall_of_the_loop_is_error_not_dns_timeout(make: Make) -> None:
    # The server answers after 100 ms; the loop is held from 10 ms to 710 ms, past the check's deadline.
    async with DnsServer(delayed(0.1, answer({NAME: ["127.0.0.20"]}))) as server, watching_the_loop():
        ctx = make(server.resolver("isp"), server.resolver("ctl", control=True), bogons=[])
        stall_the_loop(0.01, 0.7)
        results = await check(ctx, target("isp", "ctl"), within=0.6)
    for name in ("isp", "ctl"):
        r = results[name]
        assert (r.outcome, r.consistent, r.answers) == (Outcome.ERROR, None, ()), r
        evidence = " | ".join(r.evidence)
        assert re.search(r"event loop stalled for \d+ ms", evidence) and "not the network's" in evidence, evidence
        assert r.error is not None and r.error.startswith("MonitorStall: "), r.error


async def test_a_lookup_the_server_never_answers_stays_dns_timeout_without_a_stall(make: Make) -> None:
    async with DnsServer(silent()) as server, watching_the_loop():
        ctx = make(server.resolver("isp"), bogons=[])
        results = await check(ctx, target("isp"), within=0.6)
    r = results["isp"]
    assert r.outcome is Outcome.DNS_TIMEOUT, r
    assert "stalled" not in " ".join(r.evidence) and r.error is not None and "MonitorStall" not in r.error


async def test_a_round_whose_dns_check_stalled_reports_no_dns_timeout_and_probes_normally(make: Make) -> None:
    async with (
        tcp_listener("127.0.0.20") as port,
        DnsServer(delayed(0.1, answer({NAME: ["127.0.0.20"]}))) as server,
        watching_the_loop(),
    ):
        via = Route("via-isp", resolver="isp")
        t = Target(name="t", kind=TargetKind.TCP, host=NAME, port=port, resolvers=("isp",), routes=("via-isp",),
                   timeout=0.6)
        ctx = make(server.resolver("isp"), bogons=[], routes=[via], targets=[t])
        stall_the_loop(0.01, 0.8)  # during the round's DNS check, which comes first
        [result] = await run_round(ctx.config, ctx)
    assert [(d.resolver, d.outcome) for d in result.dns] == [("isp", Outcome.ERROR)], result.dns
    assert "event loop stalled for" in " ".join(result.dns[0].evidence)
    assert result.outcome is Outcome.OK, result  # the probe after it resolved and connected as usual
    assert ctx.verdicts.get(NAME, "isp") is not None  # remembered, and not as a verdict that refuses answers


async def test_a_tls_check_timing_out_across_a_stall_is_error_not_mismatch(
    make: Make, ca: trustme.CA, ca_file: str
) -> None:
    async def stall_on_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        time.sleep(1.2)  # the monitor's loop is held past the check's 1 s while the handshake is due
        writer.transport.abort()

    server = await asyncio.start_server(stall_on_accept, "127.0.0.4", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with (
            DnsServer(answer({NAME: ["127.0.0.4"]})) as isp,
            DnsServer(CONTROL, tls=ca) as control,
            watching_the_loop(),
        ):
            ctx = make(isp.resolver("isp"), doh_control(control, ca_file), bogons=[])
            results = await check(ctx, target("isp", "cf-doh", port=port, ca_file=ca_file))
    finally:
        server.close()
        await server.wait_closed()
    r = results["isp"]
    assert (r.outcome, r.consistent) == (Outcome.ERROR, None), r
    assert r.evidence[-1].startswith(f"{udp(isp, 'isp')}: TLS check of 127.0.0.4:{port} with SNI {NAME}: "
                                     "no completed TLS handshake: the monitor's event loop stalled for "), r.evidence
    assert ctx.verdicts.get(NAME, "isp") is not None
