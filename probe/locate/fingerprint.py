"""The injector's fingerprint: the IP and TCP header fields of the forged packet, as it arrived.

The sockets API hides those fields (a reset is just ECONNRESET), so this reads copies of the
arriving packets through a raw socket: root (CAP_NET_RAW) only, IPv4 only. Without it the
localisation still runs; the fingerprint then holds only what the socket saw.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from dataclasses import dataclass

from probe.models import Injector

MAX_KEPT = 64  # packets kept per capture: a flood from the peer cannot grow it
MAX_READS_PER_WAKE = 256
_FLAGS = "FSRPAUEC"  # FIN SYN RST PSH ACK URG ECE CWR, the bit order of the TCP flags byte
_FIN, _RST = 0x01, 0x04


@dataclass(frozen=True, slots=True)
class Seen:
    """The header fields of one packet from the peer."""

    local_port: int
    ip_ttl: int
    ip_id: int
    flags: int  # TCP flags; 0 for UDP
    window: int | None
    payload_bytes: int
    at: float  # loop time of arrival (read)

    @property
    def flag_text(self) -> str:
        """Return the TCP flags as letters (tcpdump's order: e.g. "RA")."""
        return "".join(letter for bit, letter in enumerate(_FLAGS) if self.flags >> bit & 1)


def parse(packet: bytes, peer: str, peer_port: int, proto: int) -> Seen | None:
    """Return the fields of an IPv4 packet from peer:peer_port, or None if it is not one."""
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != proto:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if socket.inet_ntoa(packet[12:16]) != peer:
        return None
    total = struct.unpack_from("!H", packet, 2)[0]
    ident = struct.unpack_from("!H", packet, 4)[0]
    l4 = packet[ihl:total]
    if proto == socket.IPPROTO_TCP and len(l4) >= 20:
        sport, dport = struct.unpack_from("!HH", l4)
        offset = (l4[12] >> 4) * 4
        window = struct.unpack_from("!H", l4, 14)[0]
        return Seen(dport, packet[8], ident, l4[13], window, max(0, len(l4) - offset), 0.0) if sport == peer_port \
            else None
    if proto == socket.IPPROTO_UDP and len(l4) >= 8:
        sport, dport = struct.unpack_from("!HH", l4)
        return Seen(dport, packet[8], ident, 0, None, len(l4) - 8, 0.0) if sport == peer_port else None
    return None


class Capture:
    """Copies of the packets arriving from one peer address and port, kept while a localisation runs."""

    def __init__(self, sock: socket.socket, peer: str, peer_port: int, proto: int) -> None:
        self._sock, self.peer, self.peer_port, self.proto = sock, peer, peer_port, proto
        self.seen: list[Seen] = []
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._read)

    @classmethod
    def open(cls, peer: str, peer_port: int, proto: int) -> tuple[Capture | None, str | None]:
        """Return a running capture, or None and why not (no privilege, IPv6)."""
        if ":" in peer:
            return None, "no fingerprint: the capture reads IPv4 headers only"
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
        except PermissionError:
            return None, "no fingerprint: reading the forged packet's headers needs CAP_NET_RAW (root)"
        sock.setblocking(False)
        return cls(sock, peer, peer_port, proto), None

    def _read(self) -> None:
        for _ in range(MAX_READS_PER_WAKE):
            try:
                packet = self._sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            if len(self.seen) >= MAX_KEPT:
                continue  # drained, not kept
            seen = parse(packet, self.peer, self.peer_port, self.proto)
            # Handshakes and bare ACKs are no answer: only resets, closes and payload are kept.
            if seen is not None and (seen.window is None or seen.flags & (_RST | _FIN) or seen.payload_bytes):
                self.seen.append(Seen(seen.local_port, seen.ip_ttl, seen.ip_id, seen.flags, seen.window,
                                      seen.payload_bytes, time.monotonic()))

    def first(self, local_port: int | None = None, *, kind: str | None = None) -> Seen | None:
        """Return the first packet kept (to `local_port`; of `kind`: "rst", "fin" or "data")."""
        self._read()
        for s in self.seen:
            if local_port not in (None, s.local_port):
                continue
            if kind is None or (kind == "rst" and s.flags & _RST) or (kind == "fin" and s.flags & _FIN) \
                    or (kind == "data" and s.payload_bytes):
                return s
        return None

    def close(self) -> None:
        """Stop reading and close the socket."""
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


def injector(kind: str, after: float, seen: Seen | None) -> Injector:
    """Return the fingerprint of a forged packet (`seen`: its captured headers, if any)."""
    if seen is None:
        return Injector(kind=kind, after_seconds=after)
    return Injector(
        kind=kind, after_seconds=after, ip_ttl=seen.ip_ttl, ip_id=seen.ip_id, tcp_window=seen.window,
        tcp_flags=seen.flag_text if seen.window is not None else None, payload_bytes=seen.payload_bytes,
    )
