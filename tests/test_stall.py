"""Never blame the network for the monitor's own stall (issue 19, item 2).

A hostile server of endless 1-byte chunks once held the event loop for ~0.4 s at a time
and healthy targets beside it timed out (`tcp_timeout`: blocked!). Now the body loop yields,
the loop's own stalls are measured (`prober_loop_stall_seconds`), and a timeout across a
stall, or one the kernel contradicts, is `error` with evidence.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp
import yaml

from probe import config, loop
from probe.context import ProbeContext
from probe.loop import LoopWatch
from probe.models import Outcome, ProbeResult
from probe.runner import run_probe
from tests import hostile_servers as hostile
from tests.procs import probe_run
from tests.servers import raw_server

MiB = 2**20


class _Pong(BaseHTTPRequestHandler):
    delay = 0.0

    def do_GET(self) -> None:  # noqa: N802  (http.server's name)
        time.sleep(self.delay)
        self.send_response(200)
        self.send_header("Content-Length", "4")
        self.end_headers()
        self.wfile.write(b"pong")

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def healthy_server(delay: float = 0.0) -> Iterator[int]:
    """Serve `pong` (after `delay` s) from a thread of its own, so that nothing the test's loop does delays it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Pong", (_Pong,), {"delay": delay}))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def one_target(target: dict[str, object], timeout: str = "500ms") -> config.Config:
    return config.loads(yaml.safe_dump({"vantage": "t", "defaults": {"timeout": timeout},
                                        "targets": [{"name": "t", **target}]}))


async def probe_once(cfg: config.Config) -> ProbeResult:
    ctx = ProbeContext(cfg)
    try:
        return await run_probe(cfg.targets[0], cfg.route("direct"), ctx)
    finally:
        await ctx.close()


async def test_loop_watch_measures_a_stall_and_its_overlap_with_a_window() -> None:
    watch = LoopWatch()
    watch.start()
    await asyncio.sleep(0.12)
    start = time.perf_counter()
    time.sleep(0.3)  # the loop is held, as by a probe that never yields
    total_during, _ = watch.stalled(start, time.perf_counter())  # the watch has not run yet: still going on
    await asyncio.sleep(0.12)
    total, longest = watch.stalled(start, time.perf_counter())
    before, _ = watch.stalled(start - 10, start - 5)
    await watch.stop()
    assert total_during >= 0.2
    assert 0.25 <= longest <= total <= 0.5
    assert before == 0.0
    counts = dict(watch.cumulative())
    assert counts[0.25] < counts[float("inf")], counts  # one tick was late by more than 250 ms
    assert watch.sum >= 0.25


async def test_timeout_across_a_stall_of_the_loop_is_error_with_evidence() -> None:
    with healthy_server(delay=0.1) as port:  # answers in 100 ms, while the loop is held
        cfg = one_target({"url": f"http://127.0.0.1:{port}/"})
        loop.watch.start()
        try:
            asyncio.get_running_loop().call_later(0.01, time.sleep, 0.7)  # the monitor stalls mid-probe
            result = await probe_once(cfg)
        finally:
            await loop.watch.stop()
    assert result.outcome is Outcome.ERROR, result
    assert not result.blocked
    evidence = " | ".join(result.evidence)
    assert "event loop stalled for" in evidence and "not the network's" in evidence, evidence
    assert result.error is not None and result.error.startswith("MonitorStall"), result.error


async def test_connect_the_kernel_completed_is_not_a_tcp_timeout() -> None:
    with healthy_server() as port:
        cfg = one_target({"address": f"127.0.0.1:{port}"})
        task = asyncio.ensure_future(probe_once(cfg))
        # Runs right after the probe's first step (connect_ex sent the SYN): the kernel finishes
        # the handshake in microseconds while the loop is held past the deadline.
        asyncio.get_running_loop().call_soon(time.sleep, 0.7)
        result = await task
    assert result.outcome is Outcome.ERROR, result
    evidence = " | ".join(result.evidence)
    assert "the kernel completed the TCP handshake with 127.0.0.1" in evidence, evidence


async def test_a_real_timeout_without_a_stall_stays_the_networks() -> None:
    async with raw_server(hostile.trickled_headers) as port:
        loop.watch.start()
        try:
            result = await probe_once(one_target({"url": f"http://127.0.0.1:{port}/"}))
        finally:
            await loop.watch.stop()
    assert result.outcome is Outcome.HTTP_TIMEOUT, result
    assert "stalled" not in " ".join(result.evidence)


async def test_a_body_of_1_byte_chunks_is_refused_early_in_bounded_memory() -> None:
    async with raw_server(hostile.one_byte_chunks) as port:
        cfg = one_target({"url": f"http://127.0.0.1:{port}/", "max_body_bytes": MiB}, timeout="3s")
        tracemalloc.start()
        try:
            result = await probe_once(cfg)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert result.outcome is Outcome.HTTP_UNEXPECTED, result
    assert "not an honest server" in " ".join(result.evidence), result.evidence
    assert peak <= 4 * MiB, f"peak {peak / MiB:.1f} MiB for a 1 MiB limit"


async def test_a_hostile_chunk_server_beside_healthy_targets_gives_them_no_false_outcome(tmp_path: Path) -> None:
    """A real `probe run` for a minute: the hostile target may fail, the healthy ones never do."""
    with healthy_server() as healthy:
        async with raw_server(hostile.one_byte_chunks) as bad:
            cfg = tmp_path / "targets.yml"
            cfg.write_text(yaml.safe_dump({
                "vantage": "lab",
                "defaults": {"interval": "1s", "timeout": "500ms"},
                "targets": [
                    {"name": "hostile", "url": f"http://127.0.0.1:{bad}/", "timeout": "1s"},
                    {"name": "hostile2", "url": f"http://127.0.0.1:{bad}/x", "timeout": "1s"},
                    {"name": "web", "url": f"http://127.0.0.1:{healthy}/"},
                    {"name": "web2", "url": f"http://localhost:{healthy}/"},
                    {"name": "port", "address": f"127.0.0.1:{healthy}"},
                ],
            }))
            async with probe_run("-c", str(cfg)) as running, aiohttp.ClientSession() as http:
                await asyncio.sleep(60)
                async with http.get(running.base + "/metrics") as response:
                    text = await response.text()
    runs: dict[tuple[str, str], float] = {}
    for target, outcome, value in re.findall(
        r'^probe_runs_total\{[^}]*target="([^"]+)"[^}]*outcome="([^"]+)"[^}]*\} (\S+)', text, re.M
    ):
        runs[target, outcome] = runs.get((target, outcome), 0.0) + float(value)
    for name in ("web", "web2", "port"):
        bad_runs = {o: n for (t, o), n in runs.items() if t == name and o != "ok" and n}
        assert not bad_runs, (name, bad_runs)
        assert runs.get((name, "ok"), 0) >= 40, (name, runs)
    assert sum(n for (t, _), n in runs.items() if t == "hostile") >= 20, runs  # it was probed all along
    assert "prober_loop_stall_seconds_bucket" in text
