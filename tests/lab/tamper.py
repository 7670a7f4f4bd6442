"""NFQUEUE programs of the border router that hold, drop or answer TCP packets.

    python -m tests.lab.tamper delay --queue 1 --ms 40          # hold every queued packet 40 ms
    python -m tests.lab.tamper jitter --queue 1 --min-ms 10 --max-ms 70   # hold each a uniform random time
    python -m tests.lab.tamper inject-rst --queue 4 --trigger x.example   # on-path RSTs, packet goes on
    python -m tests.lab.tamper residual --queue 2 --trigger x.example --seconds 3   # reset, then block the triple
    python -m tests.lab.tamper blockpage --queue 3              # answer a queued request with a block page

The iptables rule decides which packets reach the queue; these programs decide what happens to them.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

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

    loop = QueueLoop(args.queue, on_packet, args.max_seconds, realtime=True)
    loop.run()


def jitter(args: argparse.Namespace) -> None:
    """Hold each queued packet a time drawn uniformly from [--min-ms, --max-ms] (netem's jitter, without netem)."""
    draw = random.Random(args.seed).uniform
    low, high = args.min_ms / 1000.0, args.max_ms / 1000.0
    loop: QueueLoop

    def on_packet(pkt: Packet) -> None:
        loop.later(draw(low, high), pkt.accept)

    loop = QueueLoop(args.queue, on_packet, args.max_seconds, realtime=True)
    loop.run()


def inject_rst(args: argparse.Namespace) -> None:
    """On-path reset: let a packet carrying `--trigger` through, and forge RSTs to both ends at once.

    As the Great Firewall does it: it does not hold the packet, so the server still gets it and
    answers; the forged RST to the client arrives first. (The GFW wins that race by being
    fast; a Python program on a busy machine is not, so the client's RST leaves before the
    packet is let go.)
    """
    sender = packets.raw_sender()
    trigger = args.trigger.encode()

    def on_packet(pkt: Packet) -> None:
        ip = packets.parse_ipv4(pkt.get_payload())
        tcp = packets.parse_tcp(ip.payload)
        if trigger not in tcp.payload:
            pkt.accept()
            return
        end = tcp.seq + len(tcp.payload)
        packets.send(sender, packets.tcp_packet(ip.dst, ip.src, tcp.dport, tcp.sport, tcp.ack, 0, packets.RST,
                                                ttl=args.ttl))
        pkt.accept()
        packets.send(sender, packets.tcp_packet(ip.src, ip.dst, tcp.sport, tcp.dport, end, 0, packets.RST,
                                                ttl=args.ttl))
        log(f"injected RSTs for {ip.src}:{tcp.sport} <-> {ip.dst}:{tcp.dport} on {args.trigger!r}")

    QueueLoop(args.queue, on_packet, args.max_seconds).run()


def residual(args: argparse.Namespace) -> None:
    """Reset a connection whose payload carries `--trigger`, then drop the triple's packets for `--seconds`.

    The Great Firewall's residual censorship: after a trigger, new connections from the same
    client to the same server and port are blocked for a while, whatever they carry.
    Queue only the client-to-server direction of one server port.
    """
    sender = packets.raw_sender()
    trigger = args.trigger.encode()
    blocked: dict[tuple[str, str, int], float] = {}

    def on_packet(pkt: Packet) -> None:
        ip = packets.parse_ipv4(pkt.get_payload())
        tcp = packets.parse_tcp(ip.payload)
        triple, now = (ip.src, ip.dst, tcp.dport), time.monotonic()
        if blocked.get(triple, 0.0) > now:
            pkt.drop()
            return
        if trigger not in tcp.payload:
            pkt.accept()
            return
        blocked[triple] = now + args.seconds
        pkt.drop()
        # Exact sequence numbers: anything else draws a challenge ACK (RFC 5961), not a reset.
        packets.send(sender, packets.tcp_packet(ip.dst, ip.src, tcp.dport, tcp.sport, tcp.ack, 0, packets.RST))
        packets.send(sender, packets.tcp_packet(ip.src, ip.dst, tcp.sport, tcp.dport, tcp.seq, 0, packets.RST))
        log(f"reset {ip.src}:{tcp.sport} -> {ip.dst}:{tcp.dport} on {args.trigger!r}; triple blocked {args.seconds} s")

    QueueLoop(args.queue, on_packet, args.max_seconds).run()


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
    p = sub.add_parser("jitter")
    common_arguments(p)
    p.add_argument("--min-ms", type=float, required=True)
    p.add_argument("--max-ms", type=float, required=True)
    p.add_argument("--seed", type=int, default=15)
    p = sub.add_parser("inject-rst")
    common_arguments(p)
    p.add_argument("--trigger", required=True, help="bytes (e.g. a server name) that trigger the resets")
    p.add_argument("--ttl", type=int, default=64, help="IP TTL of the forged resets (a fingerprint)")
    p = sub.add_parser("residual")
    common_arguments(p)
    p.add_argument("--trigger", required=True, help="bytes (e.g. a server name) that trigger the reset")
    p.add_argument("--seconds", type=float, default=90.0, help="how long the triple stays blocked")
    p = sub.add_parser("blockpage")
    common_arguments(p)
    p.add_argument("--status", type=int, default=200)
    args = parser.parse_args(argv)
    programs = {"delay": delay, "jitter": jitter, "inject-rst": inject_rst, "residual": residual,
                "blockpage": blockpage}
    programs[args.program](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
