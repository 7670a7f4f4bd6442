"""HTTP/3 probe over QUIC (aioquic): phases resolve, tls, processing, transfer.

QUIC has no separate TCP connect: `tls` runs from the first Initial sent to the handshake
done. Redirects, expectations and the download are the HTTP prober's, over HTTP/3.
"""

from __future__ import annotations

from aioquic.h3.events import DataReceived, HeadersReceived

from probe.classify import Stage, Unexpected
from probe.config import Route, Target
from probe.context import ProbeContext
from probe.models import Deadline, Phase, ProbeResult
from probe.net import quic
from probe.probers.common import run_traced
from probe.probers.http import USER_AGENT, Request, Response, exchange, reach
from probe.trace import Trace

IDLE_MARGIN = 1.0  # seconds past the deadline: aioquic's idle timer must never end a probe before it does


async def probe(target: Target, route: Route, deadline: Deadline, ctx: ProbeContext) -> ProbeResult:
    """Probe an https target over HTTP/3: resolve, QUIC handshake, request, expectations, optional download."""
    return await run_traced(target, route, deadline, ctx, _body)


async def _body(target: Target, route: Route, deadline: Deadline, ctx: ProbeContext, trace: Trace) -> None:
    trace.quic = True
    await exchange(target, route, deadline, ctx, trace, _fetch)


async def _fetch(
    req: Request, target: Target, route: Route, deadline: Deadline, ctx: ProbeContext, trace: Trace
) -> Response:
    if not req.https:
        raise Unexpected(f"{req.url} is not https: HTTP/3 runs only over QUIC with TLS")
    address = await reach(req, target, route, deadline, ctx, trace)
    server_name = req.server_name(target)
    config = quic.configuration(
        server_name, target.ca_file, verify=True, idle_timeout=deadline.remaining() + IDLE_MARGIN
    )
    trace.peer = f"[{address}]:{req.port}" if ":" in address else f"{address}:{req.port}"
    trace.sni = server_name
    trace.enter(Stage.CONNECT)  # only the local socket: a failure here is ours, not the path's
    session = await quic.open_session(address, req.port, config, route.source_address)
    try:
        with trace.phase(Phase.TLS, Stage.TLS):
            session.start()
            await session.handshake()
        trace.tls = session.tls_info()
        request = [
            (b":method", req.method.encode()),
            (b":scheme", b"https"),
            (b":authority", req.authority.encode()),
            (b":path", req.path.encode()),
            (b"user-agent", USER_AGENT.encode()),
            (b"accept", b"*/*"),
            *((k.lower().encode(), v.encode()) for k, v in req.headers),  # the target's own only on its origin
        ]
        trace.http_host = req.authority
        begin = trace.now()
        trace.enter(Stage.REQUEST)
        session.request(request)
        status, head, ended = await _response_head(session)
        if req.phases:
            trace.add_phase(Phase.PROCESSING, trace.now() - begin)
        begin = trace.now()
        trace.enter(req.body_stage)
        trace.body_bytes = 0
        chunks: list[bytes] = []
        truncated = False
        while not ended:
            event = await session.next_event()
            if isinstance(event, DataReceived):
                take = min(len(event.data), req.limit - trace.body_bytes)
                if req.phases:
                    chunks.append(event.data[:take])
                trace.body_bytes += take
                if trace.body_bytes >= req.limit:
                    truncated = True
                    break
            ended = event.stream_ended  # trailers (a late HeadersReceived) end the body too
        if req.phases:
            trace.add_phase(Phase.TRANSFER, trace.now() - begin)
        if truncated:
            trace.note(f"stopped reading the body at {req.limit} bytes (max_body_bytes)")
        return Response(status=status, headers=head, body=b"".join(chunks), truncated=truncated)
    finally:
        session.close()


async def _response_head(session: quic.QuicSession) -> tuple[int, list[tuple[str, str]], bool]:
    """Return status, headers and whether the stream already ended, skipping 1xx responses."""
    while True:
        event = await session.next_event()
        if not isinstance(event, HeadersReceived):
            raise Unexpected("the response began with data instead of a header block: not HTTP/3")
        head = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in event.headers]
        status_text = dict(head).get(":status", "")
        if not (status_text.isdigit() and len(status_text) == 3):
            raise Unexpected(f"the response has no valid :status ({status_text!r}): not HTTP/3")
        status = int(status_text)
        if status >= 200 or event.stream_ended:
            return status, [(k, v) for k, v in head if not k.startswith(":")], event.stream_ended
