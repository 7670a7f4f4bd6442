"""What the `system` resolver reads: /etc/hosts and /etc/resolv.conf, re-read when they change."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import dns.exception
import dns.name
import dns.resolver

from probe.config import is_ip


@dataclass(frozen=True, slots=True)
class ResolvConf:
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    ndots: int = 1
    timeout: float = 2.0  # per nameserver, before the next one is asked
    problem: str | None = None

    def candidates(self, name: str) -> list[str]:
        """Return the names to try in order, as the C library's search rules have it."""
        if name.endswith("."):
            return [name]
        suffixed = [f"{name}.{domain}" for domain in self.search]
        return [name, *suffixed] if name.count(".") >= self.ndots else [*suffixed, name]


def resolv_conf(path: str) -> ResolvConf:
    """Return the parsed resolv.conf at `path` (cached until the file changes)."""
    return _RESOLV_CONF.get(path)


def hosts_addresses(path: str, name: str) -> tuple[str, ...]:
    """Return the addresses the hosts file at `path` lists for `name` (IPv4 first), or ()."""
    return _HOSTS.get(path).get(name.lower().rstrip("."), ())


def _parse_resolv_conf(path: str) -> ResolvConf:
    try:
        r = dns.resolver.Resolver(filename=path, configure=True)
    except (dns.exception.DNSException, ValueError) as e:  # unreadable, no nameservers, bad lines
        return ResolvConf(problem=str(e) or type(e).__name__)
    servers = tuple(ns for ns in r.nameservers if isinstance(ns, str) and is_ip(ns))
    if not servers:
        return ResolvConf(problem="no usable nameserver lines")
    # Without search or domain lines the C library (and dnspython) use the host name's domain.
    search = r.search or ([r.domain] if r.domain != dns.name.root else [])
    return ResolvConf(
        nameservers=servers,
        search=tuple(d.to_text(omit_final_dot=True) for d in search),
        ndots=r.ndots if r.ndots is not None else 1,
        timeout=float(r.timeout),
    )


def _parse_hosts(path: str) -> dict[str, tuple[str, ...]]:
    """Return name -> addresses (IPv4 first, then IPv6, each in file order) from a hosts file."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}  # no hosts file: every name goes to DNS, as with the C library
    by_version: dict[int, dict[str, list[str]]] = {4: {}, 6: {}}
    for line in text.splitlines():
        fields = line.partition("#")[0].split()
        if len(fields) < 2:
            continue
        try:
            ip = ipaddress.ip_address(fields[0].partition("%")[0])
        except ValueError:
            continue
        for host in fields[1:]:
            addresses = by_version[ip.version].setdefault(host.lower().rstrip("."), [])
            if str(ip) not in addresses:
                addresses.append(str(ip))
    names = by_version[4].keys() | by_version[6].keys()
    return {n: (*by_version[4].get(n, ()), *by_version[6].get(n, ())) for n in names}


T = TypeVar("T")


class _FileCache(Generic[T]):
    """Parsed files, read again only when their mtime or size changes."""

    def __init__(self, parse: Callable[[str], T]) -> None:
        self._parse = parse
        self._entries: dict[str, tuple[tuple[int, int] | None, T]] = {}

    def get(self, path: str) -> T:
        try:
            st = os.stat(path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        entry = self._entries.get(path)
        if entry is None or entry[0] != stamp:
            entry = (stamp, self._parse(path))
            self._entries[path] = entry
        return entry[1]


_HOSTS = _FileCache(_parse_hosts)
_RESOLV_CONF = _FileCache(_parse_resolv_conf)
