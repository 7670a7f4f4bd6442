"""Open a timed TCP connection over a route (directly, from a source address, or through a proxy)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
import struct
from typing import NamedTuple

from probe import debuglog
from probe.classify import Stage
from probe.config import Route
from probe.models import Phase
from probe.net.proxy import proxy_connect
from probe.trace import Trace

STREAM_LIMIT = 64 * 1024


async def connect(host: str, port: int, route: Route, trace: Trace) -> Connection:
    """Connect to host:port over `route` (see open_socket); return the connection."""
    with trace.phase(None, Stage.CONNECT):
        sock = await open_socket(host, port, route, trace)
        _, conn = await asyncio.get_running_loop().create_connection(Connection, sock=sock)
    trace.enter(Stage.ESTABLISHED)
    return conn


class Connection(asyncio.Protocol):
    """One probe's connection: bounded reads, writes, and TLS on top when asked for.

    TLS runs in an `ssl.SSLObject` over memory buffers that the transport feeds, not in the
    loop's TLS transport: a probe needs no more than read, write and abort, and the loop's
    version also decodes the peer certificate into a dict on every handshake (uvloop: ~4% of
    a probe's CPU). The handshake's last flight leaves with the first write, one segment less.
    At most STREAM_LIMIT received bytes are held before reading from the socket pauses, so a
    flooding peer costs bounded memory.
    """

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._plain = bytearray()  # received bytes not yet read (before or without TLS)
        self._incoming: ssl.MemoryBIO | None = None
        self._outgoing: ssl.MemoryBIO | None = None
        self.ssl_object: ssl.SSLObject | None = None
        self._eof = False
        self._lost: BaseException | None = None  # why the connection ended, when it ended in error
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._write_waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if self._incoming is not None:
            self._incoming.write(data)
        else:
            self._plain += data
        if not self._paused and self._buffered() > STREAM_LIMIT and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._end()
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self._lost is None:
            self._lost = exc
        self._end()
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_result(None)

    def pause_writing(self) -> None:
        if self._write_waiter is None or self._write_waiter.done():
            self._write_waiter = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._write_waiter is not None and not self._write_waiter.done():
            self._write_waiter.set_result(None)

    # --- for probers ------------------------------------------------------------------

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """Run the TLS handshake; raises ssl.SSLError, or a connection error, when it fails."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        if self._plain:  # what the server sent before our ClientHello is read as its handshake
            incoming.write(bytes(self._plain))
            self._plain.clear()
        if self._eof:
            incoming.write_eof()
        self._incoming, self._outgoing = incoming, outgoing
        tls = context.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
        self.ssl_object = tls
        while True:
            try:
                tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                self._flush()
                await self._more()
            except ssl.SSLEOFError:
                if self._lost is not None:  # a reset, not a close: say so
                    raise self._lost from None
                raise

    def write(self, data: bytes) -> None:
        """Send `data`, through TLS once it is on; never blocks (see drain)."""
        if self._lost is not None:
            raise self._lost
        if self.ssl_object is not None:
            self.ssl_object.write(data)
            self._flush()
        elif self._transport is not None:
            self._transport.write(data)

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if self._write_waiter is not None and not self._write_waiter.done():
            await self._write_waiter
        if self._lost is not None:
            raise self._lost

    async def read(self, limit: int) -> bytes:
        """Return up to `limit` received bytes; b"" at the end of the stream."""
        tls = self.ssl_object
        while True:
            if tls is not None:
                try:
                    data = tls.read(limit)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:  # close_notify: a clean end
                    return b""
                except ssl.SSLEOFError:  # the TCP stream ended without close_notify
                    if self._lost is not None:
                        raise self._lost from None
                    return b""  # an end too, as the loop's TLS transport reads it
                else:
                    self._resume()
                    return data
                self._flush()  # a post-handshake message (key update) may need an answer
            elif self._plain:
                data = bytes(self._plain[:limit])
                del self._plain[:limit]
                self._resume()
                return data
            elif self._eof:
                if self._lost is not None:
                    raise self._lost
                return b""
            await self._more()

    @property
    def pending(self) -> int:
        """Received bytes held and not yet read (still encrypted, under TLS)."""
        return self._buffered()

    def get_extra_info(self, name: str) -> object:
        """Return the TLS object for "ssl_object"; otherwise what the transport knows."""
        if name == "ssl_object":
            return self.ssl_object
        return self._transport.get_extra_info(name) if self._transport is not None else None

    def abort(self) -> None:
        """Drop the connection at once (a TLS close would wait for a hostile peer's close_notify)."""
        if self._transport is not None:
            self._transport.abort()

    # --- inside -----------------------------------------------------------------------

    def _buffered(self) -> int:
        return self._incoming.pending if self._incoming is not None else len(self._plain)

    def flush(self) -> None:
        """Send what TLS has ready to go (the handshake's last flight is otherwise held for the first write)."""
        self._flush()

    def _flush(self) -> None:
        outgoing = self._outgoing
        if outgoing is not None and outgoing.pending and self._transport is not None:
            self._transport.write(outgoing.read())

    def _resume(self) -> None:
        if self._paused and self._buffered() <= STREAM_LIMIT and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    def _end(self) -> None:
        self._eof = True
        if self._incoming is not None and not self._incoming.eof:
            self._incoming.write_eof()
        self._wake()

    async def _more(self) -> None:
        """Wait for more bytes or the end; raise if the stream already ended with nothing left."""
        if self._eof:
            raise self._lost if self._lost is not None else ConnectionResetError(
                errno.ECONNRESET, "connection closed by the peer"
            )
        self._resume()
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


async def open_socket(host: str, port: int, route: Route, trace: Trace) -> socket.socket:
    """Connect a socket to host:port over `route`, timing the `connect` phase.

    `host` is an IP address on direct and bound routes; on proxy routes it may be a name,
    which the proxy resolves (socks5h semantics, for socks5:// too). Through a proxy,
    `connect` covers the TCP handshake with the proxy (from the route's source_address, if
    any), authentication, the proxy's own name resolution and its connection to the target.
    Proxy failures are ProxyFailures whose text names the proxy by its redacted URL, never
    its credentials.

    On direct and bound routes the `connect` phase is the kernel's own measurement of the
    handshake (SYN to SYN-ACK, TCP_INFO), when the SYN went out once: it does not include
    how long a busy event loop took to notice the connection, which the loop's clock would.
    """
    trace.peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    before = trace.phases.get(Phase.CONNECT, 0.0)
    if (log := debuglog.current()) is not None:
        log.add(f"TCP connect to {trace.peer}" + (f" via {route.proxy.redacted()}" if route.proxy else "")
                + (f" from {route.source_address}" if route.source_address else ""))
    handshake: float | None = None
    with trace.phase(Phase.CONNECT, Stage.CONNECT):
        if route.proxy is not None:
            trace.peer += f" via {route.proxy.redacted()}"
            sock = await proxy_connect(host, port, route.proxy, route.source_address, trace)
        else:
            sock = await _direct_connect(host, port, route.source_address, trace)
            handshake = kernel_handshake_seconds(sock)
    if handshake is not None:
        trace.phases[Phase.CONNECT] = before + handshake
    if log is not None:
        kernel = f" (the kernel's SYN to SYN-ACK: {handshake * 1000:.3f} ms)" if handshake is not None else ""
        log.add(f"connected: local {_name(sock.getsockname())}, connect phase "
                f"{(trace.phases[Phase.CONNECT] - before) * 1000:.3f} ms{kernel}")
    return sock


def _name(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        return f"[{address[0]}]:{address[1]}" if ":" in str(address[0]) else f"{address[0]}:{address[1]}"
    return str(address)


async def _direct_connect(
    host: str, port: int, source_address: str | None, trace: Trace | None = None
) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source_address is not None:
            sock.bind((source_address, 0))
        # A plain non-blocking connect: the loop's sock_connect may run getaddrinfo on a
        # worker thread even for an IP literal (uvloop does), which costs CPU and adds latency.
        err = sock.connect_ex((host, port))
        if err in _IN_PROGRESS:
            await writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        if trace is not None:
            trace.kernel_connected = _connected_in_kernel(sock)
        sock.close()
        raise
    return sock


def _connected_in_kernel(sock: socket.socket) -> float | None:
    """Return the kernel's handshake time if the socket is connected after all (the wait for it was cut short)."""
    try:
        sock.getpeername()
    except OSError:  # not connected: the handshake really did not complete
        return None
    return kernel_handshake_seconds(sock)


_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK})


async def writable(sock: socket.socket, deadline: float | None = None) -> bool:
    """Wait until `sock` is writable (a non-blocking connect has ended); False if `deadline` (loop time) came first."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_writer(fd, ready)
    try:
        async with asyncio.timeout_at(deadline):  # None: no limit of its own
            await done
    except TimeoutError:
        return False
    finally:
        loop.remove_writer(fd)
    return True


# struct tcp_info (linux/tcp.h): tcpi_rtt (smoothed RTT, microseconds) at byte 68, and
# tcpi_total_retrans at byte 100. After the handshake the only RTT sample is the SYN's.
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_TCP_INFO_U32 = struct.Struct("=I")
_TCP_INFO_LEN = 104


class TcpInfo(NamedTuple):
    """What the kernel knows of a TCP socket (the part of struct tcp_info we read)."""

    rtt_us: int  # smoothed RTT; right after the handshake, the SYN's round trip
    retransmits: int  # segments retransmitted in total, the SYN included


def tcp_info(sock: socket.socket) -> TcpInfo | None:
    """Return the kernel's smoothed RTT and retransmission count of a TCP socket; None if unknown."""
    if _TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(info) < _TCP_INFO_LEN:
        return None
    rtt_us: int = _TCP_INFO_U32.unpack_from(info, 68)[0]
    retransmits: int = _TCP_INFO_U32.unpack_from(info, 100)[0]
    return TcpInfo(rtt_us, retransmits)


def kernel_handshake_seconds(sock: socket.socket) -> float | None:
    """Return the kernel's SYN to SYN-ACK time of a just-connected socket; None if unknown or retransmitted."""
    info = tcp_info(sock)
    if info is None:
        return None
    if info.retransmits or info.rtt_us == 0:
        return None  # Karn: a retransmitted SYN gives no clean sample; the loop's clock stands
    return info.rtt_us / 1e6


def close(conn: Connection) -> None:
    """Close a connection without waiting on a peer that may never answer."""
    conn.abort()
