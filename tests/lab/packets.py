"""IPv4, TCP and UDP headers: parse what NFQUEUE hands over, forge what an on-path box injects.

Only what the lab's injectors need: no options on forged packets, checksums computed.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

PROTO_TCP, PROTO_UDP = 6, 17
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


@dataclass(frozen=True, slots=True)
class IPv4:
    src: str
    dst: str
    proto: int
    ttl: int
    ident: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Tcp:
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Udp:
    sport: int
    dport: int
    payload: bytes


def parse_ipv4(data: bytes) -> IPv4:
    """Parse an IPv4 packet (header options skipped); raise ValueError if it is not one."""
    if len(data) < 20 or data[0] >> 4 != 4:
        raise ValueError("not an IPv4 packet")
    ihl = (data[0] & 0x0F) * 4
    total = struct.unpack("!H", data[2:4])[0]
    ident = struct.unpack("!H", data[4:6])[0]
    return IPv4(
        src=socket.inet_ntoa(data[12:16]),
        dst=socket.inet_ntoa(data[16:20]),
        proto=data[9],
        ttl=data[8],
        ident=ident,
        payload=bytes(data[ihl:total]),
    )


def parse_tcp(segment: bytes) -> Tcp:
    """Parse a TCP segment."""
    if len(segment) < 20:
        raise ValueError("short TCP segment")
    sport, dport, seq, ack, offset_flags = struct.unpack("!HHIIH", segment[:14])
    offset = (offset_flags >> 12) * 4
    return Tcp(sport, dport, seq, ack, offset_flags & 0x3F, bytes(segment[offset:]))


def parse_udp(datagram: bytes) -> Udp:
    """Parse a UDP datagram."""
    if len(datagram) < 8:
        raise ValueError("short UDP datagram")
    sport, dport, length = struct.unpack("!HHH", datagram[:6])
    return Udp(sport, dport, bytes(datagram[8:length]))


def checksum(data: bytes) -> int:
    """Return the Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_packet(src: str, dst: str, proto: int, payload: bytes, *, ttl: int = 64, ident: int = 0) -> bytes:
    """Return an IPv4 packet (DF set, no options) carrying `payload`."""
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident & 0xFFFF, 0x4000, ttl, proto, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + payload


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, length)


def udp_packet(src: str, dst: str, sport: int, dport: int, payload: bytes, *, ttl: int = 64, ident: int = 0) -> bytes:
    """Return an IPv4/UDP packet with correct checksums."""
    length = 8 + len(payload)
    header = struct.pack("!HHHH", sport, dport, length, 0)
    csum = checksum(_pseudo(src, dst, PROTO_UDP, length) + header + payload) or 0xFFFF
    return ipv4_packet(src, dst, PROTO_UDP, header[:6] + struct.pack("!H", csum) + payload, ttl=ttl, ident=ident)


def tcp_packet(
    src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int,
    payload: bytes = b"", *, window: int = 502, ttl: int = 64, ident: int = 0,
) -> bytes:
    """Return an IPv4/TCP packet (no options) with correct checksums."""
    header = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, flags, window, 0, 0)
    csum = checksum(_pseudo(src, dst, PROTO_TCP, len(header) + len(payload)) + header + payload)
    header = header[:16] + struct.pack("!H", csum) + header[18:]
    return ipv4_packet(src, dst, PROTO_TCP, header + payload, ttl=ttl, ident=ident)


def raw_sender() -> socket.socket:
    """Return a raw socket that sends whole IPv4 packets as given (IP_HDRINCL): any source address."""
    return socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)


def send(sock: socket.socket, packet: bytes) -> None:
    """Send a forged IPv4 packet toward its destination."""
    dst = str(ipaddress.IPv4Address(packet[16:20]))
    sock.sendto(packet, (dst, 0))
