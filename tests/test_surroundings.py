"""Faults of the monitor's own surroundings: a dead system resolver, a full disk for logs, slow scrapes, clock steps."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest

from probe import config
from probe.context import ProbeContext
from probe.exporter.server import create_app
from probe.models import Outcome, ProbeResult
from probe.runner import run_probe
from probe.scheduler import Scheduler
from probe.service import Service
from probe.store import ResultStore
from tests.dnsserver import DnsServer, silent
from tests.procs import wait_until
from tests.servers import aiohttp_server, closed_port


@pytest.fixture(autouse=True)
def _no_vantage_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROBE_VANTAGE", raising=False)


# --- the resolver in resolv.conf is dead ----------------------------------------------


@pytest.mark.parametrize("dead", ["silent", "nothing-listens"])
async def test_dead_system_resolver_is_dns_timeout_by_the_deadline(dead: str, tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    cfg = config.loads("vantage: t\ntargets: [{name: t, url: 'http://storage.example/', timeout: 1s}]\n")
    async with DnsServer(silent()) as server:
        port = server.port if dead == "silent" else closed_port()
        ctx = ProbeContext(cfg, resolv_conf=str(resolv), hosts_file=str(hosts), system_dns_port=port)
        started = time.monotonic()
        try:
            result = await run_probe(cfg.targets[0], cfg.route("direct"), ctx)
        finally:
            await ctx.close()
    assert time.monotonic() - started <= 1.5
    # Nothing answers: a timeout; an ICMP port-unreachable may surface as a refused query.
    assert result.outcome in {Outcome.DNS_TIMEOUT, Outcome.DNS_SERVFAIL}, result
    assert result.outcome is Outcome.DNS_TIMEOUT or dead == "nothing-listens"


@pytest.mark.parametrize("content", ["", "# search example.com\n", None], ids=["empty", "no-nameserver", "missing"])
async def test_unusable_resolv_conf_is_a_local_error_at_once(content: str | None, tmp_path: Path) -> None:
    """No nameserver to ask is the monitor's own trouble (`error`), never blamed on the network."""
    resolv = tmp_path / "resolv.conf"
    if content is not None:
        resolv.write_text(content)
    cfg = config.loads("vantage: t\ntargets: [{name: t, url: 'http://storage.example/', timeout: 1s}]\n")
    ctx = ProbeContext(cfg, resolv_conf=str(resolv), hosts_file=str(tmp_path / "no-hosts"))
    try:
        result = await run_probe(cfg.targets[0], cfg.route("direct"), ctx)
    finally:
        await ctx.close()
    assert result.outcome is Outcome.ERROR and not result.blocked
    assert str(resolv) in (result.error or "")
    assert result.duration_seconds < 0.5


# --- the scheduler's cadence while the surroundings misbehave -------------------------


def cadence_config(pairs: int = 20, interval: str = "200ms") -> config.Config:
    targets = "".join(f"  - {{name: t{i}, address: '127.0.0.1:{1000 + i}'}}\n" for i in range(pairs))
    return config.loads(f"vantage: v\ndefaults: {{interval: {interval}, timeout: 100ms}}\ntargets:\n{targets}")


class Counting:
    """A fast probe that records when each run started (monotonic)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    async def __call__(self, target: config.Target, route: config.Route, ctx: ProbeContext) -> ProbeResult:
        self.starts.append(time.monotonic())
        await asyncio.sleep(0.001)
        return ProbeResult(target.name, route.name, Outcome.OK, time.time(), 0.001)


@asynccontextmanager
async def scheduled(cfg: config.Config, probe: Counting) -> AsyncIterator[Scheduler]:
    ctx = ProbeContext(cfg)
    scheduler = Scheduler(cfg, ctx, ResultStore(cfg), probe_fn=probe)
    scheduler.start()
    try:
        yield scheduler
    finally:
        await scheduler.shutdown()
        await ctx.close()


def runs_per_second(probe: Counting, since: float) -> float:
    recent = [t for t in probe.starts if t >= since]
    return len(recent) / max(time.monotonic() - since, 1e-9)


async def test_disk_full_for_logs_neither_kills_nor_stalls_the_scheduler(capfd: pytest.CaptureFixture[str]) -> None:
    probe_log = logging.getLogger("probe")
    full = logging.FileHandler("/dev/full")
    old_level = probe_log.level
    probe_log.addHandler(full)
    probe_log.setLevel(logging.DEBUG)  # a line per probe, every one failing with ENOSPC
    probe = Counting()
    try:
        async with scheduled(cadence_config(), probe) as scheduler:
            await asyncio.sleep(1.0)
            since = time.monotonic()
            await asyncio.sleep(2.0)
            rate = runs_per_second(probe, since)
            lag = scheduler.store.lag
    finally:
        probe_log.removeHandler(full)
        probe_log.setLevel(old_level)
        with contextlib.suppress(OSError):  # flushing what is left fails too
            full.close()
    assert 80 <= rate <= 120, f"20 pairs every 200 ms is 100 runs/s, saw {rate:.0f}"
    assert lag.count > 200
    assert "No space left on device" in capfd.readouterr().err  # logging reported it and carried on


async def test_probe_run_with_stderr_on_a_full_disk_keeps_probing_and_reloading(tmp_path: Path) -> None:
    cfg = tmp_path / "t.yml"
    cfg.write_text("vantage: v\ntargets:\n  - {name: a, address: '127.0.0.1:1', interval: 250ms, timeout: 100ms}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PROBE_VANTAGE"}
    with open("/dev/full", "w") as full:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "probe", "--log-level", "debug", "run", "-c", str(cfg),
            "--listen", f"127.0.0.1:{port}", stdout=full, stderr=full, env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async def runs() -> float:
                try:
                    async with http.get(f"{base}/metrics") as response:
                        text = await response.text()
                except aiohttp.ClientError:
                    return -1.0
                return sum(float(v) for v in re.findall(r'^probe_runs_total\{[^}]*target="a"[^}]*\} (\S+)',
                                                        text, re.M))

            await wait_until(lambda: _positive(runs()))
            first = await runs()
            await asyncio.sleep(1.5)
            assert await runs() >= first + 3, "probes go on every 250 ms"
            cfg.write_text(cfg.read_text().replace("name: a", "name: b"))
            proc.send_signal(signal.SIGHUP)

            async def reloaded() -> bool:
                async with http.get(f"{base}/metrics") as response:
                    return 'target="b"' in await response.text()

            await wait_until(reloaded)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _positive(value: asyncio.Future[float] | object) -> bool:
    assert asyncio.iscoroutine(value)
    return float(await value) > 0


async def test_slow_scrapes_holding_connections_leave_the_cadence_and_the_lag_truthful(tmp_path: Path) -> None:
    path = tmp_path / "t.yml"
    cfg = cadence_config(pairs=100, interval="1s")
    path.write_text("unused")
    probe = Counting()
    service = Service(str(path), cfg, probe_fn=probe)
    async with aiohttp_server(create_app(service)) as port:
        service.start()
        holders: list[asyncio.StreamWriter] = []
        try:
            # Slow-loris scrapers: a request head that never ends, and scrapes that read nothing back.
            for i in range(50):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if i % 2:
                    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                else:
                    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 20)  # pipelined, never read
                    writer.transport.set_write_buffer_limits(0)
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                holders.append(writer)
            await asyncio.sleep(1.5)
            since = time.monotonic()
            lag_before = service.store.lag.count
            await asyncio.sleep(3.0)
            rate = runs_per_second(probe, since)
            # A scrape that gets through meanwhile sees the lag histogram.
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
        finally:
            for writer in holders:
                writer.transport.abort()
            await service.close()
    assert 85 <= rate <= 115, f"100 pairs every second is 100 runs/s, saw {rate:.0f}"
    assert service.store.lag.count - lag_before >= 250
    slow = sum(n for bound, n in zip(service.store.lag.bounds, service.store.lag.counts, strict=False) if bound > 0.25)
    assert slow + service.store.lag.counts[-1] < service.store.lag.count * 0.05, "runs started on time"
    assert re.search(r"^prober_scheduler_lag_seconds_count\{[^}]*\} [1-9]", text, re.M)


async def test_a_stalled_event_loop_shows_in_the_lag_histogram() -> None:
    """Truthful lag: when the loop is blocked for 0.6 s, runs start late and the histogram says so."""
    probe = Counting()
    async with scheduled(cadence_config(pairs=10, interval="200ms"), probe) as scheduler:
        await asyncio.sleep(0.6)
        before = dict(zip(scheduler.store.lag.bounds, scheduler.store.lag.counts, strict=False))
        time.sleep(0.6)  # a blocking call somewhere in the process
        await asyncio.sleep(0.5)
        after = dict(zip(scheduler.store.lag.bounds, scheduler.store.lag.counts, strict=False))
    late = sum(after[b] - before.get(b, 0) for b in after if b >= 0.5)
    assert late >= 8, "each of the 10 pairs due during the stall reports its 0.4-0.6 s of lag"


# --- the wall clock steps -------------------------------------------------------------


class SteppingClock:
    """The wall clock as the scheduler's clock watch sees it; `step` moves it like NTP or an admin would."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def step(self, seconds: float) -> None:
        self.offset += seconds


@pytest.mark.parametrize("step", [-3600.0, 3600.0], ids=["backwards-an-hour", "forwards-an-hour"])
async def test_a_clock_step_replans_every_job_and_the_cadence_goes_on(step: float) -> None:
    cfg = cadence_config(pairs=5, interval="300ms")
    ctx = ProbeContext(cfg)
    clock, probe = SteppingClock(), Counting()
    scheduler = Scheduler(cfg, ctx, ResultStore(cfg), probe_fn=probe, wall_clock=clock)
    scheduler.start()
    try:
        await asyncio.sleep(0.8)
        # What the step does to APScheduler, which plans in wall-clock time: after a step back
        # every next run is an hour away; after a step forward every job is an hour overdue.
        for job_id in scheduler.job_ids():
            scheduler._aps.modify_job(job_id, next_run_time=datetime.now(UTC) - timedelta(seconds=step))
        scheduler._aps.wakeup()
        if step < 0:
            stalled = len(probe.starts)
            await asyncio.sleep(0.7)
            assert len(probe.starts) <= stalled + 5, "without noticing the step, nothing would run for an hour"
        clock.step(step)
        await wait_until(lambda: _async(scheduler.clock_steps == 1), timeout=3)
        since = time.monotonic()
        await asyncio.sleep(1.5)
        rate = runs_per_second(probe, since)
    finally:
        await scheduler.shutdown()
        await ctx.close()
    assert 12 <= rate <= 20, f"5 pairs every 300 ms is ~17 runs/s, saw {rate:.1f}"


async def _async(value: bool) -> bool:
    return value
