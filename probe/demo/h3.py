"""The demo's HTTP/3 storage endpoint (also the interference lab's): aioquic's server.

Answers GET /api/ping with "pong" and anything else with 404, as the TCP storage app does.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import QuicEvent

from probe.demo.border import DATA_DIR, HOST


class _Storage(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._h3: H3Connection | None = None

    def quic_event_received(self, event: QuicEvent) -> None:
        if self._h3 is None:
            self._h3 = H3Connection(self._quic)
        for h3_event in self._h3.handle_event(event):
            if isinstance(h3_event, HeadersReceived):
                self._answer(h3_event)

    def _answer(self, event: HeadersReceived) -> None:
        assert self._h3 is not None
        path = dict(event.headers).get(b":path", b"")
        status, body = (b"200", b"pong") if path == b"/api/ping" else (b"404", b"not found")
        self._h3.send_headers(event.stream_id, [(b":status", status), (b"content-type", b"text/plain"),
                                                (b"content-length", str(len(body)).encode())])
        self._h3.send_data(event.stream_id, body, end_stream=True)
        self.transmit()


async def start_h3(
    host: str = HOST, port: int = 0, cert: str | Path = DATA_DIR / "server.pem",
    key: str | Path = DATA_DIR / "server.key",
) -> tuple[QuicServer, int]:
    """Serve HTTP/3 on (host, port), port 0 for a free one; return the server and its port."""
    config = QuicConfiguration(is_client=False, alpn_protocols=list(H3_ALPN))
    config.load_cert_chain(cert, key)
    if port == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # serve() takes a port: find a free one
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = await serve(host, port, configuration=config, create_protocol=_Storage)
    return server, port
