"""The config's values: frozen types every other module reads (no YAML, no validation here)."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import zlib
from dataclasses import dataclass, field
from enum import StrEnum

from probe.models import PathMethod

NAME_RE = re.compile(r"^[a-z0-9_.-]+$")
DEFAULT_LISTEN = "0.0.0.0:9516"
DEFAULT_INTERVAL = 30.0
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_DOWNLOAD_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_DNS_REPLY_WINDOW = 0.5
# Path sampling (README "Path quality"). A sample unanswered after PATH_SAMPLE_DEADLINE is lost:
# under Linux's 1 s initial SYN retransmission timeout, so a retransmitted SYN never hides a loss.
PATH_SAMPLE_DEADLINE = 0.9
PATH_MAX_SAMPLES = 100  # per run of one pair
PATH_MIN_GAP = 0.05  # seconds between two samples of one pair: at most 20 a second
PATH_MAX_RATE = 2000.0  # samples a second on average over every pair of a config


class ConfigError(Exception):
    """The config is invalid; `problems` holds one `path: message` line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class ResolverType(StrEnum):
    SYSTEM = "system"
    UDP = "udp"
    TCP = "tcp"
    DOT = "dot"
    DOH = "doh"


class TargetKind(StrEnum):
    HTTP = "http"
    HTTP3 = "http3"  # an https:// url with http_version: 3, probed over QUIC
    TCP = "tcp"
    TLS = "tls"


@dataclass(frozen=True, slots=True)
class Resolver:
    name: str
    type: ResolverType
    host: str | None = None  # an IP address for udp/tcp/dot
    port: int | None = None
    url: str | None = None  # doh
    server_name: str | None = None  # dot: the name its certificate must carry
    control: bool = False
    ca_file: str | None = None


SYSTEM_RESOLVER = Resolver(name="system", type=ResolverType.SYSTEM)


@dataclass(frozen=True, slots=True)
class Proxy:
    scheme: str  # socks5 | socks5h | http
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def redacted(self) -> str:
        """Return the proxy URL without credentials, safe for logs and JSON."""
        auth = "***@" if self.username is not None else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{auth}{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    source_address: str | None = None
    proxy: Proxy | None = None
    resolver: str | None = None  # name of the resolver used for the connection stages


DIRECT_ROUTE = Route(name="direct")


@dataclass(frozen=True, slots=True)
class Expect:
    status: tuple[int, ...] = ()  # empty: any 2xx
    body_contains: tuple[str, ...] = ()
    body_regex: tuple[re.Pattern[str], ...] = ()
    headers: tuple[tuple[str, re.Pattern[str]], ...] = ()  # (lower-case name, pattern)

    def status_ok(self, status: int) -> bool:
        """Return whether `status` is expected."""
        return status in self.status if self.status else 200 <= status <= 299


@dataclass(frozen=True, slots=True)
class Download:
    url: str
    min_bytes_per_second: float
    max_bytes: int = DEFAULT_DOWNLOAD_MAX_BYTES


@dataclass(frozen=True, slots=True)
class HttpCheck:
    """What an http(s) target asks and expects (blackbox_exporter's Module.HTTP); only url targets have one."""

    url: str
    expect: Expect = field(default_factory=Expect)
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    follow_redirects: bool = True
    download: Download | None = None
    allow_insecure_redirects: bool = False  # follow an https -> http redirect (else http_unexpected)


@dataclass(frozen=True, slots=True)
class PathCheck:
    """Multi-sample path quality (DESIGN.md "Path quality"): `samples` spread evenly over `spread` seconds."""

    samples: int
    spread: float
    method: PathMethod = PathMethod.TCP


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    kind: TargetKind
    host: str  # name or IP literal (no brackets)
    port: int
    http: HttpCheck | None = None  # set exactly when kind is HTTP
    server_name: str | None = None  # SNI and certificate name; default: host
    routes: tuple[str, ...] = ("direct",)
    resolvers: tuple[str, ...] = ()
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    ca_file: str | None = None
    dnssec: bool = False  # validate the answer chain (DNSSEC) for this name
    dns_reply_window: float = DEFAULT_DNS_REPLY_WINDOW  # UDP: keep listening this long after the first reply
    group: str | None = None  # endpoints serving the same content (mirrors, regions) share a group
    path: PathCheck | None = None  # multi-sample loss and jitter; None: no path sampling
    locate: bool = False  # find the censor's hop after a run blocked at the DNS, TLS or HTTP stage
    control_sni: str | None = None  # a name nobody filters, for the control handshake (TLS targets only)
    histograms: bool = False  # probe_phase_seconds for this target's pairs: 60 series each (README, "What it costs")
    # Whether the host is a name rather than an IP literal. Kept, not a property: parsing the
    # address costs ~10 us, and /metrics asks for every target on every scrape.
    needs_dns: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "needs_dns", not is_ip(self.host))

    @property
    def uses_tls(self) -> bool:
        """Return whether the probe does a TLS handshake."""
        return self.kind is not TargetKind.TCP and (self.http is None or self.http.url.startswith("https:"))

    @property
    def quic(self) -> bool:
        """Return whether the probe runs over QUIC (UDP) rather than TCP."""
        return self.kind is TargetKind.HTTP3

    @property
    def url(self) -> str | None:
        """Return the URL of an http(s) target, None for the others."""
        return self.http.url if self.http is not None else None

    @property
    def sni(self) -> str:
        """Return the name sent as SNI and checked in the certificate."""
        return self.server_name or self.host



@dataclass(frozen=True, slots=True)
class Config:
    vantage: str
    listen: str
    resolvers: tuple[Resolver, ...]
    routes: tuple[Route, ...]
    targets: tuple[Target, ...]
    canaries: tuple[str, ...] = ()
    bogons: tuple[str, ...] | None = None
    path: str | None = None
    timezone: str | None = None  # IANA name of the vantage's local time; None: the host's
    _targets_by_name: dict[str, Target] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # target() runs for every recorded result: a dict, not a scan of thousands of targets.
        object.__setattr__(self, "_targets_by_name", {t.name: t for t in self.targets})

    def route(self, name: str) -> Route:
        """Return the route called `name`."""
        return next(r for r in self.routes if r.name == name)

    def resolver(self, name: str) -> Resolver:
        """Return the resolver called `name` (`system` always exists)."""
        for r in self.resolvers:
            if r.name == name:
                return r
        if name == SYSTEM_RESOLVER.name:
            return SYSTEM_RESOLVER
        raise KeyError(name)

    def target(self, name: str) -> Target:
        """Return the target called `name`."""
        return self._targets_by_name[name]

    def shard(self, index: int, count: int) -> Config:
        """Return the config with only this shard's targets (of `count`, 0-based `index`).

        A target belongs to shard crc32(name) % count: stable across restarts and replicas,
        and all routes of a target stay in one replica so its ranking stays whole.
        """
        mine = tuple(t for t in self.targets if zlib.crc32(t.name.encode()) % count == index)
        return dataclasses.replace(self, targets=mine)

    def route_resolver(self, route: Route) -> Resolver:
        """Return the resolver whose answers a route connects to."""
        return self.resolver(route.resolver or SYSTEM_RESOLVER.name)


def is_ip(text: str) -> bool:
    """Return whether `text` is an IPv4 or IPv6 literal."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
