"""DNS verdicts and the one rule that applies them to a probe.

The DNS check (judge) runs per target; its verdict per resolver is kept here, for the
resolve step of later probes (`probe run`) and for the round that ran it (`probe once`,
`/probe`): both go through `apply`, the one place where a verdict becomes a probe's outcome.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from probe.config import Config, Route, Target
from probe.models import DnsResult, Outcome, ProbeResult

# The verdicts that make a resolver's answers unusable for connecting.
UNUSABLE_ANSWERS = frozenset({Outcome.DNS_INJECTION, Outcome.DNS_MISMATCH})
# A probe with one of these outcomes failed before (or outside) the connection stages.
_FAILED_HERE = frozenset({Outcome.DNS_INJECTION, Outcome.DNS_MISMATCH, Outcome.DNS_NXDOMAIN, Outcome.DNS_SERVFAIL,
                          Outcome.DNS_TIMEOUT, Outcome.ERROR})


@dataclass(frozen=True, slots=True)
class DnsVerdict:
    """A DNS check result kept for the resolve steps of later probes (event loop clock times)."""

    result: DnsResult
    checked_at: float
    expires_at: float
    trusted: frozenset[str] = frozenset()  # the control answers of the same check


class VerdictCache:
    """The latest DNS verdict per (host, resolver), each valid for a while; owned by the service, kept over reloads."""

    def __init__(self) -> None:
        self._verdicts: dict[tuple[str, str], DnsVerdict] = {}

    def remember(
        self, host: str, results: Sequence[DnsResult], valid_for: float, trusted: frozenset[str] = frozenset()
    ) -> None:
        """Keep the DNS check's verdicts for `host`, one per resolver, for `valid_for` seconds."""
        now = asyncio.get_running_loop().time()
        for result in results:
            key = (host.lower().rstrip("."), result.resolver)
            self._verdicts[key] = DnsVerdict(result, now, now + valid_for, trusted)

    def get(self, host: str, resolver: str) -> DnsVerdict | None:
        """Return the latest unexpired DNS check verdict on `host` through `resolver`, if any."""
        verdict = self._verdicts.get((host.lower().rstrip("."), resolver))
        if verdict is None or verdict.expires_at < asyncio.get_running_loop().time():
            return None
        return verdict


def with_dns_verdict(result: ProbeResult, target: Target, route: Route, checks: Sequence[DnsResult],
                     config: Config) -> ProbeResult:
    """Return `result` with `dns` set, and with the DNS verdict as its outcome when DNS is where it failed.

    That is when the route connects to the answers of a resolver (its own, or `system`) that the
    check found forged or unusable, and the probe connected to an address the controls do not give.
    """
    result = dataclasses.replace(result, dns=tuple(checks))
    if not target.needs_dns or route.proxy is not None and route.proxy.scheme != "socks5":
        return result  # an IP literal, or a proxy that resolves the name itself: no local answer used
    verdict = next((d for d in checks if d.resolver == config.route_resolver(route).name), None)
    if verdict is None or verdict.outcome not in UNUSABLE_ANSWERS or result.address is None:
        return result
    if result.outcome in _FAILED_HERE or not untrusted((result.address,), verdict, trusted_answers(checks, config)):
        return result
    then = (f"{verdict.resolver} answered {result.address} for {target.host}, which the DNS check of this round "
            f"judged {verdict.outcome}; connecting to it gave {result.outcome}")
    return dataclasses.replace(
        result, outcome=verdict.outcome, evidence=(*verdict.evidence, *result.evidence, then),
        error=result.error or verdict.error,
    )


def trusted_answers(checks: Sequence[DnsResult], config: Config) -> frozenset[str]:
    """Return every address the control resolvers answered in `checks`."""
    controls = {r.name for r in config.resolvers if r.control}
    return frozenset(a for d in checks if d.resolver in controls and d.outcome is Outcome.OK for a in d.answers)


def untrusted(answers: Sequence[str], verdict: DnsResult, trusted: frozenset[str]) -> bool:
    """Return whether `answers` are tainted by `verdict`: none from the controls (or, without them, a flagged one)."""
    if trusted:
        return not set(answers) & trusted
    return bool(set(answers) & set(verdict.answers))


