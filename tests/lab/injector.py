"""An on-path DNS injector on the border router (NFQUEUE): forged replies that beat the real one.

    python -m tests.lab.injector --queue 4 --fingerprint gfw-a [--fingerprint gfw-b] --name blocked.example
                                 [--poison] [--to ADDR]

Each queued UDP query for a watched name (or a subdomain of one) is answered at once with a
forged reply per fingerprint, sent from the queried server's address through a raw socket,
before the query itself goes on: the forgeries always arrive first. `--poison` drops the query instead, so the
forged reply is the only one (a resolver that lies, as seen from outside). `--to` restricts it
to queries sent to these addresses (e.g. a canary that runs no DNS server).

Fingerprints, so that several injectors on one path are told apart, as measurements of the
Great Firewall tell its injectors apart: the IP TTL and IP ID of the forged packet, the answer
TTL, the AA flag, the forged address pool, and how AAAA queries are answered.
"""

from __future__ import annotations

import argparse
import random
import sys
import zlib
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from netfilterqueue import Packet

from tests.lab import packets
from tests.lab.nfqueue import QueueLoop, common_arguments, log


@dataclass(frozen=True)
class Fingerprint:
    ip_ttl: int | None  # None: random per packet
    ip_id: str  # "zero" | "random"
    answer_ttl: int
    authoritative: bool
    pool: tuple[str, ...]  # forged IPv4 answers; one per name, picked by hash
    aaaa_as_a: bool  # answer AAAA queries with an A record (a documented injector bug)


FINGERPRINTS = {
    "gfw-a": Fingerprint(ip_ttl=None, ip_id="random", answer_ttl=60, authoritative=False,
                         pool=tuple(f"203.0.113.{i}" for i in range(100, 110)), aaaa_as_a=True),
    "gfw-b": Fingerprint(ip_ttl=233, ip_id="zero", answer_ttl=218, authoritative=True,
                         pool=tuple(f"198.51.100.{i}" for i in range(200, 210)), aaaa_as_a=False),
    "poison": Fingerprint(ip_ttl=64, ip_id="random", answer_ttl=300, authoritative=False,
                          pool=("203.0.113.66",), aaaa_as_a=False),
}


def forge(query: dns.message.Message, fp: Fingerprint) -> bytes:
    """Return a forged reply to `query` with this fingerprint's answers."""
    reply = dns.message.make_response(query)
    if fp.authoritative:
        reply.flags |= dns.flags.AA
    q = query.question[0]
    address = fp.pool[zlib.crc32(q.name.to_text().lower().encode()) % len(fp.pool)]
    if q.rdtype == dns.rdatatype.A or (q.rdtype == dns.rdatatype.AAAA and fp.aaaa_as_a):
        reply.answer.append(dns.rrset.from_text_list(q.name, fp.answer_ttl, dns.rdataclass.IN, "A", [address]))
    return reply.to_wire()


def watched(name: dns.name.Name, names: list[dns.name.Name]) -> bool:
    """Return whether `name` is one of `names` or below one (no names: every name)."""
    return not names or any(name.is_subdomain(n) for n in names)


def main(argv: list[str] | None = None) -> int:
    """Inject until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m tests.lab.injector")
    common_arguments(parser)
    parser.add_argument("--fingerprint", choices=sorted(FINGERPRINTS), action="append",
                        help="one forged reply per fingerprint (repeatable; default gfw-a)")
    parser.add_argument("--name", action="append", default=[], help="inject for this name and below (repeatable)")
    parser.add_argument("--to", action="append", default=[], help="only queries sent to this address (repeatable)")
    parser.add_argument("--poison", action="store_true", help="drop the query: the forged reply is the only one")
    args = parser.parse_args(argv)
    fingerprints = [(name, FINGERPRINTS[name]) for name in args.fingerprint or ["gfw-a"]]
    names = [dns.name.from_text(n) for n in args.name]
    sender = packets.raw_sender()
    rng = random.Random()

    def on_packet(pkt: Packet) -> None:
        try:
            ip = packets.parse_ipv4(pkt.get_payload())
            udp = packets.parse_udp(ip.payload)
            query = dns.message.from_wire(udp.payload)
        except (ValueError, dns.exception.DNSException):
            pkt.accept()
            return
        if not query.question or not watched(query.question[0].name, names) or (args.to and ip.dst not in args.to):
            pkt.accept()
            return
        q = query.question[0]
        for name, fp in fingerprints:
            forged = packets.udp_packet(
                ip.dst, ip.src, udp.dport, udp.sport, forge(query, fp),
                ttl=fp.ip_ttl if fp.ip_ttl is not None else rng.randint(40, 120),
                ident=0 if fp.ip_id == "zero" else rng.randint(1, 0xFFFF),
            )
            packets.send(sender, forged)
            log(f"{name}: forged {q.name} {dns.rdatatype.to_text(q.rdtype)} for {ip.src} from {ip.dst}")
        if args.poison:
            pkt.drop()
        else:
            pkt.accept()

    QueueLoop(args.queue, on_packet, args.max_seconds).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
