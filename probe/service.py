"""`probe run`: the scheduler and the HTTP server until SIGTERM; SIGHUP reloads the config."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from probe import config as config_module
from probe import loop
from probe.config import Config, ConfigError, parse_hostport
from probe.context import ProbeContext
from probe.controls import ControlState, without_history
from probe.dns.verdicts import VerdictCache
from probe.exporter import webconfig
from probe.exporter.limits import CappedSite, ListenerLimits
from probe.exporter.server import create_app
from probe.models import ProbeResult
from probe.runner import DnsFn, ProbeFn
from probe.scheduler import DEFAULT_CONCURRENCY, Scheduler
from probe.store import ResultStore

log = logging.getLogger("probe")

# How long in-flight requests (a /probe takes up to a target's timeout) may finish on stop.
SHUTDOWN_TIMEOUT = 5.0


class Service:
    """The running monitor: config, probe context, store and scheduler, and how to reload them."""

    def __init__(
        self,
        config_path: str,
        config: Config,
        *,
        probe_fn: ProbeFn | None = None,
        dns_fn: DnsFn | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        shard: tuple[int, int] | None = None,
    ) -> None:
        self.config_path = config_path
        self.shard = shard
        self.config = config
        # The DNS verdicts outlive reloads: a reload must not forget what the last check found forged.
        self.verdicts = VerdictCache()
        # Control handshakes follow each pair's history, kept across reloads too (probe.controls).
        self.controls = ControlState(history=True)
        self.ctx = ProbeContext(config, verdicts=self.verdicts, controls=self.controls)
        self.store = ResultStore(config)
        self.scheduler = Scheduler(
            config, self.ctx, self.store, probe_fn=probe_fn, dns_fn=dns_fn, concurrency=concurrency
        )
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[object]] = set()

    def start(self) -> None:
        """Start probing (inside the running event loop), with the watch of the loop's own stalls."""
        loop.watch.start()
        self.scheduler.start()

    async def close(self) -> None:
        """Stop probing, wait for in-flight probes to end, release every session."""
        await self.scheduler.shutdown()
        await loop.watch.stop()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.ctx.close()

    async def probe_target(self, name: str) -> list[ProbeResult]:
        """Probe one configured target now over all its routes, with its DNS check."""
        with without_history():  # /probe has no history: the control goes first wherever one is configured
            return await self.scheduler.run_target(name)

    async def reload(self) -> str | None:
        """Load the config file again and switch to it; return None, or why the running config stays."""
        async with self._reload_lock:
            try:
                # Off the loop: reading and validating 10,000 targets takes seconds of CPU, which on
                # the loop would stall every probe in flight (and make healthy targets time out).
                new = await asyncio.to_thread(load_config, self.config_path, self.shard)
                ctx = ProbeContext(new, verdicts=self.verdicts, controls=self.controls)
            except ConfigError as e:
                self.store.reload_failed(str(e))
                log.error("reload of %s failed, keeping the running config: %s",
                          self.config_path, "; ".join(e.problems))
                return str(e)
            except Exception as e:  # a loader bug must not keep the gauge at 1 nor end the service
                error = f"{self.config_path}: cannot load: {type(e).__name__}: {e}"
                self.store.reload_failed(error)
                log.exception("reload of %s failed, keeping the running config", self.config_path)
                return error
            old, old_ctx = self.config, self.ctx
            # In slices that yield to the loop, no run starting meanwhile; the rest below happens in
            # the same step as the switch's end, so no probe sees the new jobs with the old store.
            try:
                changes = await self.scheduler.switch(new, ctx)
            except Exception as e:  # a scheduler bug: switch() put the running jobs back; keep the config
                error = f"{self.config_path}: cannot switch the jobs: {type(e).__name__}: {e}"
                self.store.reload_failed(error)
                log.exception("reload of %s failed, keeping the running config", self.config_path)
                await ctx.close()
                return error
            self.config, self.ctx = new, ctx
            self.controls.forget({(t.name, r) for t in new.targets for r in t.routes})
            self.store.reload_succeeded(new)
            # Probes already running still use the old context; close it once they must have ended.
            grace = max((t.timeout for t in old.targets), default=0.0)
            self._spawn(_close_later(old_ctx, grace))
            if new.listen != old.listen:
                log.warning("listen changed to %s; it takes effect on restart", new.listen)
            log.info("config reloaded from %s: vantage %s, %d targets, %s", self.config_path, new.vantage,
                     len(new.targets), changes)
            return None

    def reload_soon(self) -> None:
        """Reload in the background (from a signal handler)."""
        self._spawn(self.reload())

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _close_later(ctx: ProbeContext, delay: float) -> None:
    try:
        await asyncio.sleep(delay)
    finally:
        await ctx.close()


async def serve(
    config_path: str,
    listen: str | None,
    *,
    probe_fn: ProbeFn | None = None,
    dns_fn: DnsFn | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    shard: tuple[int, int] | None = None,
    web_config_file: str | None = None,
    limits: ListenerLimits | None = None,
) -> int:
    """Run the monitor until SIGTERM or SIGINT; return the exit status. Raises ConfigError on a bad config."""
    cfg = load_config(config_path, shard)
    web_config = webconfig.load(web_config_file) if web_config_file else webconfig.WebConfig()
    address = listen or cfg.listen
    try:
        host, port = listen_address(address)
    except ValueError as e:
        log.error("cannot listen on %s: %s", address, e)
        return 2
    service = Service(config_path, cfg, probe_fn=probe_fn, dns_fn=dns_fn, concurrency=concurrency, shard=shard)
    if shard is not None:
        log.info("shard %d/%d: %d targets are this replica's", shard[0] + 1, shard[1], len(cfg.targets))
    limits = limits or ListenerLimits()
    runner = web.AppRunner(
        create_app(service, web_config, limits), handle_signals=False, access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT, keepalive_timeout=limits.header_timeout,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Handlers go in before anything announces readiness, so an early signal is never fatal.
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, service.reload_soon)
    try:
        await runner.setup()
        try:
            ssl_context = web_config.tls.context() if web_config.tls is not None else None
            await CappedSite(
                runner, host, port, ssl_context=ssl_context, max_connections=limits.max_connections
            ).start()
        except OSError as e:
            log.error("cannot listen on %s: %s", address, e.strerror or e)
            return 1
        scheme = "https" if web_config.tls is not None else "http"
        bound = ", ".join(_url(a, scheme) for a in runner.addresses)
        log.info("listening on %s (vantage %s, %d targets)", bound, cfg.vantage, len(cfg.targets))
        _settle_heap()
        service.start()
        await stop.wait()
        log.info("stopping")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        await service.close()
    log.info("stopped")
    return 0


# Every probe allocates many short-lived objects (TLS, HTTP, asyncio): with CPython's default
# first threshold (700 net allocations) the collector had 5.5% of py-spy's samples of `probe run`
# at 300 HTTPS probes/s. The objects that live long (config, scheduler jobs, the store) are left
# out of its passes by freezing them after start-up.
GC_THRESHOLDS = (20_000, 20, 20)


def _settle_heap() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def load_config(path: str, shard: tuple[int, int] | None) -> Config:
    """Load the config file, keeping only this replica's shard of targets when sharded."""
    cfg = config_module.load(path)
    return cfg.shard(*shard) if shard is not None else cfg


def listen_address(text: str) -> tuple[str, int]:
    """Split `host:port` for the HTTP server; port 0 asks for an ephemeral port."""
    head, sep, port = text.rpartition(":")
    if sep and port == "0":
        host, _ = parse_hostport(f"{head}:1")
        return host, 0
    return parse_hostport(text)


def _url(address: object, scheme: str = "http") -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"{scheme}://[{host}]:{address[1]}" if ":" in host else f"{scheme}://{host}:{address[1]}"
    return str(address)
