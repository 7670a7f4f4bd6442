"""gzip for /metrics: Prometheus asks for it on every scrape (Accept-Encoding: gzip).

The text is ~14 times smaller gzipped (1.4 KB -> 0.1 KB per pair of a default HTTPS target).
Compression runs chunk by chunk in one worker thread of its own: zlib releases the GIL while it
deflates, so the event loop (and the scheduler on it) keeps running during a scrape, and a
default executor busy with getaddrinfo() calls cannot delay it.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncGenerator, AsyncIterable
from concurrent.futures import ThreadPoolExecutor

# Level 1: at 10,000 pairs ~40 ms of CPU for 0.95 MiB; level 6 took ~110 ms for 0.82 MiB (docs/benchmarks.md).
LEVEL = 1
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip header and trailer around the deflate stream


def accepts_gzip(header: str | None) -> bool:
    """Return whether an Accept-Encoding header value accepts gzip (RFC 9110: q=0 refuses)."""
    if not header:
        return False
    star = False
    for item in header.split(","):
        coding, _, params = item.strip().partition(";")
        coding = coding.strip().lower()
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if coding in ("gzip", "x-gzip"):
            return q > 0
        if coding == "*":
            star = q > 0
    return star


class Gzipper:
    """Compresses responses in a thread of its own; one per server."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gzip")

    async def compress(self, chunks: AsyncIterable[bytes]) -> AsyncGenerator[bytes, None]:
        """Yield `chunks` as one gzip stream, each chunk deflated in the worker thread.

        One chunk is deflated while the loop renders the next (one worker runs the calls in
        the order they were submitted, so the stream stays in order).
        """
        loop = asyncio.get_running_loop()
        deflate = zlib.compressobj(LEVEL, zlib.DEFLATED, _GZIP_WBITS)
        pending: asyncio.Future[bytes] | None = None
        async for chunk in chunks:
            if not chunk:
                continue  # a pause of the renderer (the loop ran there already)
            submitted = loop.run_in_executor(self._executor, deflate.compress, chunk)
            if pending is not None and (out := await pending):
                yield out
            pending = submitted
        if pending is not None and (out := await pending):
            yield out
        yield await loop.run_in_executor(self._executor, deflate.flush)

    def close(self) -> None:
        """Stop the worker thread (after the server stopped)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
