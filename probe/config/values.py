"""Parse the config's small value syntaxes: durations, host:port, shards, proxy URLs."""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

from probe.config.model import Proxy

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Parse `250ms`, `10s`, `5m`, `1h30m` into seconds; raise ValueError otherwise."""
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos == 0 or pos != len(text):
        raise ValueError(f"bad duration {text!r} (use e.g. 250ms, 10s, 5m, 1h)")
    return total


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Split `host:port` or `[v6]:port` (port optional when a default is given)."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {text!r}")
        port_text = rest[1:] if rest else ""
    elif text.count(":") > 1:  # bare IPv6
        host, port_text = text, ""
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"bad address {text!r}: no host")
    if not port_text:
        if default_port is None:
            raise ValueError(f"bad address {text!r}: needs host:port")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port_text)


def parse_shard(text: str) -> tuple[int, int]:
    """Parse `i/n` (1-based, as operators count replicas) into a 0-based (index, count)."""
    index, sep, count = text.partition("/")
    if not sep or not index.isdigit() or not count.isdigit() or not 1 <= int(index) <= int(count):
        raise ValueError(f"bad shard {text!r}: use i/n with 1 <= i <= n, e.g. 2/3")
    return int(index) - 1, int(count)


def parse_proxy(text: str) -> Proxy:
    """Parse a `socks5://`, `socks5h://` or `http://` proxy URL."""
    try:
        parts = urlsplit(text)
    except ValueError as e:  # e.g. an unclosed [ of an IPv6 address
        raise ValueError(f"bad proxy {_redact(text)!r}: {str(e)[:80]}") from None
    if parts.scheme not in ("socks5", "socks5h", "http"):
        raise ValueError(f"bad proxy {_redact(text)!r}: scheme must be socks5, socks5h or http")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"bad proxy {_redact(text)!r}: only scheme://[user:pass@]host:port")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad proxy {_redact(text)!r}: bad port") from None
    if port == 0:
        raise ValueError(f"bad proxy {_redact(text)!r}: bad port")
    if not parts.hostname or port is None:
        raise ValueError(f"bad proxy {_redact(text)!r}: needs host:port")
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return Proxy(parts.scheme, parts.hostname, port, user, password)


def _redact(url: str) -> str:
    # Greedy up to the last '@': an unencoded '@' or '/' in a password must not leak.
    # DOTALL: a line break in the password must not end the match and leak the rest.
    return re.sub(r"//.*@", "//***@", url, flags=re.DOTALL)

