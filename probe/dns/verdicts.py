"""DNS verdicts and the one rule that applies them to a probe.

The DNS check (judge) runs per target; its verdict per resolver is kept here, owned by the
service across reloads. Every probe's resolve step asks `judged_unusable` (the one rule),
whether it runs in a round after its target's check (`probe once`, `/probe`) or on its own
schedule (`probe run`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from probe.config import Config
from probe.models import DnsResult, Outcome

# The verdicts that make a resolver's answers unusable for connecting.
UNUSABLE_ANSWERS = frozenset({Outcome.DNS_INJECTION, Outcome.DNS_MISMATCH})


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


def judged_unusable(host: str, resolver: str, answers: Sequence[str], cache: VerdictCache) -> DnsVerdict | None:
    """Return the verdict that forbids connecting to `answers` for `host` from `resolver`, or None.

    The one rule: the latest check of (host, resolver) found its answers forged or unusable
    (dns_injection, dns_mismatch), and these answers are tainted by it (none of them is what
    the controls gave). A route that hands the name to its proxy has no local answers, so
    the rule never reaches it.
    """
    verdict = cache.get(host, resolver)
    if verdict is None or verdict.result.outcome not in UNUSABLE_ANSWERS:
        return None
    return verdict if untrusted(answers, verdict.result, verdict.trusted) else None


def trusted_answers(checks: Sequence[DnsResult], config: Config) -> frozenset[str]:
    """Return every address the control resolvers answered in `checks`."""
    controls = {r.name for r in config.resolvers if r.control}
    return frozenset(a for d in checks if d.resolver in controls and d.outcome is Outcome.OK for a in d.answers)


def untrusted(answers: Sequence[str], verdict: DnsResult, trusted: frozenset[str]) -> bool:
    """Return whether `answers` are tainted by `verdict`: none from the controls (or, without them, a flagged one)."""
    if trusted:
        return not set(answers) & trusted
    return bool(set(answers) & set(verdict.answers))


