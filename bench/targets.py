"""The benchmark's own targets: HTTPS and HTTP/3 endpoints, a plain TCP port and a stats port, in one process.

    python -m bench.targets --host 127.0.0.1 --cert leaf.pem --key leaf.key

Prints one JSON line `{"https": PORT, "tcp": PORT, "stats": PORT, "h3": PORT}` once listening (h3: an
HTTP/3 endpoint on UDP, aioquic's server as `probe demo` runs it), then serves
until SIGTERM or --max-seconds. Raw asyncio protocols on uvloop (when installed), no web
framework: the server's CPU per connection must stay far below either client's, and the
benchmark measures it separately to show it. Every HTTPS connection is a fresh TLS handshake;
the server sends no session tickets, so neither client could resume a session even if it tried.

`GET /` answers `pong`; `GET /slow?ms=N` answers after N ms (to keep probes in flight).
The stats port answers every connection with one JSON line of counters and closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
from urllib.parse import parse_qs, urlsplit

from probe.demo.h3 import start_h3

PONG = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 4\r\nConnection: close\r\n\r\npong"
BACKLOG = 4096


class Counters:
    """What the server saw; the stats port reports it."""

    def __init__(self) -> None:
        self.tcp = 0
        self.https = 0
        self.requests = 0
        self.open = 0
        self.max_open = 0

    def opened(self) -> None:
        self.open += 1
        self.max_open = max(self.max_open, self.open)

    def to_json(self) -> bytes:
        return json.dumps(
            {"tcp": self.tcp, "https": self.https, "requests": self.requests, "open": self.open,
             "max_open": self.max_open}
        ).encode() + b"\n"


class HttpsHandler(asyncio.Protocol):
    """Read one request head, answer it (now, or after ?ms=N), close."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport
        self.counters.https += 1
        self.counters.opened()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.answered or b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > 65536 and self.transport is not None:
                self.transport.abort()
            return
        self.answered = True
        self.counters.requests += 1
        line = self.buffer.split(b"\r\n", 1)[0].split()
        delay = 0.0
        if len(line) >= 2 and line[1].startswith(b"/slow"):
            ms = parse_qs(urlsplit(line[1].decode("latin-1")).query).get("ms", ["0"])[0]
            delay = float(ms) / 1000.0
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._answer)
        else:
            self._answer()

    def _answer(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(PONG)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.counters.open -= 1


class TcpHandler(asyncio.Protocol):
    """Count the connection and close it: a TCP connect probe needs nothing more."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.counters.tcp += 1
        transport.close()


class StatsHandler(asyncio.Protocol):
    def __init__(self, counters: Counters) -> None:
        self.counters = counters

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.counters.to_json())  # type: ignore[attr-defined]
        transport.close()


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """Return the HTTPS context: the leaf certificate, no session tickets (no resumption)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0  # TLS 1.3: send no tickets at all
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    counters = Counters()
    tls = server_context(args.cert, args.key)
    https = await loop.create_server(
        lambda: HttpsHandler(counters), args.host, args.https_port, ssl=tls, backlog=BACKLOG,
        ssl_handshake_timeout=30,
    )
    tcp = await loop.create_server(lambda: TcpHandler(counters), args.host, args.tcp_port, backlog=BACKLOG)
    stats = await loop.create_server(lambda: StatsHandler(counters), args.host, 0)
    h3, h3_port = await start_h3(args.host, 0, args.cert, args.key)  # HTTP/3: GET / answers 404, /api/ping pong
    ports = {
        "https": https.sockets[0].getsockname()[1],
        "tcp": tcp.sockets[0].getsockname()[1],
        "stats": stats.sockets[0].getsockname()[1],
        "h3": h3_port,
    }
    print(json.dumps(ports), flush=True)
    try:
        await asyncio.wait_for(stop.wait(), args.max_seconds)
    except TimeoutError:
        pass
    for server in (https, tcp, stats):
        server.close()
    h3.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.targets")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--https-port", type=int, default=0)
    parser.add_argument("--tcp-port", type=int, default=0)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="exit by itself after this long")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
