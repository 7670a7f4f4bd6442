"""Send one path sample over a route: a TCP handshake, a proxy's CONNECT, or an ICMP echo.

Each function returns the sample's round-trip time in seconds, or None when it was lost
(no answer within `wait` seconds); a fault of this host (an address that is not ours, no
permission for ICMP, a proxy refusing our credentials) raises SampleError, which is never
counted as loss.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import socket
import struct
import time

from icmplib import (
    AsyncSocket,
    ICMPError,
    ICMPRequest,
    ICMPSocketError,
    ICMPv4Socket,
    ICMPv6Socket,
    SocketAddressError,
    SocketPermissionError,
    TimeoutExceeded,
)

# python-socks' connectors run the handshake over a stream we hand them, which lets the sample time
# the CONNECT request and the first byte of its reply; they live in its underscore modules (tests/
# test_path.py runs them against real microsocks and tinyproxy, so an upgrade that moves them fails).
from python_socks import ProxyType
from python_socks._connectors.factory_async import create_connector
from python_socks._errors import IncompleteReadError
from python_socks._protocols.errors import ReplyError
from python_socks.async_.asyncio._resolver import Resolver
from python_socks.async_.asyncio._stream import AsyncioSocketStream

from probe.config import Proxy, Route
from probe.net.dial import _direct_connect, kernel_handshake_seconds, tcp_info, writable


class SampleError(Exception):
    """This host could not send the sample (a local fault, not the network's)."""


# A refusal (RST) is an answer; so is a proxy's refusal. Unreachable messages from routers and
# a connection timing out are no answer from the target: lost.
_LOST_ERRNOS = frozenset({errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN})
# Proxy replies meaning the target never answered the proxy (as probe/net/proxy.py reads them):
# SOCKS5 3 network unreachable, 4 host unreachable, 6 TTL expired; HTTP 504.
_PROXY_NO_ANSWER_SOCKS = frozenset({3, 4, 6})
_PROXY_NO_ANSWER_HTTP = frozenset({504})
_clock = time.perf_counter  # not loop.time(): uvloop's is a millisecond clock cached per loop iteration
_LINGER_RESET = struct.pack("ii", 1, 0)  # close() sends RST: no TIME_WAIT left behind per sample


async def tcp(host: str, port: int, route: Route, wait: float) -> float | None:
    """Time the SYN -> SYN-ACK (or RST) of one TCP handshake to host:port; None when lost."""
    if route.proxy is not None:
        return await _proxy_connect_reply(host, port, route.proxy, route.source_address, wait)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if route.source_address is not None:
            try:
                sock.bind((route.source_address, 0))
            except OSError as e:
                raise SampleError(f"cannot send from {route.source_address}: {e.strerror or e}") from e
        started = _clock()
        err = sock.connect_ex((host, port))
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            if not await writable(sock, asyncio.get_running_loop().time() + wait):
                return None
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        elapsed = _clock() - started
        if err == errno.ECONNREFUSED:
            return elapsed  # a refusal is an answer; the kernel keeps no RTT for it, the loop's clock stands
        if err in _LOST_ERRNOS:
            return None
        if err:
            raise SampleError(f"cannot connect to {host}:{port}: {os.strerror(err)}")
        handshake = kernel_handshake_seconds(sock)
        if handshake is None:
            # kernel_handshake_seconds() says None for a retransmitted SYN: the first one went
            # unanswered, which is the loss this sample exists to see.
            return None if (info := tcp_info(sock)) is not None and info.retransmits else elapsed
        return handshake
    finally:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
        sock.close()


class _TimedStream(AsyncioSocketStream):
    """The proxy handshake's stream, noting when the last request left and its answer began to arrive."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(sock=sock, loop=loop)
        self.sent_at = 0.0
        self.answered_at: float | None = None

    async def write(self, data: bytes) -> None:
        await super().write(data)
        self.sent_at, self.answered_at = _clock(), None

    async def read(self, max_bytes: int = 65536) -> bytes:
        data = await super().read(max_bytes)
        if self.answered_at is None:
            self.answered_at = _clock()
        return data

    async def read_exactly(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            packet = await self.read(n - len(data))
            if not packet:
                raise IncompleteReadError("Connection closed unexpectedly")
            data += packet
        return bytes(data)


async def _proxy_connect_reply(host: str, port: int, p: Proxy, source_address: str | None, wait: float) -> float | None:
    """Time from the proxy's CONNECT request (SOCKS5 or HTTP) to the first byte of its reply.

    The connection to the proxy and the SOCKS5 greeting come first and are not timed (the
    route's HTTPS probe says whether the proxy works); only the CONNECT exchange, which spans
    the proxy's own handshake with the target, is the sample. A refusal reply is an answer.
    """
    loop = asyncio.get_running_loop()
    try:
        sock = await _direct_connect(p.host, p.port, source_address)
    except OSError as e:
        raise SampleError(f"proxy {p.redacted()} is unreachable: {e.strerror or e}") from e
    stream = _TimedStream(sock, loop)
    connector = create_connector(
        proxy_type=ProxyType.HTTP if p.scheme == "http" else ProxyType.SOCKS5,
        username=p.username, password=p.password, rdns=True, resolver=Resolver(loop=loop),
    )
    try:
        handshake = asyncio.ensure_future(connector.connect(stream=stream, host=host, port=port))
        while not handshake.done():
            # Whatever step the handshake is in, its latest request waits at most `wait`.
            left = stream.sent_at + wait - _clock() if stream.sent_at else wait
            await asyncio.wait([handshake], timeout=max(0.0, left))
            if not handshake.done() and stream.sent_at and _clock() >= stream.sent_at + wait:
                handshake.cancel()
                await asyncio.gather(handshake, return_exceptions=True)
                return None
        try:
            handshake.result()
        except ReplyError as e:
            if _auth_failed(p, e):
                raise SampleError(f"proxy {p.redacted()} refused the credentials: {e}") from e
            if e.error_code in (_PROXY_NO_ANSWER_HTTP if p.scheme == "http" else _PROXY_NO_ANSWER_SOCKS):
                return None  # the proxy heard nothing from the target: lost beyond the proxy
        except (IncompleteReadError, ConnectionError) as e:
            raise SampleError(f"proxy {p.redacted()} broke off its handshake: {e}") from e
        if stream.answered_at is None:
            return None
        return stream.answered_at - stream.sent_at
    finally:
        sock.close()


def _auth_failed(p: Proxy, e: ReplyError) -> bool:
    if p.scheme == "http":
        return e.error_code in (401, 407)
    return "authentication" in str(e).lower()


_ids = itertools.count(os.getpid() & 0xFFFF)


def icmp_privileged() -> bool | None:
    """Return True to use raw ICMP (root), False for unprivileged ping sockets, None when neither is allowed."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/sys/net/ipv4/ping_group_range") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return None
    groups = {os.getegid(), *os.getgroups()}
    return False if any(low <= g <= high for g in groups) else None


async def icmp(address: str, route: Route, wait: float, privileged: bool | None) -> float | None:
    """Time one ICMP echo to `address` (an IP) from the route's source address; None when lost."""
    if privileged is None:
        raise SampleError("ICMP needs root or a group in net.ipv4.ping_group_range (sysctl)")
    family = ICMPv6Socket if ":" in address else ICMPv4Socket
    try:
        sock = AsyncSocket(family(address=route.source_address, privileged=privileged))
    except SocketPermissionError as e:
        raise SampleError(f"no permission for ICMP sockets: {e}") from e
    except SocketAddressError as e:
        raise SampleError(f"cannot send from {route.source_address}: {e}") from e
    except ICMPSocketError as e:
        raise SampleError(f"cannot open an ICMP socket: {e}") from e
    try:
        request = ICMPRequest(destination=address, id=next(_ids) & 0xFFFF, sequence=1)
        started = time.time()
        try:
            sock.send(request)
        except ICMPSocketError as e:
            raise SampleError(f"cannot send ICMP echo to {address}: {e}") from e
        try:
            reply = await sock.receive(request, wait)
            reply.raise_for_status()
        except (TimeoutExceeded, ICMPError):  # no echo reply; unreachable messages are no answer either
            return None
        except ICMPSocketError as e:
            raise SampleError(f"receiving ICMP: {e}") from e
        rtt: float = reply.time - started
        return rtt
    finally:
        sock.close()
