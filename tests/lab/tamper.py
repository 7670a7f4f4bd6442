"""NFQUEUE programs of the border router that hold, drop or answer TCP packets.

    python -m tests.lab.tamper delay --queue 1 --ms 40          # hold every queued packet 40 ms
    python -m tests.lab.tamper handshake-rst --queue 2          # RST both ends just after a SYN-ACK
    python -m tests.lab.tamper blockpage --queue 3              # answer a queued request with a block page

The iptables rule decides which packets reach the queue; these programs decide what happens to them.
"""

from __future__ import annotations

import argparse
import sys

from netfilterqueue import Packet

from tests.lab import packets
from tests.lab.nfqueue import QueueLoop, common_arguments, log

BLOCK_PAGE = (
    "<html><head><title>Notice</title></head><body><h1>This site cannot be reached</h1>"
    "<p>According to relevant laws and regulations, this page is not available.</p></body></html>"
)


def delay(args: argparse.Namespace) -> None:
    """Hold every queued packet `--ms` milliseconds, then let it go on."""
    seconds = args.ms / 1000.0
    loop: QueueLoop

    def on_packet(pkt: Packet) -> None:
        loop.later(seconds, pkt.accept)

    loop = QueueLoop(args.queue, on_packet, args.max_seconds)
    loop.run()


def handshake_rst(args: argparse.Namespace) -> None:
    """Let each queued SYN-ACK through, then `--after-ms` later reset both ends, as a censor does."""
    sender = packets.raw_sender()
    loop: QueueLoop

    def on_packet(pkt: Packet) -> None:
        ip = packets.parse_ipv4(pkt.get_payload())
        tcp = packets.parse_tcp(ip.payload)
        pkt.accept()
        if tcp.flags & (packets.SYN | packets.ACK) != packets.SYN | packets.ACK:
            return
        # Exact sequence numbers: anything else draws a challenge ACK (RFC 5961), not a reset.
        to_client = packets.tcp_packet(ip.src, ip.dst, tcp.sport, tcp.dport, tcp.seq + 1, 0, packets.RST)
        to_server = packets.tcp_packet(ip.dst, ip.src, tcp.dport, tcp.sport, tcp.ack, 0, packets.RST)

        def fire() -> None:
            packets.send(sender, to_client)
            packets.send(sender, to_server)
            log(f"reset {ip.dst}:{tcp.dport} <-> {ip.src}:{tcp.sport} after the handshake")

        loop.later(args.after_ms / 1000.0, fire)

    loop = QueueLoop(args.queue, on_packet, args.max_seconds)
    loop.run()


def blockpage(args: argparse.Namespace) -> None:
    """Drop each queued request segment; answer the client with a block page and reset the server."""
    sender = packets.raw_sender()
    body = BLOCK_PAGE.encode()
    page = (
        f"HTTP/1.1 {args.status} {'OK' if args.status == 200 else 'Forbidden'}\r\n"
        f"Content-Type: text/html; charset=utf-8\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body

    def on_packet(pkt: Packet) -> None:
        ip = packets.parse_ipv4(pkt.get_payload())
        tcp = packets.parse_tcp(ip.payload)
        if not tcp.payload:
            pkt.accept()
            return
        pkt.drop()
        answer = packets.tcp_packet(
            ip.dst, ip.src, tcp.dport, tcp.sport, tcp.ack, tcp.seq + len(tcp.payload),
            packets.PSH | packets.ACK | packets.FIN, page,
        )
        packets.send(sender, answer)
        packets.send(sender, packets.tcp_packet(ip.src, ip.dst, tcp.sport, tcp.dport, tcp.seq, 0, packets.RST))
        log(f"block page to {ip.src}:{tcp.sport} for a request to {ip.dst}:{tcp.dport}")

    QueueLoop(args.queue, on_packet, args.max_seconds).run()


def main(argv: list[str] | None = None) -> int:
    """Run one tamper program until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m tests.lab.tamper")
    sub = parser.add_subparsers(dest="program", required=True)
    p = sub.add_parser("delay")
    common_arguments(p)
    p.add_argument("--ms", type=float, required=True)
    p = sub.add_parser("handshake-rst")
    common_arguments(p)
    p.add_argument("--after-ms", type=float, default=5.0)
    p = sub.add_parser("blockpage")
    common_arguments(p)
    p.add_argument("--status", type=int, default=200)
    args = parser.parse_args(argv)
    {"delay": delay, "handshake-rst": handshake_rst, "blockpage": blockpage}[args.program](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
