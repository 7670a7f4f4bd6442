"""TCP connect probe: resolve, connect, close."""

from __future__ import annotations

from probe.classify import Stage
from probe.config import Route, Target
from probe.context import ProbeContext
from probe.models import Deadline, ProbeResult
from probe.net import dial
from probe.probers.common import resolve, run_traced
from probe.trace import Trace


async def probe(target: Target, route: Route, deadline: Deadline, ctx: ProbeContext) -> ProbeResult:
    """Probe a plain TCP target: the three-way handshake must complete."""
    return await run_traced(target, route, deadline, ctx, _body)


async def _body(target: Target, route: Route, deadline: Deadline, ctx: ProbeContext, trace: Trace) -> None:
    address = await resolve(target.host, route, deadline, ctx, trace)
    sock = await dial.open_socket(address, target.port, route, trace)  # no streams: nothing is read or written
    trace.enter(Stage.ESTABLISHED)
    sock.close()
