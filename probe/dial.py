"""Open a timed TCP connection over a route, and the TLS handshake on top of it."""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

from python_socks import ProxyType
from python_socks.async_.asyncio import Proxy as AsyncProxy

from probe.classify import Stage
from probe.config import Route
from probe.models import Phase, TlsInfo
from probe.trace import Trace

STREAM_LIMIT = 64 * 1024
_TLS_VERSIONS = {"TLSv1": "TLS 1.0", "TLSv1.1": "TLS 1.1", "TLSv1.2": "TLS 1.2", "TLSv1.3": "TLS 1.3"}


async def connect(
    host: str, port: int, route: Route, trace: Trace
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to host:port over `route`, timing the `connect` phase.

    `host` is an IP address on direct and bound routes; on proxy routes it may be a name,
    which the proxy resolves (socks5h semantics). Through a proxy, `connect` covers the TCP
    handshake with the proxy and the proxy's own connection to the target.
    """
    trace.peer = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    with trace.phase(Phase.CONNECT, Stage.CONNECT):
        if route.proxy is not None:
            sock = await _proxy_connect(host, port, route)
        else:
            sock = await _direct_connect(host, port, route.source_address)
        reader, writer = await asyncio.open_connection(sock=sock, limit=STREAM_LIMIT)
    trace.enter(Stage.ESTABLISHED)
    return reader, writer


async def _direct_connect(host: str, port: int, source_address: str | None) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source_address is not None:
            sock.bind((source_address, 0))
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _proxy_connect(host: str, port: int, route: Route) -> socket.socket:
    assert route.proxy is not None
    p = route.proxy
    kind = ProxyType.HTTP if p.scheme == "http" else ProxyType.SOCKS5
    proxy = AsyncProxy.create(
        proxy_type=kind,
        host=p.host,
        port=p.port,
        username=p.username,
        password=p.password,
        rdns=p.scheme != "socks5",  # socks5h and http: the proxy resolves the name
    )
    # The probe's deadline bounds this; python-socks wants its own timeout too.
    sock: socket.socket = await proxy.connect(host, port, timeout=3600)
    sock.setblocking(False)
    return sock


async def start_tls(
    writer: asyncio.StreamWriter, context: ssl.SSLContext, server_name: str, trace: Trace
) -> TlsInfo:
    """Run the TLS handshake with SNI `server_name`, timing the `tls` phase."""
    trace.sni = server_name
    with trace.phase(Phase.TLS, Stage.TLS):
        await writer.start_tls(context, server_hostname=server_name)
    ssl_object = writer.get_extra_info("ssl_object")
    info = tls_info(ssl_object)
    trace.tls = info
    return info


def tls_info(ssl_object: Any) -> TlsInfo:
    """Return version, cipher and the earliest expiry over the verified chain."""
    version = ssl_object.version() or ""
    cipher = ssl_object.cipher()
    return TlsInfo(
        version=_TLS_VERSIONS.get(version, version),
        earliest_cert_expiry=_earliest_expiry(ssl_object),
        cipher=cipher[0] if cipher else None,
    )


def _earliest_expiry(ssl_object: Any) -> float | None:
    expiries: list[float] = []
    # get_verified_chain is public from Python 3.13; 3.11 and 3.12 have it on the private object.
    chain_getter = getattr(ssl_object, "get_verified_chain", None) or getattr(
        getattr(ssl_object, "_sslobj", None), "get_verified_chain", None
    )
    if chain_getter is not None:
        for cert in chain_getter() or ():
            info = cert.get_info() if hasattr(cert, "get_info") else None
            if info and info.get("notAfter"):
                expiries.append(float(ssl.cert_time_to_seconds(info["notAfter"])))
    if not expiries:
        peer = ssl_object.getpeercert()
        if peer and peer.get("notAfter"):
            expiries.append(float(ssl.cert_time_to_seconds(peer["notAfter"])))
    return min(expiries) if expiries else None


def close(writer: asyncio.StreamWriter) -> None:
    """Close a connection without waiting on a peer that may never answer."""
    # abort(): a TLS close would wait for the peer's close_notify, which a hostile peer never sends.
    writer.transport.abort()
