"""The low items of issue 19: /probe hammering, CSRF on reload, escape sequences from a hostile
proxy, and the unknown-user bcrypt cost; each against real servers and a real `probe run`."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import bcrypt
import pytest
import yaml

from probe.exporter.webconfig import BasicAuth
from tests.procs import probe_run
from tests.servers import raw_server
from tests.test_cli import run_cli


async def test_sequential_probe_requests_reuse_a_young_result_instead_of_probing_again(tmp_path: Path) -> None:
    hits = 0

    async def pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal hits
        await reader.readuntil(b"\r\n\r\n")
        hits += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\npong")
        await writer.drain()

    async with raw_server(pong) as port:
        cfg = tmp_path / "targets.yml"
        cfg.write_text(yaml.safe_dump({"vantage": "lab", "targets": [
            {"name": "web", "url": f"http://127.0.0.1:{port}/", "interval": "1h"}]}))
        async with probe_run("-c", str(cfg), "--web.probe-reuse", "2s") as running, \
                aiohttp.ClientSession() as http:
            await asyncio.sleep(0.5)
            before = hits  # the scheduler's own run, if it fell into this second
            started = time.monotonic()
            for _ in range(200):  # one after another, never overlapping
                async with http.get(running.base + "/probe", params={"target": "web"}) as response:
                    assert response.status == 200
                    assert "probe_success" in await response.text()
            spent = time.monotonic() - started
    assert hits - before <= spent / 2 + 2, (hits - before, spent)


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "text/plain"},
    ],
    ids=["foreign-origin", "sec-fetch-cross-site", "form-post", "text-plain-post"],
)
async def test_reload_refuses_a_cross_site_post(tmp_path: Path, headers: dict[str, str]) -> None:
    cfg = tmp_path / "targets.yml"
    cfg.write_text("vantage: lab\ntargets: [{name: a, address: '127.0.0.1:1', interval: 1h}]\n")
    async with probe_run("-c", str(cfg)) as running, aiohttp.ClientSession() as http:
        cfg.write_text("vantage: lab\ntargets: [{name: b, address: '127.0.0.1:1', interval: 1h}]\n")
        async with http.post(running.base + "/-/reload", headers=headers, data=b"x=1") as response:
            assert response.status == 403, await response.text()
        async with http.get(running.base + "/metrics") as response:
            assert 'target="a"' in await response.text()  # not reloaded
        host = running.base.removeprefix("http://")
        async with http.post(running.base + "/-/reload", headers={"Origin": f"http://{host}"}) as response:
            assert response.status == 200, await response.text()  # the same origin, and curl -X POST, may
        async with http.get(running.base + "/metrics") as response:
            assert 'target="b"' in await response.text()


async def test_a_hostile_proxys_escape_sequences_never_reach_the_terminal(tmp_path: Path) -> None:
    async def hostile_proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 407 \x1b]0;pwned\x07\x1b[2J\x9bProxy says hi\r\n\r\n")
        await writer.drain()

    async with raw_server(hostile_proxy) as port:
        cfg = tmp_path / "targets.yml"
        cfg.write_text(yaml.safe_dump({
            "vantage": "lab", "routes": [{"name": "p", "proxy": f"http://127.0.0.1:{port}"}],
            "targets": [{"name": "t", "url": "http://storage.example/", "routes": ["p"], "timeout": "2s"}]}))
        code, out, err = await run_cli("once", "-c", str(cfg))
    assert code == 1, out + err
    assert out.isascii() and all(c.isprintable() or c == "\n" for c in out), repr(out)
    assert "\\x1b]0;pwned\\x07" in out, out


def test_an_unknown_user_costs_what_a_known_one_does() -> None:
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=12))
    auth = BasicAuth({"alice": hashed})

    def timed(user: str) -> float:
        import base64

        header = "Basic " + base64.b64encode(f"{user}:wrong-{time.monotonic()}".encode()).decode()
        started = time.perf_counter()
        assert asyncio.run(auth.check(header)) is None
        return time.perf_counter() - started

    known, unknown = min(timed("alice") for _ in range(2)), min(timed("mallory") for _ in range(2))
    assert unknown > known / 2, (known, unknown)  # the same cost (12), not the fixed 10 (1/4 the time)
    assert bcrypt.checkpw(b"not a password", auth._dummy) and auth._dummy.split(b"$")[2] == b"12"
