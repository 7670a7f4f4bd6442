"""dial.Connection on real loopback sockets: bounded buffering, ends of stream, TLS through memory buffers."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from pathlib import Path

import pytest

from probe.config import Route
from probe.net import dial
from probe.trace import Trace
from tests.servers import Pki, raw_server

DIRECT = Route(name="direct")
FLOOD = b"x" * (1 << 20)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def client_context(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca_file))


async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    for _ in range(16):  # 16 MiB, far more than the kernel's buffers hold
        writer.write(FLOOD)
        await writer.drain()


async def flood_after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readexactly(4)
    await flood(reader, writer)


async def held_until_read(conn: dial.Connection) -> int:
    """Let a flooding peer send for a while without reading; return the most bytes held at once."""
    most = 0
    for _ in range(40):
        await asyncio.sleep(0.01)
        most = max(most, conn.pending)
    return most


async def test_a_peer_flooding_an_idle_connection_is_held_back_at_the_limit() -> None:
    async with raw_server(flood) as port:
        conn = await dial.connect("127.0.0.1", port, DIRECT, Trace())
        try:
            most = await held_until_read(conn)
            assert 0 < most <= dial.STREAM_LIMIT + 256 * 1024  # the limit, plus at most one read of the loop's
            got = 0
            while got < 4 * len(FLOOD):  # reading resumes the flow
                got += len(await conn.read(65536))
        finally:
            dial.close(conn)


async def test_a_peer_flooding_through_tls_is_held_back_at_the_limit(pki: Pki) -> None:
    async with raw_server(flood_after_request, pki.server_context()) as port:
        conn = await dial.connect("127.0.0.1", port, DIRECT, Trace())
        try:
            await conn.start_tls(client_context(pki), "localhost")
            conn.write(b"GET\n")
            most = await held_until_read(conn)
            assert 0 < most <= dial.STREAM_LIMIT + 256 * 1024
            got = 0
            while got < 4 * len(FLOOD):
                got += len(await conn.read(65536))
        finally:
            dial.close(conn)


async def echo_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.readexactly(5))
    await writer.drain()
    writer.close()


async def read_all(conn: dial.Connection) -> bytes:
    chunks = []
    while data := await conn.read(3):
        chunks.append(data)
    return b"".join(chunks)


async def test_plain_reads_return_everything_then_the_end() -> None:
    async with raw_server(echo_once) as port:
        conn = await dial.connect("127.0.0.1", port, DIRECT, Trace())
        conn.write(b"hello")
        assert await read_all(conn) == b"hello"
        assert await conn.read(10) == b""  # the end stays the end
        dial.close(conn)


async def test_tls_reads_return_everything_then_the_end(pki: Pki) -> None:
    async with raw_server(echo_once, pki.server_context()) as port:
        conn = await dial.connect("127.0.0.1", port, DIRECT, Trace())
        await conn.start_tls(client_context(pki), "localhost")
        assert conn.ssl_object is not None and conn.ssl_object.version() in {"TLSv1.2", "TLSv1.3"}
        conn.write(b"hello")
        assert await read_all(conn) == b"hello"
        dial.close(conn)


async def test_a_reset_during_the_handshake_is_a_connection_reset(pki: Pki) -> None:
    async def reset_after_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the ClientHello has begun
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST

    async with raw_server(reset_after_hello) as port:
        conn = await dial.connect("127.0.0.1", port, DIRECT, Trace())
        with pytest.raises(ConnectionResetError):
            await conn.start_tls(client_context(pki), "localhost")
        dial.close(conn)


async def test_a_close_during_the_handshake_is_an_eof_not_a_hang(pki: Pki) -> None:
    async def close_after_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    async with raw_server(close_after_hello) as port:
        conn = await dial.connect("127.0.0.1", port, DIRECT, Trace())
        with pytest.raises((ssl.SSLEOFError, ConnectionResetError)):
            await asyncio.wait_for(conn.start_tls(client_context(pki), "localhost"), 5)
        dial.close(conn)


async def test_a_wrong_certificate_fails_verification(pki: Pki, tmp_path: Path) -> None:
    other = Pki(tmp_path)  # a CA the client does not trust
    async with raw_server(echo_once, other.server_context()) as port:
        conn = await dial.connect("127.0.0.1", port, DIRECT, Trace())
        with pytest.raises(ssl.SSLCertVerificationError):
            await conn.start_tls(client_context(pki), "localhost")
        dial.close(conn)
