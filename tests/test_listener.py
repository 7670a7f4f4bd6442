"""The listener's limits (issue 19, item 3): a connection cap, a request-head timeout, a write
timeout for clients that never read, and one /metrics rendering shared by concurrent scrapes."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

from probe.exporter import server as server_module
from probe.exporter.limits import write_within
from probe.exporter.shared import SharedRendering
from tests.procs import probe_run, wait_until
from tests.servers import aiohttp_server
from tests.test_stall import healthy_server

IDLE = 1000


async def test_a_thousand_idle_connections_under_a_low_fd_limit_cost_no_probe_and_no_scrape(tmp_path: Path) -> None:
    with healthy_server() as port:
        cfg = tmp_path / "targets.yml"
        cfg.write_text(yaml.safe_dump({"vantage": "lab", "targets": [
            {"name": "web", "url": f"http://127.0.0.1:{port}/", "interval": "1s", "timeout": "500ms"}]}))
        async with probe_run("-c", str(cfg), "--web.max-connections", "64", "--web.header-timeout", "2s",
                             max_fds=256) as running, aiohttp.ClientSession() as http:
            host, _, listen_port = running.base.removeprefix("http://").rpartition(":")
            idle = await asyncio.gather(*(asyncio.open_connection(host, int(listen_port)) for _ in range(IDLE)))
            try:
                # Over the cap: told 503 and closed at once, so the process's fds stay bounded; under
                # it: a silent connection is closed once the head timeout (2 s) passes. None stays open.
                ends = await asyncio.wait_for(asyncio.gather(*(r.read() for r, _ in idle)), 20)
                busy = sum(e.startswith(b"HTTP/1.1 503") for e in ends)
                assert busy + ends.count(b"") == IDLE, {e[:20] for e in ends}
                assert busy >= IDLE // 2, busy
                async with http.get(running.base + "/metrics") as response:
                    assert response.status == 200
                    text = await response.text()

                async def probed_again() -> bool:
                    async with http.get(running.base + "/api/results") as response:
                        return (await response.json())["results"][0]["outcome"] == "ok"

                await wait_until(probed_again)
            finally:
                for _, writer in idle:
                    writer.transport.abort()
    errors = re.search(r'^probe_runs_total\{[^}]*outcome="error"[^}]*\} (\S+)', text, re.M)
    assert errors is None or float(errors.group(1)) == 0, errors
    assert "Too many open files" not in running.log, running.log[-2000:]
    assert running.proc.returncode == 0


async def test_a_client_that_never_reads_is_dropped_after_the_write_timeout() -> None:
    outcome: list[bool] = []
    piece = b"x" * (1 << 20)

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(64):  # 64 MiB: far more than the socket buffers hold
            if not await write_within(resp, request, piece, timeout=0.5):
                outcome.append(False)
                return resp
        outcome.append(True)
        return resp

    app = web.Application()
    app.router.add_get("/big", handler)
    async with aiohttp_server(app) as port:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            async def dropped() -> bool:
                return bool(outcome)

            await wait_until(dropped, timeout=20)
        finally:
            sock.close()
    assert outcome == [False]


def counted(calls: list[int], chunks: Iterator[bytes]) -> Iterator[bytes]:
    calls.append(1)
    yield from chunks


async def test_concurrent_readers_share_one_rendering_and_a_later_one_gets_the_next() -> None:
    calls: list[int] = []
    pieces = [b"a" * 10, b"b" * 10, b"c" * 10]
    shared = SharedRendering(counted(calls, iter(pieces)))

    async def read_all(rendering: SharedRendering) -> bytes:
        out = b""
        async with aclosing(rendering.read()) as chunks:
            async for chunk in chunks:
                out += chunk
                await asyncio.sleep(0.01)
        return out

    texts = await asyncio.gather(*(read_all(shared) for _ in range(5)))
    assert texts == [b"".join(pieces)] * 5
    assert calls == [1]
    assert not shared.joinable  # its chunks are gone: a later scrape renders anew


async def test_concurrent_scrapes_of_the_server_render_metrics_once(monkeypatch: object, tmp_path: Path) -> None:
    import pytest

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    calls: list[int] = []
    real = server_module.render_chunks
    monkeypatch.setattr(server_module, "render_chunks", lambda store, config: counted(calls, real(store, config)))
    cfg = tmp_path / "targets.yml"
    cfg.write_text("vantage: lab\ntargets: [{name: a, address: '127.0.0.1:1', interval: 1h}]\n")
    from probe.service import Service, load_config

    service = Service(str(cfg), load_config(str(cfg), None))
    app = server_module.create_app(service)
    async with aiohttp_server(app) as port, aiohttp.ClientSession() as http:
        async def scrape() -> str:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                return await response.text()

        texts = await asyncio.gather(*(scrape() for _ in range(8)))
    await service.close()
    assert len(set(texts)) == 1 and "prober_config_last_reload_successful" in texts[0]
    assert 1 <= len(calls) < 8, calls
