"""When to localise and what to repeat: one localisation per (target, route) per 10 minutes, after a residual check."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence

from probe.config import Config, ResolverType, Route, Target, TargetKind, is_ip
from probe.dns.context import DnsContext
from probe.dns.system import resolv_conf
from probe.locate import trigger
from probe.locate.search import DnsPlan, TcpPlan, locate_dns, locate_tcp
from probe.models import Localisation, Outcome, ProbeResult

RATE_SECONDS = 600.0  # at most one localisation per (target, route) in this time
RESIDUAL_CONNECT_TIMEOUT = 2.0
RESIDUAL_RECHECK_SECONDS = 30.0
RESIDUAL_GIVE_UP_SECONDS = 300.0  # longer than any residual block measured (90-180 s): an address block
CONCURRENT_SERIES = 4  # TTL series running at once (a whole round of blocked targets does not fire together)
# Outcomes whose trigger is a packet the monitor can repeat TTL-limited: the ClientHello, the
# plain-HTTP request, the DNS query. A dropped packet (timeouts) or a TCP-level block has none.
LOCATABLE = frozenset({Outcome.TLS_RESET, Outcome.HTTP_RESET, Outcome.HTTP_UNEXPECTED, Outcome.DNS_INJECTION})

_OVER_TCP = frozenset({TargetKind.TCP, TargetKind.TLS, TargetKind.HTTP})  # their ClientHello or request rides TCP
log = logging.getLogger("probe.locate")
Plan = TcpPlan | DnsPlan


class Locator:
    """Decide whether a blocked result gets a localisation now, run it, and keep the rate per pair.

    `wait_residual`: wait (in `probe run`) until the address answers again, instead of
    reporting `deferred` (in `probe once`).
    """

    def __init__(
        self, *, wait_residual: bool, clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        recheck: float = RESIDUAL_RECHECK_SECONDS, give_up: float = RESIDUAL_GIVE_UP_SECONDS,
    ) -> None:
        self.wait_residual = wait_residual
        self._clock, self._sleep, self._recheck, self._give_up = clock, sleep, recheck, give_up
        self._last: dict[tuple[str, str], float] = {}
        self._series = asyncio.Semaphore(CONCURRENT_SERIES)

    def wanted(self, target: Target, result: ProbeResult) -> bool:
        """Return whether `result` calls for a localisation (configured, a locatable block, not too soon)."""
        if not target.locate or result.outcome not in LOCATABLE:
            return False
        last = self._last.get((target.name, result.route))
        return last is None or self._clock() - last >= RATE_SECONDS

    async def locate(
        self, target: Target, route: Route, result: ProbeResult, config: Config, ctx: DnsContext
    ) -> Localisation:
        """Localise the censor behind `result`; never raises (a bug of ours is said in the evidence)."""
        self._last[(target.name, route.name)] = self._clock()
        try:
            return await self._locate(target, route, result, config, ctx)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # our own failure: said as such, never blamed on the network
            log.exception("%s/%s: localisation failed", target.name, route.name)
            return _said(f"error: the localisation itself failed ({type(e).__name__}: {e}); no hop stated")

    async def attach(self, results: Sequence[ProbeResult], config: Config, ctx: DnsContext) -> list[ProbeResult]:
        """Return `results` with a localisation on each that calls for one (all localised at once)."""

        async def one(result: ProbeResult) -> ProbeResult:
            target = config.target(result.target)
            if not self.wanted(target, result):
                return result
            found = await self.locate(target, config.route(result.route), result, config, ctx)
            return dataclasses.replace(result, locate=found)

        return list(await asyncio.gather(*(one(r) for r in results)))

    async def _locate(
        self, target: Target, route: Route, result: ProbeResult, config: Config, ctx: DnsContext
    ) -> Localisation:
        if route.proxy is not None:
            return _said(
                f"not possible from the vantage: over route {route.name} the packets leave from the proxy "
                f"({route.proxy.redacted()}), whose path the vantage cannot see or TTL-limit")
        plan = plan_for(target, route, result, config, ctx)
        if isinstance(plan, str):
            return _said(plan)
        if isinstance(plan, DnsPlan):
            async with self._series:
                return await locate_dns(plan)
        waited = 0.0
        while (blocked := await _residual(plan)) is not None:
            if not self.wait_residual:
                return Localisation(deferred=blocked, finished_at=time.time())
            if waited >= self._give_up:
                return _said(f"{blocked}; still so after {waited:.0f} s: the address is blocked outright, not for a "
                             f"while; not localised")
            log.info("%s/%s: waiting out a residual block (%s)", target.name, route.name, blocked)
            await self._sleep(self._recheck)
            waited += self._recheck
        async with self._series:
            return await locate_tcp(plan)


def _said(line: str) -> Localisation:
    return Localisation(evidence=(line,), finished_at=time.time())


async def _residual(plan: TcpPlan) -> str | None:
    """Return why the address does not answer a fresh connection now (a residual block), or None if it does.

    Where the target has a `control_sni`, the connection also carries a ClientHello for it, which
    must draw an answer: some censors let the handshake through and reset whatever follows.
    """
    loop = asyncio.get_running_loop()
    reader_writer = asyncio.open_connection(
        plan.address, plan.port, local_addr=(plan.source, 0) if plan.source else None)
    started = loop.time()
    try:
        reader, writer = await asyncio.wait_for(reader_writer, RESIDUAL_CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as e:
        why = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else type(e).__name__
        return (f"{plan.address}:{plan.port} does not answer a fresh connection ({why} after "
                f"{loop.time() - started:.1f} s): residual blocking after the reset (censors keep blocking the "
                f"address for 90-180 s); localise once it lifts")
    try:
        if plan.control_sni is None:
            return None
        # The control name draws an answer from the server unless the address is still blocked for any name.
        writer.write(trigger.client_hello(plan.control_sni))
        started = loop.time()
        try:
            answer = await asyncio.wait_for(reader.read(1), RESIDUAL_CONNECT_TIMEOUT)
            refused: str | None = None if answer else "reset or closed"
        except (OSError, TimeoutError) as e:
            refused = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else type(e).__name__
        if refused is None:
            return None
        return (f"{plan.address}:{plan.port} answers a fresh connection but not a ClientHello for the control name "
                f"{plan.control_sni} ({refused} after {loop.time() - started:.1f} s): residual blocking after the "
                f"reset (censors keep blocking the address for 90-180 s); localise once it lifts")
    finally:
        writer.transport.abort()


def plan_for(target: Target, route: Route, result: ProbeResult, config: Config, ctx: DnsContext) -> Plan | str:
    """Return what to repeat TTL-limited for this blocked result, or why nothing can be."""
    if result.outcome is Outcome.DNS_INJECTION:
        return _dns_plan(target, route, result, config, ctx)
    if target.kind not in _OVER_TCP:
        return (f"{result.outcome} of target kind {target.kind}: only TCP handshakes, plain-HTTP requests and UDP DNS "
                f"queries are repeated TTL-limited; not localised")
    if result.address is None or not is_ip(result.address):
        return f"no address to localise toward: the probe did not get as far as one ({result.outcome})"
    source = route.source_address
    if result.outcome is Outcome.TLS_RESET:
        return TcpPlan(
            result.address, target.port, trigger.client_hello(target.sni), f"ClientHello (sni={target.sni})",
            trigger.client_hello(ctx.control_name), f"ClientHello for {ctx.control_name}", source, target.control_sni)
    if target.http is None or target.uses_tls:
        return (f"{result.outcome} inside TLS: the request travels encrypted, so a censor acting on it cannot be "
                f"found by repeating it TTL-limited; not localised")
    url, method = target.http.url, target.http.method
    control_url = url.replace(f"//{target.host}", f"//{ctx.control_name}", 1)
    return TcpPlan(
        result.address, target.port, trigger.http_request(url, method), f"request (Host: {target.host})",
        trigger.http_request(control_url, method), f"request for {ctx.control_name}", source)


def _dns_plan(target: Target, route: Route, result: ProbeResult, config: Config, ctx: DnsContext) -> Plan | str:
    query, query_id = trigger.dns_query(target.host)
    source = route.source_address
    if config.canaries:
        return DnsPlan(config.canaries[0], ctx.canary_port, query, query_id, target.host, True, source)
    for dns_result in result.dns:
        if dns_result.outcome is not Outcome.DNS_INJECTION:
            continue
        resolver = config.resolver(dns_result.resolver)
        if resolver.type is ResolverType.UDP and resolver.host is not None:
            return DnsPlan(resolver.host, resolver.port or 53, query, query_id, target.host, False, source)
        if resolver.type is ResolverType.SYSTEM and (servers := resolv_conf(ctx.resolv_conf).nameservers):
            return DnsPlan(servers[0], ctx.system_dns_port, query, query_id, target.host, False, source)
    return ("no UDP resolver or canary saw the injection: a query over TCP, DoT or DoH cannot be repeated "
            "TTL-limited; not localised")
