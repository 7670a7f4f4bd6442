"""TTL-limited sends and what comes back: resets, answers, and ICMP time-exceeded from the routers.

No raw socket: the kernel hands a UDP socket the ICMP errors its datagrams caused (with the
router's address) through its error queue once IP_RECVERR is set. A TCP socket gets only the
error number (EHOSTUNREACH, no address; Linux queues no TCP errors), so a TCP step runs beside
a UDP datagram of the same TTL to the same address, which names the router.

Times come from time.monotonic(), not loop.time(): uvloop's clock has millisecond steps, and a
forged reset arrives within a millisecond on a short path.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
import time
from dataclasses import dataclass
from enum import StrEnum

IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IP_RECVTTL = getattr(socket, "IP_RECVTTL", 12)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
IPV6_RECVHOPLIMIT = getattr(socket, "IPV6_RECVHOPLIMIT", 51)
IPV6_HOPLIMIT = getattr(socket, "IPV6_HOPLIMIT", 52)
SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6 = 2, 3
ICMP_TIME_EXCEEDED, ICMP6_TIME_EXCEEDED = 11, 3
DEFAULT_TTL = 64
MAX_READS_PER_WAKE = 64  # an ICMP or reply flood costs at most this many reads per wake-up
MAX_ERRORS_PER_STEP = 256  # and at most this many in one step: the rest is left unread
_UNREACHABLE = (errno.EHOSTUNREACH, errno.ENETUNREACH)


class TcpEvent(StrEnum):
    """What one TTL-limited TCP step saw after its trigger left."""

    RESET = "reset"
    CLOSED = "closed"  # a FIN: the peer (or a forger) closed
    ANSWER = "answer"  # bytes came back
    EXPIRED = "expired"  # only an ICMP error: a router dropped the trigger, nothing else came
    SILENT = "silent"
    CONNECT_FAILED = "connect_failed"
    SOCKET_ERROR = "socket_error"  # the socket reported another error after the trigger (`error` says which)


@dataclass(frozen=True, slots=True)
class IcmpError:
    """One ICMP error from a socket's error queue."""

    source: str | None  # the router (or host) that sent it
    expired: bool  # time exceeded (else unreachable or another error)


@dataclass(frozen=True, slots=True)
class UdpStep:
    """What came back for one datagram sent with IP TTL `ttl`."""

    ttl: int
    router: str | None  # who said "time exceeded" (the first, if several did)
    reached: bool  # the destination itself answered (a reply, or an ICMP unreachable from its address)
    errors: int  # ICMP errors read
    sources: tuple[str, ...]  # distinct addresses among them
    reply: bytes | None = None
    reply_ttl: int | None = None
    reply_after: float | None = None
    replies: int = 0
    packets: int = 1
    local_port: int = 0
    sent_at: float = 0.0  # time.monotonic() when the datagram left


@dataclass(frozen=True, slots=True)
class TcpStep:
    """What one fresh connection saw when its trigger left with IP TTL `ttl`."""

    ttl: int
    event: TcpEvent
    after: float | None = None  # seconds from the trigger to the event
    icmp: bool = False  # an ICMP error reached the socket (a router dropped the trigger)
    local_port: int = 0
    connect_seconds: float | None = None
    packets: int = 0
    error: str | None = None
    sent_at: float = 0.0  # time.monotonic() when the trigger left


def _levels(family: int) -> tuple[int, int, int]:
    """Return (level, TTL option, RECVERR option) for the address family."""
    if family == socket.AF_INET6:
        return socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, IPV6_RECVERR
    return socket.IPPROTO_IP, socket.IP_TTL, IP_RECVERR


def family_of(address: str) -> int:
    """Return the socket family of an IP literal."""
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def parse_error(cmsg_data: bytes) -> IcmpError | None:
    """Parse a sock_extended_err and its offender address; None if it is not from ICMP."""
    if len(cmsg_data) < 16:
        return None
    _errno, origin, icmp_type, _code = struct.unpack_from("=IBBB", cmsg_data)
    if origin not in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6):
        return None
    offender = cmsg_data[16:]
    source = None
    if len(offender) >= 8 and struct.unpack_from("=H", offender)[0] == socket.AF_INET:
        source = socket.inet_ntop(socket.AF_INET, offender[4:8])
    elif len(offender) >= 24 and struct.unpack_from("=H", offender)[0] == socket.AF_INET6:
        source = socket.inet_ntop(socket.AF_INET6, offender[8:24])
    expired = icmp_type == (ICMP_TIME_EXCEEDED if origin == SO_EE_ORIGIN_ICMP else ICMP6_TIME_EXCEEDED)
    return IcmpError(source, expired)


def read_errors(sock: socket.socket, limit: int = MAX_READS_PER_WAKE) -> list[IcmpError]:
    """Read up to `limit` ICMP errors from the socket's error queue, without blocking."""
    out: list[IcmpError] = []
    for _ in range(limit):
        try:
            _data, ancdata, _flags, _addr = sock.recvmsg(1, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            break
        for level, kind, data in ancdata:
            if (level, kind) in ((socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)):
                error = parse_error(data)
                if error is not None:
                    out.append(error)
    return out


async def udp_step(
    address: str, port: int, ttl: int, payload: bytes, window: float, *,
    source: str | None = None, want_reply: bool = False, grace: float = 0.05,
) -> UdpStep:
    """Send one datagram with IP TTL `ttl`; collect ICMP errors (and replies) for up to `window` seconds.

    Without `want_reply` it ends at the first ICMP error; with it, `grace` seconds after the
    first reply or time-exceeded (a router's error and a forged reply from one hop come about
    together, in either order), or at once on an unreachable.
    """
    loop = asyncio.get_running_loop()
    family = family_of(address)
    level, ttl_option, recverr = _levels(family)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    errors: list[IcmpError] = []
    first_error_at: list[float] = []
    replies: list[tuple[bytes, int | None, float]] = []
    wake = asyncio.Event()
    try:
        sock.setblocking(False)
        if source is not None:
            sock.bind((source, 0))
        sock.setsockopt(level, recverr, 1)
        if family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1)
        sock.connect((address, port))
        local_port = sock.getsockname()[1]
        sock.setsockopt(level, ttl_option, ttl)

        def readable() -> None:
            if len(errors) < MAX_ERRORS_PER_STEP:
                errors.extend(read_errors(sock))
                if errors and not first_error_at:
                    first_error_at.append(time.monotonic())
            for _ in range(MAX_READS_PER_WAKE):
                try:
                    data, ancdata, _flags, _addr = sock.recvmsg(4096, 256, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:  # the error the queued ICMP also set on the socket
                    continue
                if len(replies) < MAX_READS_PER_WAKE:
                    replies.append((data, _received_ttl(ancdata), time.monotonic()))
            wake.set()

        loop.add_reader(sock.fileno(), readable)
        sent = time.monotonic()
        sock.send(payload)
        end = sent + window
        try:
            while (remaining := end - time.monotonic()) > 0:
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), remaining)
                if replies and want_reply:
                    end = min(end, replies[0][2] + grace)
                elif errors and not want_reply:
                    break
                elif errors and not errors[0].expired:
                    break  # unreachable: no reply will come
                elif first_error_at:  # a forger at the hop that dropped the query answers about as fast
                    end = min(end, first_error_at[0] + max(grace, 0.5 * (first_error_at[0] - sent)))
        finally:
            loop.remove_reader(sock.fileno())
    finally:
        sock.close()
    router = next((e.source for e in errors if e.expired), None)
    reached = any(not e.expired and e.source == address for e in errors) or (bool(replies) and router is None)
    first = replies[0] if replies else None
    return UdpStep(
        ttl=ttl, router=router, reached=reached, errors=len(errors),
        sources=tuple(dict.fromkeys(e.source for e in errors if e.source)),
        reply=first[0] if first else None, reply_ttl=first[1] if first else None,
        reply_after=first[2] - sent if first else None, replies=len(replies), local_port=local_port, sent_at=sent,
    )


def _received_ttl(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancdata:
        if (level, kind) in ((socket.IPPROTO_IP, socket.IP_TTL), (socket.IPPROTO_IPV6, IPV6_HOPLIMIT)) and data:
            return int(struct.unpack_from("=i", data.ljust(4, b"\0"))[0])
    return None


async def tcp_step(
    address: str, port: int, ttl: int, payload: bytes, window: float, *,
    source: str | None = None, connect_timeout: float = 2.0, grace: float = 0.05,
) -> TcpStep:
    """Connect with the normal TTL, then send `payload` with IP TTL `ttl`; report what came back within `window`.

    An ICMP error (a router dropped the trigger) ends the wait `grace` seconds later: a
    censor that taps the same hop answers in that time.
    """
    loop = asyncio.get_running_loop()
    family = family_of(address)
    level, ttl_option, recverr = _levels(family)
    sock = socket.socket(family, socket.SOCK_STREAM)
    event, after, icmp, local_port, connected_in, error = TcpEvent.SILENT, None, False, 0, None, None
    sent = 0.0
    packets = 0
    try:
        sock.setblocking(False)
        if source is not None:
            sock.bind((source, 0))
        sock.setsockopt(level, recverr, 1)  # an ICMP error then reaches recv() at once, not at the timeout
        started = time.monotonic()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (address, port)), connect_timeout)
        except (OSError, TimeoutError) as e:
            error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            return TcpStep(ttl, TcpEvent.CONNECT_FAILED, packets=_segments_out(sock, default=1), error=error)
        connected_in = time.monotonic() - started
        local_port = sock.getsockname()[1]
        sock.setsockopt(level, ttl_option, ttl)
        sent = time.monotonic()
        sock.send(payload)
        end = sent + window
        while (remaining := end - time.monotonic()) > 0:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 65536), remaining)
            except TimeoutError:
                break
            except ConnectionResetError:
                event, after = TcpEvent.RESET, time.monotonic() - sent
                break
            except OSError as e:
                if e.errno not in _UNREACHABLE:
                    event, after = TcpEvent.SOCKET_ERROR, time.monotonic() - sent
                    error = os.strerror(e.errno) if e.errno else f"{type(e).__name__}: {e}"
                    break
                icmp = True
                end = min(end, time.monotonic() + grace)
                continue
            event, after = (TcpEvent.ANSWER if data else TcpEvent.CLOSED), time.monotonic() - sent
            break
        if event is TcpEvent.SILENT and icmp:
            event = TcpEvent.EXPIRED
        packets = _segments_out(sock, default=3)
        if event is not TcpEvent.RESET:
            # The closing reset leaves with the normal TTL, so the server forgets the connection too.
            with contextlib.suppress(OSError):
                sock.setsockopt(level, ttl_option, DEFAULT_TTL)
            packets += 1
    finally:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    return TcpStep(ttl, event, after, icmp, local_port, connected_in, packets, error, sent)


def _segments_out(sock: socket.socket, default: int) -> int:
    """Return how many segments the connection sent (TCP_INFO tcpi_segs_out), retransmissions included."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 144)
    except OSError:
        return default
    return int(struct.unpack_from("=I", info, 136)[0]) if len(info) >= 140 else default
