"""What every prober shares: the boundary that turns exceptions into outcomes, and resolution."""

from __future__ import annotations

import asyncio
import functools
import os
import ssl
from collections.abc import Awaitable, Callable

from probe import debuglog, loop
from probe.classify import TIMEOUT_OUTCOMES, DnsFailure, MonitorStall, Stage, classify, describe
from probe.config import Route, Target, is_ip
from probe.context import ProbeContext
from probe.dns import lookup as dns
from probe.dns import verdicts
from probe.models import Deadline, Outcome, Phase, ProbeResult
from probe.probers.control import conclude
from probe.probers.steps import debug_section, log_classification
from probe.trace import PhaseTimes, Trace

Body = Callable[[Target, Route, Deadline, ProbeContext, Trace], Awaitable[None]]


async def run_traced(
    target: Target, route: Route, deadline: Deadline, ctx: ProbeContext, body: Body
) -> ProbeResult:
    """Run a prober body under the deadline; classify whatever stops it (the prober boundary)."""
    trace = Trace()
    outcome, error, failure = Outcome.OK, None, None
    log = debuglog.current()
    try:
        async with asyncio.timeout_at(deadline.at):
            if log is None:
                await body(target, route, deadline, ctx, trace)
            else:
                with debuglog.section(debug_section(target, route)):
                    await body(target, route, deadline, ctx, trace)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the boundary: anything a probe meets becomes an outcome
        outcome = classify(trace.stage, exc)
        error = describe(exc)
        trace.note(failure_evidence(trace, outcome, exc))
        failure = exc
        if outcome in TIMEOUT_OUTCOMES and (why := own_delay(trace, target.timeout)) is not None:
            stall = MonitorStall(why)  # never blame the network for the monitor's own stall
            outcome, error, failure = classify(trace.stage, stall), describe(stall), stall
            trace.note(why)
    if log is not None:
        log_classification(log, target, route, trace, outcome, failure)
    sni_filtered = conclude(target, route, ctx, trace, outcome)
    return ProbeResult(
        target=target.name,
        route=route.name,
        outcome=outcome,
        started_at=trace.wall_started,
        duration_seconds=trace.elapsed(),
        phases=PhaseTimes(trace.phases),
        address=trace.address,
        http_status=trace.http_status,
        throughput_bytes_per_second=trace.throughput,
        tls=trace.tls,
        evidence=tuple(trace.evidence),
        error=error,
        sni_filtered=sni_filtered,
    )


def own_delay(trace: Trace, timeout: float) -> str | None:
    """Return why a timeout was the monitor's own delay rather than the network's; None if it was not."""
    if trace.kernel_connected is not None:
        return (
            f"the kernel completed the TCP handshake with {trace.peer} in {trace.kernel_connected * 1e6:.0f} us, "
            "but the monitor did not get to it before the deadline: its own delay, not the network's"
        )
    return loop.watch.blame(trace.started, trace.now(), timeout, "this probe")


def failure_evidence(trace: Trace, outcome: Outcome, exc: BaseException) -> str:
    """Return one line an operator can paste into a report."""
    ms = f"{trace.in_stage() * 1000:.0f} ms"
    peer = trace.peer or trace.address or "?"
    sni = f" (sni={trace.sni})" if trace.sni else ""
    host = f" (Host: {trace.http_host})" if trace.http_host else ""
    reason = (
        getattr(exc, "verify_message", None)
        or getattr(exc, "reason", None)
        or (os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else None)
        or exc
    )
    match outcome:
        case Outcome.TCP_TIMEOUT if trace.stage is Stage.CONNECT:
            return f"no answer to the TCP handshake with {peer} within {ms}"
        case Outcome.TCP_REFUSED:
            return f"connection to {peer} refused after {ms}: {reason}"
        case Outcome.TCP_RESET:
            return f"connection to {peer} reset {ms} after the TCP handshake"
        case Outcome.TLS_RESET if isinstance(exc, ssl.SSLError) and not isinstance(exc, ssl.SSLEOFError):
            return f"TLS handshake with {peer} broken {ms} after ClientHello{sni}: {reason}"
        case Outcome.TLS_RESET:
            what = "closed" if isinstance(exc, EOFError | ssl.SSLEOFError) else "reset"
            return f"connection {what} {ms} after ClientHello{sni}"
        case Outcome.TLS_TIMEOUT:
            return f"TLS handshake with {peer} stalled: no answer {ms} after ClientHello{sni}"
        case Outcome.TLS_CERT_INVALID:
            return f"certificate of {peer} failed verification{sni}: {reason}"
        case Outcome.HTTP_RESET if trace.stage in (Stage.TRANSFER, Stage.DOWNLOAD):
            return f"connection reset after {trace.body_bytes} body bytes, {ms} into the transfer{host}"
        case Outcome.HTTP_RESET:
            return f"connection reset {ms} after the request was sent{host}"
        case Outcome.HTTP_TIMEOUT if trace.stage in (Stage.TRANSFER, Stage.DOWNLOAD):
            return f"response body incomplete after {trace.body_bytes} bytes and {ms}{host}"
        case Outcome.HTTP_TIMEOUT:
            return f"no response head {ms} after the request{host}"
        case _:
            return str(exc) or describe(exc)


# Parsing an address costs more than the rest of resolve(); the answer never changes.
_is_ip = functools.lru_cache(maxsize=16384)(is_ip)


async def resolve(host: str, route: Route, deadline: Deadline, ctx: ProbeContext, trace: Trace) -> str:
    """Return the address to connect to for `host` over `route`, timing the `resolve` phase.

    Proxy routes (socks5, socks5h, http) hand the name to the proxy, which resolves it (so
    local poisoning cannot touch it): no `resolve` phase is recorded. A proxy route that
    names a `resolver` resolves here through it and hands the proxy the address. Other
    routes ask their resolver (`system` by default), from their source_address if any.
    """
    literal = _is_ip(host)
    if route.proxy is not None and route.resolver is None and not literal:
        if (log := debuglog.current()) is not None:
            log.add(f"not resolved here: the proxy {route.proxy.redacted()} resolves {host}")
        trace.address = host
        return host
    with trace.phase(Phase.RESOLVE, Stage.RESOLVE):
        if literal:
            address = host
        else:
            resolver = ctx.config.route_resolver(route)
            found = await dns.lookup(resolver, host, deadline, ctx, source_address=route.source_address)
            address = found.answers[0]  # IPv4 first: lookup orders A before AAAA
            if (log := debuglog.current()) is not None:
                log.add(f"resolved {host} through {resolver.name}: {', '.join(found.answers)}; using {address}")
            _refuse_judged_answers(host, resolver.name, found.answers, ctx, trace)
    trace.address = address
    return address


def _refuse_judged_answers(host: str, resolver: str, answers: tuple[str, ...], ctx: ProbeContext, trace: Trace) -> None:
    """Fail the resolve stage when the latest DNS check found these answers forged or unusable."""
    verdict = verdicts.judged_unusable(host, resolver, answers, ctx.verdicts)
    if verdict is None:
        return
    for line in verdict.result.evidence:
        trace.note(line)
    age = asyncio.get_running_loop().time() - verdict.checked_at
    raise DnsFailure(
        f"{resolver} answered {', '.join(answers)} for {host}, which the DNS check {age:.0f} s ago judged "
        f"{verdict.result.outcome}",
        verdict.result.outcome,
    )
