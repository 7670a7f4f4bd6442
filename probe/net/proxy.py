"""Connect through a SOCKS5 or HTTP CONNECT proxy, and say what the proxy's refusals mean."""

from __future__ import annotations

import asyncio
import base64
import os
import socket

from python_socks import ProxyConnectionError, ProxyError, ProxyType
from python_socks.async_.asyncio import Proxy as AsyncProxy

from probe.classify import ProbeFailure, connect_errno, proxy_refusal
from probe.config import Proxy
from probe.models import Outcome
from probe.trace import Trace


class ProxyFailure(ProbeFailure):
    """The proxy was unreachable, refused the credentials, or would not carry the probe to the target."""

    def __init__(self, message: str, outcome: Outcome, reason: str | None = None) -> None:
        super().__init__(message, outcome)
        self.reason = reason or message  # the probe's evidence line ends with this


_HTTP_AUTH_STATUSES = {401, 407}


MAX_CONNECT_REPLY = 16 * 1024  # an HTTP proxy's reply head larger than this is not an honest proxy


async def proxy_connect(host: str, port: int, p: Proxy, source_address: str | None, trace: Trace) -> socket.socket:
    """Open a tunnel to host:port through the proxy `p`; ProxyFailure names what went wrong."""
    if p.scheme == "http":
        connect = _http_connect(host, port, p, source_address)
    else:
        connect = _socks_connect(host, port, p, source_address)
    try:
        sock = await connect
    except ProxyConnectionError as e:
        trace.peer = f"proxy {p.redacted()}"
        raise _unreachable(p, e, source_address) from e
    except ProxyError as e:
        raise _refused(p, e, trace) from e
    except (ConnectionError, EOFError) as e:
        trace.peer = f"proxy {p.redacted()}"
        raise ProxyFailure(f"proxy {p.redacted()} reset the connection during its handshake", Outcome.TCP_RESET) from e
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def _socks_connect(host: str, port: int, p: Proxy, source_address: str | None) -> socket.socket:
    proxy = AsyncProxy(
        proxy_type=ProxyType.HTTP if p.scheme == "http" else ProxyType.SOCKS5,
        host=p.host,
        port=p.port,
        username=p.username,
        password=p.password,
        rdns=True,  # the proxy resolves names: local poisoning cannot touch them
    )
    # The probe's deadline bounds this; python-socks wants its own timeout too.
    local = (source_address, 0) if source_address is not None else None
    sock: socket.socket = await proxy.connect(host, port, timeout=3600, local_addr=local)
    return sock


async def _http_connect(host: str, port: int, p: Proxy, source_address: str | None) -> socket.socket:
    """Open an HTTP CONNECT tunnel, reading the proxy's reply head to its end however it is split.

    python-socks parsed the first recv() as the whole reply: an honest proxy that split its reply
    made probes fail, and a `200` never finished made a TCP target `ok`. Only the reply head is
    consumed (peeked first): bytes after it belong to the tunnel.
    """
    loop = asyncio.get_running_loop()
    sock: socket.socket | None = None
    try:
        family, kind, proto, _, address = (await loop.getaddrinfo(p.host, p.port, type=socket.SOCK_STREAM))[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        if source_address is not None:
            sock.bind((source_address, 0))
        await loop.sock_connect(sock, address)
    except OSError as e:
        if sock is not None:
            sock.close()
        raise ProxyConnectionError(e.errno, f"cannot connect to the proxy: {e.strerror or e}") from e
    try:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        head = f"CONNECT {where} HTTP/1.1\r\nHost: {where}\r\n"
        if p.username is not None:
            token = base64.b64encode(f"{p.username}:{p.password or ''}".encode()).decode()
            head += f"Proxy-Authorization: Basic {token}\r\n"
        await loop.sock_sendall(sock, (head + "\r\n").encode())
        reply = await _reply_head(sock)
        status_line = reply.split(b"\r\n", 1)[0].decode("latin-1")
        version, _, rest = status_line.partition(" ")
        code_text, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/") or not code_text.isdigit():
            raise ProxyError(f"not an HTTP reply: {status_line[:100]!r}")
        code = int(code_text)
        if not 200 <= code < 300:
            raise ProxyError(f"{code} {reason}"[:200], code)
    except BaseException:
        sock.close()
        raise
    return sock


async def _reply_head(sock: socket.socket) -> bytes:
    """Return the proxy's reply head up to its blank line; leave what follows in the socket."""
    head = bytearray()
    while True:
        await _readable(sock)
        peeked = sock.recv(MAX_CONNECT_REPLY, socket.MSG_PEEK)
        if not peeked:
            raise ProxyError(f"the proxy closed the connection after {len(head)} bytes of its reply")
        end = (head[-3:] + peeked).find(b"\r\n\r\n")
        take = len(peeked) if end < 0 else end + 4 - len(head[-3:])
        head += sock.recv(take)
        if end >= 0:
            return bytes(head)
        if len(head) > MAX_CONNECT_REPLY:
            raise ProxyError(f"the proxy's reply head is larger than {MAX_CONNECT_REPLY} bytes")


async def _readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


def _unreachable(p: Proxy, e: ProxyConnectionError, source_address: str | None) -> ProxyFailure:
    text = os.strerror(e.errno) if e.errno else str(e)
    outcome = connect_errno(e.errno)  # the errno rows of a direct connect
    if outcome is Outcome.ERROR and source_address is not None:  # a local fault, e.g. an address not ours
        return ProxyFailure(f"cannot connect to proxy {p.redacted()} from {source_address}: {text}", outcome)
    reason = f"{text}; the proxy itself is unreachable"
    return ProxyFailure(f"proxy {p.redacted()} is unreachable: {text}", outcome, reason)


def _refused(p: Proxy, e: ProxyError, trace: Trace) -> ProxyFailure:
    answer, code = str(e), e.error_code
    # python-socks reports SOCKS5 authentication failures by message only, without a code.
    auth_failed = code in _HTTP_AUTH_STATUSES if p.scheme == "http" else "authentication" in answer.lower()
    if auth_failed:
        what = "rejected the credentials" if p.username is not None else "requires credentials"
        return ProxyFailure(f"proxy {p.redacted()} {what}: {answer}", Outcome.ERROR)
    if code is None:  # it hung up or answered something that is not the protocol
        trace.peer = f"proxy {p.redacted()}"
        trace.note(f"proxy {p.redacted()} broke off its handshake: {answer}")
        return ProxyFailure(f"proxy {p.redacted()} broke off its handshake: {answer}", Outcome.TCP_RESET)
    if p.scheme == "http":
        detail = f"the proxy answered {answer!r}"
    else:
        detail = f"the proxy answered {answer!r} (SOCKS5 reply {code})"
    return ProxyFailure(f"proxy {p.redacted()} did not connect to the target: {detail}", proxy_refusal(p.scheme, code),
                        detail)
