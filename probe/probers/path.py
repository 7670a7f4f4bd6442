"""Path quality: one run of `path.samples` samples of one (target, route), spread evenly over `path.spread`.

Not a prober of the registry (it returns a PathResult, not a ProbeResult), but it looks the
same: one signature, one boundary. The name is resolved once per run, as a probe resolves it;
then sample i leaves at i x spread / samples after the start and is lost if unanswered after
min(PATH_SAMPLE_DEADLINE, timeout), which sits under the kernel's 1 s initial SYN
retransmission timeout (and a sample whose SYN was retransmitted anyway counts as lost).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence

from probe.classify import describe
from probe.config import PATH_SAMPLE_DEADLINE, Config, Route, Target
from probe.context import ProbeContext
from probe.models import Deadline, PathMethod, PathResult, ProbeResult
from probe.net import sample
from probe.probers.common import resolve
from probe.trace import Trace

Sampler = Callable[[str, int, Route, float], Awaitable[float | None]]


def _tcp(address: str, port: int, route: Route, wait: float) -> Awaitable[float | None]:
    return sample.tcp(address, port, route, wait)


_PRIVILEGED: list[bool | None] = []  # icmp_privileged(), asked once per process


def _icmp(address: str, port: int, route: Route, wait: float) -> Awaitable[float | None]:
    if not _PRIVILEGED:
        _PRIVILEGED.append(sample.icmp_privileged())
    return sample.icmp(address, route, wait, _PRIVILEGED[0])


SAMPLERS: dict[PathMethod, Sampler] = {PathMethod.TCP: _tcp, PathMethod.ICMP: _icmp}


def sample_wait(target: Target) -> float:
    """Return how long one sample of `target` waits for its answer before it counts as lost."""
    return min(PATH_SAMPLE_DEADLINE, target.timeout)


async def run(target: Target, route: Route, ctx: ProbeContext, *, wait: float | None = None) -> PathResult:
    """Sample the path of `target` over `route` once (target.path must be set); never raises but CancelledError."""
    check = target.path
    assert check is not None, f"{target.name} has no path configured"
    started = time.time()
    wait = sample_wait(target) if wait is None else wait
    trace = Trace()
    try:
        address = await resolve(target.host, route, Deadline.after(target.timeout), ctx, trace)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a boundary like run_traced's: the run reports it, nothing was sent
        return PathResult(target.name, route.name, check.method, started, 0, 0, (), describe(exc),
                          tuple(trace.evidence))
    send = SAMPLERS[check.method]
    gap = check.spread / check.samples
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    tasks: list[asyncio.Task[float | None]] = []
    try:
        for i in range(check.samples):
            delay = t0 + i * gap - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(send(address, target.port, route, wait)))
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    rtts: list[float] = []
    sent = lost = failed = 0
    error: str | None = None
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            failed += 1
            if error is None:
                error = str(outcome) if isinstance(outcome, sample.SampleError) else describe(outcome)
            continue
        sent += 1
        if outcome is None:
            lost += 1
        else:
            rtts.append(outcome)
    evidence = list(trace.evidence)
    if failed:
        evidence.append(f"{failed} of {check.samples} samples not sent: {error}")
    if lost:
        evidence.append(f"{lost} of {sent} samples to {address}:{target.port} unanswered within {wait * 1000:.0f} ms")
    return PathResult(target.name, route.name, check.method, started, sent, lost, tuple(rtts), error, tuple(evidence))


async def run_pairs(
    config: Config, ctx: ProbeContext, pairs: Sequence[tuple[Target, str]]
) -> dict[tuple[str, str], PathResult]:
    """Sample the path of every pair whose target has `path`, all at once (`probe once`)."""
    chosen = [(t, r) for t, r in pairs if t.path is not None]
    done = await asyncio.gather(*(run(t, config.route(r), ctx) for t, r in chosen))
    return {(p.target, p.route): p for p in done}


def attach(results: Sequence[ProbeResult], paths: dict[tuple[str, str], PathResult]) -> list[ProbeResult]:
    """Return `results` with each pair's path run in `path`."""
    return [
        dataclasses.replace(r, path=p) if (p := paths.get((r.target, r.route))) is not None else r for r in results
    ]
