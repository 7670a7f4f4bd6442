"""Run probes: one (target, route) with a fresh deadline, a target's DNS check, and the one round.

The round is what `probe once`, `probe routes`, `/probe` and the scheduler's "probe this
target now" all run: for each target the DNS check first, then its probes. The DNS check
leaves its verdicts in the context's VerdictCache; a probe's resolve step (probers.common)
is the one place where a verdict turns into the probe's outcome, for these rounds and for
the scheduler's periodic probes alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from probe.config import Config, Route, Target
from probe.context import ProbeContext
from probe.dns import judge
from probe.locate import Locator
from probe.models import Deadline, DnsResult, Outcome, ProbeResult
from probe.probers import PROBERS, path

ProbeFn = Callable[[Target, Route, ProbeContext], Awaitable[ProbeResult]]
DnsFn = Callable[[Target, Deadline, ProbeContext], Awaitable[tuple[DnsResult, ...]]]

DEFAULT_ROUND_CONCURRENCY = 64
log = logging.getLogger("probe")


async def run_probe(target: Target, route: Route, ctx: ProbeContext) -> ProbeResult:
    """Probe `target` over `route` with a fresh deadline of target.timeout; never raises."""
    return await PROBERS[target.kind](target, route, Deadline.after(target.timeout), ctx)


async def check_dns(target: Target, deadline: Deadline, ctx: ProbeContext) -> tuple[DnsResult, ...]:
    """Run the target's DNS check (its verdicts go to ctx.verdicts); () for an IP literal."""
    if not target.needs_dns:
        return ()
    return await judge.check_target(target, deadline, ctx)


async def guarded_probe(target: Target, route: Route, ctx: ProbeContext, probe_fn: ProbeFn = run_probe) -> ProbeResult:
    """Run `probe_fn`; a prober bug becomes an `error` result, never an outcome blamed on the network."""
    started, t0 = time.time(), time.monotonic()
    try:
        return await probe_fn(target, route, ctx)
    except Exception as e:  # the boundary above the probers' own: a bug in one must not end the round
        log.exception("%s/%s: probe raised", target.name, route.name)
        return ProbeResult(
            target.name, route.name, Outcome.ERROR, started, time.monotonic() - t0, error=f"{type(e).__name__}: {e}"
        )


async def guarded_dns(target: Target, ctx: ProbeContext, dns_fn: DnsFn = check_dns) -> tuple[DnsResult, ...]:
    """Run the DNS check with a deadline of target.timeout; a bug in it becomes `error` for every resolver."""
    if not target.needs_dns:
        return ()
    try:
        return await dns_fn(target, Deadline.after(target.timeout), ctx)
    except Exception as e:  # a bug in the DNS check: every resolver reports `error`
        log.exception("%s: DNS check raised", target.name)
        error = f"{type(e).__name__}: {e}"
        return tuple(DnsResult(r, Outcome.ERROR, error=error) for r in target.resolvers)


async def run_round(
    config: Config,
    ctx: ProbeContext,
    targets: Sequence[Target] | None = None,
    routes: Sequence[str] | None = None,
    *,
    on_result: Callable[[ProbeResult], object] | None = None,
    on_dns: Callable[[Target, tuple[DnsResult, ...]], None] | None = None,
    limit: asyncio.Semaphore | None = None,
    probe_fn: ProbeFn = run_probe,
    dns_fn: DnsFn = check_dns,
    sample_paths: bool = False,
    locator: Locator | None = None,
) -> list[ProbeResult]:
    """Probe every chosen (target, route) once, each target's DNS check first; results in config order.

    Each result carries its target's DNS results of this round. `limit` bounds how many
    probes and checks run at once (the scheduler passes its own, so a round shares its bound).
    With `sample_paths` (`probe once`, `probe routes`), pairs with `path` also run one path
    sampling run alongside, outside `limit`, and carry it in `path`.
    With `locator`, the results blocked where a localisation applies get one, after the round.
    """
    chosen = list(targets if targets is not None else config.targets)
    bound = limit if limit is not None else asyncio.Semaphore(DEFAULT_ROUND_CONCURRENCY)
    pairs = [(t, r) for t in chosen for r in t.routes if routes is None or r in routes] if sample_paths else []
    paths = asyncio.ensure_future(path.run_pairs(config, ctx, pairs))

    async def one_target(target: Target) -> list[ProbeResult]:
        names = [r for r in target.routes if routes is None or r in routes]
        if not names:
            return []
        async with bound:
            checks = await guarded_dns(target, ctx, dns_fn)
        if on_dns is not None and target.needs_dns:
            on_dns(target, checks)

        async def one(route: str) -> ProbeResult:
            async with bound:
                result = await guarded_probe(target, config.route(route), ctx, probe_fn)
            result = dataclasses.replace(result, dns=checks)
            if on_result is not None:
                on_result(result)
            return result

        return list(await asyncio.gather(*(one(r) for r in names)))

    try:
        per_target = await asyncio.gather(*(one_target(t) for t in chosen))
    except BaseException:
        paths.cancel()
        raise
    results = path.attach([r for chunk in per_target for r in chunk], await paths)
    return results if locator is None else await locator.attach(results, config, ctx)
