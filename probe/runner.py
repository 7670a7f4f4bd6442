"""Run probes: one (target, route) with a fresh deadline, or a whole round."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from probe.config import Config, Route, Target
from probe.context import ProbeContext
from probe.dns import judge, verdicts
from probe.models import Deadline, DnsResult, ProbeResult
from probe.probers import PROBERS

DEFAULT_ROUND_CONCURRENCY = 64


async def run_probe(target: Target, route: Route, ctx: ProbeContext) -> ProbeResult:
    """Probe `target` over `route` with a fresh deadline of target.timeout; never raises."""
    return await PROBERS[target.kind](target, route, Deadline.after(target.timeout), ctx)


async def check_dns(target: Target, ctx: ProbeContext) -> tuple[DnsResult, ...]:
    """Run the target's DNS check with a deadline of target.timeout."""
    if not target.needs_dns:
        return ()
    return await judge.check_target(target, Deadline.after(target.timeout), ctx)


async def run_round(
    config: Config,
    ctx: ProbeContext,
    targets: Sequence[Target] | None = None,
    routes: Sequence[str] | None = None,
    on_result: Callable[[ProbeResult], None] | None = None,
    concurrency: int = DEFAULT_ROUND_CONCURRENCY,
) -> list[ProbeResult]:
    """Probe every (target, route) once, with each target's DNS check; results in config order."""
    chosen = list(targets if targets is not None else config.targets)
    limit = asyncio.Semaphore(concurrency)
    pairs = [(t, r) for t in chosen for r in t.routes if routes is None or r in routes]

    async def one(target: Target, route: str) -> ProbeResult:
        async with limit:
            result = await run_probe(target, config.route(route), ctx)
        if on_result is not None:
            on_result(result)
        return result

    async def dns_of(target: Target) -> tuple[DnsResult, ...]:
        async with limit:
            return await check_dns(target, ctx)

    dns_tasks = {t.name: asyncio.ensure_future(dns_of(t)) for t in chosen if any(p[0] is t for p in pairs)}
    results = await asyncio.gather(*(one(t, r) for t, r in pairs))
    checks = {name: await task for name, task in dns_tasks.items()}
    return [
        verdicts.with_dns_verdict(r, config.target(r.target), config.route(r.route), checks.get(r.target, ()), config)
        for r in results
    ]
