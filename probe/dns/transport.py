"""Send one DNS query over udp, tcp, dot or doh; over UDP keep listening and record every reply.

An on-path injector races the genuine reply with a forged one, and a stub resolver takes
whichever comes first. Listening on for a short window after the first reply, and keeping
every reply that matches the query, is what makes the race visible.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import aiohttp
import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from probe import debuglog
from probe.classify import Stage, classify, describe
from probe.config import Resolver, ResolverType
from probe.dns.context import DnsContext
from probe.models import Deadline, Outcome

MAX_DOH_BYTES = 64 * 1024
MAX_UDP_REPLIES = 32  # a flood of forged replies is recorded up to this many
EDNS_PAYLOAD = 1232  # the DNS flag day 2020 size: no IP fragmentation
_NETWORK_ERRNOS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
}
_DOH_TYPE = "application/dns-message"
_DOH_HEADERS = {"content-type": _DOH_TYPE, "accept": _DOH_TYPE}


@dataclass(frozen=True, slots=True)
class Server:
    """Where queries go: a configured udp/tcp/dot/doh resolver, or one system nameserver (udp)."""

    label: str  # the resolver's name
    type: ResolverType
    host: str = ""
    port: int = 53
    url: str = ""
    server_name: str | None = None
    ca_file: str | None = None

    @classmethod
    def of(cls, r: Resolver) -> Server:
        port = r.port or (853 if r.type is ResolverType.DOT else 53)
        return cls(r.name, r.type, r.host or "", port, r.url or "", r.server_name, r.ca_file)

    @property
    def prefix(self) -> str:
        """Return `name (address:port/type)`, how evidence names the server."""
        if self.type is ResolverType.DOH:
            return f"{self.label} ({self.url})"
        return f"{self.label} ({_hostport(self.host, self.port)}/{self.type})"


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply to one query, as it arrived."""

    qtype: str  # "A", "AAAA", ...
    transport: str  # udp | tcp | dot | doh
    source: str  # the address it came from (DoH: the URL's host)
    after: float  # seconds after the query was sent
    rcode: str  # "NOERROR", "NXDOMAIN", ...
    answers: tuple[str, ...] = ()  # addresses of the asked type, CNAMEs followed, in received order
    ttl: int | None = None  # of the address records
    truncated: bool = False
    qname: str = ""  # the name asked, lower case, no final dot
    misfits: tuple[str, ...] = ()  # addresses of the other type (A records in an AAAA reply): no server sends them

    @property
    def query(self) -> tuple[str, str, str]:
        """Return (name, type, server): replies with the same key answer the same question to one server."""
        return self.qname, self.qtype, self.source

    @property
    def says(self) -> tuple[str, frozenset[str]]:
        """Return what the reply claims, order-free: replies that say the same thing do not differ."""
        return self.rcode, frozenset(self.answers)

    def shows(self) -> str:
        """Return the reply's content for evidence: `[a, b]`, `NXDOMAIN`, `no records`."""
        if self.truncated:
            return "truncated (TC)"
        if self.rcode != "NOERROR":
            return self.rcode
        return f"[{', '.join(self.answers)}]" if self.answers else "no records"


@dataclass(frozen=True, slots=True)
class Exchange:
    """The reply a stub resolver would use (the first that matches the query), and every reply counted."""

    message: dns.message.Message
    replies: tuple[Reply, ...]
    at: float  # when `message` arrived (the event loop's clock)


class QueryFailed(Exception):
    """One query failed; `what` reads as `<what> for <name> <type>`."""

    def __init__(
        self, what: str, outcome: Outcome, replied: bool = False, replies: tuple[Reply, ...] = ()
    ) -> None:
        super().__init__(what)
        self.what, self.outcome, self.replied, self.replies = what, outcome, replied, replies


def make_query(name: str, rdtype: dns.rdatatype.RdataType, *, dnssec: bool = False) -> dns.message.QueryMessage:
    """Return a recursive query for `name` with EDNS (and the DO bit when `dnssec`)."""
    try:
        return dns.message.make_query(name, rdtype, use_edns=0, payload=EDNS_PAYLOAD, want_dnssec=dnssec)
    except dns.exception.DNSException as e:  # not a valid DNS name
        raise QueryFailed(f"cannot ask ({describe(e)})", Outcome.ERROR) from e


async def exchange(
    server: Server,
    query: dns.message.QueryMessage,
    deadline: Deadline,
    ctx: DnsContext,
    source: str | None,
    window: float = 0.0,
) -> Exchange:
    """Send `query` to `server` and return its reply; raise QueryFailed.

    Over UDP the socket stays open `window` seconds after the first reply (never past the
    deadline) and every reply matching the query is kept. A TC reply is returned as is.
    """
    try:
        return await _exchange(server, query, deadline, ctx, source, window)
    except QueryFailed as f:
        if (log := debuglog.current()) is not None:
            log.add(f"{server.prefix}: {_asked(query)} failed: {f.what}")
        raise


async def _exchange(
    server: Server,
    query: dns.message.QueryMessage,
    deadline: Deadline,
    ctx: DnsContext,
    source: str | None,
    window: float,
) -> Exchange:
    started = _now()
    try:
        async with asyncio.timeout_at(deadline.at):
            if server.type in (ResolverType.UDP, ResolverType.SYSTEM):
                return await _udp(server, query, deadline, window, source)
            if (log := debuglog.current()) is not None:
                log.add(f"{server.prefix}: {_asked(query)} sent")
            message = await _send_stream(server, query, deadline.remaining(), ctx, source)
            reply = reply_of(message, query, str(server.type), _source(server), _now() - started)
            if log is not None:
                log.add(f"{server.prefix}: reply {reply.shows()}{_ttl(reply)} after {reply.after * 1000:.1f} ms")
            return Exchange(message, (reply,), _now())
    except QueryFailed:
        raise
    except (TimeoutError, dns.exception.Timeout) as e:
        raise QueryFailed(f"no reply within {_now() - started:.1f} s", _outcome(e)) from None
    except ssl.SSLCertVerificationError as e:
        raise QueryFailed(f"TLS certificate rejected ({e.verify_message})", _outcome(e)) from e
    except ssl.SSLError as e:
        raise QueryFailed(f"TLS handshake failed ({e.reason or e})", _outcome(e)) from e
    except OSError as e:
        raise os_failure(e) from e
    except EOFError as e:
        raise QueryFailed("connection closed before a reply", _outcome(e)) from e
    except dns.query.BadResponse as e:
        raise QueryFailed("a reply that does not match the query", _outcome(e), replied=True) from e
    except Exception as e:  # the boundary: dnspython's wire parser raises arbitrary types on hostile bytes
        raise QueryFailed(f"an unparseable reply ({describe(e)})", _outcome(e), replied=True) from e


async def count_replies(
    address: str,
    name: str,
    rdtype: dns.rdatatype.RdataType,
    deadline: Deadline,
    *,
    port: int = 53,
    window: float = 0.0,
    source: str | None = None,
    dnssec: bool = False,
) -> tuple[Reply, ...]:
    """Ask `address` over UDP once and return every reply until `window` after the first, or the deadline.

    Never raises for silence or ICMP errors (both mean no reply). This is the canary query,
    and the building block for an interference lab that checks what an injector sent.
    """
    query = make_query(name, rdtype, dnssec=dnssec)
    server = Server("canary", ResolverType.UDP, address, port)
    return (await _collect(server, query, deadline, window, source, icmp_ends=False)).replies


def reply_of(
    message: dns.message.Message, query: dns.message.Message, transport: str, source: str, after: float
) -> Reply:
    """Return what `message` says in answer to `query`."""
    qtype = dns.rdatatype.to_text(query.question[0].rdtype)
    qname = query.question[0].name.to_text(omit_final_dot=True).lower()
    truncated = bool(message.flags & dns.flags.TC)
    answers: tuple[str, ...] = ()
    ttl = None
    if isinstance(message, dns.message.QueryMessage) and message.rcode() == dns.rcode.NOERROR:
        try:
            chain = message.resolve_chaining()
        except dns.exception.DNSException:  # a CNAME loop: no answer
            chain = None
        if chain is not None and chain.answer is not None and chain.answer.rdtype in _ADDRESS_TYPES:
            answers = tuple(str(ipaddress.ip_address(rd.to_text())) for rd in chain.answer)
            ttl = chain.answer.ttl
    asked = query.question[0].rdtype
    misfits = tuple(
        str(ipaddress.ip_address(rd.to_text()))
        for rrset in message.answer if rrset.rdtype in _ADDRESS_TYPES and rrset.rdtype != asked for rd in rrset
    )
    rcode = dns.rcode.to_text(message.rcode())
    return Reply(qtype, transport, source, after, rcode, answers, ttl, truncated, qname, misfits)


def os_failure(e: OSError) -> QueryFailed:
    """Return the failure for a socket error: a local fault is `error`, a network one `dns_servfail`."""
    outcome = _outcome(e)
    if outcome is Outcome.ERROR:
        return QueryFailed(f"a local socket error ({describe(e)})", outcome)
    return QueryFailed(_NETWORK_ERRNOS.get(e.errno or 0, f"a network error ({describe(e)})"), outcome)


def _outcome(e: BaseException) -> Outcome:
    return classify(Stage.QUERY, e)  # the one table, its DNS-query rows


# ---- UDP: every reply counted ----------------------------------------------------------------


class _Inbox(asyncio.DatagramProtocol):
    """Queue every datagram (arrival time, source, bytes) and every ICMP error."""

    def __init__(self) -> None:
        self.items: asyncio.Queue[tuple[float, str, bytes] | OSError] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.items.put_nowait((_now(), str(addr[0]), data))

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError):
            self.items.put_nowait(exc)


async def _udp(
    server: Server, query: dns.message.QueryMessage, deadline: Deadline, window: float, source: str | None
) -> Exchange:
    got = await _collect(server, query, deadline, window, source, icmp_ends=True)
    if got.first is not None:
        return Exchange(got.first, got.replies, got.first_at)
    if got.unparseable is not None:
        what = f"an unparseable reply ({describe(got.unparseable)})"
        raise QueryFailed(what, Outcome.DNS_SERVFAIL, replied=True)
    raise TimeoutError


class _Gathered(NamedTuple):
    first: dns.message.Message | None  # the first reply that matches the query
    first_at: float  # when it arrived
    replies: tuple[Reply, ...]  # every reply that matches, in arrival order
    unparseable: Exception | None  # why the first datagram that was not DNS failed to parse


async def _collect(
    server: Server,
    query: dns.message.QueryMessage,
    deadline: Deadline,
    window: float,
    source: str | None,
    *,
    icmp_ends: bool,
) -> _Gathered:
    """Send `query` over a connected UDP socket; gather replies until `window` after the first.

    With `icmp_ends`, an ICMP error before any reply raises it (a resolver that is not there).
    """
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server.host else socket.AF_INET
    transport, inbox = await loop.create_datagram_endpoint(
        _Inbox, remote_addr=(server.host, server.port), local_addr=(source, 0) if source else None, family=family
    )
    replies: list[Reply] = []
    first: dns.message.Message | None = None
    first_at = 0.0
    unparseable: Exception | None = None
    log = debuglog.current()
    try:
        sent = _now()
        transport.sendto(query.to_wire())
        if log is not None:
            log.add(f"{server.prefix}: {_asked(query)} sent (id {query.id}), listening {window * 1000:.0f} ms "
                    "after the first reply")
        end = hard_end = sent + deadline.remaining()
        while len(replies) < MAX_UDP_REPLIES and (left := end - _now()) > 0:
            try:
                async with asyncio.timeout(left):
                    item = await inbox.items.get()
            except TimeoutError:
                break
            if isinstance(item, OSError):
                if log is not None:
                    log.add(f"{server.prefix}: ICMP error after {(_now() - sent) * 1000:.1f} ms: {describe(item)}")
                if icmp_ends and first is None and unparseable is None:
                    raise item
                continue  # a canary's port unreachable, or an error after a reply: no reply
            at, peer, data = item
            try:
                message = dns.message.from_wire(data)
            except Exception as e:  # the boundary: the wire parser raises arbitrary types on hostile bytes
                unparseable = unparseable or e
                if log is not None:
                    log.add(f"{server.prefix}: unparseable datagram from {peer} after {(at - sent) * 1000:.1f} ms "
                            f"({len(data)} bytes): {describe(e)}")
            else:
                if not query.is_response(message):
                    if log is not None:
                        log.add(f"{server.prefix}: datagram from {peer} that does not answer the query: not counted")
                    continue  # not an answer to this query (another ID or question): not counted
                reply = reply_of(message, query, "udp", peer, at - sent)
                replies.append(reply)
                if log is not None:
                    used = " (the first: what a stub resolver uses)" if first is None else ""
                    log.add(f"{server.prefix}: reply #{len(replies)} from {peer} after {reply.after * 1000:.1f} ms: "
                            f"{reply.qtype} {reply.shows()}{_ttl(reply)}{used}")
                if first is None:
                    first, first_at = message, at
            if end == hard_end:  # the first reply: listen on for the window
                end = min(_now() + window, hard_end)
    finally:
        transport.abort()
    return _Gathered(first, first_at, tuple(replies), unparseable)


# ---- TCP, DoT, DoH: one reply per query ----------------------------------------------------------


async def _send_stream(
    server: Server, query: dns.message.QueryMessage, timeout: float, ctx: DnsContext, source: str | None
) -> dns.message.Message:
    match server.type:
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
    raise AssertionError(f"not a stream transport: {server.type}")


async def _doh(
    server: Server, query: dns.message.QueryMessage, ctx: DnsContext, source: str | None
) -> dns.message.Message:
    """POST `query` as RFC 8484 wire format from `source`; the caller's deadline bounds it."""
    query.id = 0  # RFC 8484 4.1: lets HTTP caches share answers
    try:
        async with ctx.http_session(source).post(
            server.url, data=query.to_wire(), headers=_DOH_HEADERS,
            ssl=ctx.tls.verifying(server.ca_file), allow_redirects=False,
        ) as resp:
            if resp.status != 200:
                raise QueryFailed(f"HTTP {resp.status} {resp.reason or ''}".rstrip(), Outcome.DNS_SERVFAIL)
            if resp.content_type != _DOH_TYPE:
                raise QueryFailed(f"a {resp.content_type} reply, not {_DOH_TYPE}", Outcome.DNS_SERVFAIL)
            if (resp.content_length or 0) > MAX_DOH_BYTES:
                raise QueryFailed(f"a reply of {resp.content_length} bytes", Outcome.DNS_SERVFAIL)
            body = bytearray()
            async for chunk in resp.content.iter_chunked(16 * 1024):
                body += chunk
                if len(body) > MAX_DOH_BYTES:
                    raise QueryFailed(f"a reply over {MAX_DOH_BYTES} bytes", Outcome.DNS_SERVFAIL)
    except aiohttp.ClientConnectorCertificateError as e:
        reason = getattr(e.certificate_error, "verify_message", None) or e.certificate_error
        raise QueryFailed(f"TLS certificate rejected ({reason})", _outcome(e)) from e
    except aiohttp.ClientSSLError as e:
        raise QueryFailed(f"TLS handshake failed ({e.os_error})", _outcome(e)) from e
    except aiohttp.ClientConnectorError as e:
        raise os_failure(e.os_error) from e
    except aiohttp.ClientError as e:
        raise QueryFailed(f"HTTP exchange failed ({describe(e)})", _outcome(e)) from e
    return dns.message.from_wire(bytes(body))


# ---- small helpers ---------------------------------------------------------------------------


_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)


def _source(server: Server) -> str:
    if server.type is ResolverType.DOH:
        return urlsplit(server.url).hostname or server.url
    return server.host


def _asked(query: dns.message.Message) -> str:
    q = query.question[0]
    return f"{dns.rdatatype.to_text(q.rdtype)} query for {q.name.to_text(omit_final_dot=True)}"


def _ttl(reply: Reply) -> str:
    return f", TTL {reply.ttl}" if reply.ttl is not None else ""


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _now() -> float:
    # Not the loop's clock: uvloop's loop.time() is libuv's millisecond clock, cached per iteration.
    return time.perf_counter()

