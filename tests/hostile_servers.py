"""Loopback servers and DNS behaviours that misbehave on purpose, for tests/test_hostile.py.

The stream handlers plug into tests.servers.raw_server; the DNS behaviours into
tests.dnsserver.DnsServer. Each is named after what a hostile peer or middlebox does.
"""

from __future__ import annotations

import asyncio
import os
import struct

import dns.message
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from tests.dnsserver import Behaviour, Transport, _wire

HEAD_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
CHUNK = b"x" * 65536


async def _request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def endless_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer 200 with no length and a body that never ends, as fast as the client reads."""
    await _request(reader)
    writer.write(HEAD_OK + b"Connection: close\r\n\r\n")
    while True:
        writer.write(CHUNK)
        await writer.drain()


async def endless_chunked_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer 200 chunked, with chunks that never stop coming."""
    await _request(reader)
    writer.write(HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"%x\r\n" % len(CHUNK) + CHUNK + b"\r\n"
    while True:
        writer.write(piece)
        await writer.drain()


async def one_byte_chunks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer 200 chunked, with 1-byte chunks that never stop coming, as fast as the client reads."""
    await _request(reader)
    writer.write(HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b"1\r\nx\r\n" * 10000
    while True:
        writer.write(piece)
        await writer.drain()


async def endless_chunk_size(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer 200 chunked, then a chunk-size line that never ends."""
    await _request(reader)
    writer.write(HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n")
    while True:
        writer.write(b"f" * 65536)
        await writer.drain()


async def trickled_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Promise 1000 body bytes, then send one a second."""
    await _request(reader)
    writer.write(HEAD_OK + b"Content-Length: 1000\r\n\r\n")
    while True:
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(1)


async def endless_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send a status line, then header lines that never end, as fast as the client reads."""
    await _request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\n")
    line = b"X-Filler: " + b"y" * 1000 + b"\r\n"
    while True:
        writer.write(line * 64)
        await writer.drain()


async def trickled_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send header lines one a second, never the blank line that ends the head."""
    await _request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\n")
    for i in range(3600):
        writer.write(b"X-Slow-%d: 1\r\n" % i)
        await writer.drain()
        await asyncio.sleep(1)


async def huge_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Send one header line of 8 MiB (then a proper end and body)."""
    await _request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nX-Huge: ")
    for _ in range(128):
        writer.write(CHUNK)
        await writer.drain()
    writer.write(b"\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()


async def redirect_loop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Redirect /a to /b and everything else to /a."""
    head = await _request(reader)
    where = b"/b" if head.startswith(b"GET /a ") else b"/a"
    writer.write(b"HTTP/1.1 302 Found\r\nLocation: " + where + b"\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()


async def redirect_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Redirect /n to /n+1: no loop, just no end."""
    head = await _request(reader)
    path = head.split(b" ", 2)[1]
    n = int(path.strip(b"/") or b"0") + 1
    writer.write(b"HTTP/1.1 301 Moved\r\nLocation: /%d\r\nContent-Length: 0\r\n\r\n" % n)
    await writer.drain()


async def tls_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer the ClientHello with random bytes."""
    await reader.read(5)
    writer.write(os.urandom(4096))
    await writer.drain()
    await asyncio.sleep(3600)


async def tls_stall_mid_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer the ClientHello with the start of a ServerHello record (promising 2000 bytes), then stall."""
    await reader.read(5)
    writer.write(b"\x16\x03\x03" + struct.pack("!H", 2000) + b"\x02\x00\x07\xcc\x03\x03")
    await writer.drain()
    await asyncio.sleep(3600)


async def never_relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A proxy that accepts the connection, reads what it is told, and never answers."""
    while await reader.read(4096):
        pass


async def connect_then_never_relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An HTTP proxy that says `200 Connection established`, then relays nothing either way."""
    await _request(reader)
    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await writer.drain()
    while await reader.read(4096):
        pass


# --- DNS ------------------------------------------------------------------------------


def _reply(query: dns.message.Message) -> dns.message.Message:
    response = dns.message.make_response(query)
    q = query.question[0]
    if q.rdtype == dns.rdatatype.A:
        response.answer.append(dns.rrset.from_text(q.name, 60, "IN", "A", "198.51.100.7"))
    return response


def malformed() -> Behaviour:
    """Reply with the query's ID and flags, then random bytes."""

    async def behave(query: dns.message.Message, transport: Transport) -> list[bytes]:
        return [struct.pack("!HH", query.id, 0x8180) + os.urandom(40)]

    return behave


def wrong_id() -> Behaviour:
    """Reply correctly, but under another ID."""

    async def behave(query: dns.message.Message, transport: Transport) -> list[bytes]:
        response = _reply(query)
        response.id = (query.id + 1) % 65536
        return [_wire(response, transport)]

    return behave


def wrong_question() -> Behaviour:
    """Reply with the right ID to a question that was not asked."""

    async def behave(query: dns.message.Message, transport: Transport) -> list[bytes]:
        other = dns.message.make_query("other.example.", query.question[0].rdtype)
        other.id = query.id
        response = _reply(other)
        return [_wire(response, transport)]

    return behave


def compression_loop() -> Behaviour:
    """Reply with an answer whose owner name is a compression pointer to itself."""

    async def behave(query: dns.message.Message, transport: Transport) -> list[bytes]:
        q = query.question[0]
        question = q.name.to_wire() + struct.pack("!HH", q.rdtype, 1)
        header = struct.pack("!HHHHHH", query.id, 0x8180, 1, 1, 0, 0)
        offset = 12 + len(question)
        pointer = struct.pack("!H", 0xC000 | offset)  # points at itself
        record = pointer + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([198, 51, 100, 7])
        return [header + question + record]

    return behave


def thousands_of_records(name: str = "storage.example", count: int = 3000) -> Behaviour:
    """Answer `name` with `count` A records (about 48 kB, one UDP datagram), built up front, under each query's ID."""
    built: dict[int, bytes] = {}
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        response = dns.message.make_response(dns.message.make_query(name, rdtype, use_edns=0, payload=65535))
        if rdtype == dns.rdatatype.A:
            addresses = [f"198.51.{100 + i // 250}.{i % 250 + 1}" for i in range(count)]
            response.answer.append(dns.rrset.from_text_list(name + ".", 60, dns.rdataclass.IN, "A", addresses))
        built[rdtype] = response.to_wire(max_size=65535, want_shuffle=False)

    async def behave(query: dns.message.Message, transport: Transport) -> list[bytes]:
        return [struct.pack("!H", query.id) + built[query.question[0].rdtype][2:]]

    return behave


def flood(copies: int = 2000) -> Behaviour:
    """Send `copies` identical genuine replies to every query."""

    async def behave(query: dns.message.Message, transport: Transport) -> list[bytes]:
        return [_wire(_reply(query), transport)] * copies

    return behave
