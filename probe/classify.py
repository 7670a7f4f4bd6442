"""Turn what went wrong, and at which stage, into one closed outcome: the one mapping table."""

from __future__ import annotations

import errno
import ssl
from enum import StrEnum

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


class Throttled(ProbeFailure):
    """The download ran below `min_bytes_per_second`."""

    outcome = Outcome.THROTTLED


_TIMEOUT_BY_STAGE = {
    Stage.RESOLVE: Outcome.DNS_TIMEOUT,
    Stage.CONNECT: Outcome.TCP_TIMEOUT,
    Stage.ESTABLISHED: Outcome.TCP_TIMEOUT,
    Stage.TLS: Outcome.TLS_TIMEOUT,
    Stage.REQUEST: Outcome.HTTP_TIMEOUT,
    Stage.TRANSFER: Outcome.HTTP_TIMEOUT,
    Stage.DOWNLOAD: Outcome.HTTP_TIMEOUT,
}
_RESET_BY_STAGE = {
    Stage.CONNECT: Outcome.TCP_REFUSED,  # an RST answering the SYN
    Stage.ESTABLISHED: Outcome.TCP_RESET,
    Stage.TLS: Outcome.TLS_RESET,
    Stage.REQUEST: Outcome.HTTP_RESET,
    Stage.TRANSFER: Outcome.HTTP_RESET,
    Stage.DOWNLOAD: Outcome.HTTP_RESET,
}
# ICMP answers to a SYN are refusals, like an RST: the path answered, nothing listens.
_REFUSED_ERRNOS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}
_LOCAL_ERRNOS = {errno.EADDRNOTAVAIL, errno.EADDRINUSE, errno.EMFILE, errno.ENFILE, errno.EACCES}
_RESET_TYPES = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, ssl.SSLEOFError, EOFError)


def classify(stage: Stage, exc: BaseException) -> Outcome:
    """Return the outcome for `exc` raised at `stage`; most specific rules first."""
    if isinstance(exc, ProbeFailure):
        return exc.outcome
    if isinstance(exc, TimeoutError | ProxyTimeoutError):
        return _TIMEOUT_BY_STAGE.get(stage, Outcome.ERROR)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Outcome.TLS_CERT_INVALID
    if isinstance(exc, _RESET_TYPES):
        return _RESET_BY_STAGE.get(stage, Outcome.ERROR)
    if isinstance(exc, ssl.SSLError) and stage is Stage.TLS:
        return Outcome.TLS_RESET  # the handshake was broken: garbage or an alert instead of a ServerHello
    if isinstance(exc, ssl.SSLError) and stage in (Stage.REQUEST, Stage.TRANSFER, Stage.DOWNLOAD):
        return Outcome.HTTP_RESET
    if isinstance(exc, h11.RemoteProtocolError):
        return Outcome.HTTP_UNEXPECTED  # not HTTP at all: an injected or broken answer
    if isinstance(exc, ProxyConnectionError):
        return Outcome.TCP_REFUSED if stage is Stage.CONNECT else Outcome.ERROR
    if isinstance(exc, ProxyError):
        # The proxy answered but would not carry us: it refused or could not reach the target.
        return Outcome.TCP_REFUSED
    if isinstance(exc, OSError) and stage is Stage.CONNECT:
        if exc.errno in _REFUSED_ERRNOS:
            return Outcome.TCP_REFUSED
        if exc.errno == errno.ETIMEDOUT:
            return Outcome.TCP_TIMEOUT
        if exc.errno in _LOCAL_ERRNOS:
            return Outcome.ERROR
    if isinstance(exc, OSError) and exc.errno == errno.ECONNRESET:
        return _RESET_BY_STAGE.get(stage, Outcome.ERROR)
    return Outcome.ERROR


def describe(exc: BaseException) -> str:
    """Return `Type: message` for an exception, as the JSON `error` field shows it."""
    text = str(exc)
    if isinstance(exc, TimeoutError) and not text:
        text = "deadline reached"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
