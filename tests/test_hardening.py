"""The low items of issue 19: /probe hammering, CSRF on reload, escape sequences from a hostile
proxy, and the unknown-user bcrypt cost; each against real servers and a real `probe run`."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import yaml

from probe.exporter.webconfig import BasicAuth
from tests.procs import probe_run
from tests.servers import raw_server
from tests.test_cli import run_cli
from tests.test_stall import healthy_server


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
            for i in range(200):  # one after another, never overlapping; the debug trace alike
                debug = {"debug": "true"} if i % 2 else {}
                async with http.get(running.base + "/probe", params={"target": "web", **debug}) as response:
                    assert response.status == 200
                    assert ("probe_success" if not debug else "web") in await response.text()
            spent = time.monotonic() - started
    assert hits - before <= 2 * (spent / 2 + 2), (hits - before, spent)  # plain and debug: each once per 2 s


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Referer": "https://evil.example/page.html", "Content-Type": "application/x-www-form-urlencoded"},
        {"Origin": "null"},
    ],
    ids=["foreign-origin", "sec-fetch-cross-site", "form-post-from-another-site", "opaque-origin"],
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
            assert response.status == 200, await response.text()  # the same origin may
        async with http.post(running.base + "/-/reload", data=b"",  # curl -d '', urllib: a form type, no Origin
                             headers={"Content-Type": "application/x-www-form-urlencoded"}) as response:
            assert response.status == 200, await response.text()
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


def split_proxy(reply: list[bytes], then_relay: bool) -> Any:
    """An HTTP proxy that sends its CONNECT reply in pieces, a little apart, then relays to 127.0.0.1:<port>."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        for piece in reply:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.05)
        if not then_relay:
            await asyncio.sleep(3600)
        port = int(head.split(b" ")[1].rsplit(b":", 1)[1])
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)

    return handle


async def test_an_http_proxy_that_splits_its_connect_reply_carries_the_probe(tmp_path: Path) -> None:
    pieces = [b"HTTP/1.1 200 Conn", b"ection established\r\nVia: 1.1 sq", b"uid\r\n", b"\r\n"]
    with healthy_server() as port:
        async with raw_server(split_proxy(pieces, then_relay=True)) as proxy_port:
            cfg = tmp_path / "t.yml"
            cfg.write_text(yaml.safe_dump({
                "vantage": "lab", "routes": [{"name": "p", "proxy": f"http://127.0.0.1:{proxy_port}"}],
                "targets": [{"name": "web", "url": f"http://127.0.0.1:{port}/", "routes": ["p"], "timeout": "3s"},
                            {"name": "port", "address": f"127.0.0.1:{port}", "routes": ["p"], "timeout": "3s"}]}))
            code, out, err = await run_cli("once", "-c", str(cfg), "--json")
    assert code == 0, out + err
    assert [r["outcome"] for r in json.loads(out)["results"]] == ["ok", "ok"], out


async def test_a_connect_200_never_finished_is_no_ok_for_a_tcp_target(tmp_path: Path) -> None:
    async with raw_server(split_proxy([b"HTTP/1.1 200 OK\r\n"], then_relay=False)) as proxy_port:
        cfg = tmp_path / "t.yml"
        cfg.write_text(yaml.safe_dump({
            "vantage": "lab", "routes": [{"name": "p", "proxy": f"http://127.0.0.1:{proxy_port}"}],
            "targets": [{"name": "port", "address": "127.0.0.1:9", "routes": ["p"], "timeout": "1s"}]}))
        code, out, err = await run_cli("once", "-c", str(cfg), "--json")
    assert code == 1, out + err
    assert json.loads(out)["results"][0]["outcome"] == "tcp_timeout", out
