"""Credentials never leave the target's origin on a redirect (issue 19, item 1).

A target's configured `headers` (Authorization, API keys) go to its own origin only; an
https -> http redirect is http_unexpected unless the target allows it; a Location that is
no http(s) URL is http_unexpected, not an error or a DNS failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from probe import config
from probe.context import ProbeContext
from probe.models import Outcome, ProbeResult
from probe.runner import run_probe
from tests.procs import probe_run, wait_until
from tests.servers import Pki, raw_server

SECRET = "Bearer s3cr3t-token-4711"
HEADERS = {"Authorization": SECRET, "X-Api-Key": "k3y-0815"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


class Listener:
    """A server that records every byte it receives and answers 200 `pong`."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.received += head
        self.requests += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\npong")
        await writer.drain()


def redirecting(location: str | bytes, seen: Listener | None = None) -> Any:
    """A handler that records the request and answers 302 to `location` (a str is encoded as UTF-8)."""
    where = location if isinstance(location, bytes) else location.encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if seen is not None:
            seen.received += head
            seen.requests += 1
        if head.startswith(b"GET /final "):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\npong")
        else:
            writer.write(b"HTTP/1.1 302 Found\r\nLocation: " + where + b"\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    return handle


@asynccontextmanager
async def listener() -> AsyncIterator[tuple[Listener, int]]:
    seen = Listener()
    async with raw_server(seen.handle) as port:
        yield seen, port


async def probe(pki: Pki, target: dict[str, Any]) -> ProbeResult:
    cfg = config.loads(yaml.safe_dump({
        "vantage": "t", "defaults": {"timeout": "2s", "ca_file": str(pki.ca_file)},
        "targets": [{"name": "t", "headers": HEADERS, **target}],
    }))
    ctx = ProbeContext(cfg)
    try:
        return await run_probe(cfg.targets[0], cfg.route("direct"), ctx)
    finally:
        await ctx.close()


async def test_a_redirect_to_another_origin_never_carries_the_configured_headers(pki: Pki) -> None:
    origin = Listener()
    async with listener() as (elsewhere, other_port), \
            raw_server(redirecting(f"http://127.0.0.1:{other_port}/landing", origin)) as port:
        result = await probe(pki, {"url": f"http://127.0.0.1:{port}/"})
    assert result.outcome is Outcome.OK, result
    assert SECRET.encode() in origin.received and b"k3y-0815" in origin.received  # the origin gets them
    assert elsewhere.requests == 1
    assert SECRET.encode() not in elsewhere.received and b"k3y-0815" not in elsewhere.received
    assert b"Authorization" not in elsewhere.received
    assert any("the configured headers (Authorization, X-Api-Key) are not sent there" in e for e in result.evidence)


async def test_a_redirect_within_the_origin_keeps_the_headers(pki: Pki) -> None:
    origin = Listener()
    async with raw_server(redirecting("/final", origin)) as port:
        result = await probe(pki, {"url": f"http://127.0.0.1:{port}/start"})
    assert result.outcome is Outcome.OK, result
    assert origin.requests == 2
    assert origin.received.count(SECRET.encode()) == 2


async def test_an_https_to_http_downgrade_is_unexpected_and_not_followed(pki: Pki) -> None:
    async with listener() as (plain, plain_port), \
            raw_server(redirecting(f"http://127.0.0.1:{plain_port}/"), pki.server_context()) as port:
        result = await probe(pki, {"url": f"https://127.0.0.1:{port}/"})
        allowed = await probe(pki, {"url": f"https://127.0.0.1:{port}/", "allow_insecure_redirects": True})
    assert result.outcome is Outcome.HTTP_UNEXPECTED, result
    assert "a downgrade from https to plain http" in " ".join(result.evidence), result.evidence
    assert allowed.outcome is Outcome.OK, allowed
    assert plain.requests == 1  # only the allowed probe went there ...
    assert SECRET.encode() not in plain.received  # ... and without the credentials (another origin)


@pytest.mark.parametrize(
    ("location", "evidence"),
    [
        ("http://[2001:db8::1/", "redirect to a bad Location 'http://[2001:db8::1/'"),
        ("file:///etc/passwd", "redirect to 'file:///etc/passwd': not an http(s) URL"),
        ("http://:80/", "no host"),
    ],
    ids=["unclosed-ipv6-bracket", "file-url", "no-host"],
)
async def test_a_location_that_is_no_http_url_is_unexpected(pki: Pki, location: str, evidence: str) -> None:
    async with raw_server(redirecting(location)) as port:
        result = await probe(pki, {"url": f"http://127.0.0.1:{port}/"})
    assert result.outcome is Outcome.HTTP_UNEXPECTED, result
    assert evidence in " ".join(result.evidence), result.evidence


async def test_probe_run_never_lets_the_secret_reach_another_origins_listener(tmp_path: Path) -> None:
    origin = Listener()
    async with listener() as (elsewhere, other_port), \
            raw_server(redirecting(f"http://127.0.0.1:{other_port}/", origin)) as port:
        cfg = tmp_path / "targets.yml"
        cfg.write_text(yaml.safe_dump({"vantage": "lab", "targets": [
            {"name": "api", "url": f"http://127.0.0.1:{port}/", "headers": HEADERS, "interval": "1s"}]}))
        async with probe_run("-c", str(cfg)) as running, aiohttp.ClientSession() as http:
            async def probed_thrice() -> bool:
                return elsewhere.requests >= 3

            await wait_until(probed_thrice)
            async with http.get(running.base + "/api/results") as response:
                results = (await response.json())["results"]
    assert results[0]["outcome"] == "ok", results
    assert origin.requests >= 3 and origin.received.count(SECRET.encode()) == origin.requests
    assert SECRET.encode() not in elsewhere.received and b"k3y-0815" not in elsewhere.received
