"""The injectable pieces a probe runs with: TLS contexts and the DoH HTTP session."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

import aiohttp

from probe.config import Config


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


@dataclass
class ProbeContext:
    """Everything a prober needs besides (target, route, deadline); one per running config."""

    config: Config
    tls: TlsContexts = field(default_factory=TlsContexts)
    # The `system` resolver reads these; tests point them at their own files and loopback server.
    resolv_conf: str = "/etc/resolv.conf"
    hosts_file: str = "/etc/hosts"
    system_dns_port: int = 53  # resolv.conf cannot carry a port
    _http: dict[str | None, aiohttp.ClientSession] = field(default_factory=dict)

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
