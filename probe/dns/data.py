"""Shipped DNS reference data: addresses no honest answer holds, and the root's DNSSEC trust anchors."""

from __future__ import annotations

import functools
import ipaddress
from importlib import resources

import dns.exception
import dns.rrset

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# RFC 6890 special-purpose ranges (with their updates) that no public name resolves to, plus
# multicast. Left out on purpose: the documentation ranges 192.0.2.0/24, 198.51.100.0/24,
# 203.0.113.0/24 and 2001:db8::/32, which labs use as stand-ins for public addresses; the NAT64
# prefix 64:ff9b::/96, which DNS64 resolvers put into honest AAAA answers; and 6to4 2002::/16.
BUILTIN_BOGONS: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared address space (carrier-grade NAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.88.99.0/24", "6to4 relay anycast"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("100::/64", "discard-only"),
    ("2001::/32", "Teredo"),
    ("2001:2::/48", "benchmarking"),
    ("2001:10::/28", "ORCHID"),
    ("fc00::/7", "unique local"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
)
FORGED_FILE = "gfw-forged.txt"
ROOT_ANCHORS_FILE = "root-anchors.txt"


class KnownForged:
    """Answers that cannot be honest: bogons (configured, or the built-in set) and the documented GFW set."""

    def __init__(self, bogons: tuple[str, ...] | None = None) -> None:
        if bogons is None:
            self._bogons = [(ipaddress.ip_network(n), f"{name} {n}") for n, name in BUILTIN_BOGONS]
        else:
            self._bogons = [(ipaddress.ip_network(n), f"in the configured bogons {n}") for n in bogons]
        self._documented = documented_forged()

    def why(self, address: str) -> str | None:
        """Return why `address` is no honest answer (`a bogon (loopback 127.0.0.0/8)`), or None."""
        ip = ipaddress.ip_address(address)
        bogon = next((name for net, name in self._bogons if ip.version == net.version and ip in net), None)
        if any(ip.version == net.version and ip in net for net in self._documented):
            return f"in the documented GFW forged set ({bogon})" if bogon else "in the documented GFW forged set"
        return f"a bogon ({bogon})" if bogon else None


@functools.cache
def documented_forged() -> tuple[IPNetwork, ...]:
    """Return the documented GFW forged addresses shipped in probe/data/gfw-forged.txt."""
    text = resources.files("probe").joinpath("data", FORGED_FILE).read_text(encoding="utf-8")
    lines = (line.partition("#")[0].strip() for line in text.splitlines())
    return tuple(ipaddress.ip_network(line) for line in lines if line)


@functools.cache
def root_anchors() -> tuple[dns.rrset.RRset, ...]:
    """Return the root zone's trust anchors (IANA's DS records) shipped in probe/data/root-anchors.txt."""
    text = resources.files("probe").joinpath("data", ROOT_ANCHORS_FILE).read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    try:
        return (dns.rrset.from_text_list(".", 172800, "IN", "DS", [line.split(None, 3)[3] for line in lines]),)
    except (dns.exception.DNSException, IndexError) as e:
        raise ValueError(f"probe/data/{ROOT_ANCHORS_FILE}: {e}") from e
