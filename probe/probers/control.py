"""The control handshake, sent before the target's own, and what the pair of them proves.

Policy (when to send it) is `probe.controls.ControlState`; this module sends it and reads it.
"""

from __future__ import annotations

import asyncio
import ssl

from probe.classify import QuicClosed
from probe.config import Route, Target
from probe.context import ProbeContext
from probe.controls import TLS_STAGE_FAILURES, Endpoint
from probe.models import ControlHandshake, Deadline, Outcome
from probe.net import dial, quic
from probe.trace import Trace

CONTROL_SHARE = 0.4  # at most this share of the timeout goes to the control: the target keeps the rest


async def send_first(
    target: Target, route: Route, address: str, port: int, deadline: Deadline, ctx: ProbeContext, trace: Trace
) -> None:
    """Send the control handshake to (address, port) if the target has a control_sni and the policy wants one."""
    trace.port = port
    if target.control_sni is None or trace.control is not None:
        return
    if not ctx.controls.wants_control(target.name, route.name):
        return
    limit = deadline.earlier(target.timeout * CONTROL_SHARE)
    scratch = Trace()  # the control's own phases and peer: never the target's
    begin = scratch.now()
    try:
        async with asyncio.timeout_at(limit.at):
            if target.quic:
                detail = await _quic_control(address, port, target.control_sni, route, limit)
            else:
                detail = await _tcp_control(address, port, target.control_sni, route, ctx, scratch)
        answered = True
    except TimeoutError:
        answered, detail = False, "no answer"
    except (ConnectionError, EOFError, ssl.SSLEOFError) as e:
        answered, detail = False, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    except OSError as e:  # a refused connection, an ICMP unreachable: the path answered, not a server
        answered, detail = False, f"{type(e).__name__}: {e}"
    trace.control = ControlHandshake(target.control_sni, answered, scratch.now() - begin, detail)


async def _tcp_control(address: str, port: int, server_name: str, route: Route, ctx: ProbeContext, trace: Trace) -> str:
    conn = await dial.connect(address, port, route, trace)
    try:
        await conn.start_tls(ctx.tls.unverified(), server_name)
        return "handshake completed"
    except ssl.SSLEOFError:
        raise
    except ssl.SSLError as e:  # an alert is the server answering, if only to refuse the name
        return f"the server answered with {e.reason or e}"
    finally:
        dial.close(conn)


async def _quic_control(address: str, port: int, server_name: str, route: Route, deadline: Deadline) -> str:
    config = quic.configuration(server_name, None, verify=False, idle_timeout=deadline.remaining() + 1.0)
    session = await quic.open_session(address, port, config, route.source_address)
    try:
        session.start()
        await session.handshake()
        return "handshake completed"
    except QuicClosed as e:
        if not e.by_peer:
            raise ConnectionAbortedError(str(e)) from e
        return f"the server answered with CONNECTION_CLOSE: {e}"
    finally:
        session.close()


def conclude(target: Target, route: Route, ctx: ProbeContext, trace: Trace, outcome: Outcome) -> bool | None:
    """Return sni_filtered for this run, add its evidence, and let the control policy learn from the run."""
    endpoint = None
    if trace.address is not None and trace.port is not None and target.uses_tls:
        endpoint = Endpoint(trace.address, trace.port, "udp" if target.quic else "tcp")
    started = ctx.controls.now() - trace.elapsed()
    failed = endpoint is not None and outcome is not Outcome.OK
    residual = ctx.controls.residual_age(endpoint, started) if failed and endpoint is not None else None
    control = trace.control
    verdict: bool | None = None
    if control is not None and outcome in TLS_STAGE_FAILURES:
        sent = f"control handshake to {endpoint} with sni={control.server_name}, sent first"
        if control.answered:
            verdict = True
            trace.note(
                f"{sent}: {control.detail} after {control.seconds * 1000:.0f} ms, while the handshake with "
                f"sni={trace.sni} got {outcome}: the name is filtered, not the address"
            )
        elif residual is None:
            verdict = False
            trace.note(
                f"{sent}: {control.detail} after {control.seconds * 1000:.0f} ms either: the address is blocked "
                f"for any name (or the server is down), not only sni={trace.sni}"
            )
        else:
            trace.note(f"{sent}: {control.detail} after {control.seconds * 1000:.0f} ms either")
    if residual is not None and endpoint is not None and not (control is not None and control.answered):
        # (A control that answered shows the address is not blocked now: no residual block to blame.)
        trace.note(
            f"the previous run on {endpoint} failed at the TLS stage {residual:.0f} s before this one: residual "
            f"blocking (censors keep blocking an address for 90-180 s after they fire) may explain this {outcome}"
        )
    ctx.controls.record(target.name, route.name, endpoint, outcome, started)
    return verdict
