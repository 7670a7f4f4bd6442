"""TLS handshake probe: resolve, connect, handshake with SNI and certificate verification."""

from __future__ import annotations

from probe.config import Route, Target
from probe.context import ProbeContext
from probe.models import Deadline, ProbeResult
from probe.net import dial
from probe.net.tls import start_tls
from probe.probers import control
from probe.probers.common import resolve, run_traced
from probe.trace import Trace


async def probe(target: Target, route: Route, deadline: Deadline, ctx: ProbeContext) -> ProbeResult:
    """Probe a TLS target: TCP, then a verified handshake (no HTTP)."""
    return await run_traced(target, route, deadline, ctx, _body)


async def _body(target: Target, route: Route, deadline: Deadline, ctx: ProbeContext, trace: Trace) -> None:
    address = await resolve(target.host, route, deadline, ctx, trace)
    await control.send_first(target, route, address, target.port, deadline, ctx, trace)
    conn = await dial.connect(address, target.port, route, trace)
    try:
        await start_tls(conn, ctx.tls.verifying(target.ca_file), target.sni, trace)
        conn.flush()  # the handshake's last flight: nothing else will carry it
    finally:
        dial.close(conn)
