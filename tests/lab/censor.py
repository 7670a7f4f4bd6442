"""Censors for the localisation lab, each an NFQUEUE program in one router's PREROUTING hook.

    python -m tests.lab.censor rst --queue 1 --trigger blocked-sni.example --ttl 58 --ip-id 1 --window 1981 \\
                                   --payload 10 [--copy-ttl] [--delay-ms 400]   # an SNI reset injector
    python -m tests.lab.censor reset-all --queue 2                  # reset every data segment, whatever it says
    python -m tests.lab.censor dns --queue 3 --name injected.example --answer 203.0.113.99 --ttl 233 [--copy-ttl]
    python -m tests.lab.censor icmp-flood --queue 4 --count 200     # answer each expiring datagram 200 times

Like an on-path tap, every program lets the packet go on after it acted (the router then
forwards it, or drops it and answers time-exceeded if its TTL ran out here). `--copy-ttl`
gives the forged packet the TTL the probe's packet arrived with, as one of the Great
Firewall's DNS injectors does.
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys

import dns.exception
import dns.message
import dns.rdataclass
import dns.rrset
from netfilterqueue import Packet

from tests.lab import packets
from tests.lab.nfqueue import QueueLoop, common_arguments, log


def rst(args: argparse.Namespace) -> None:
    """Forge one RST+ACK toward the client for a segment carrying `--trigger`, with a fixed fingerprint."""
    sender = packets.raw_sender()
    trigger = args.trigger.encode()
    loop: QueueLoop

    def on_packet(pkt: Packet) -> None:
        ip = packets.parse_ipv4(pkt.get_payload())
        tcp = packets.parse_tcp(ip.payload)
        if trigger in tcp.payload:
            ttl = ip.ttl if args.copy_ttl else args.ttl
            forged = packets.tcp_packet(
                ip.dst, ip.src, tcp.dport, tcp.sport, tcp.ack, tcp.seq + len(tcp.payload), packets.RST | packets.ACK,
                b"\0" * args.payload, window=args.window, ttl=ttl, ident=args.ip_id)
            if args.delay_ms:  # a slow injector (the GFW's reset 11-445 ms after the ClientHello)
                loop.later(args.delay_ms / 1000.0, lambda: packets.send(sender, forged))
            else:  # before the packet goes on, so that the reset beats the server's answer
                packets.send(sender, forged)
            log(f"rst for {ip.src}:{tcp.sport} (arrived with TTL {ip.ttl}, forged TTL {ttl}, in {args.delay_ms} ms)")
        pkt.accept()

    loop = QueueLoop(args.queue, on_packet, args.max_seconds)
    loop.run()


def reset_all(args: argparse.Namespace) -> None:
    """Reset every segment that carries data, whatever it carries and whatever its TTL."""
    sender = packets.raw_sender()

    def on_packet(pkt: Packet) -> None:
        ip = packets.parse_ipv4(pkt.get_payload())
        tcp = packets.parse_tcp(ip.payload)
        if tcp.payload:
            packets.send(sender, packets.tcp_packet(ip.dst, ip.src, tcp.dport, tcp.sport, tcp.ack, 0, packets.RST))
        pkt.accept()

    QueueLoop(args.queue, on_packet, args.max_seconds).run()


def forge_dns(args: argparse.Namespace) -> None:
    """Answer a query for `--name` at once with `--answer`; the query goes on."""

    sender = packets.raw_sender()

    def on_packet(pkt: Packet) -> None:
        ip = packets.parse_ipv4(pkt.get_payload())
        udp = packets.parse_udp(ip.payload)
        try:
            query = dns.message.from_wire(udp.payload)
        except dns.exception.DNSException:
            pkt.accept()
            return
        if query.question and query.question[0].name.to_text().rstrip(".") == args.name:
            reply = dns.message.make_response(query)
            reply.answer.append(dns.rrset.from_text_list(query.question[0].name, 60, dns.rdataclass.IN, "A",
                                                         [args.answer]))
            ttl = ip.ttl if args.copy_ttl else args.ttl
            packets.send(sender, packets.udp_packet(ip.dst, ip.src, udp.dport, udp.sport, reply.to_wire(), ttl=ttl,
                                                    ident=0))
            log(f"forged {args.name} for {ip.src} to {ip.dst} (arrived with TTL {ip.ttl}, forged TTL {ttl})")
        pkt.accept()

    QueueLoop(args.queue, on_packet, args.max_seconds).run()


def icmp_flood(args: argparse.Namespace) -> None:
    """Answer each queued datagram that expires here with `--count` forged time-exceeded messages."""
    sender = packets.raw_sender()

    def on_packet(pkt: Packet) -> None:
        data = pkt.get_payload()
        ip = packets.parse_ipv4(data)
        if ip.ttl <= 1:
            quoted = data[:28]
            for i in range(args.count):
                body = struct.pack("!BBHI", 11, 0, 0, 0) + quoted
                body = body[:2] + struct.pack("!H", packets.checksum(body)) + body[4:]
                src = f"192.0.2.{200 + i % 50}"
                packets.send(sender, packets.ipv4_packet(src, ip.src, socket.IPPROTO_ICMP, body, ttl=64))
            log(f"{args.count} time-exceeded for {ip.src} -> {ip.dst}")
        pkt.accept()

    QueueLoop(args.queue, on_packet, args.max_seconds).run()


def main(argv: list[str] | None = None) -> int:
    """Run one censor until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m tests.lab.censor")
    sub = parser.add_subparsers(dest="program", required=True)
    p = sub.add_parser("rst")
    common_arguments(p)
    p.add_argument("--trigger", required=True)
    p.add_argument("--ttl", type=int, default=58)
    p.add_argument("--ip-id", type=int, default=1)
    p.add_argument("--window", type=int, default=1981)
    p.add_argument("--payload", type=int, default=10, help="bytes of zeros the reset carries")
    p.add_argument("--copy-ttl", action="store_true")
    p.add_argument("--delay-ms", type=float, default=0.0, help="send the reset this long after the trigger")
    p = sub.add_parser("reset-all")
    common_arguments(p)
    p = sub.add_parser("dns")
    common_arguments(p)
    p.add_argument("--name", required=True)
    p.add_argument("--answer", required=True)
    p.add_argument("--ttl", type=int, default=233)
    p.add_argument("--copy-ttl", action="store_true")
    p = sub.add_parser("icmp-flood")
    common_arguments(p)
    p.add_argument("--count", type=int, default=200)
    args = parser.parse_args(argv)
    {"rst": rst, "reset-all": reset_all, "dns": forge_dns, "icmp-flood": icmp_flood}[args.program](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
