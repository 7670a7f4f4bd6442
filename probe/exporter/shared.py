"""One `/metrics` rendering shared by the scrapes that arrive while it runs.

Rendering costs CPU in proportion to the pairs (~0.6 s at 10,000); N scrapers at once
(an HA pair of Prometheus, or a client hammering the endpoint) should cost one rendering,
not N. The text is kept only until every scrape that joined has written a chunk: a scrape
may join while the first chunk is still held, and a later one starts the next rendering.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterable


class SharedRendering:
    """The chunks of one rendering, produced once and read by every scrape that joined."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._source = chunks
        self._chunks: list[bytes | None] = []
        self._pending: list[int] = []  # per chunk: readers that still have to write it
        self._readers = 0
        self._dropped = False
        self._done = False
        self._error: BaseException | None = None
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._produce())

    @property
    def joinable(self) -> bool:
        """Whether a new scrape can still read this rendering from its first chunk."""
        return not self._dropped

    async def _produce(self) -> None:
        try:
            for chunk in self._source:
                self._chunks.append(chunk)
                self._pending.append(self._readers)
                self._notify()
                await asyncio.sleep(0)  # the loop runs between chunks (a chunk costs 1-3 ms of CPU)
        except BaseException as e:  # the readers raise it: a task's own exception would go unseen
            self._error = e
        finally:
            self._done = True
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def read(self) -> AsyncGenerator[bytes, None]:
        """Yield every chunk in order, waiting for the ones not rendered yet."""
        self._readers += 1
        for j in range(len(self._pending)):  # joinable: every chunk so far is still here
            self._pending[j] += 1
        i = 0
        try:
            while True:
                if i < len(self._chunks):
                    chunk = self._chunks[i]
                    assert chunk is not None  # dropped only once every reader wrote it
                    yield chunk
                    self._done_with(i)
                    i += 1
                elif self._error is not None:
                    raise self._error
                elif self._done:
                    return
                else:
                    await self._changed.wait()
        finally:
            self._readers -= 1
            for j in range(i, len(self._chunks)):  # a reader that left early is done with the rest
                self._done_with(j)

    def _done_with(self, i: int) -> None:
        self._pending[i] -= 1
        if self._pending[i] <= 0:
            self._chunks[i] = None
            self._dropped = True
