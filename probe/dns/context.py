"""What DNS lookups and the integrity judge run with: config, TLS contexts, DoH sessions, files, verdicts."""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp
import dns.rrset

from probe.config import Config
from probe.dns.data import KnownForged, root_anchors
from probe.dns.verdicts import VerdictCache
from probe.net.tls import TlsContexts


@dataclass
class DnsContext:
    """The DNS side of a running config: where the system resolver's files are, integrity settings, caches."""

    config: Config
    tls: TlsContexts = field(default_factory=TlsContexts)
    # The `system` resolver reads these; tests point them at their own files and loopback server.
    resolv_conf: str = "/etc/resolv.conf"
    hosts_file: str = "/etc/hosts"
    system_dns_port: int = 53  # resolv.conf cannot carry a port
    # DNS integrity checks (probe.dns.judge). Canaries run no DNS server: any reply was injected.
    canary_port: int = 53
    canary_wait: float = 1.0  # seconds a canary query waits for an injected reply (bounded by the deadline)
    control_name: str = "example.com"  # a name nobody blocks: a canary must not answer it either
    nxdomain_zone: str = "example.com"  # random names under it do not exist: the NXDOMAIN-rewrite probe
    trust_anchors: tuple[dns.rrset.RRset, ...] = field(default_factory=root_anchors)  # DS or DNSKEY sets
    tls_check_timeout: float = 3.0  # the TLS check of an answer that differs from the controls
    _http: dict[str | None, aiohttp.ClientSession] = field(default_factory=dict)
    _forged: KnownForged | None = None
    verdicts: VerdictCache = field(default_factory=VerdictCache)  # the service passes one that outlives reloads
    # resolver name -> (recheck after, evidence that it rewrites NXDOMAIN or None)
    nx_rewrites: dict[str, tuple[float, str | None]] = field(default_factory=dict)

    @property
    def known_forged(self) -> KnownForged:
        """Return the bogons of the config (or the built-in set) and the documented GFW forged set."""
        if self._forged is None:
            self._forged = KnownForged(self.config.bogons)
        return self._forged

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
