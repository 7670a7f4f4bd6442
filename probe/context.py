"""The injectable pieces a probe runs with: TLS contexts, the DoH HTTP session, DNS integrity settings."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
import dns.rrset

from probe.config import Config
from probe.dnsdata import KnownForged, root_anchors
from probe.models import DnsResult, Outcome

# The verdicts a probe's resolve step acts on: the answers cannot be used.
UNUSABLE_ANSWERS = frozenset({Outcome.DNS_INJECTION, Outcome.DNS_MISMATCH})


class TlsContexts:
    """Client SSL contexts, built once per CA file: the system store plus the extra CA bundle."""

    def __init__(self) -> None:
        self._verify: dict[str | None, ssl.SSLContext] = {}
        self._dns: dict[str | None, ssl.SSLContext] = {}

    def verifying(self, ca_file: str | None) -> ssl.SSLContext:
        """Return a context that verifies against the system store plus `ca_file`."""
        ctx = self._verify.get(ca_file)
        if ctx is None:
            ctx = ssl.create_default_context()
            if ca_file:
                ctx.load_verify_locations(cafile=ca_file)
            ctx.set_alpn_protocols(["http/1.1"])
            self._verify[ca_file] = ctx
        return ctx

    def dns_tls(self, ca_file: str | None) -> ssl.SSLContext:
        """Return a context for DNS over TLS: like `verifying`, but offering ALPN "dot" (RFC 7858)."""
        ctx = self._dns.get(ca_file)
        if ctx is None:
            ctx = ssl.create_default_context()
            if ca_file:
                ctx.load_verify_locations(cafile=ca_file)
            ctx.set_alpn_protocols(["dot"])
            self._dns[ca_file] = ctx
        return ctx


@dataclass(frozen=True, slots=True)
class DnsVerdict:
    """A DNS check result kept for the resolve steps of later probes (event loop clock times)."""

    result: DnsResult
    checked_at: float
    expires_at: float
    trusted: frozenset[str] = frozenset()  # the control answers of the same check


@dataclass
class ProbeContext:
    """Everything a prober needs besides (target, route, deadline); one per running config."""

    config: Config
    tls: TlsContexts = field(default_factory=TlsContexts)
    # The `system` resolver reads these; tests point them at their own files and loopback server.
    resolv_conf: str = "/etc/resolv.conf"
    hosts_file: str = "/etc/hosts"
    system_dns_port: int = 53  # resolv.conf cannot carry a port
    # DNS integrity checks (probe.integrity). Canaries run no DNS server: any reply was injected.
    canary_port: int = 53
    canary_wait: float = 1.0  # seconds a canary query waits for an injected reply (bounded by the deadline)
    control_name: str = "example.com"  # a name nobody blocks: a canary must not answer it either
    nxdomain_zone: str = "example.com"  # random names under it do not exist: the NXDOMAIN-rewrite probe
    trust_anchors: tuple[dns.rrset.RRset, ...] = field(default_factory=root_anchors)  # DS or DNSKEY sets
    tls_check_timeout: float = 3.0  # the TLS check of an answer that differs from the controls
    _http: dict[str | None, aiohttp.ClientSession] = field(default_factory=dict)
    _forged: KnownForged | None = None
    _verdicts: dict[tuple[str, str], DnsVerdict] = field(default_factory=dict)
    # resolver name -> (recheck after, evidence that it rewrites NXDOMAIN or None)
    nx_rewrites: dict[str, tuple[float, str | None]] = field(default_factory=dict)

    @property
    def known_forged(self) -> KnownForged:
        """Return the bogons of the config (or the built-in set) and the documented GFW forged set."""
        if self._forged is None:
            self._forged = KnownForged(self.config.bogons)
        return self._forged

    def remember_dns(
        self, host: str, results: Sequence[DnsResult], valid_for: float, trusted: frozenset[str] = frozenset()
    ) -> None:
        """Keep the DNS check's verdicts for `host`, one per resolver, for `valid_for` seconds."""
        now = asyncio.get_running_loop().time()
        for result in results:
            key = (host.lower().rstrip("."), result.resolver)
            self._verdicts[key] = DnsVerdict(result, now, now + valid_for, trusted)

    def dns_verdict(self, host: str, resolver: str) -> DnsVerdict | None:
        """Return the latest unexpired DNS check verdict on `host` through `resolver`, if any."""
        verdict = self._verdicts.get((host.lower().rstrip("."), resolver))
        if verdict is None or verdict.expires_at < asyncio.get_running_loop().time():
            return None
        return verdict

    def http_session(self, source_address: str | None = None) -> aiohttp.ClientSession:
        """Return the shared aiohttp session (DoH) whose connections leave from `source_address`.

        One session per source address (None: the kernel chooses), created on first use inside the loop.
        """
        session = self._http.get(source_address)
        if session is None or session.closed:
            local = (source_address, 0) if source_address is not None else None
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100, ttl_dns_cache=300, local_addr=local),
                timeout=aiohttp.ClientTimeout(total=None),
            )
            self._http[source_address] = session
        return session

    async def close(self) -> None:
        """Release the HTTP sessions."""
        sessions, self._http = list(self._http.values()), {}
        for session in sessions:
            await session.close()
