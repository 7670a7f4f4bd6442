"""A loopback DNS server for tests: UDP and TCP on one port, optionally DoT and DoH too, one behaviour.

    from tests.dnsserver import DnsServer, answer, nxdomain, silent, delayed

    async with DnsServer(answer({"hk.storage.example": ["198.51.100.20", "2001:db8::20"]})) as server:
        resolver = server.resolver("ali")             # a probe.config.Resolver (udp) aimed at it
        tcp = server.resolver("ali-tcp", ResolverType.TCP)
        ...
        server.queries                                # [("udp", "hk.storage.example", "A"), ...]
        server.clients                                # [("udp", "127.0.0.1"), ...]: who asked

    async with DnsServer(silent(), tls=ca) as server:  # tls: a trustme.CA; also serves DoT and DoH
        server.resolver("q9", ResolverType.DOT, ca_file=ca_pem_path, server_name="dns.test")
        server.resolver("cf", ResolverType.DOH, ca_file=ca_pem_path)

The system resolver is pointed at the server with a resolv.conf holding `nameserver 127.0.0.1`
and `ProbeContext(resolv_conf=..., system_dns_port=server.port)`.

A behaviour is `async (query, transport) -> [bytes | float]`: the wire replies to send (a float
between them: a pause). UDP sends
every one (several = an injected reply racing the genuine one); TCP, DoT and DoH send the first;
none = stay silent until the client gives up. Ready-made: answer (a given record set; a forged
one is just another set), nxdomain, servfail, refused, nodata, silent, garbage, delayed,
truncated_over_udp (TC bit and no answer over UDP, the full answer over TCP), several, racing
(a forged reply, then the genuine one from the same socket), only_for (answer some names,
ignore the rest: an injector seen at a canary), rewriting_nxdomain (an ISP resolver's ad
server instead of NXDOMAIN), and signed zones (SignedZones: DNSSEC with dnspython's dns.dnssec).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

import dns.dnssec
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import trustme
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

from probe.config import Resolver, ResolverType

Transport = Literal["udp", "tcp", "dot", "doh"]
# The replies to send; a float between them is a pause in seconds (UDP only: the stream
# transports send the first reply at once).
Behaviour = Callable[[dns.message.Message, Transport], Awaitable[Sequence[bytes | float]]]
GARBAGE = b"\x16\x03\x01\x02\x00 this is not a DNS message at all"


class DnsServer:
    """Serve one behaviour on 127.0.0.1 (UDP+TCP on `port`; with `tls`, DoT on `dot_port`, DoH at `doh_url`)."""

    def __init__(
        self,
        behaviour: Behaviour,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: trustme.CA | None = None,
        tls_names: Sequence[str] = ("127.0.0.1", "localhost", "dns.test"),
        doh_status: int = 200,
    ) -> None:
        self.behaviour = behaviour
        self.host = host
        self.port = port  # 0: pick a port free for both UDP and TCP
        self.dot_port = 0
        self.doh_url = ""
        self.doh_status = doh_status  # anything but 200: DoH answers with this status, no DNS
        self.queries: list[tuple[Transport, str, str]] = []  # (transport, name, type), as they arrive
        self.clients: list[tuple[Transport, str]] = []  # (transport, source address) of every query
        self._tls, self._tls_names = tls, tuple(tls_names)
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._closing = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._servers: list[asyncio.Server] = []
        self._udp: asyncio.DatagramTransport | None = None
        self._runner: web.AppRunner | None = None

    def resolver(
        self,
        name: str = "test",
        type: ResolverType = ResolverType.UDP,
        *,
        control: bool = False,
        ca_file: str | None = None,
        server_name: str | None = None,
    ) -> Resolver:
        """Return a configured resolver of `type` (udp, tcp, dot, doh) that asks this server."""
        match type:
            case ResolverType.UDP | ResolverType.TCP:
                return Resolver(name, type, host=self.host, port=self.port, control=control)
            case ResolverType.DOT:
                assert self._tls is not None, "DnsServer(tls=ca) serves DoT"
                return Resolver(
                    name, type, host=self.host, port=self.dot_port, server_name=server_name,
                    control=control, ca_file=ca_file,
                )
            case ResolverType.DOH:
                assert self._tls is not None, "DnsServer(tls=ca) serves DoH"
                return Resolver(name, type, url=self.doh_url, control=control, ca_file=ca_file)
        raise ValueError("point the system resolver here with ProbeContext(resolv_conf=..., system_dns_port=...)")

    async def __aenter__(self) -> DnsServer:
        try:
            await self._start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        tcp_sock, udp_sock = self._bind_pair()
        self._servers.append(await asyncio.start_server(self._on_tcp, sock=tcp_sock))
        self._udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp_sock)
        if self._tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.issue_cert(*self._tls_names).configure_cert(context)
            dot = await asyncio.start_server(self._on_dot, self.host, 0, ssl=context)
            self._servers.append(dot)
            self.dot_port = dot.sockets[0].getsockname()[1]
            app = web.Application()
            app.router.add_post("/dns-query", self._on_doh)
            self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
            await self._runner.setup()
            sock = socket.socket(self._family, socket.SOCK_STREAM)
            try:
                sock.bind((self.host, 0))
                await web.SockSite(self._runner, sock, ssl_context=context).start()
            except BaseException:
                sock.close()
                raise
            host = f"[{self.host}]" if ":" in self.host else self.host
            self.doh_url = f"https://{host}:{sock.getsockname()[1]}/dns-query"

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
        for server in self._servers:
            server.close()
        if self._udp is not None:
            self._udp.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()

    def _bind_pair(self) -> tuple[socket.socket, socket.socket]:
        for _ in range(50):
            tcp = socket.socket(self._family, socket.SOCK_STREAM)
            udp = socket.socket(self._family, socket.SOCK_DGRAM)
            try:
                tcp.bind((self.host, self.port))
                port = tcp.getsockname()[1]
                udp.bind((self.host, port))
            except OSError:
                tcp.close()
                udp.close()
                if self.port:
                    raise
                continue
            self.port = port
            return tcp, udp
        raise OSError("no port free for both UDP and TCP")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _parse(self, wire: bytes, transport: Transport, client: str | None) -> dns.message.Message | None:
        self.clients.append((transport, client or "?"))
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if query.question:
            q = query.question[0]
            name = q.name.to_text(omit_final_dot=True).lower()
            self.queries.append((transport, name, dns.rdatatype.to_text(q.rdtype)))
        return query

    async def _on_udp(self, wire: bytes, peer: Any) -> None:
        query = self._parse(wire, "udp", peer[0])
        if query is None or self._udp is None:
            return
        for reply in await self.behaviour(query, "udp"):
            if isinstance(reply, float | int):
                await asyncio.sleep(reply)
            elif not self._udp.is_closing():
                self._udp.sendto(reply, peer)

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._serve_stream(reader, writer, "tcp")

    async def _on_dot(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._serve_stream(reader, writer, "dot")

    async def _serve_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, kind: Transport) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                query = self._parse(await reader.readexactly(size), kind, writer.get_extra_info("peername")[0])
                if query is None:
                    return
                replies = _wires(await self.behaviour(query, kind))
                if not replies:
                    await self._closing.wait()  # silent: hold the connection until the client gives up
                    return
                writer.write(len(replies[0]).to_bytes(2, "big") + replies[0])
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass  # the client hung up, or gave up on the handshake
        except asyncio.CancelledError:
            # Only __aexit__ cancels this task, and it awaits it; ending quietly keeps Python
            # 3.11's start_server callback from logging the cancellation as an error.
            pass
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    async def _on_doh(self, request: web.Request) -> web.StreamResponse:
        if self.doh_status != 200:
            return web.Response(status=self.doh_status, text="not today")
        query = self._parse(await request.read(), "doh", request.remote)
        if query is None:
            return web.Response(status=400, text="not a DNS message")
        replies = _wires(await self.behaviour(query, "doh"))
        if not replies:
            await self._closing.wait()
            return web.Response(status=503)
        return web.Response(body=replies[0], content_type="application/dns-message")


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.server._spawn(self.server._on_udp(data, addr))


# ---- behaviours ---------------------------------------------------------------------------


def _wires(replies: Sequence[bytes | float]) -> list[bytes]:
    return [r for r in replies if isinstance(r, bytes)]


def _wire(response: dns.message.Message, transport: Transport) -> bytes:
    """Render in record order (no shuffling); over UDP, too big for the client's buffer = TC and no records."""
    try:
        return response.to_wire(max_size=0 if transport == "udp" else 65535, want_shuffle=False)
    except dns.exception.TooBig:
        response.flags |= dns.flags.TC
        response.answer.clear()
        return response.to_wire(want_shuffle=False)


def _absolute(name: str) -> str:
    return name.lower().rstrip(".") + "."


def answer(
    records: Mapping[str, Sequence[str]], *, cnames: Mapping[str, str] | None = None, ttl: int = 60
) -> Behaviour:
    """Answer from a zone: name -> addresses (A or AAAA by form), `cnames`: alias -> canonical name.

    A name in neither table is NXDOMAIN; a name without addresses of the asked type is NODATA.
    Aliases are answered with the whole CNAME chain and the final addresses, as recursors do.
    """
    zone = {_absolute(k): list(v) for k, v in records.items()}
    aliases = {_absolute(k): _absolute(v) for k, v in (cnames or {}).items()}

    async def behave(query: dns.message.Message, transport: Transport) -> Sequence[bytes | float]:
        response = dns.message.make_response(query)
        q = query.question[0]
        name = _absolute(q.name.to_text())
        for _ in range(16):
            if name not in aliases:
                break
            response.answer.append(dns.rrset.from_text(name, ttl, "IN", "CNAME", aliases[name]))
            name = aliases[name]
        if name not in zone:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif q.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            wanted = [a for a in zone[name] if (":" in a) == (q.rdtype == dns.rdatatype.AAAA)]
            if wanted:
                response.answer.append(dns.rrset.from_text_list(name, ttl, dns.rdataclass.IN, q.rdtype, wanted))
        return [_wire(response, transport)]

    return behave


def rcode(code: dns.rcode.Rcode) -> Behaviour:
    """Reply with `code` and no records."""

    async def behave(query: dns.message.Message, transport: Transport) -> Sequence[bytes | float]:
        response = dns.message.make_response(query)
        response.set_rcode(code)
        return [_wire(response, transport)]

    return behave


def nxdomain() -> Behaviour:
    """Say the name does not exist."""
    return rcode(dns.rcode.NXDOMAIN)


def servfail() -> Behaviour:
    """Reply SERVFAIL."""
    return rcode(dns.rcode.SERVFAIL)


def refused() -> Behaviour:
    """Reply REFUSED."""
    return rcode(dns.rcode.REFUSED)


def nodata() -> Behaviour:
    """Reply NOERROR with no records (the name exists, without A or AAAA)."""
    return rcode(dns.rcode.NOERROR)


def silent() -> Behaviour:
    """Never reply."""

    async def behave(query: dns.message.Message, transport: Transport) -> Sequence[bytes | float]:
        return []

    return behave


def garbage(data: bytes = GARBAGE) -> Behaviour:
    """Reply with bytes that are not a DNS message."""

    async def behave(query: dns.message.Message, transport: Transport) -> Sequence[bytes | float]:
        return [data]

    return behave


def delayed(seconds: float, inner: Behaviour) -> Behaviour:
    """Reply as `inner` does, `seconds` late."""

    async def behave(query: dns.message.Message, transport: Transport) -> Sequence[bytes | float]:
        await asyncio.sleep(seconds)
        return await inner(query, transport)

    return behave


def truncated_over_udp(inner: Behaviour) -> Behaviour:
    """Over UDP reply with TC set and no answer; over the stream transports, as `inner` does."""

    async def behave(query: dns.message.Message, transport: Transport) -> Sequence[bytes | float]:
        if transport != "udp":
            return await inner(query, transport)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.TC
        return [_wire(response, transport)]

    return behave


def several(*behaviours: Behaviour) -> Behaviour:
    """Send every behaviour's replies, in order (over UDP; stream transports send the first)."""

    async def behave(query: dns.message.Message, transport: Transport) -> list[bytes | float]:
        return [reply for b in behaviours for reply in await b(query, transport)]

    return behave


def racing(forged: Behaviour, genuine: Behaviour, gap: float = 0.03) -> Behaviour:
    """Over UDP send `forged`'s reply, then `genuine`'s `gap` seconds later: an on-path injector winning the race.

    The stream transports (which an injector cannot race) answer as `genuine` does.
    """

    async def behave(query: dns.message.Message, transport: Transport) -> list[bytes | float]:
        if transport != "udp":
            return list(await genuine(query, transport))
        return [*await forged(query, transport), gap, *await genuine(query, transport)]

    return behave


def only_for(names: Sequence[str], inner: Behaviour) -> Behaviour:
    """Answer queries for `names` as `inner` does and ignore every other query."""
    wanted = {_absolute(n) for n in names}

    async def behave(query: dns.message.Message, transport: Transport) -> Sequence[bytes | float]:
        if _absolute(query.question[0].name.to_text()) not in wanted:
            return []
        return await inner(query, transport)

    return behave


def rewriting_nxdomain(inner: Behaviour, address: str, ttl: int = 5) -> Behaviour:
    """Answer as `inner` does, but replace every NXDOMAIN with `address` (A queries): an ISP's ad server."""

    async def behave(query: dns.message.Message, transport: Transport) -> list[bytes | float]:
        out: list[bytes | float] = []
        for reply in await inner(query, transport):
            if isinstance(reply, bytes) and dns.message.from_wire(reply).rcode() == dns.rcode.NXDOMAIN:
                response = dns.message.make_response(query)
                q = query.question[0]
                if q.rdtype == dns.rdatatype.A:
                    response.answer.append(dns.rrset.from_text(q.name, ttl, "IN", "A", address))
                reply = _wire(response, transport)
            out.append(reply)
        return out

    return behave


class SignedZones:
    """DNSSEC-signed zones (ECDSA P-256, one key per zone) served as a validating recursor would.

        zones = SignedZones({"example": {}, "storage.example": {"hk.storage.example": ["127.0.0.20"]}})
        ctx = ProbeContext(config, trust_anchors=(zones.anchor("example"),))
        DnsServer(zones.behaviour())                                        # honest, signed
        DnsServer(zones.behaviour(forged={"hk.storage.example": ["127.0.0.66"]}, signatures="kept"))

    A child zone's DS is served, signed, from its parent, so the chain runs from the anchor down.
    """

    def __init__(self, zones: Mapping[str, Mapping[str, Sequence[str]]], ttl: int = 60) -> None:
        self.ttl = ttl
        self.zones = {dns.name.from_text(z): {_absolute(k): list(v) for k, v in records.items()}
                      for z, records in zones.items()}
        self._keys: dict[dns.name.Name, tuple[ec.EllipticCurvePrivateKey, Any]] = {}
        for zone in self.zones:
            private = ec.generate_private_key(ec.SECP256R1())
            dnskey = dns.dnssec.make_dnskey(private.public_key(), dns.dnssec.Algorithm.ECDSAP256SHA256, flags=257)
            self._keys[zone] = (private, dnskey)

    def anchor(self, zone: str) -> dns.rrset.RRset:
        """Return the DS set of `zone`, to be used as a trust anchor."""
        name = dns.name.from_text(zone)
        return dns.rrset.from_rdata(name, self.ttl, dns.dnssec.make_ds(name, self._keys[name][1], "SHA256"))

    def _zone_of(self, name: dns.name.Name) -> dns.name.Name | None:
        enclosing = [z for z in self.zones if name.is_subdomain(z)]
        return max(enclosing, key=len, default=None)

    def _signed(self, rrset: dns.rrset.RRset, zone: dns.name.Name) -> list[dns.rrset.RRset]:
        private, dnskey = self._keys[zone]
        rrsig = dns.dnssec.sign(rrset, private, zone, dnskey, lifetime=3600)
        return [rrset, dns.rrset.from_rdata(rrset.name, rrset.ttl, rrsig)]

    def behaviour(
        self,
        *,
        forged: Mapping[str, Sequence[str]] | None = None,
        signatures: Literal["valid", "kept", "none", "regional"] = "valid",
    ) -> Behaviour:
        """Answer A, AAAA, DNSKEY and DS queries; `forged` addresses replace the zone's, with the
        genuine signature `kept` (a replayed signature), `none`, or signed by the zone itself
        (`regional`: another GeoDNS answer); signatures="none" alone strips them."""
        fakes = {_absolute(k): list(v) for k, v in (forged or {}).items()}

        async def behave(query: dns.message.Message, transport: Transport) -> list[bytes | float]:
            response = dns.message.make_response(query)
            q = query.question[0]
            want = bool(query.ednsflags & dns.flags.DO) and signatures != "none"
            if q.rdtype == dns.rdatatype.DNSKEY and q.name in self.zones:
                keys = dns.rrset.from_rdata(q.name, self.ttl, self._keys[q.name][1])
                response.answer.extend(self._signed(keys, q.name) if want else [keys])
            elif q.rdtype == dns.rdatatype.DS and q.name in self.zones and (parent := self._zone_of(q.name.parent())):
                ds = dns.rrset.from_rdata(q.name, self.ttl, dns.dnssec.make_ds(q.name, self._keys[q.name][1], "SHA256"))
                response.answer.extend(self._signed(ds, parent) if want else [ds])
            elif q.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) and (zone := self._zone_of(q.name)) is not None:
                name = _absolute(q.name.to_text())
                genuine = [a for a in self.zones[zone].get(name, []) if (":" in a) == (q.rdtype == dns.rdatatype.AAAA)]
                given = [a for a in fakes.get(name, genuine) if (":" in a) == (q.rdtype == dns.rdatatype.AAAA)]
                if name not in self.zones[zone] and name not in fakes:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                elif given:
                    rrset = dns.rrset.from_text_list(name, self.ttl, "IN", q.rdtype, given)
                    if want and signatures == "regional":
                        response.answer.extend(self._signed(rrset, zone))
                    elif want and genuine:
                        real = dns.rrset.from_text_list(name, self.ttl, "IN", q.rdtype, genuine)
                        rrsig = self._signed(real, zone)[1]
                        response.answer.extend([rrset, rrsig] if signatures == "kept" or name not in fakes else [rrset])
                    else:
                        response.answer.append(rrset)
            else:
                response.set_rcode(dns.rcode.REFUSED)
            return [_wire(response, transport)]

        return behave
