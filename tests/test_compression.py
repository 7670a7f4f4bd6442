"""gzip for /metrics: which requests get it, and that the stream is the text, chunk for chunk."""

from __future__ import annotations

import gzip
import threading
from collections.abc import AsyncIterator

import pytest

from probe.exporter import compression
from probe.exporter.compression import Gzipper, accepts_gzip


@pytest.mark.parametrize(("header", "accepted"), [
    ("gzip", True),  # Prometheus: "gzip" (with its Accept header asking for the text format)
    ("gzip, deflate", True),
    ("GZIP", True),
    ("x-gzip", True),
    ("deflate, gzip;q=0.5", True),
    ("gzip;q=0", False),
    ("gzip; q=0.0", False),
    ("gzip;q=nonsense", False),
    ("identity", False),
    ("deflate, br", False),
    ("*", True),
    ("*;q=0", False),
    ("*, gzip;q=0", False),
    ("", False),
    (None, False),
], ids=lambda v: repr(v))
def test_accept_encoding(header: str | None, accepted: bool) -> None:
    assert accepts_gzip(header) is accepted


async def _aiter(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_chunks_become_one_gzip_stream_deflated_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = [b"probe_success{target=\"t%d\"} 1.0\n" % i * 500 if i % 3 else b"" for i in range(30)]  # b"": a pause
    threads: set[str] = set()
    real = compression.zlib.compressobj

    class Spy:
        def __init__(self, *args: int) -> None:
            self.inner = real(*args)

        def compress(self, data: bytes) -> bytes:
            threads.add(threading.current_thread().name)
            return self.inner.compress(data)

        def flush(self) -> bytes:
            return self.inner.flush()

    monkeypatch.setattr(compression.zlib, "compressobj", Spy)
    gzipper = Gzipper()
    try:
        out = [part async for part in gzipper.compress(_aiter(chunks))]
    finally:
        gzipper.close()
    assert gzip.decompress(b"".join(out)) == b"".join(chunks)
    assert len(b"".join(out)) < len(b"".join(chunks)) / 10
    assert threads and all(name.startswith("gzip") for name in threads)  # never on the event loop's thread
