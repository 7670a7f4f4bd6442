"""Resolve target names through each configured resolver (system, udp, tcp, dot, doh) and compare them."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import aiohttp
import dns.asyncquery
import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver

from probe.classify import DnsFailure, describe
from probe.config import Resolver, ResolverType, Target, is_ip
from probe.context import ProbeContext
from probe.models import Deadline, DnsResult, Outcome

log = logging.getLogger(__name__)

MAX_ANSWERS = 64
MAX_DOH_BYTES = 64 * 1024
EDNS_PAYLOAD = 1232  # the DNS flag day 2020 size: no IP fragmentation
# Once one query type has answered with addresses, the other gets this long, so a resolver
# that drops AAAA queries cannot eat the whole probe deadline before the connect stage.
OTHER_TYPE_GRACE = 1.0
_QTYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
# What a server said is more telling than silence; a local fault only when nothing else is known.
_SEVERITY = (Outcome.DNS_NXDOMAIN, Outcome.DNS_SERVFAIL, Outcome.DNS_TIMEOUT, Outcome.ERROR)
_LOCAL_ERRNOS = {errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EINVAL, errno.EMFILE, errno.ENFILE, errno.EACCES}
_NETWORK_ERRNOS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
}
_DOH_TYPE = "application/dns-message"
_DOH_HEADERS = {"content-type": _DOH_TYPE, "accept": _DOH_TYPE}


@dataclass(frozen=True, slots=True)
class Lookup:
    """The answers one resolver gave for one name (A and AAAA)."""

    answers: tuple[str, ...]  # IPv4 answers first, then IPv6, each in the order received
    replies: int  # DNS replies received (UDP: every reply to the query, counted)
    duration_seconds: float
    evidence: tuple[str, ...] = ()


class LookupFailure(DnsFailure):
    """A failed lookup: dns_nxdomain, dns_servfail, dns_timeout, or error for a local fault."""

    def __init__(self, message: str, outcome: Outcome, replies: int = 0, error: str | None = None) -> None:
        super().__init__(message, outcome)
        self.replies = replies
        self.error = error or message


async def lookup(
    resolver: Resolver,
    name: str,
    deadline: Deadline,
    ctx: ProbeContext,
    *,
    source_address: str | None = None,
) -> Lookup:
    """Resolve `name` (A and AAAA) through `resolver` before `deadline`.

    Raises LookupFailure (a probe.classify.DnsFailure) with outcome dns_nxdomain, dns_servfail
    or dns_timeout; or error when the host itself cannot resolve (no nameservers, bad source).
    """
    started = _now()
    if resolver.type is ResolverType.SYSTEM:
        found = await _system_lookup(resolver.name, name, deadline, ctx, source_address)
    else:
        found = await _lookup_at(_Server.of(resolver), name, deadline, ctx, source_address)
    return dataclasses.replace(found, duration_seconds=_now() - started)


async def check_target(target: Target, deadline: Deadline, ctx: ProbeContext) -> tuple[DnsResult, ...]:
    """Query every resolver of `target` concurrently; one DnsResult per resolver, in config order."""
    if not target.needs_dns:
        return ()
    order = {r.name: i for i, r in enumerate(ctx.config.resolvers)}
    names = sorted(target.resolvers or order, key=lambda n: order.get(n, len(order)))
    resolvers = [ctx.config.resolver(n) for n in names]
    results = await asyncio.gather(*(_check(r, target.host, deadline, ctx) for r in resolvers))
    return _judge_consistency(resolvers, results)


async def _check(resolver: Resolver, name: str, deadline: Deadline, ctx: ProbeContext) -> DnsResult:
    started = _now()
    try:
        found = await lookup(resolver, name, deadline, ctx)
    except LookupFailure as failure:
        return DnsResult(
            resolver=resolver.name,
            outcome=failure.outcome,
            replies=failure.replies,
            duration_seconds=_now() - started,
            evidence=(str(failure),),
            error=failure.error,
        )
    except Exception as exc:  # the boundary: a bug in one resolver's check must not lose the round
        log.exception("DNS check of %s through %s failed", name, resolver.name)
        return DnsResult(
            resolver=resolver.name,
            outcome=Outcome.ERROR,
            duration_seconds=_now() - started,
            evidence=(f"{resolver.name}: the DNS check itself failed: {describe(exc)}",),
            error=describe(exc),
        )
    return DnsResult(
        resolver=resolver.name,
        outcome=Outcome.OK,
        answers=found.answers,
        replies=found.replies,
        duration_seconds=found.duration_seconds,
        evidence=found.evidence,
    )


def _judge_consistency(resolvers: Sequence[Resolver], results: Sequence[DnsResult]) -> tuple[DnsResult, ...]:
    """Mark each answer set as sharing an address with the controls' answers, or not.

    A resolver that did not answer has nothing to compare (None), not even a control.
    """
    answered = [(r, res) for r, res in zip(resolvers, results, strict=True) if res.outcome is Outcome.OK]
    control_answers = _unique(a for r, res in answered if r.control for a in res.answers)
    control_names = ", ".join(r.name for r, res in answered if r.control)
    judged = []
    for resolver, result in zip(resolvers, results, strict=True):
        if result.outcome is not Outcome.OK:
            judged.append(result)
        elif resolver.control:
            judged.append(dataclasses.replace(result, consistent=True))
        elif not control_answers:
            judged.append(result)
        elif set(result.answers) & set(control_answers):
            judged.append(dataclasses.replace(result, consistent=True))
        else:
            note = (
                f"answers {_show(result.answers)} share nothing with control answers "
                f"{_show(control_answers)} ({control_names})"
            )
            judged.append(dataclasses.replace(result, consistent=False, evidence=(*result.evidence, note)))
    return tuple(judged)


# ---- one server: A and AAAA concurrently -------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Server:
    """Where queries go: a configured udp/tcp/dot/doh resolver, or one system nameserver (udp)."""

    label: str  # the resolver's name
    type: ResolverType
    host: str = ""
    port: int = 53
    url: str = ""
    server_name: str | None = None
    ca_file: str | None = None

    @classmethod
    def of(cls, r: Resolver) -> _Server:
        port = r.port or (853 if r.type is ResolverType.DOT else 53)
        return cls(r.name, r.type, r.host or "", port, r.url or "", r.server_name, r.ca_file)

    @property
    def prefix(self) -> str:
        """Return `name (address:port/type)`, how failure evidence names the server."""
        if self.type is ResolverType.DOH:
            return f"{self.label} ({self.url})"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.label} ({host}:{self.port}/{self.type})"


class _QueryFailed(Exception):
    """One query type failed; `what` reads as `<what> for <name> <type>`."""

    def __init__(self, what: str, outcome: Outcome, replied: bool = False) -> None:
        super().__init__(what)
        self.what, self.outcome, self.replied = what, outcome, replied


async def _lookup_at(
    server: _Server, name: str, deadline: Deadline, ctx: ProbeContext, source: str | None
) -> Lookup:
    tasks = [asyncio.create_task(_ask(server, name, t, deadline, ctx, source)) for t in _QTYPES]
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
    failures: list[tuple[str, _QueryFailed]] = []
    replies = 0
    for rdtype, result in zip(_QTYPES, results, strict=True):
        qtype = dns.rdatatype.to_text(rdtype)
        if isinstance(result, asyncio.CancelledError):  # abandoned once the other type had answered
            other = "AAAA" if qtype == "A" else "A"
            result = _QueryFailed(f"no reply within {waited:.1f} s of the {other} answer", Outcome.DNS_TIMEOUT)
        if isinstance(result, _QueryFailed):
            failures.append((qtype, result))
            parts.append((qtype, result.what))
            replies += result.replied
        elif isinstance(result, BaseException):
            raise result
        else:
            addresses.extend(result)
            replies += 1
            if not result:
                parts.append((qtype, "no records"))
    if addresses:
        evidence = tuple(f"{server.prefix}: {f.what} for {name} {t}" for t, f in failures)
        return Lookup(_unique(addresses)[:MAX_ANSWERS], replies, 0.0, evidence)
    if not failures:
        raise LookupFailure(f"{server.prefix}: no A or AAAA records for {name}", Outcome.DNS_NXDOMAIN, replies)
    first = failures[0][1]
    raise LookupFailure(
        f"{server.prefix}: {_per_type(name, parts)}",
        _worst(f.outcome for _, f in failures),
        replies,
        describe(first.__cause__) if first.__cause__ is not None else first.what,
    )


def _has_addresses(task: asyncio.Task[tuple[str, ...]]) -> bool:
    return not task.cancelled() and task.exception() is None and bool(task.result())


def _per_type(name: str, parts: list[tuple[str, str]]) -> str:
    """Return `SERVFAIL for x A and AAAA`, or `no records for x A; SERVFAIL for x AAAA`."""
    if len({what for _, what in parts}) == 1:
        return f"{parts[0][1]} for {name} {' and '.join(t for t, _ in parts)}"
    return "; ".join(f"{what} for {name} {t}" for t, what in parts)


async def _ask(
    server: _Server, name: str, rdtype: dns.rdatatype.RdataType, deadline: Deadline, ctx: ProbeContext,
    source: str | None,
) -> tuple[str, ...]:
    """Return the `rdtype` addresses `server` gives for `name`, following CNAMEs (empty: NODATA)."""
    try:
        query = dns.message.make_query(name, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
    except dns.exception.DNSException as e:  # not a valid DNS name
        raise _QueryFailed(f"cannot ask ({describe(e)})", Outcome.ERROR) from e
    try:
        reply = await _exchange(server, query, deadline, ctx, source)
    except dns.message.Truncated:
        # Too big for UDP: ask again over TCP, as stub resolvers do.
        tcp = dataclasses.replace(server, type=ResolverType.TCP)
        try:
            reply = await _exchange(tcp, query, deadline, ctx, source)
        except _QueryFailed as f:
            raise _QueryFailed(f"{f.what} over TCP after a truncated UDP reply", f.outcome, f.replied) from f
    if not query.is_response(reply):
        raise _QueryFailed("a reply that does not match the query", Outcome.DNS_SERVFAIL, replied=True)
    rcode = reply.rcode()
    if rcode == dns.rcode.NXDOMAIN:
        raise _QueryFailed("NXDOMAIN", Outcome.DNS_NXDOMAIN, replied=True)
    if rcode != dns.rcode.NOERROR:
        raise _QueryFailed(dns.rcode.to_text(rcode), Outcome.DNS_SERVFAIL, replied=True)
    if not isinstance(reply, dns.message.QueryMessage):
        raise _QueryFailed("a reply that is not a query response", Outcome.DNS_SERVFAIL, replied=True)
    try:
        chain = reply.resolve_chaining()
    except dns.exception.DNSException as e:  # a CNAME loop or chain too long
        raise _QueryFailed(f"an unusable answer ({describe(e)})", Outcome.DNS_SERVFAIL, replied=True) from e
    if chain.answer is None:
        return ()
    return tuple(str(ipaddress.ip_address(rd.to_text())) for rd in chain.answer)


async def _exchange(
    server: _Server, query: dns.message.QueryMessage, deadline: Deadline, ctx: ProbeContext, source: str | None
) -> dns.message.Message:
    """Send `query` to `server`; raise _QueryFailed, or dns.message.Truncated for a TC reply over UDP."""
    started = _now()
    try:
        async with asyncio.timeout_at(deadline.at):
            return await _send(server, query, deadline.remaining(), ctx, source)
    except (dns.message.Truncated, _QueryFailed):
        raise
    except (TimeoutError, dns.exception.Timeout):
        raise _QueryFailed(f"no reply within {_now() - started:.1f} s", Outcome.DNS_TIMEOUT) from None
    except ssl.SSLCertVerificationError as e:
        raise _QueryFailed(f"TLS certificate rejected ({e.verify_message})", Outcome.DNS_SERVFAIL) from e
    except ssl.SSLError as e:
        raise _QueryFailed(f"TLS handshake failed ({e.reason or e})", Outcome.DNS_SERVFAIL) from e
    except OSError as e:
        raise _os_failure(e) from e
    except EOFError as e:
        raise _QueryFailed("connection closed before a reply", Outcome.DNS_SERVFAIL) from e
    except dns.query.BadResponse as e:
        raise _QueryFailed("a reply that does not match the query", Outcome.DNS_SERVFAIL, replied=True) from e
    except Exception as e:  # the boundary: dnspython's wire parser raises arbitrary types on hostile bytes
        raise _QueryFailed(f"an unparseable reply ({describe(e)})", Outcome.DNS_SERVFAIL, replied=True) from e


async def _send(
    server: _Server, query: dns.message.QueryMessage, timeout: float, ctx: ProbeContext, source: str | None
) -> dns.message.Message:
    match server.type:
        case ResolverType.UDP | ResolverType.SYSTEM:
            return await dns.asyncquery.udp(
                query, server.host, timeout, server.port, source, ignore_unexpected=True, raise_on_truncation=True
            )
        case ResolverType.TCP:
            return await dns.asyncquery.tcp(query, server.host, timeout, server.port, source)
        case ResolverType.DOT:
            return await dns.asyncquery.tls(
                query, server.host, timeout, server.port, source,
                ssl_context=ctx.tls.dns_tls(server.ca_file),
                server_hostname=server.server_name or server.host,
            )
        case ResolverType.DOH:
            return await _doh(server, query, ctx, source)


async def _doh(
    server: _Server, query: dns.message.QueryMessage, ctx: ProbeContext, source: str | None
) -> dns.message.Message:
    """POST `query` as RFC 8484 wire format from `source`; the caller's deadline bounds it."""
    query.id = 0  # RFC 8484 4.1: lets HTTP caches share answers
    try:
        async with ctx.http_session(source).post(
            server.url, data=query.to_wire(), headers=_DOH_HEADERS,
            ssl=ctx.tls.verifying(server.ca_file), allow_redirects=False,
        ) as resp:
            if resp.status != 200:
                raise _QueryFailed(f"HTTP {resp.status} {resp.reason or ''}".rstrip(), Outcome.DNS_SERVFAIL)
            if resp.content_type != _DOH_TYPE:
                raise _QueryFailed(f"a {resp.content_type} reply, not {_DOH_TYPE}", Outcome.DNS_SERVFAIL)
            if (resp.content_length or 0) > MAX_DOH_BYTES:
                raise _QueryFailed(f"a reply of {resp.content_length} bytes", Outcome.DNS_SERVFAIL)
            body = bytearray()
            async for chunk in resp.content.iter_chunked(16 * 1024):
                body += chunk
                if len(body) > MAX_DOH_BYTES:
                    raise _QueryFailed(f"a reply over {MAX_DOH_BYTES} bytes", Outcome.DNS_SERVFAIL)
    except aiohttp.ClientConnectorCertificateError as e:
        reason = getattr(e.certificate_error, "verify_message", None) or e.certificate_error
        raise _QueryFailed(f"TLS certificate rejected ({reason})", Outcome.DNS_SERVFAIL) from e
    except aiohttp.ClientSSLError as e:
        raise _QueryFailed(f"TLS handshake failed ({e.os_error})", Outcome.DNS_SERVFAIL) from e
    except aiohttp.ClientConnectorError as e:
        raise _os_failure(e.os_error) from e
    except aiohttp.ClientError as e:
        raise _QueryFailed(f"HTTP exchange failed ({describe(e)})", Outcome.DNS_SERVFAIL) from e
    return dns.message.from_wire(bytes(body))


def _os_failure(e: OSError) -> _QueryFailed:
    if e.errno in _LOCAL_ERRNOS or isinstance(e, socket.gaierror):
        return _QueryFailed(f"a local socket error ({describe(e)})", Outcome.ERROR)
    return _QueryFailed(_NETWORK_ERRNOS.get(e.errno or 0, f"a network error ({describe(e)})"), Outcome.DNS_SERVFAIL)


# ---- the system resolver: /etc/hosts, then the nameservers of /etc/resolv.conf -----------


@dataclass(frozen=True, slots=True)
class _ResolvConf:
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    ndots: int = 1
    timeout: float = 2.0  # per nameserver, before the next one is asked
    problem: str | None = None

    def candidates(self, name: str) -> list[str]:
        """Return the names to try in order, as the C library's search rules have it."""
        if name.endswith("."):
            return [name]
        suffixed = [f"{name}.{domain}" for domain in self.search]
        return [name, *suffixed] if name.count(".") >= self.ndots else [*suffixed, name]


async def _system_lookup(
    label: str, name: str, deadline: Deadline, ctx: ProbeContext, source: str | None
) -> Lookup:
    listed = _HOSTS.get(ctx.hosts_file).get(name.lower().rstrip("."))
    if listed:
        return Lookup(listed[:MAX_ANSWERS], 0, 0.0, (f"{label}: {name} is listed in {ctx.hosts_file}",))
    conf = _RESOLV_CONF.get(ctx.resolv_conf)
    if conf.problem is not None:
        raise LookupFailure(f"{label}: cannot use {ctx.resolv_conf}: {conf.problem}", Outcome.ERROR)
    failures: list[LookupFailure] = []
    for candidate in conf.candidates(name):
        for i, host in enumerate(conf.nameservers):
            last = i == len(conf.nameservers) - 1
            server = _Server(label, ResolverType.UDP, host, ctx.system_dns_port)
            try:
                found = await _lookup_at(
                    server, candidate, deadline if last else deadline.earlier(conf.timeout), ctx, source
                )
            except LookupFailure as f:
                failures.append(f)
                if f.outcome is Outcome.DNS_NXDOMAIN:
                    break  # an answer, not a fault: the next nameserver would say the same
                continue
            notes = tuple(str(f) for f in failures if f.outcome is not Outcome.DNS_NXDOMAIN)
            replies = found.replies + sum(f.replies for f in failures)
            return dataclasses.replace(found, replies=replies, evidence=notes + found.evidence)
        if deadline.remaining() <= 0:
            break
    raise LookupFailure(
        "; ".join(str(f) for f in failures),
        _worst(f.outcome for f in failures),
        sum(f.replies for f in failures),
        failures[0].error,
    )


def _parse_resolv_conf(path: str) -> _ResolvConf:
    try:
        r = dns.resolver.Resolver(filename=path, configure=True)
    except (dns.exception.DNSException, ValueError) as e:  # unreadable, no nameservers, bad lines
        return _ResolvConf(problem=str(e) or describe(e))
    servers = tuple(ns for ns in r.nameservers if isinstance(ns, str) and is_ip(ns))
    if not servers:
        return _ResolvConf(problem="no usable nameserver lines")
    # Without search or domain lines the C library (and dnspython) use the host name's domain.
    search = r.search or ([r.domain] if r.domain != dns.name.root else [])
    return _ResolvConf(
        nameservers=servers,
        search=tuple(d.to_text(omit_final_dot=True) for d in search),
        ndots=r.ndots if r.ndots is not None else 1,
        timeout=float(r.timeout),
    )


def _parse_hosts(path: str) -> dict[str, tuple[str, ...]]:
    """Return name -> addresses (IPv4 first, then IPv6, each in file order) from a hosts file."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}  # no hosts file: every name goes to DNS, as with the C library
    by_version: dict[int, dict[str, list[str]]] = {4: {}, 6: {}}
    for line in text.splitlines():
        fields = line.partition("#")[0].split()
        if len(fields) < 2:
            continue
        try:
            ip = ipaddress.ip_address(fields[0].partition("%")[0])
        except ValueError:
            continue
        for host in fields[1:]:
            addresses = by_version[ip.version].setdefault(host.lower().rstrip("."), [])
            if str(ip) not in addresses:
                addresses.append(str(ip))
    names = by_version[4].keys() | by_version[6].keys()
    return {n: (*by_version[4].get(n, ()), *by_version[6].get(n, ())) for n in names}


T = TypeVar("T")


class _FileCache(Generic[T]):
    """Parsed files, read again only when their mtime or size changes."""

    def __init__(self, parse: Callable[[str], T]) -> None:
        self._parse = parse
        self._entries: dict[str, tuple[tuple[int, int] | None, T]] = {}

    def get(self, path: str) -> T:
        try:
            st = os.stat(path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        entry = self._entries.get(path)
        if entry is None or entry[0] != stamp:
            entry = (stamp, self._parse(path))
            self._entries[path] = entry
        return entry[1]


_HOSTS = _FileCache(_parse_hosts)
_RESOLV_CONF = _FileCache(_parse_resolv_conf)


# ---- small helpers -----------------------------------------------------------------------


def _now() -> float:
    return asyncio.get_running_loop().time()


def _worst(outcomes: Iterable[Outcome]) -> Outcome:
    return min(outcomes, key=_SEVERITY.index)


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _show(addresses: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(addresses[:limit])
    return shown if len(addresses) <= limit else f"{shown} and {len(addresses) - limit} more"
