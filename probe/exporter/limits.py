"""The listener's limits: a cap on open connections, and how long a client may idle or stall.

aiohttp has no connection cap of its own. `CappedSite` is a TCPSite whose protocol factory
counts open connections and answers one over the cap with `503` and a close, so silent
clients cannot exhaust the process's file descriptors (which once made every probe `error`).
Its `keepalive_timeout` closes a connection that has sent no complete request head within
`header_timeout`, at its start (aiohttp >= 3.10 starts the timer there) or after a response.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web

DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_WRITE_TIMEOUT = 30.0
DEFAULT_PROBE_REUSE = 1.0
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 22\r\nConnection: close\r\n\r\ntoo many connections\r\n"


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """What `probe run` allows its HTTP clients (flags --web.max-connections, --web.header-timeout, ...)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT  # no complete request head in this long: closed
    write_timeout: float = DEFAULT_WRITE_TIMEOUT  # a response chunk not taken in this long: aborted
    probe_reuse: float = DEFAULT_PROBE_REUSE  # /probe answers with results younger than this


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted while it is open."""

    def __init__(self, inner: asyncio.Protocol, cap: ConnectionCap) -> None:
        self._inner = inner
        self._cap = cap

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cap.open -= 1
        self._inner.connection_lost(exc)


class _Busy(asyncio.Protocol):
    """A connection over the cap: told so, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = cast(asyncio.WriteTransport, transport)  # uvloop's transports are not asyncio's classes
        writer.write(_BUSY)
        writer.close()


class ConnectionCap:
    """A protocol factory that hands out aiohttp's protocol while fewer than `limit` connections are open."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], limit: int) -> None:
        self._factory = factory
        self.limit = limit
        self.open = 0
        self.refused = 0

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.limit:
            self.refused += 1
            return _Busy()
        self.open += 1
        return _Counted(self._factory(), self)


class CappedSite(web.TCPSite):
    """A TCPSite whose connections are counted and capped (see ConnectionCap)."""

    __slots__ = ("cap", "_limit")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, max_connections: int, **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self._limit = max_connections
        self.cap: ConnectionCap | None = None

    async def start(self) -> None:
        """Listen, like TCPSite.start, with the capped protocol factory."""
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self.cap = ConnectionCap(server, self._limit)
        # The same call as TCPSite.start, but with our factory; aiohttp keeps these in private slots.
        self._server = await asyncio.get_running_loop().create_server(
            self.cap, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            reuse_address=self._reuse_address, reuse_port=self._reuse_port,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port


async def write_within(resp: web.StreamResponse, request: web.Request, data: bytes, timeout: float) -> bool:
    """Write `data`; if the client does not take it within `timeout`, drop the connection and return False."""
    try:
        async with asyncio.timeout(timeout):
            await resp.write(data)
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()  # a client that never reads must not pin the response's memory
        return False
    return True
