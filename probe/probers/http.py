"""HTTP(S) probe over our own timed connection, with blackbox_exporter's five phases.

h11 speaks HTTP/1.1 over the socket that `dial` opened, so connect and TLS are timed
separately, reads are bounded by bytes, and proxies carry HTTP exactly as they carry TCP.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import h11

from probe import __version__, debuglog
from probe.classify import Stage, Throttled, Unexpected
from probe.config import Expect, HttpCheck, Route, Target
from probe.context import ProbeContext
from probe.models import Deadline, Phase, ProbeResult
from probe.net import dial
from probe.net.tls import start_tls
from probe.probers import control
from probe.probers.common import resolve, run_traced
from probe.trace import Trace

MAX_REDIRECTS = 10
READ_CHUNK = 64 * 1024
MAX_HEADER_BYTES = 64 * 1024  # a response head larger than this is not an honest storage API
EVENTS_PER_WAKEUP = 256  # h11 events parsed before yielding to the loop: a peer of 1-byte chunks cannot hold it
# A body in more than this many pieces averaging under TINY_CHUNK bytes is refused: parsing costs
# ~5 us a piece, and a 1 MiB body of 1-byte chunks would cost seconds of CPU.
MAX_TINY_EVENTS, TINY_CHUNK = 4096, 64
DOWNLOAD_MARGIN = 0.05  # stop the download this share of the timeout early, to report its rate
_REDIRECTS = {301, 302, 303, 307, 308}
USER_AGENT = f"probe/{__version__} (cross-border connectivity monitor)"


@dataclass(slots=True)
class Response:
    """What one fetch brought back (the body up to its limit)."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    truncated: bool


async def probe(target: Target, route: Route, deadline: Deadline, ctx: ProbeContext) -> ProbeResult:
    """Probe an http(s) target: resolve, connect, TLS, request, expectations, optional download."""
    return await run_traced(target, route, deadline, ctx, _body)


async def _body(target: Target, route: Route, deadline: Deadline, ctx: ProbeContext, trace: Trace) -> None:
    await exchange(target, route, deadline, ctx, trace, _fetch)


@dataclass(frozen=True, slots=True)
class Request:
    """One request of a probe: its URL's parts, what to send, how much body to read and what to time."""

    url: str
    host: str
    https: bool
    port: int
    authority: str  # the Host header (HTTP/1.1), :authority (HTTP/3)
    path: str  # the request target: path and query
    method: str
    headers: tuple[tuple[str, str], ...]  # the configured ones, sent only on the target's own origin
    limit: int  # body bytes read at most
    phases: bool  # time the processing and transfer phases and keep the body (not for the download)
    body_stage: Stage

    @classmethod
    def of(
        cls, url: str, method: str, *, limit: int, phases: bool = True, headers: tuple[tuple[str, str], ...] = (),
        body_stage: Stage = Stage.TRANSFER,
    ) -> Request:
        """Return the request of `url` (parsed once per URL)."""
        host, https, port, authority, path = url_parts(url)
        return cls(url, host, https, port, authority, path, method, headers, limit, phases, body_stage)

    def server_name(self, target: Target) -> str:
        """Return the name TLS sends: the target's server_name for its own host, else the URL's host."""
        return target.server_name if self.host == target.host and target.server_name else self.host


# One request over a fresh connection: `_fetch` here (HTTP/1.1), `http3._fetch` (HTTP/3).
Fetch = Callable[[Request, Target, Route, Deadline, ProbeContext, Trace], Awaitable[Response]]


async def exchange(
    target: Target, route: Route, deadline: Deadline, ctx: ProbeContext, trace: Trace, fetch: Fetch
) -> None:
    """Fetch the target's url (following redirects), check the expectations, then the download."""
    check = http_check(target)
    url, seen = check.url, [check.url]
    home = _origin(check.url)
    headers = check.headers
    while True:
        request = Request.of(url, check.method, limit=check.max_body_bytes, headers=headers)
        resp = await fetch(request, target, route, deadline, ctx, trace)
        location = dict(resp.headers).get("location")
        if not (check.follow_redirects and resp.status in _REDIRECTS and location):
            break
        previous, url = url, _redirect_target(url, location)
        if url in seen:
            raise Unexpected(f"redirect loop: {' -> '.join([*seen, url])}")
        if len(seen) > MAX_REDIRECTS:
            raise Unexpected(f"more than {MAX_REDIRECTS} redirects, last to {url}")
        if previous.startswith("https:") and url.startswith("http:") and not check.allow_insecure_redirects:
            raise Unexpected(f"redirected ({resp.status}) from {previous} to {url}: a downgrade from https to "
                             "plain http (not followed; allow_insecure_redirects: true follows it)")
        seen.append(url)
        trace.note(f"redirected ({resp.status}) to {url}")
        # Configured headers (Authorization, API keys) go to the target's own origin only, as
        # curl, Go and requests do: an injected redirect must not collect them.
        same_origin = _origin(url) == home
        if check.headers and not same_origin and headers:
            names = ", ".join(name for name, _ in check.headers)
            trace.note(f"{url} is another origin than {check.url}: the configured headers ({names}) are not sent there")
        headers = check.headers if same_origin else ()
    trace.http_status = resp.status
    check_expectations(check.expect, resp)
    if check.download is not None:
        await _download(target, route, deadline, ctx, trace, fetch)


async def reach(req: Request, target: Target, route: Route, deadline: Deadline, ctx: ProbeContext, trace: Trace) -> str:
    """Resolve the request's host and, over https, send the control first; return the address to connect to."""
    address = await resolve(req.host, route, deadline, ctx, trace)
    if req.https:
        await control.send_first(target, route, address, req.port, deadline, ctx, trace)
    return address


async def _fetch(
    req: Request, target: Target, route: Route, deadline: Deadline, ctx: ProbeContext, trace: Trace
) -> Response:
    address = await reach(req, target, route, deadline, ctx, trace)
    conn = await dial.connect(address, req.port, route, trace)
    try:
        if req.https:
            await start_tls(conn, ctx.tls.verifying(target.ca_file), req.server_name(target), trace)
        http = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        trace.http_host = req.authority
        request = _request(req.method, req.path, req.authority, req.headers)
        begin = trace.now()
        trace.enter(Stage.REQUEST)
        head_bytes = http.send(request) or b""
        conn.write(head_bytes + (http.send(h11.EndOfMessage()) or b""))
        if (log := debuglog.current()) is not None:
            log_head(log, "request", f"{req.method} {req.path} HTTP/1.1", request.headers)
        await conn.drain()
        head = await _next_event(http, conn, trace)
        while isinstance(head, h11.InformationalResponse):
            head = await _next_event(http, conn, trace)
        assert isinstance(head, h11.Response)
        if log is not None:
            reason = head.reason.decode("latin-1")
            log_head(log, "response", f"HTTP/{head.http_version.decode()} {head.status_code} {reason}", head.headers)
        if req.phases:
            trace.add_phase(Phase.PROCESSING, trace.now() - begin)
        begin = trace.now()
        trace.enter(req.body_stage)
        trace.body_bytes = 0
        body, truncated = await _read_body(http, conn, trace, req.limit, keep=req.phases)
        if req.phases:
            trace.add_phase(Phase.TRANSFER, trace.now() - begin)
        if truncated:
            trace.note(f"stopped reading the body at {req.limit} bytes (max_body_bytes)")
        if log is not None:
            log.add(f"body: {trace.body_bytes} bytes{' (truncated)' if truncated else ''}")
        return Response(
            status=head.status_code,
            headers=[(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in head.headers],
            body=body,
            truncated=truncated,
        )
    finally:
        dial.close(conn)


def log_head(log: debuglog.DebugLog, what: str, first: str, headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Record a request or response head, credentials masked."""
    lines = debuglog.header_lines((k.decode("latin-1"), v.decode("latin-1")) for k, v in headers)
    log.add(f"{what} head: {first}" + "".join(f"\n{'':15}{line}" for line in lines))


def _origin(url: str) -> tuple[str, str, int]:
    """Return the (scheme, host, port) origin of a URL."""
    host, https, port, _, _ = url_parts(url)
    return ("https" if https else "http", host.lower(), port)


def _redirect_target(base: str, location: str) -> str:
    """Return the absolute http(s) URL a Location header points to; Unexpected if it is no such URL."""
    shown = location[:200]
    try:
        url = urljoin(base, location)
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError as e:
        raise Unexpected(f"redirect to a bad Location {shown!r}: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise Unexpected(f"redirect to {shown!r}: not an http(s) URL (not followed)")
    if not parts.hostname:
        raise Unexpected(f"redirect to {shown!r}: no host")
    return url


def http_check(target: Target) -> HttpCheck:
    if target.http is None:  # the registry sends only url targets here
        raise TypeError(f"target {target.name} has no HTTP settings")
    return target.http


@functools.lru_cache(maxsize=16384)
def _request(method: str, path: str, host_header: str, extra: tuple[tuple[str, str], ...]) -> h11.Request:
    """Return the request of a probe: h11 validates it once per distinct request, not per probe."""
    headers = [("Host", host_header), ("User-Agent", USER_AGENT), ("Accept", "*/*"), ("Connection", "close"), *extra]
    return h11.Request(method=method, target=path, headers=headers)


@functools.lru_cache(maxsize=16384)
def url_parts(url: str) -> tuple[str, bool, int, str, str]:
    """Return host, https?, port, Host header and request target of a URL (parsed once per URL)."""
    parts = urlsplit(url)
    https = parts.scheme == "https"
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname or "", https, parts.port or (443 if https else 80), parts.netloc.rpartition("@")[2], path


async def _next_event(http: h11.Connection, conn: dial.Connection, trace: Trace) -> object:
    while True:
        try:
            event = http.next_event()
        except h11.RemoteProtocolError as e:
            if e.error_status_hint == 431:  # h11's "Receive buffer too long": an event over the limit
                what = "response head" if trace.stage is Stage.REQUEST else "chunk header or trailer"
                raise Unexpected(f"{what} larger than {MAX_HEADER_BYTES} bytes: not an honest server") from e
            raise
        if event is h11.NEED_DATA:
            data = await conn.read(READ_CHUNK)
            if not data and trace.stage is Stage.REQUEST:
                raise EOFError("connection closed before any response")
            if not data and http.their_state is h11.SEND_BODY:
                raise EOFError(f"connection closed after {trace.body_bytes} body bytes")
            http.receive_data(data)
            continue
        return event


async def _read_body(
    http: h11.Connection, conn: dial.Connection, trace: Trace, limit: int, *, keep: bool
) -> tuple[bytes, bool]:
    # One buffer, not a list of pieces: a body of a million 1-byte chunks costs its bytes, not a
    # million objects (a list of them took ~190 MB for a 1 MiB limit).
    body = bytearray()
    events = 0
    while True:
        event = await _next_event(http, conn, trace)
        events += 1
        if events % EVENTS_PER_WAKEUP == 0:
            await asyncio.sleep(0)  # buffered events never suspend: let the loop run other probes
            if events > MAX_TINY_EVENTS and trace.body_bytes < events * TINY_CHUNK:
                raise Unexpected(
                    f"body sent in {events}+ pieces of {trace.body_bytes / events:.1f} bytes on average after "
                    f"{trace.body_bytes} bytes: not an honest server"
                )
        if isinstance(event, h11.Data):
            take = min(len(event.data), limit - trace.body_bytes)
            if keep:
                body += event.data[:take] if take < len(event.data) else event.data
            trace.body_bytes += take
            if trace.body_bytes >= limit:
                return bytes(body), True
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return bytes(body), False


def check_expectations(expect: Expect, resp: Response) -> None:
    if not expect.status_ok(resp.status):
        wanted = ", ".join(map(str, expect.status)) if expect.status else "2xx"
        raise Unexpected(f"status {resp.status}, expected {wanted}{_snippet(resp.body)}")
    headers = dict(resp.headers)
    for name, pattern in expect.headers:
        value = headers.get(name)
        if value is None or not pattern.search(value):
            raise Unexpected(f"header {name}: {value!r} does not match /{pattern.pattern}/")
    text = resp.body.decode("utf-8", "replace")
    for needle in expect.body_contains:
        if needle not in text:
            raise Unexpected(f"body does not contain {needle!r}{_snippet(resp.body)}")
    for pattern in expect.body_regex:
        if not pattern.search(text):
            raise Unexpected(f"body does not match /{pattern.pattern}/{_snippet(resp.body)}")


def _snippet(body: bytes, size: int = 120) -> str:
    if not body:
        return " (empty body)"
    text = body[:size].decode("utf-8", "replace").replace("\n", " ").replace("\r", " ")
    return f" (body starts {text!r}{'...' if len(body) > size else ''})"


async def _download(
    target: Target, route: Route, deadline: Deadline, ctx: ProbeContext, trace: Trace, fetch: Fetch
) -> None:
    """Fetch `download.url` over the same route; its rate is body bytes over body time."""
    dl = http_check(target).download
    assert dl is not None
    saved_phases, saved_tls = dict(trace.phases), trace.tls  # the phases describe the main request
    try:
        async with asyncio.timeout_at(deadline.at - target.timeout * DOWNLOAD_MARGIN):
            request = Request.of(
                dl.url, "GET", limit=dl.max_bytes, phases=False,
                headers=http_check(target).headers, body_stage=Stage.DOWNLOAD,  # a configured URL, not a redirect
            )
            resp = await fetch(request, target, route, deadline, ctx, trace)
            if resp.status != 200:
                raise Unexpected(f"download of {dl.url} answered status {resp.status}, expected 200")
    except TimeoutError:
        if trace.stage is not Stage.DOWNLOAD:
            raise  # it stalled before the body: classify by the stage it stalled in
    finally:
        trace.phases.clear()
        trace.phases.update(saved_phases)
        trace.tls = saved_tls
    elapsed = trace.in_stage()
    rate = trace.body_bytes / elapsed if elapsed > 0 else 0.0
    trace.throughput = rate
    if rate < dl.min_bytes_per_second:
        raise Throttled(
            f"download of {dl.url} ran at {rate:,.0f} B/s ({trace.body_bytes} bytes in {elapsed:.2f} s), "
            f"below min_bytes_per_second {dl.min_bytes_per_second:,.0f}"
        )
    trace.note(f"download: {trace.body_bytes} bytes in {elapsed:.3f} s = {rate:,.0f} B/s")
