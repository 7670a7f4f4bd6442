"""DNS resolution of target names through each configured resolver (system, udp, tcp, dot, doh).

INTERFACE STUB: to be implemented (see the helper's task).
"""

from __future__ import annotations

from dataclasses import dataclass

from probe.config import Resolver, Target
from probe.context import ProbeContext
from probe.models import Deadline, DnsResult


@dataclass(frozen=True, slots=True)
class Lookup:
    """The answers one resolver gave for one name (A and AAAA)."""

    answers: tuple[str, ...]  # IPv4 answers first, then IPv6, each in the order received
    replies: int  # DNS replies received (UDP: every reply to the query, counted)
    duration_seconds: float
    evidence: tuple[str, ...] = ()


async def lookup(
    resolver: Resolver,
    name: str,
    deadline: Deadline,
    ctx: ProbeContext,
    *,
    source_address: str | None = None,
) -> Lookup:
    """Resolve `name` (A and AAAA) through `resolver` before `deadline`.

    Raises probe.classify.DnsFailure with outcome dns_nxdomain, dns_servfail or dns_timeout.
    """
    raise NotImplementedError


async def check_target(target: Target, deadline: Deadline, ctx: ProbeContext) -> tuple[DnsResult, ...]:
    """Query every resolver of `target` concurrently; one DnsResult per resolver, in config order."""
    raise NotImplementedError
