"""Turn what went wrong, and at which stage, into one closed outcome: the one mapping table."""

from __future__ import annotations

import errno
import socket
import ssl
from enum import StrEnum

import dns.exception
import h11
from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError

from probe.models import Outcome


class Stage(StrEnum):
    """Where a probe is; an exception is read in the light of the stage it broke."""

    RESOLVE = "resolve"
    CONNECT = "connect"  # TCP handshake (to the proxy, then through it, on proxy routes)
    ESTABLISHED = "established"  # connected, nothing sent yet
    TLS = "tls"  # ClientHello sent, handshake under way
    REQUEST = "request"  # HTTP request sent, waiting for the response head
    TRANSFER = "transfer"  # reading the response body
    DOWNLOAD = "download"  # the throughput download
    QUERY = "query"  # one DNS query to one resolver (udp, tcp, dot, doh)


class ProbeFailure(Exception):
    """A failure whose outcome the prober already knows (expectations, DNS verdicts)."""

    outcome: Outcome = Outcome.ERROR

    def __init__(self, message: str, outcome: Outcome | None = None) -> None:
        super().__init__(message)
        if outcome is not None:
            self.outcome = outcome


class DnsFailure(ProbeFailure):
    """Resolution failed; `outcome` is one of the dns_* outcomes."""


class Unexpected(ProbeFailure):
    """The response differs from `expect`."""

    outcome = Outcome.HTTP_UNEXPECTED


class MonitorStall(ProbeFailure):
    """A timeout that was the monitor's own: its loop stalled, or the kernel had the answer in time."""

    outcome = Outcome.ERROR


class Throttled(ProbeFailure):
    """The download ran below `min_bytes_per_second`."""

    outcome = Outcome.THROTTLED


class QuicClosed(Exception):
    """A QUIC connection ended by CONNECTION_CLOSE: the peer's (`by_peer`), or ours after a TLS alert or bad HTTP/3."""

    def __init__(self, error_code: int, reason: str, *, by_peer: bool, alert: int | None = None) -> None:
        who = "peer" if by_peer else "we"
        what = f"TLS alert {alert}" if alert is not None else f"error 0x{error_code:x}"
        super().__init__(f"{who} closed the connection ({what}){': ' + reason if reason else ''}")
        self.error_code = error_code
        self.reason = reason
        self.by_peer = by_peer
        self.alert = alert  # the TLS alert of a CRYPTO_ERROR close (RFC 9001 4.8), else None


class QuicStreamReset(Exception):
    """The peer reset the request stream (RESET_STREAM)."""

    def __init__(self, error_code: int) -> None:
        super().__init__(f"stream reset by the peer (error 0x{error_code:x})")
        self.error_code = error_code


_TIMEOUT_BY_STAGE = {
    Stage.QUERY: Outcome.DNS_TIMEOUT,
    Stage.RESOLVE: Outcome.DNS_TIMEOUT,
    Stage.CONNECT: Outcome.TCP_TIMEOUT,
    Stage.ESTABLISHED: Outcome.TCP_TIMEOUT,
    Stage.TLS: Outcome.TLS_TIMEOUT,
    Stage.REQUEST: Outcome.HTTP_TIMEOUT,
    Stage.TRANSFER: Outcome.HTTP_TIMEOUT,
    Stage.DOWNLOAD: Outcome.HTTP_TIMEOUT,
}
# Timeouts are the outcomes a stalled monitor can fake; run_traced re-reads them as MonitorStall.
TIMEOUT_OUTCOMES = frozenset(_TIMEOUT_BY_STAGE.values())
_RESET_BY_STAGE = {
    Stage.QUERY: Outcome.DNS_SERVFAIL,  # a resolver that hung up: resolution failed
    Stage.CONNECT: Outcome.TCP_REFUSED,  # an RST answering the SYN
    Stage.ESTABLISHED: Outcome.TCP_RESET,
    Stage.TLS: Outcome.TLS_RESET,
    Stage.REQUEST: Outcome.HTTP_RESET,
    Stage.TRANSFER: Outcome.HTTP_RESET,
    Stage.DOWNLOAD: Outcome.HTTP_RESET,
}
# ICMP answers to a SYN are refusals, like an RST: the path answered, nothing listens.
_REFUSED_ERRNOS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}
# Our own side failed: an address not ours, no free fd or port, a family or argument the host refuses.
LOCAL_ERRNOS = frozenset({errno.EADDRNOTAVAIL, errno.EADDRINUSE, errno.EMFILE, errno.ENFILE, errno.EACCES,
                          errno.EAFNOSUPPORT, errno.EINVAL, errno.ENOBUFS, errno.ENOMEM})
# TLS alerts (RFC 8446 6.2) our own verification sends about the peer's certificate.
_CERT_ALERTS = {42, 43, 44, 45, 46, 48}
_RESET_TYPES = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, ssl.SSLEOFError, EOFError)

# What a proxy's refusal means (python-socks puts the SOCKS5 reply code or the HTTP status in
# error_code). Anything not listed is tcp_refused: the proxy could not, or would not, reach the target.
_SOCKS_REPLIES = {6: Outcome.TCP_TIMEOUT, 7: Outcome.ERROR, 8: Outcome.ERROR}  # TTL expired; unsupported
_HTTP_PROXY_STATUSES = {504: Outcome.TCP_TIMEOUT}  # the proxy's own connection timed out


def classify(stage: Stage, exc: BaseException) -> Outcome:
    """Return the outcome for `exc` raised at `stage`; most specific rules first."""
    if isinstance(exc, ProbeFailure):
        return exc.outcome
    if isinstance(exc, TimeoutError | ProxyTimeoutError | dns.exception.Timeout):
        return _TIMEOUT_BY_STAGE.get(stage, Outcome.ERROR)
    if isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS or isinstance(exc, socket.gaierror):
        return Outcome.ERROR  # never blame the network for our own side
    if stage is Stage.QUERY:
        # A resolver that answers garbage, breaks TLS or hangs up failed to resolve. dnspython's
        # wire parser raises arbitrary types on hostile bytes, so every other row reads the same.
        return Outcome.DNS_SERVFAIL
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Outcome.TLS_CERT_INVALID
    if isinstance(exc, QuicClosed):
        if not exc.by_peer and exc.alert in _CERT_ALERTS:
            return Outcome.TLS_CERT_INVALID
        if stage is Stage.TLS:
            return Outcome.TLS_RESET  # the peer or the path broke the handshake (CONNECTION_CLOSE)
        if exc.by_peer:
            return _RESET_BY_STAGE.get(stage, Outcome.ERROR)
        # We closed it after the handshake: the answer was not HTTP/3 (a frame or stream error).
        return Outcome.HTTP_UNEXPECTED if stage in (Stage.REQUEST, Stage.TRANSFER, Stage.DOWNLOAD) else Outcome.ERROR
    if isinstance(exc, QuicStreamReset):
        return _RESET_BY_STAGE.get(stage, Outcome.ERROR)
    if isinstance(exc, _RESET_TYPES):
        return _RESET_BY_STAGE.get(stage, Outcome.ERROR)
    if isinstance(exc, ssl.SSLError) and stage is Stage.TLS:
        return Outcome.TLS_RESET  # the handshake was broken: garbage or an alert instead of a ServerHello
    if isinstance(exc, ssl.SSLError) and stage in (Stage.REQUEST, Stage.TRANSFER, Stage.DOWNLOAD):
        return Outcome.HTTP_RESET
    if isinstance(exc, h11.RemoteProtocolError):
        return Outcome.HTTP_UNEXPECTED  # not HTTP at all: an injected or broken answer
    if isinstance(exc, ProxyConnectionError):
        return connect_errno(exc.errno) if stage is Stage.CONNECT else Outcome.ERROR
    if isinstance(exc, ProxyError):
        # The proxy answered but would not carry us: it refused or could not reach the target.
        return Outcome.TCP_REFUSED
    if isinstance(exc, OSError) and stage is Stage.TLS and exc.errno in _REFUSED_ERRNOS:
        return Outcome.TLS_RESET  # ICMP unreachable answering a QUIC Initial: the path broke the handshake
    if isinstance(exc, OSError) and stage is Stage.CONNECT:
        return connect_errno(exc.errno)
    if isinstance(exc, OSError) and exc.errno == errno.ECONNRESET:
        return _RESET_BY_STAGE.get(stage, Outcome.ERROR)
    return Outcome.ERROR


def connect_errno(code: int | None) -> Outcome:
    """Return what an errno from a TCP connect (direct, or to a proxy) means."""
    if code in _REFUSED_ERRNOS:
        return Outcome.TCP_REFUSED
    if code == errno.ETIMEDOUT:
        return Outcome.TCP_TIMEOUT
    return Outcome.ERROR  # a local fault, or one we cannot read: never blamed on the network


def proxy_refusal(scheme: str, code: int) -> Outcome:
    """Return what a proxy's refusal to connect to the target means (SOCKS5 reply code or HTTP status)."""
    table = _HTTP_PROXY_STATUSES if scheme == "http" else _SOCKS_REPLIES
    return table.get(code, Outcome.TCP_REFUSED)


def describe(exc: BaseException) -> str:
    """Return `Type: message` for an exception, as the JSON `error` field shows it."""
    text = str(exc)
    if isinstance(exc, TimeoutError) and not text:
        text = "deadline reached"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
