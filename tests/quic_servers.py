"""Real QUIC peers on loopback: an aioquic HTTP/3 server, and raw UDP servers that misbehave on purpose.

Each is an async context manager yielding its UDP port on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import cast

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import serve
from aioquic.buffer import Buffer
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent
from aioquic.quic.packet import (
    QuicProtocolVersion,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)

from tests.servers import Pki


@dataclass(frozen=True)
class Answer:
    """What the HTTP/3 server does with a request."""

    status: int = 200
    body: bytes = b"pong from storage"
    headers: tuple[tuple[str, str], ...] = (("content-type", "text/plain"),)
    delay: float = 0.0  # before the response head
    reset: bool = False  # RESET_STREAM instead of an answer
    silent: bool = False  # never answer


Handler = Callable[[str, str, dict[str, str]], Answer | Awaitable[Answer]]


@dataclass
class Seen:
    """What the server saw: requests (method, path, headers) and handshakes' SNI."""

    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)


class _H3Server(QuicConnectionProtocol):
    handler: Handler
    seen: Seen

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._h3: H3Connection | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def quic_event_received(self, event: QuicEvent) -> None:
        if self._h3 is None:
            self._h3 = H3Connection(self._quic)
        for h3_event in self._h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                task = asyncio.ensure_future(self._answer(h3_event))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _answer(self, event: HeadersReceived) -> None:
        head = {k.decode(): v.decode() for k, v in event.headers}
        method, path = head.get(":method", ""), head.get(":path", "")
        self.seen.requests.append((method, path, head))
        answer = self.handler(method, path, head)
        if not isinstance(answer, Answer):
            answer = await answer
        if answer.delay:
            await asyncio.sleep(answer.delay)
        assert self._h3 is not None
        if answer.silent:
            return
        if answer.reset:
            self._quic.reset_stream(event.stream_id, 0x10C)  # H3_REQUEST_CANCELLED
            self.transmit()
            return
        headers = [(b":status", str(answer.status).encode())]
        headers += [(k.encode(), v.encode()) for k, v in answer.headers]
        headers.append((b"content-length", str(len(answer.body)).encode()))
        self._h3.send_headers(event.stream_id, headers)
        for offset in range(0, len(answer.body), 16384):
            chunk = answer.body[offset : offset + 16384]
            self._h3.send_data(event.stream_id, chunk, end_stream=offset + 16384 >= len(answer.body))
            self.transmit()
            await asyncio.sleep(0)
        if not answer.body:
            self._h3.send_data(event.stream_id, b"", end_stream=True)
        self.transmit()


def _ok(method: str, path: str, headers: dict[str, str]) -> Answer:
    if path.startswith("/blob"):
        return Answer(body=b"x" * 262144)
    return Answer()


@asynccontextmanager
async def h3_server(
    pki: Pki, handler: Handler = _ok, names: tuple[str, ...] = ("localhost", "127.0.0.1"), host: str = "127.0.0.1",
    port: int = 0, seen: Seen | None = None,
) -> AsyncIterator[int]:
    """Serve HTTP/3 with aioquic on (host, port) with a certificate for `names` from `pki`; yield the port."""
    config = QuicConfiguration(is_client=False, alpn_protocols=list(H3_ALPN), max_datagram_frame_size=65536)
    with tempfile.TemporaryDirectory() as tmp:
        cert = pki.ca.issue_cert(*names)
        cert_file, key_file = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        cert.cert_chain_pems[0].write_to_path(cert_file)
        cert.private_key_pem.write_to_path(key_file)
        config.load_cert_chain(cert_file, key_file)
    protocol = type("H3", (_H3Server,), {"handler": staticmethod(handler), "seen": seen or Seen()})
    if port == 0:
        port = free_udp_port(host)
    server = await serve(host, port, configuration=config, create_protocol=protocol)
    try:
        yield port
    finally:
        server.close()


def free_udp_port(host: str = "127.0.0.1") -> int:
    """Return a UDP port free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


RawHandler = Callable[[bytes, tuple[str, int], asyncio.DatagramTransport], None]


class _Raw(asyncio.DatagramProtocol):
    def __init__(self, handler: RawHandler) -> None:
        self.handler = handler
        self.transport: asyncio.DatagramTransport | None = None
        self.received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1
        assert self.transport is not None
        self.handler(data, addr, self.transport)


@asynccontextmanager
async def raw_udp(handler: RawHandler) -> AsyncIterator[int]:
    """Answer every datagram with `handler`; yield the port."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: _Raw(handler), local_addr=("127.0.0.1", 0))
    try:
        yield transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


def _initial(data: bytes) -> tuple[bytes, bytes, int] | None:
    """Return (client's source CID, destination CID, version) of a long-header packet, else None."""
    try:
        header = pull_quic_header(Buffer(data=data), host_cid_length=8)
    except ValueError:
        return None
    if header.version is None:
        return None
    return header.source_cid, header.destination_cid, header.version


def garbage(data: bytes, addr: tuple[str, int], transport: asyncio.DatagramTransport) -> None:
    """Answer each datagram with three datagrams of random bytes."""
    for _ in range(3):
        transport.sendto(os.urandom(1200), addr)


def endless_retry(data: bytes, addr: tuple[str, int], transport: asyncio.DatagramTransport) -> None:
    """Answer every Initial with a fresh Retry (a client may follow only one)."""
    found = _initial(data)
    if found is None:
        return
    scid, dcid, version = found
    transport.sendto(
        encode_quic_retry(version, source_cid=os.urandom(8), destination_cid=scid, original_destination_cid=dcid,
                          retry_token=os.urandom(32)),
        addr,
    )


def endless_version_negotiation(data: bytes, addr: tuple[str, int], transport: asyncio.DatagramTransport) -> None:
    """Answer every packet with a Version Negotiation listing only versions nobody speaks."""
    found = _initial(data)
    if found is None:
        return
    scid, dcid, _ = found
    transport.sendto(
        encode_quic_version_negotiation(source_cid=dcid, destination_cid=scid, supported_versions=[0x1A2A3A4A]),
        addr,
    )


def version_negotiation_with_ours(data: bytes, addr: tuple[str, int], transport: asyncio.DatagramTransport) -> None:
    """Answer with Version Negotiation packets that list the client's own version (RFC 9368: ignored)."""
    found = _initial(data)
    if found is None:
        return
    scid, dcid, _ = found
    for _ in range(50):
        transport.sendto(
            encode_quic_version_negotiation(
                source_cid=dcid, destination_cid=scid, supported_versions=[QuicProtocolVersion.VERSION_1]
            ),
            addr,
        )


def flood(data: bytes, addr: tuple[str, int], transport: asyncio.DatagramTransport) -> None:
    """Answer each datagram with 200 datagrams of 1,400 random bytes."""
    blob = os.urandom(1400)
    for _ in range(200):
        transport.sendto(blob, addr)
