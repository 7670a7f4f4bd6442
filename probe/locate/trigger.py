"""The packets a localisation repeats: the target's ClientHello, its plain-HTTP request, its DNS query."""

from __future__ import annotations

import ssl
from urllib.parse import urlsplit

import dns.exception
import dns.flags
import dns.message
import dns.rdatatype


def client_hello(server_name: str) -> bytes:
    """Return the first flight of a TLS handshake naming `server_name` (SNI), as the probe sends it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def http_request(url: str, method: str = "GET") -> bytes:
    """Return the plain-HTTP request head of `url` (the Host header and path are what censors match)."""
    parts = urlsplit(url)
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: probe\r\nAccept: */*\r\n\r\n".encode()


def dns_query(name: str) -> tuple[bytes, int]:
    """Return an A query for `name` and its id."""
    query = dns.message.make_query(name, dns.rdatatype.A)
    return query.to_wire(), query.id


def dns_reply_matches(wire: bytes, query_id: int) -> bool:
    """Return whether `wire` is a DNS response with the query's id."""
    try:
        reply = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError):  # unparsable: not an answer to us
        return False
    return bool(reply.id == query_id and reply.flags & dns.flags.QR)
