"""The demo border for QUIC: a UDP relay that filters by the SNI of QUIC Initials, as the GFW does.

It decrypts each client Initial (probe.demo.quic_sni), and when the name is on its list it
drops the datagram and then every datagram from that client address to this port for the
residual window, from any client port: no reset, no ICMP, only a handshake that times out.
Like the GFW it inspects only datagrams whose source port is above their destination port.
Other datagrams are relayed to the real server through one upstream socket per client.
"""

from __future__ import annotations

import asyncio
import errno
import random
import time
from collections.abc import Callable
from typing import cast

from probe.demo.quic_sni import initial_sni

HOST = "127.0.0.1"
LOW_PORTS = (20000, 32000)  # below Linux's ephemeral range (32768-60999), where clients' ports come from
MAX_FLOWS = 1024  # client addresses relayed at once; the oldest is dropped beyond this


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, back: Callable[[bytes], None]) -> None:
        self.back = back
        self.transport: asyncio.DatagramTransport | None = None
        self.used = time.monotonic()
        self.queue: list[bytes] = []  # datagrams that came before the upstream socket was open

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        for data in self.queue:
            self.transport.sendto(data)
        self.queue.clear()

    def send(self, data: bytes) -> None:
        self.used = time.monotonic()
        if self.transport is None:
            self.queue.append(data)
        else:
            self.transport.sendto(data)

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.used = time.monotonic()
        self.back(data)


class QuicMiddlebox(asyncio.DatagramProtocol):
    """Relay UDP to (HOST, server_port), dropping QUIC by SNI with residual blocking of the client address."""

    def __init__(self, server_port: int, blocked_names: set[str], residual: float = 180.0) -> None:
        self.server_port = server_port
        self.blocked_names = blocked_names
        self.residual = residual
        self.port = 0
        self.triggered: list[tuple[str, str]] = []  # (client address, name) that fired the filter
        self._blocked_until: dict[str, float] = {}
        self._flows: dict[tuple[str, int], _Upstream] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: set[asyncio.Future[tuple[asyncio.DatagramTransport, _Upstream]]] = set()

    async def start(self) -> None:
        """Listen on a free UDP port of HOST below the ephemeral range, so clients' ports are the higher ones."""
        loop = asyncio.get_running_loop()
        for _ in range(100):
            port = random.randrange(LOW_PORTS[0], LOW_PORTS[1])
            try:
                transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(HOST, port))
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                continue
            self.port = transport.get_extra_info("sockname")[1]
            return
        raise OSError(errno.EADDRINUSE, "no free UDP port below the ephemeral range")

    def close(self) -> None:
        """Stop relaying."""
        for flow in self._flows.values():
            if flow.transport is not None:
                flow.transport.close()
        self._flows.clear()
        if self._transport is not None:
            self._transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        client_ip, client_port = addr[0], addr[1]
        now = time.monotonic()
        if self._blocked_until.get(client_ip, 0.0) > now:
            return  # residual blocking: the whole (client, server, port) triple, any client port
        if client_port > self.port:  # the GFW inspects only datagrams whose source port is the higher one
            name = initial_sni(data)
            if name is not None and name in self.blocked_names:
                self._blocked_until[client_ip] = now + self.residual
                self.triggered.append((client_ip, name))
                return
        flow = self._flows.get(addr)
        if flow is None:
            flow = self._open_flow(addr)
        flow.send(data)

    def _open_flow(self, addr: tuple[str, int]) -> _Upstream:
        if len(self._flows) >= MAX_FLOWS:
            oldest = min(self._flows, key=lambda a: self._flows[a].used)
            stale = self._flows.pop(oldest)
            if stale.transport is not None:
                stale.transport.close()

        def back(data: bytes) -> None:
            if self._transport is not None and self._blocked_until.get(addr[0], 0.0) <= time.monotonic():
                self._transport.sendto(data, addr)

        flow = _Upstream(back)
        self._flows[addr] = flow
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(
            loop.create_datagram_endpoint(lambda: flow, remote_addr=(HOST, self.server_port))
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return flow
