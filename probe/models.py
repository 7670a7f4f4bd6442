"""Values that cross module boundaries: outcomes, phases and results."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class Outcome(StrEnum):
    """The closed set of probe outcomes (DESIGN.md); the first failing stage wins."""

    OK = "ok"
    DNS_INJECTION = "dns_injection"
    DNS_MISMATCH = "dns_mismatch"
    DNS_NXDOMAIN = "dns_nxdomain"
    DNS_SERVFAIL = "dns_servfail"
    DNS_TIMEOUT = "dns_timeout"
    TCP_TIMEOUT = "tcp_timeout"
    TCP_REFUSED = "tcp_refused"
    TCP_RESET = "tcp_reset"
    TLS_RESET = "tls_reset"
    TLS_TIMEOUT = "tls_timeout"
    TLS_CERT_INVALID = "tls_cert_invalid"
    HTTP_RESET = "http_reset"
    HTTP_TIMEOUT = "http_timeout"
    HTTP_UNEXPECTED = "http_unexpected"
    THROTTLED = "throttled"
    ERROR = "error"

    @property
    def blocked(self) -> bool:
        """Return whether this outcome is an interference class."""
        return self in BLOCKED_OUTCOMES


BLOCKED_OUTCOMES = frozenset(
    {
        Outcome.DNS_INJECTION,
        Outcome.DNS_MISMATCH,
        Outcome.TCP_TIMEOUT,
        Outcome.TCP_RESET,
        Outcome.TLS_RESET,
        Outcome.TLS_TIMEOUT,
        Outcome.TLS_CERT_INVALID,
        Outcome.HTTP_RESET,
        Outcome.HTTP_UNEXPECTED,
        Outcome.THROTTLED,
    }
)


class Phase(StrEnum):
    """Phases of a probe, named as blackbox_exporter names them."""

    RESOLVE = "resolve"
    CONNECT = "connect"
    TLS = "tls"
    PROCESSING = "processing"
    TRANSFER = "transfer"


class PathMethod(StrEnum):
    """How path samples are sent (config `path.method`)."""

    TCP = "tcp"  # SYN -> SYN-ACK to the target's port; through a proxy, its CONNECT reply
    ICMP = "icmp"  # echo request -> reply; direct and source_address routes only


class Deadline:
    """An absolute point on the event loop's monotonic clock by which work must end."""

    __slots__ = ("at",)

    def __init__(self, at: float) -> None:
        self.at = at

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        """Return a deadline `seconds` from now."""
        return cls(asyncio.get_running_loop().time() + seconds)

    def remaining(self) -> float:
        """Return the seconds left, never negative."""
        return max(0.0, self.at - asyncio.get_running_loop().time())

    def earlier(self, seconds: float) -> Deadline:
        """Return this deadline or one `seconds` from now, whichever comes first."""
        return Deadline(min(self.at, asyncio.get_running_loop().time() + seconds))


@dataclass(frozen=True, slots=True)
class DnsResult:
    """What one resolver said about one target name."""

    resolver: str
    outcome: Outcome
    answers: tuple[str, ...] = ()
    replies: int = 0
    consistent: bool | None = None
    duration_seconds: float | None = None
    evidence: tuple[str, ...] = ()
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        """Return the DESIGN.md JSON form."""
        return {
            "resolver": self.resolver,
            "outcome": str(self.outcome),
            "answers": list(self.answers),
            "replies": self.replies,
            "consistent": self.consistent,
            "duration_seconds": _round(self.duration_seconds),
            "evidence": list(self.evidence),
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """Facts about a completed TLS handshake."""

    version: str  # "TLS 1.3", as blackbox_exporter labels it
    earliest_cert_expiry: float | None  # unix seconds, over the verified chain
    cipher: str | None = None


@dataclass(frozen=True, slots=True)
class Injector:
    """What the forged packet of a censor looked like, as it arrived at the vantage (a fingerprint)."""

    kind: str  # "rst" (a TCP reset), "fin" (a close), "data" (a forged answer: block page, DNS reply)
    after_seconds: float  # from sending the trigger to its arrival
    ip_ttl: int | None = None  # None: not captured (the capture needs CAP_NET_RAW)
    ip_id: int | None = None
    tcp_window: int | None = None
    tcp_flags: str | None = None  # e.g. "RA": one letter per flag, as tcpdump writes them
    payload_bytes: int | None = None

    def to_json(self) -> dict[str, object]:
        """Return the DESIGN.md JSON form."""
        return {
            "kind": self.kind, "ip_ttl": self.ip_ttl, "ip_id": self.ip_id, "tcp_window": self.tcp_window,
            "tcp_flags": self.tcp_flags, "payload_bytes": self.payload_bytes,
            "after_seconds": _round(self.after_seconds),
        }


@dataclass(frozen=True, slots=True)
class Localisation:
    """Where on the path the interference happens: the censor's hop, the routers, the injector's fingerprint.

    `hop` is set only when the evidence proves it; `deferred` says why no localisation ran yet.
    """

    hop: int | None = None
    hops: tuple[str | None, ...] = ()  # router per TTL (from ICMP time-exceeded); None: silent
    injector: Injector | None = None
    evidence: tuple[str, ...] = ()
    deferred: str | None = None
    packets: int = 0  # packets sent by the localisation
    duration_seconds: float = 0.0
    finished_at: float = 0.0  # unix seconds

    def to_json(self) -> dict[str, object]:
        """Return the DESIGN.md JSON form: `{"deferred": why}` or `{hop, hops, injector, evidence, ...}`."""
        if self.deferred is not None:
            return {"deferred": self.deferred, "evidence": list(self.evidence)}
        return {
            "hop": self.hop,
            "hops": list(self.hops),
            "injector": self.injector.to_json() if self.injector else None,
            "evidence": list(self.evidence),
            "packets": self.packets,
            "duration_seconds": _round(self.duration_seconds),
            "finished_at": round(self.finished_at, 3),
        }


@dataclass(frozen=True, slots=True)
class ControlHandshake:
    """What the control handshake (control_sni to the target's address and port) met, sent first."""

    server_name: str
    answered: bool  # any server answer counts: a certificate for another name, an alert, a close
    seconds: float
    detail: str  # what was seen, for the evidence line


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The result of one probe of one target over one route."""

    target: str
    route: str
    outcome: Outcome
    started_at: float  # unix seconds (wall clock), when the probe began
    duration_seconds: float
    phases: Mapping[Phase, float] = field(default_factory=dict)
    address: str | None = None
    http_status: int | None = None
    throughput_bytes_per_second: float | None = None
    tls: TlsInfo | None = None
    dns: tuple[DnsResult, ...] = ()
    evidence: tuple[str, ...] = ()
    error: str | None = None
    path: PathResult | None = None  # the pair's latest path sampling run, where `path` is configured
    locate: Localisation | None = None  # the pair's latest localisation (kept until the next one)
    # True: the control answered and the target did not (name filtered); False: neither answered
    # (the address is blocked for any name, or down); None: not tested (Control handshakes).
    sni_filtered: bool | None = None

    @property
    def blocked(self) -> bool:
        """Return whether the outcome is an interference class."""
        return self.outcome.blocked

    @property
    def success(self) -> bool:
        """Return whether every stage passed."""
        return self.outcome is Outcome.OK

    def to_json(self) -> dict[str, object]:
        """Return the DESIGN.md JSON form (`locate` only where a localisation ran or was deferred)."""
        out: dict[str, object] = {
            "target": self.target,
            "route": self.route,
            "outcome": str(self.outcome),
            "blocked": self.blocked,
            "success": self.success,
            "duration_seconds": _round(self.duration_seconds),
            "phases": {str(p): _round(s) for p, s in _ordered(self.phases)},
            "address": self.address,
            "http_status": self.http_status,
            "throughput_bytes_per_second": _round(self.throughput_bytes_per_second),
            "tls_version": self.tls.version if self.tls else None,
            "ssl_earliest_cert_expiry": self.tls.earliest_cert_expiry if self.tls else None,
            "started_at": round(self.started_at, 3),
            "dns": [d.to_json() for d in self.dns],
            "sni_filtered": self.sni_filtered,
            "evidence": list(self.evidence),
            "error": self.error,
            "path": self.path.to_json() if self.path is not None else None,
        }
        if self.locate is not None:
            out["locate"] = self.locate.to_json()
        return out


@dataclass(frozen=True, slots=True)
class PathResult:
    """One path sampling run of one (target, route): `sent` samples, `lost` of them unanswered.

    `rtts` are the answered samples' round-trip times in the order they were sent. Samples that
    failed here (a local error) are neither sent nor lost: `error` says why.
    """

    target: str
    route: str
    method: PathMethod
    started_at: float  # unix seconds
    sent: int
    lost: int
    rtts: tuple[float, ...] = ()
    error: str | None = None
    evidence: tuple[str, ...] = ()

    @property
    def loss(self) -> float | None:
        """Return lost / sent; None when nothing was sent."""
        return self.lost / self.sent if self.sent else None

    def rtt(self, stat: str) -> float | None:
        """Return `min`, `p50`, `p90` or `max` of the answered samples (nearest rank); None without answers."""
        if not self.rtts:
            return None
        ordered = sorted(self.rtts)
        rank = {"min": 0.0, "p50": 0.5, "p90": 0.9, "max": 1.0}[stat]
        return ordered[max(0, math.ceil(rank * len(ordered)) - 1)]

    @property
    def jitter(self) -> float | None:
        """Return the mean absolute difference of consecutive RTTs (RFC 3550's idea, unsmoothed); None below two."""
        r = self.rtts
        if len(r) < 2:
            return None
        return sum(abs(b - a) for a, b in zip(r, r[1:], strict=False)) / (len(r) - 1)

    def to_json(self) -> dict[str, object]:
        """Return the DESIGN.md JSON form."""
        return {
            "method": str(self.method),
            "sent": self.sent,
            "lost": self.lost,
            "rtt_seconds": {s: _round(self.rtt(s)) for s in PATH_STATS},
            "jitter_seconds": _round(self.jitter),
            "started_at": round(self.started_at, 3),
            "evidence": list(self.evidence),
            "error": self.error,
        }


PATH_STATS = ("min", "p50", "p90", "max")


def _ordered(phases: Mapping[Phase, float]) -> list[tuple[Phase, float]]:
    return [(p, phases[p]) for p in Phase if p in phases]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
