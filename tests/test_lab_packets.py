"""The lab's packet forging and its injectors' fingerprints, checked without root."""

from __future__ import annotations

import struct

import dns.flags
import dns.message
import dns.rdatatype
import pytest

from tests.lab import packets

pytest.importorskip("netfilterqueue")
from tests.lab import injector  # noqa: E402  (needs netfilterqueue)


def test_forged_udp_packet_parses_back_with_valid_checksums() -> None:
    raw = packets.udp_packet("198.51.100.53", "192.0.2.10", 53, 40000, b"payload", ttl=233, ident=0)
    assert packets.checksum(raw[:20]) == 0  # a valid IPv4 header sums to zero
    ip = packets.parse_ipv4(raw)
    assert (ip.src, ip.dst, ip.proto, ip.ttl, ip.ident) == ("198.51.100.53", "192.0.2.10", packets.PROTO_UDP, 233, 0)
    udp = packets.parse_udp(ip.payload)
    assert (udp.sport, udp.dport, udp.payload) == (53, 40000, b"payload")
    pseudo = raw[12:20] + struct.pack("!BBH", 0, packets.PROTO_UDP, len(ip.payload))
    assert packets.checksum(pseudo + ip.payload) == 0


def test_forged_rst_carries_the_exact_sequence_number() -> None:
    raw = packets.tcp_packet("198.51.100.20", "192.0.2.10", 443, 40000, 123456789, 0, packets.RST)
    tcp = packets.parse_tcp(packets.parse_ipv4(raw).payload)
    assert (tcp.seq, tcp.flags, tcp.payload) == (123456789, packets.RST, b"")
    pseudo = raw[12:20] + struct.pack("!BBH", 0, packets.PROTO_TCP, len(raw) - 20)
    assert packets.checksum(pseudo + raw[20:]) == 0


@pytest.mark.parametrize("fingerprint", sorted(injector.FINGERPRINTS))
def test_each_fingerprint_forges_a_reply_to_the_query(fingerprint: str) -> None:
    fp = injector.FINGERPRINTS[fingerprint]
    query = dns.message.make_query("blocked.example", "A")
    reply = dns.message.from_wire(injector.forge(query, fp))
    assert reply.id == query.id and query.is_response(reply)
    assert bool(reply.flags & dns.flags.AA) == fp.authoritative
    (rrset,) = reply.answer
    assert rrset.ttl == fp.answer_ttl and rrset[0].address in fp.pool


def test_fingerprints_differ_in_how_they_answer_aaaa() -> None:
    query = dns.message.make_query("blocked.example", "AAAA")
    a_bug = dns.message.from_wire(injector.forge(query, injector.FINGERPRINTS["gfw-a"]))
    clean = dns.message.from_wire(injector.forge(query, injector.FINGERPRINTS["gfw-b"]))
    assert [r.rdtype for r in a_bug.answer] == [dns.rdatatype.A]  # an A record for an AAAA question
    assert clean.answer == []
