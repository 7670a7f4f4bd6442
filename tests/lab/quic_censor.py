"""NFQUEUE program of the border: the Great Firewall's QUIC filter (since 2024-04-07).

    python -m tests.lab.quic_censor --queue 5 --trigger quic-blocked.example --seconds 10

Decrypts each client Initial (its keys derive from the Destination Connection ID in clear;
probe.demo.quic_sni does it with aioquic's crypto), reads the ClientHello's SNI, and on a
match drops the datagram and every UDP datagram between (client IP, server IP, server port)
for `--seconds`, in both directions and from any client port: no reset, no ICMP. Like the GFW
(Zohaib et al., USENIX Security 2025) it inspects only datagrams whose source port is above
their destination port. Queue both directions of the server's UDP port.
"""

from __future__ import annotations

import argparse
import sys
import time

from netfilterqueue import Packet

from probe.demo.quic_sni import initial_sni
from tests.lab import packets
from tests.lab.nfqueue import QueueLoop, common_arguments, log


def censor(args: argparse.Namespace) -> None:
    """Drop QUIC by SNI, then the whole triple for `--seconds`."""
    triggers = set(args.trigger)
    blocked: dict[tuple[str, str, int], float] = {}

    def on_packet(pkt: Packet) -> None:
        ip = packets.parse_ipv4(pkt.get_payload())
        if ip.proto != packets.PROTO_UDP:
            pkt.accept()
            return
        udp = packets.parse_udp(ip.payload)
        now = time.monotonic()
        # The triple as (client, server, server port), whichever way the datagram goes.
        to_server = udp.dport == args.port
        triple = (ip.src, ip.dst, udp.dport) if to_server else (ip.dst, ip.src, udp.sport)
        if blocked.get(triple, 0.0) > now:
            pkt.drop()
            return
        if to_server and udp.sport > udp.dport:
            name = initial_sni(udp.payload)
            if name is not None and name in triggers:
                blocked[triple] = now + args.seconds
                pkt.drop()
                log(f"QUIC Initial from {ip.src}:{udp.sport} to {ip.dst}:{udp.dport} names {name!r}: "
                    f"triple blocked {args.seconds} s")
                return
            if name is not None:
                log(f"QUIC Initial from {ip.src}:{udp.sport} names {name!r}: let through")
        elif to_server:
            log(f"datagram from {ip.src}:{udp.sport} to port {udp.dport}: source port not above it, not inspected")
        pkt.accept()

    QueueLoop(args.queue, on_packet, args.max_seconds).run()


def main(argv: list[str] | None = None) -> int:
    """Run the QUIC censor until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m tests.lab.quic_censor")
    common_arguments(parser)
    parser.add_argument("--trigger", action="append", required=True, help="a server name to block (repeatable)")
    parser.add_argument("--seconds", type=float, default=180.0, help="how long the triple stays blocked")
    parser.add_argument("--port", type=int, default=443, help="the servers' UDP port")
    censor(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
