"""The HTTP endpoints of `probe run`: metrics, JSON results, ranking, on-demand probes, reload."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from importlib import resources
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from probe import debuglog
from probe.config import Config
from probe.exporter import debugtrace
from probe.exporter.api import results_json, routes_json
from probe.exporter.compression import Gzipper, accepts_gzip
from probe.exporter.limits import ListenerLimits, write_within
from probe.exporter.metrics import render_chunks, render_target
from probe.exporter.shared import SharedRendering
from probe.exporter.webconfig import BasicAuth, WebConfig, auth_middleware
from probe.models import ProbeResult
from probe.store import ResultStore

_TYPES = {"html": "text/html", "css": "text/css", "js": "text/javascript"}

# The status page: plain files shipped in the package, read once. The policy keeps the page to this
# monitor: nothing is fetched from anywhere else (a CDN may be exactly what is blocked where it runs).
STATIC = {
    f.name: (f.read_bytes(), _TYPES[f.name.rpartition(".")[2]])
    for f in resources.files("probe.exporter").joinpath("static").iterdir()
    if f.name.rpartition(".")[2] in _TYPES
}
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy":
        "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


def _static(name: str) -> web.Response:
    body, content_type = STATIC[name]
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers=PAGE_HEADERS)


class Backend(Protocol):
    """What the endpoints need from the running service."""

    @property
    def config(self) -> Config: ...

    @property
    def store(self) -> ResultStore: ...

    async def probe_target(self, name: str) -> list[ProbeResult]:
        """Probe one configured target now over all its routes, with its DNS check."""
        ...

    async def reload(self) -> str | None:
        """Reload the config file; return None on success, else why the running config stays."""
        ...


def create_app(
    backend: Backend, web_config: WebConfig | None = None, limits: ListenerLimits | None = None
) -> web.Application:
    """Return the aiohttp application serving `backend`, behind basic auth if `web_config` has users."""
    h = _Handlers(backend, limits or ListenerLimits())
    middlewares = [auth_middleware(BasicAuth(web_config.users))] if web_config and web_config.users else []
    app = web.Application(middlewares=middlewares)

    async def close_gzipper(app: web.Application) -> None:
        h.gzipper.close()

    app.on_cleanup.append(close_gzipper)
    app.router.add_get("/", h.index)
    app.router.add_get("/static/{name}", h.static)
    app.router.add_get("/metrics", h.metrics)
    app.router.add_get("/api/results", h.results)
    app.router.add_get("/api/routes", h.routes)
    app.router.add_get("/probe", h.probe)
    app.router.add_get("/-/healthy", h.healthy)
    app.router.add_post("/-/reload", h.reload)
    return app


def cross_site(request: web.Request) -> str | None:
    """Return why a POST looks sent by a web page on another site (CSRF), or None.

    Browsers mark a cross-site request with Sec-Fetch-Site, and a form post with Origin (older
    ones at least with Referer); curl, urllib, Prometheus tooling and scripts send none of them.
    """
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none"):
        return f"Sec-Fetch-Site: {site[:40]}"
    for header in ("Origin", "Referer"):
        value = request.headers.get(header)
        if value is not None and value.partition("://")[2].partition("/")[0] != request.host:
            return f"{header} {value[:100]!r} is not this host"
    return None


class _Handlers:
    def __init__(self, backend: Backend, limits: ListenerLimits) -> None:
        self.backend = backend
        self.limits = limits
        self.gzipper = Gzipper()
        self._probing: dict[str, asyncio.Future[list[ProbeResult]]] = {}
        self._debugging: dict[str, asyncio.Future[str]] = {}
        self._rendering: SharedRendering | None = None
        self._recent: dict[str, tuple[float, list[ProbeResult]]] = {}  # configured names only
        self._recent_debug: dict[str, tuple[float, str]] = {}

    async def _probe_once(self, name: str) -> list[ProbeResult]:
        # Requests for a target already being probed share that probe, and results younger than
        # probe_reuse are answered again: hammering /probe cannot multiply the traffic the monitor
        # sends to a target, whether the requests overlap or follow each other.
        loop = asyncio.get_running_loop()
        recent = self._recent.get(name)
        if recent is not None and loop.time() - recent[0] < self.limits.probe_reuse:
            return recent[1]
        running = self._probing.get(name)
        if running is None:
            running = asyncio.ensure_future(self.backend.probe_target(name))
            self._probing[name] = running
            running.add_done_callback(lambda f: self._probing.pop(name, None) if self._probing.get(name) is f else None)
        results = await asyncio.shield(running)
        self._recent[name] = (loop.time(), results)
        return results

    async def _debug_once(self, name: str) -> str:
        # Like _probe_once, but a probe of its own: one already running without a recorder has no trace.
        loop = asyncio.get_running_loop()
        recent = self._recent_debug.get(name)
        if recent is not None and loop.time() - recent[0] < self.limits.probe_reuse:
            return recent[1]
        running = self._debugging.get(name)
        if running is None:
            running = asyncio.ensure_future(self._debug_probe(name))
            self._debugging[name] = running
            running.add_done_callback(
                lambda f: self._debugging.pop(name, None) if self._debugging.get(name) is f else None)
        text = await asyncio.shield(running)
        self._recent_debug[name] = (loop.time(), text)
        return text

    async def _debug_probe(self, name: str) -> str:
        config = self.backend.config
        log = debuglog.DebugLog(debugtrace.secrets_of(config))
        with debuglog.recording(log):
            results = await self.backend.probe_target(name)
        return debugtrace.render(log, config, config.target(name), results)

    async def index(self, request: web.Request) -> web.Response:
        return _static("index.html")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC or name == "index.html":
            raise web.HTTPNotFound()
        return _static(name)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        # Written in chunks of about 10,000 lines (exposition.CHUNK_LINES, ~1 MB of bytes): at 10,000
        # pairs the text is ~14 MB, which need never be whole in memory, and the loop runs between
        # chunks, so many, pipelined or slow scrapers never stall the scheduler (a chunk costs 1-3 ms
        # of CPU).
        # Scrapes arriving while a rendering runs share it (exporter/shared.py); a client that does
        # not take a chunk within the write timeout is dropped instead of pinning the text. gzip
        # when asked (Prometheus always asks): each scrape deflates the shared chunks in a thread.
        gzip = accepts_gzip(request.headers.get("Accept-Encoding"))
        headers = {"Content-Type": CONTENT_TYPE_LATEST, "Vary": "Accept-Encoding"}
        if gzip:
            headers["Content-Encoding"] = "gzip"
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        shared = self._rendering
        if shared is None or not shared.joinable:
            shared = self._rendering = SharedRendering(render_chunks(self.backend.store, self.backend.config))
        async with aclosing(shared.read()) as chunks:
            stream = self.gzipper.compress(chunks) if gzip else chunks
            async with aclosing(stream):
                async for data in stream:
                    if data and not await write_within(resp, request, data, self.limits.write_timeout):
                        return resp
        await resp.write_eof()
        return resp

    async def results(self, request: web.Request) -> web.Response:
        return web.json_response(results_json(self.backend.store, self.backend.config))

    async def routes(self, request: web.Request) -> web.Response:
        return web.json_response(routes_json(self.backend.store, self.backend.config))

    async def probe(self, request: web.Request) -> web.Response:
        name = request.query.get("target")
        if not name:
            raise web.HTTPBadRequest(text="missing parameter: /probe?target=NAME (a configured target)\n")
        config = self.backend.config
        if not any(t.name == name for t in config.targets):
            # Only configured targets are probed: never an open proxy to arbitrary hosts.
            raise web.HTTPNotFound(text=f"unknown target {name[:100]!r}: not in the config\n")
        if request.query.get("debug", "").lower() in ("true", "1"):
            return web.Response(text=await self._debug_once(name), content_type="text/plain")
        results = await self._probe_once(name)
        scratch = ResultStore(config)
        for r in results:
            scratch.record(r)
        if results:
            scratch.record_dns(name, results[0].dns)
        return web.Response(body=render_target(scratch, config, name), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthy(self, request: web.Request) -> web.Response:
        return web.Response(text="OK")

    async def reload(self, request: web.Request) -> web.Response:
        if (why := cross_site(request)) is not None:
            raise web.HTTPForbidden(text=f"reload refused: {why}\n")
        error = await self.backend.reload()
        if error is not None:
            raise web.HTTPBadRequest(text=f"reload failed; the running config stays:\n{error}\n")
        return web.Response(text="OK\n")
