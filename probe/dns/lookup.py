"""Resolve names through a configured resolver (system, udp, tcp, dot, doh): A and AAAA, every reply counted.

`lookup` is what a probe's resolve step uses; `probe.dns.judge` judges a target's answers across
all its resolvers. Transports live in `probe.dns.transport`, the files the system resolver
reads in `probe.dns.system`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from probe import loop
from probe.classify import DnsFailure, MonitorStall, describe
from probe.config import Resolver, ResolverType
from probe.dns import system as dns_system
from probe.dns.context import DnsContext
from probe.dns.transport import Exchange, QueryFailed, Reply, Server, exchange, make_query
from probe.models import Deadline, Outcome

MAX_ANSWERS = 64
# Once one query type has answered with addresses, the other gets this long, so a resolver
# that drops AAAA queries cannot eat the whole probe deadline before the connect stage.
OTHER_TYPE_GRACE = 1.0
_QTYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
# What a server said is more telling than silence; a local fault only when nothing else is known.
_SEVERITY = (Outcome.DNS_NXDOMAIN, Outcome.DNS_SERVFAIL, Outcome.DNS_TIMEOUT, Outcome.ERROR)


@dataclass(frozen=True, slots=True)
class Lookup:
    """The answers one resolver gave for one name (A and AAAA)."""

    answers: tuple[str, ...]  # IPv4 answers first, then IPv6, each in the order received
    replies: int  # DNS replies received (UDP: every reply to the query, counted)
    duration_seconds: float  # until the answers were in hand (not the listening window after them)
    evidence: tuple[str, ...] = ()
    received: tuple[Reply, ...] = ()  # every reply, A and AAAA, in arrival order per type
    server: str = ""  # `name (address:port/type)` of the server that answered, for evidence
    # The replies used (one per type that answered), for DNSSEC validation.
    messages: tuple[dns.message.Message, ...] = field(default=(), compare=False, repr=False)


class LookupFailure(DnsFailure):
    """A failed lookup: dns_nxdomain, dns_servfail, dns_timeout, or error for a local fault."""

    def __init__(
        self,
        message: str,
        outcome: Outcome,
        replies: int = 0,
        error: str | None = None,
        received: tuple[Reply, ...] = (),
    ) -> None:
        super().__init__(message, outcome)
        self.replies = replies
        self.error = error or message
        self.received = received


async def lookup(
    resolver: Resolver,
    name: str,
    deadline: Deadline,
    ctx: DnsContext,
    *,
    source_address: str | None = None,
    reply_window: float = 0.0,
    dnssec: bool = False,
) -> Lookup:
    """Resolve `name` (A and AAAA) through `resolver` before `deadline`.

    Over UDP, `reply_window` > 0 keeps listening that long after each first reply, counting
    every reply (the reply-counting check); `dnssec` sets the DO bit so replies carry RRSIGs.
    Raises LookupFailure (a probe.classify.DnsFailure) with outcome dns_nxdomain, dns_servfail
    or dns_timeout; or error when the host itself cannot resolve (no nameservers, bad source), or
    when the lookup timed out while the monitor's own event loop stalled (see own_stall).
    """
    started = _now()
    how = _How(source_address, reply_window, dnssec)
    try:
        if resolver.type is ResolverType.SYSTEM:
            found, answered = await _system_lookup(resolver.name, name, deadline, ctx, how)
        else:
            found, answered = await _lookup_at(Server.of(resolver), name, deadline, ctx, how)
    except LookupFailure as f:
        if (mine := own_stall(f, started)) is not None:
            raise mine from f
        raise
    return dataclasses.replace(found, duration_seconds=max(0.0, answered - started))


def own_stall(failure: LookupFailure, started: float) -> LookupFailure | None:
    """Return the monitor's own `error` for a timeout across a stall of its loop; None for any other failure.

    The rule of the probes' boundary (probe.loop.LoopWatch.blame): never blame the network,
    here as dns_timeout, for a reply the monitor may have received and not got to in time.
    """
    if failure.outcome is not Outcome.DNS_TIMEOUT:
        return None
    now = _now()
    why = loop.watch.blame(started, now, now - started, "this lookup")
    if why is None:
        return None
    return LookupFailure(f"{failure}; {why}", Outcome.ERROR, failure.replies, describe(MonitorStall(why)),
                         failure.received)


async def ask(
    resolver: Resolver, name: str, rdtype: dns.rdatatype.RdataType, deadline: Deadline, ctx: DnsContext,
    *, dnssec: bool = False,
) -> dns.message.Message:
    """Send one query of any type (DNSKEY, DS, A...) through `resolver`; return the reply whatever its rcode.

    The system resolver asks its first nameserver. Raises LookupFailure when no usable reply came.
    """
    server = _first_server(resolver, ctx)
    qtype = dns.rdatatype.to_text(rdtype)
    started = _now()
    try:
        query = make_query(name, rdtype, dnssec=dnssec)
        return (await _exchange_or_tcp(server, query, deadline, ctx, _How())).message
    except QueryFailed as f:
        failure = LookupFailure(f"{server.prefix}: {f.what} for {name} {qtype}", f.outcome, int(f.replied))
        raise own_stall(failure, started) or failure from f


def server_label(resolver: Resolver, ctx: DnsContext) -> str:
    """Return `name (address:port/type)` for evidence about `resolver` (system: its first nameserver)."""
    try:
        return _first_server(resolver, ctx).prefix
    except LookupFailure:
        return resolver.name


# ---- one server: A and AAAA concurrently -------------------------------------------------


@dataclass(frozen=True, slots=True)
class _How:
    source: str | None = None
    window: float = 0.0
    dnssec: bool = False


@dataclass(frozen=True, slots=True)
class _Answer:
    addresses: tuple[str, ...]
    replies: tuple[Reply, ...]
    message: dns.message.Message
    at: float


async def _lookup_at(
    server: Server, name: str, deadline: Deadline, ctx: DnsContext, how: _How
) -> tuple[Lookup, float]:
    """Return the lookup through one server, and when its answers were in hand."""
    tasks = [asyncio.create_task(_ask(server, name, t, deadline, ctx, how)) for t in _QTYPES]
    waited = 0.0  # how long a straggling type was given after the other type's addresses
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if pending and any(_has_addresses(t) for t in done):
                answered = _now()
                await asyncio.wait(pending, timeout=min(OTHER_TYPE_GRACE, deadline.remaining()))
                waited = _now() - answered
                break
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    addresses: list[str] = []
    parts: list[tuple[str, str]] = []  # (type, what) for every type without addresses
    failures: list[tuple[str, QueryFailed]] = []
    received: list[Reply] = []
    messages: list[dns.message.Message] = []
    answered_at = 0.0
    for rdtype, result in zip(_QTYPES, results, strict=True):
        qtype = dns.rdatatype.to_text(rdtype)
        if isinstance(result, asyncio.CancelledError):  # abandoned once the other type had answered
            other = "AAAA" if qtype == "A" else "A"
            result = QueryFailed(f"no reply within {waited:.1f} s of the {other} answer", Outcome.DNS_TIMEOUT)
        if isinstance(result, QueryFailed):
            failures.append((qtype, result))
            parts.append((qtype, result.what))
            received.extend(result.replies)
        elif isinstance(result, BaseException):
            raise result
        else:
            addresses.extend(result.addresses)
            received.extend(result.replies)
            messages.append(result.message)
            answered_at = max(answered_at, result.at)
            if not result.addresses:
                parts.append((qtype, "no records"))
    replies = reply_count(received) + sum(1 for _, f in failures if f.replied and not f.replies)
    if addresses:
        evidence = tuple(f"{server.prefix}: {f.what} for {name} {t}" for t, f in failures)
        found = Lookup(_unique(addresses)[:MAX_ANSWERS], replies, 0.0, evidence, tuple(received), server.prefix,
                       tuple(messages))
        return found, answered_at
    if not failures:
        raise LookupFailure(
            f"{server.prefix}: no A or AAAA records for {name}", Outcome.DNS_NXDOMAIN, replies, None, tuple(received)
        )
    first = failures[0][1]
    raise LookupFailure(
        f"{server.prefix}: {_per_type(name, parts)}",
        _worst(f.outcome for _, f in failures),
        replies,
        describe(first.__cause__) if first.__cause__ is not None else first.what,
        tuple(received),
    )


def reply_count(received: Iterable[Reply]) -> int:
    """Return how many replies answered the queries: per query every complete reply, all counted.

    A truncated UDP reply is not an answer of its own: asked again over TCP, the TCP reply
    completes it and counts once. Only a truncated reply that nothing completed counts itself.
    """
    by_query: dict[tuple[str, str, str], list[Reply]] = {}
    for reply in received:
        by_query.setdefault(reply.query, []).append(reply)
    return sum(sum(not r.truncated for r in rs) or len(rs) for rs in by_query.values())


def _has_addresses(task: asyncio.Task[_Answer]) -> bool:
    return not task.cancelled() and task.exception() is None and bool(task.result().addresses)


def _per_type(name: str, parts: list[tuple[str, str]]) -> str:
    """Return `SERVFAIL for x A and AAAA`, or `no records for x A; SERVFAIL for x AAAA`."""
    if len({what for _, what in parts}) == 1:
        return f"{parts[0][1]} for {name} {' and '.join(t for t, _ in parts)}"
    return "; ".join(f"{what} for {name} {t}" for t, what in parts)


async def _ask(
    server: Server, name: str, rdtype: dns.rdatatype.RdataType, deadline: Deadline, ctx: DnsContext, how: _How
) -> _Answer:
    """Return the `rdtype` addresses `server` gives for `name`, following CNAMEs (empty: NODATA)."""
    query = make_query(name, rdtype, dnssec=how.dnssec)
    got = await _exchange_or_tcp(server, query, deadline, ctx, how)
    reply, replies = got.message, got.replies

    def failed(what: str, outcome: Outcome) -> QueryFailed:
        return QueryFailed(what, outcome, replied=True, replies=replies)

    if not query.is_response(reply):
        raise failed("a reply that does not match the query", Outcome.DNS_SERVFAIL)
    rcode = reply.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        raise failed("NXDOMAIN", Outcome.DNS_NXDOMAIN)
    if rcode != dns.rcode.NOERROR:
        raise failed(dns.rcode.to_text(rcode), Outcome.DNS_SERVFAIL)
    if not isinstance(reply, dns.message.QueryMessage):
        raise failed("a reply that is not a query response", Outcome.DNS_SERVFAIL)
    try:
        chain = reply.resolve_chaining()
    except dns.exception.DNSException as e:  # a CNAME loop or chain too long
        raise failed(f"an unusable answer ({describe(e)})", Outcome.DNS_SERVFAIL) from e
    if chain.answer is None:
        return _Answer((), replies, reply, got.at)
    addresses = tuple(str(ipaddress.ip_address(rd.to_text())) for rd in chain.answer)
    return _Answer(addresses, replies, reply, got.at)


async def _exchange_or_tcp(
    server: Server, query: dns.message.QueryMessage, deadline: Deadline, ctx: DnsContext, how: _How
) -> Exchange:
    """Exchange over `server`; a truncated UDP reply is asked again over TCP, as stub resolvers do."""
    got = await exchange(server, query, deadline, ctx, how.source, how.window)
    if not got.message.flags & dns.flags.TC or server.type not in (ResolverType.UDP, ResolverType.SYSTEM):
        return got
    tcp = dataclasses.replace(server, type=ResolverType.TCP)
    try:
        again = await exchange(tcp, query, deadline, ctx, how.source)
    except QueryFailed as f:
        what = f"{f.what} over TCP after a truncated UDP reply"
        raise QueryFailed(what, f.outcome, f.replied, got.replies + f.replies) from f
    return Exchange(again.message, got.replies + again.replies, again.at)


# ---- the system resolver: /etc/hosts, then the nameservers of /etc/resolv.conf -----------


async def _system_lookup(
    label: str, name: str, deadline: Deadline, ctx: DnsContext, how: _How
) -> tuple[Lookup, float]:
    listed = dns_system.hosts_addresses(ctx.hosts_file, name)
    if listed:
        evidence = (f"{label}: {name} is listed in {ctx.hosts_file}",)
        return Lookup(listed[:MAX_ANSWERS], 0, 0.0, evidence, server=f"{label} ({ctx.hosts_file})"), _now()
    conf = dns_system.resolv_conf(ctx.resolv_conf)
    if conf.problem is not None:
        raise LookupFailure(f"{label}: cannot use {ctx.resolv_conf}: {conf.problem}", Outcome.ERROR)
    failures: list[LookupFailure] = []
    for candidate in conf.candidates(name):
        for i, host in enumerate(conf.nameservers):
            last = i == len(conf.nameservers) - 1
            server = Server(label, ResolverType.UDP, host, ctx.system_dns_port)
            try:
                found, answered = await _lookup_at(
                    server, candidate, deadline if last else deadline.earlier(conf.timeout), ctx, how
                )
            except LookupFailure as f:
                failures.append(f)
                if f.outcome is Outcome.DNS_NXDOMAIN:
                    break  # an answer, not a fault: the next nameserver would say the same
                continue
            notes = tuple(str(f) for f in failures if f.outcome is not Outcome.DNS_NXDOMAIN)
            replies = found.replies + sum(f.replies for f in failures)
            received = tuple(r for f in failures for r in f.received) + found.received
            return dataclasses.replace(found, replies=replies, evidence=notes + found.evidence, received=received), \
                answered
        if deadline.remaining() <= 0:
            break
    raise LookupFailure(
        "; ".join(str(f) for f in failures),
        _worst(f.outcome for f in failures),
        sum(f.replies for f in failures),
        failures[0].error,
        tuple(r for f in failures for r in f.received),
    )


def _first_server(resolver: Resolver, ctx: DnsContext) -> Server:
    if resolver.type is not ResolverType.SYSTEM:
        return Server.of(resolver)
    conf = dns_system.resolv_conf(ctx.resolv_conf)
    if conf.problem is not None:
        raise LookupFailure(f"{resolver.name}: cannot use {ctx.resolv_conf}: {conf.problem}", Outcome.ERROR)
    return Server(resolver.name, ResolverType.UDP, conf.nameservers[0], ctx.system_dns_port)


# ---- small helpers -----------------------------------------------------------------------


def _now() -> float:
    return time.perf_counter()  # the clock of probe.dns.transport's reply times


def _worst(outcomes: Iterable[Outcome]) -> Outcome:
    return min(outcomes, key=_SEVERITY.index)


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))
