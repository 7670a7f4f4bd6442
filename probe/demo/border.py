"""The simulated border of `probe demo`: servers abroad, and a middlebox in front of them, all on loopback.

Every connection of the monitor crosses a `Middlebox`: it reads the client's first bytes (the
TLS ClientHello, the HTTP request head, or the proxy's CONNECT line), looks at the name in
them, and then resets, stalls, answers a block page, throttles, or relays to the real server,
as the Great Firewall does by SNI and Host. DNS goes to a resolver path that forges some
answers (probe/demodns.py).
No root and no namespaces: what a newcomer can run anywhere, to see every outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from aiohttp import web

from probe.config import is_ip

HOST = "127.0.0.1"
FIRST_BYTES_LIMIT = 16 * 1024
CONNECTION_LIMIT_SECONDS = 120.0  # no demo connection lives longer
RELAY_CHUNK = 16 * 1024
BLOCK_PAGE = (
    b"<html><head><title>Notice</title></head><body><h1>This site cannot be reached</h1>"
    b"<p>According to relevant laws and regulations, this page is not available.</p></body></html>"
)
MIB = 1024 * 1024
DATA_DIR = Path(__file__).parent.parent / "data" / "demo"


class Action(StrEnum):
    """What the middlebox does to a connection, decided by the name in its first bytes."""

    RELAY = "relay"
    RESET = "reset"  # a TCP RST to the client
    STALL = "stall"  # swallow everything, answer nothing
    BLOCK_PAGE = "block page"  # answer with a 200 block page instead of the server
    THROTTLE = "throttle"  # relay, but the server's bytes at a trickle


class Inspect(StrEnum):
    """Which name the middlebox reads from a connection's first bytes."""

    SNI = "TLS SNI"
    HOST = "HTTP Host"
    CONNECT = "HTTP CONNECT"


# ---- the servers abroad -------------------------------------------------------------------


def storage_app() -> web.Application:
    """Return the storage endpoint: /api/ping (pong), /probe/1MiB.bin, and /slow (never answers)."""

    async def ping(request: web.Request) -> web.Response:
        return web.Response(text="pong")

    async def blob(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = MIB
        await resp.prepare(request)
        chunk = b"\0" * RELAY_CHUNK
        for _ in range(MIB // RELAY_CHUNK):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(CONNECTION_LIMIT_SECONDS)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/api/ping", ping)
    app.router.add_get("/probe/1MiB.bin", blob)
    app.router.add_get("/slow", slow)
    return app


def server_tls(stem: str) -> ssl.SSLContext:
    """Return a server context with the shipped demo certificate `stem` (server or interceptor)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(DATA_DIR / f"{stem}.pem", DATA_DIR / f"{stem}.key")
    return ctx


# ---- the middlebox -------------------------------------------------------------------------


@dataclass
class Connections:
    """The open connections of one server, so that closing it ends them without cancelling handlers.

    (Python 3.11's start_server logs a cancelled connection handler as an error.)
    """

    open: dict[asyncio.Task[Any], asyncio.StreamWriter] = field(default_factory=dict)

    def add(self, writer: asyncio.StreamWriter) -> None:
        """Track the connection of the running handler."""
        task = asyncio.current_task()
        if task is not None:
            self.open[task] = writer

    def remove(self) -> None:
        """Forget the connection of the running handler."""
        task = asyncio.current_task()
        if task is not None:
            self.open.pop(task, None)

    async def close(self) -> None:
        """Abort every connection and give the handlers a moment to return."""
        for writer in self.open.values():
            writer.transport.abort()
        if self.open:
            _, late = await asyncio.wait(list(self.open), timeout=2.0)
            for task in late:  # stuck beyond an aborted socket: should not happen
                task.cancel()


@dataclass(kw_only=True)
class _Listener:
    """A loopback server on a free port whose connections all end when it closes."""

    port: int = 0
    _server: asyncio.Server | None = None
    _connections: Connections = field(default_factory=Connections)

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and end every connection."""
        if self._server is not None:
            self._server.close()
        await self._connections.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


@dataclass
class Middlebox(_Listener):
    """A TCP relay in front of `upstream` that acts on the name it reads from the first bytes."""

    inspect: Inspect
    upstream: int  # port on HOST
    rules: Mapping[str, Action]
    throttle_bytes_per_second: float = 64 * 1024

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            async with asyncio.timeout(CONNECTION_LIMIT_SECONDS):
                first = await self._first_bytes(reader)
                action = self.rules.get(self._name(first) or "", Action.RELAY)
                await self._act(action, first, reader, writer)
        except (OSError, EOFError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the monitor hung up or timed out: that is what it is here to see
        finally:
            writer.transport.abort()
            self._connections.remove()

    async def _first_bytes(self, reader: asyncio.StreamReader) -> bytes:
        if self.inspect is Inspect.SNI:
            header = await reader.readexactly(5)
            length = struct.unpack("!H", header[3:5])[0]
            return header + await reader.readexactly(min(length, FIRST_BYTES_LIMIT))
        return await reader.readuntil(b"\r\n\r\n")

    def _name(self, first: bytes) -> str | None:
        if self.inspect is Inspect.SNI:
            return client_hello_sni(first)
        head = first.decode("latin-1")
        if self.inspect is Inspect.CONNECT:
            parts = head.split(" ", 2)
            return parts[1].rpartition(":")[0].lower() if len(parts) > 1 and parts[0] == "CONNECT" else None
        for line in head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == "host":
                return value.strip().rpartition(":")[0].lower() if ":" in value.strip() else value.strip().lower()
        return None

    async def _act(self, action: Action, first: bytes, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> None:
        if action is Action.RESET:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends RST
            return
        if action is Action.STALL:
            while await reader.read(RELAY_CHUNK):
                pass
            return
        if action is Action.BLOCK_PAGE:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nConnection: close\r\n"
                         + f"Content-Length: {len(BLOCK_PAGE)}\r\n\r\n".encode() + BLOCK_PAGE)
            await writer.drain()
            return
        up_reader, up_writer = await asyncio.open_connection(HOST, self.upstream)
        try:
            up_writer.write(first)
            rate = self.throttle_bytes_per_second if action is Action.THROTTLE else None
            await relay(reader, writer, up_reader, up_writer, rate)
        finally:
            up_writer.transport.abort()


def client_hello_sni(record: bytes) -> str | None:
    """Return the server name of a TLS ClientHello record (RFC 8446 4.1.2, RFC 6066 3), or None."""
    try:
        if record[0] != 0x16 or record[5] != 0x01:  # handshake record, ClientHello
            return None
        p = 5 + 4 + 2 + 32  # record header, handshake header, legacy_version, random
        p += 1 + record[p]  # legacy_session_id
        p += 2 + int.from_bytes(record[p:p + 2], "big")  # cipher_suites
        p += 1 + record[p]  # legacy_compression_methods
        end = p + 2 + int.from_bytes(record[p:p + 2], "big")
        p += 2
        while p + 4 <= min(end, len(record)):
            kind, size = int.from_bytes(record[p:p + 2], "big"), int.from_bytes(record[p + 2:p + 4], "big")
            p += 4
            if kind == 0:  # server_name: list length (2), name type (1), name length (2), name
                length = int.from_bytes(record[p + 3:p + 5], "big")
                return record[p + 5:p + 5 + length].decode("ascii").lower()
            p += size
    except (IndexError, UnicodeDecodeError):
        return None
    return None


async def relay(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter, rate: float | None,
) -> None:
    """Copy both ways until either side closes; the server's bytes at most `rate` bytes/s."""

    async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, limit: float | None) -> None:
        size = RELAY_CHUNK if limit is None else max(1, min(RELAY_CHUNK, int(limit / 20)))
        while data := await src.read(size):
            dst.write(data)
            await dst.drain()
            if limit is not None:
                await asyncio.sleep(len(data) / limit)

    tasks = [asyncio.create_task(copy(reader, up_writer, None)), asyncio.create_task(copy(up_reader, writer, rate))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for r in results:
        if isinstance(r, Exception) and not isinstance(r, OSError):
            raise r


# ---- a proxy abroad (HTTP CONNECT) ---------------------------------------------------------


@dataclass
class ConnectProxy(_Listener):
    """An HTTP CONNECT proxy beyond the border: it resolves names itself and reaches servers directly.

    `ports` maps the port a client asks for (the middlebox in front of a server) to the
    server's own port, since the proxy's path does not cross the border.
    """

    zone: Mapping[str, str]
    ports: Mapping[int, int]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            async with asyncio.timeout(CONNECTION_LIMIT_SECONDS):
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                method, _, rest = head.partition(" ")
                host, _, port_text = rest.partition(" ")[0].rpartition(":")
                address = self.zone.get(host.lower()) or (host if is_ip(host) else None)
                if method != "CONNECT" or address is None or not port_text.isdigit():
                    writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                    return
                port = int(port_text)
                up_reader, up_writer = await asyncio.open_connection(address, self.ports.get(port, port))
                try:
                    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    await relay(reader, writer, up_reader, up_writer, None)
                finally:
                    up_writer.transport.abort()
        except (OSError, EOFError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.transport.abort()
            self._connections.remove()


# ---- ports that refuse or black-hole -------------------------------------------------------


class Blackhole:
    """A port whose SYNs go unanswered: a listener that never accepts, its queue kept full.

    Linux drops a SYN for a listener whose accept queue is full, which on loopback is the
    closest thing to a path that drops packets, without root.
    """

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(0)
        self.port: int = self.listener.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(2):  # backlog 0 still queues one connection; the second makes sure
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((HOST, self.port))
            self.fillers.append(s)

    def close(self) -> None:
        """Release the sockets."""
        for s in [*self.fillers, self.listener]:
            s.close()


def closed_port() -> int:
    """Return a loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])
