"""Connect through a SOCKS5 or HTTP CONNECT proxy, and say what the proxy's refusals mean."""

from __future__ import annotations

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


async def proxy_connect(host: str, port: int, p: Proxy, source_address: str | None, trace: Trace) -> socket.socket:
    proxy = AsyncProxy(
        proxy_type=ProxyType.HTTP if p.scheme == "http" else ProxyType.SOCKS5,
        host=p.host,
        port=p.port,
        username=p.username,
        password=p.password,
        rdns=True,  # the proxy resolves names: local poisoning cannot touch them
    )
    try:
        # The probe's deadline bounds this; python-socks wants its own timeout too.
        local = (source_address, 0) if source_address is not None else None
        sock: socket.socket = await proxy.connect(host, port, timeout=3600, local_addr=local)
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
