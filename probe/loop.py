"""The event loop of `probe run`: uvloop when it is installed, else asyncio's own; and its stall watch."""

from __future__ import annotations

import asyncio
import bisect
import collections
import os
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

TICK = 0.05  # the watch's timer period, seconds
STALL_MIN = 0.02  # a timer late by more than this is recorded as a stall
STALL_SHARE = 0.25  # a timeout is the monitor's when its loop stalled for this share of the time waited
STALL_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_KEEP = 4096  # stalls remembered (a probe looks back at most its timeout)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on uvloop (PROBE_LOOP=asyncio forces the standard loop)."""
    if os.environ.get("PROBE_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:  # an optional speed-up: the standard loop does the same work
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


class LoopWatch:
    """Measure the event loop's own stalls: how late a timer of TICK seconds fires.

    A probe that timed out while the loop was stalled may have been answered in time and
    never noticed; the prober boundary asks `stalled()` before blaming the network. Times
    are time.perf_counter(), the clock of probe.trace.
    """

    def __init__(self) -> None:
        self.counts = [0] * (len(STALL_BUCKETS) + 1)  # the last slot is +Inf
        self.sum = 0.0
        self.last_tick: float | None = None  # None: not running
        self._stalls: collections.deque[tuple[float, float]] = collections.deque(maxlen=_KEEP)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start watching the running loop (once; later calls do nothing)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        """Stop watching."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self.last_tick = None

    async def _watch(self) -> None:
        self.last_tick = time.perf_counter()
        while True:
            before = time.perf_counter()
            await asyncio.sleep(TICK)
            now = time.perf_counter()
            self.observe(before, now)

    def observe(self, slept_at: float, woke_at: float) -> None:
        """Record one tick: the timer set at `slept_at` fired at `woke_at`."""
        late = max(0.0, woke_at - slept_at - TICK)
        self.counts[bisect.bisect_left(STALL_BUCKETS, late)] += 1
        self.sum += late
        self.last_tick = woke_at
        if late > STALL_MIN:
            self._stalls.append((woke_at - late, woke_at))

    def cumulative(self) -> list[tuple[float, int]]:
        """Return (upper bound, ticks late by at most it) pairs, ending with +Inf."""
        out, running = [], 0
        for bound, n in zip((*STALL_BUCKETS, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out

    def stalled(self, start: float, end: float) -> tuple[float, float]:
        """Return the total and the longest stall overlapping [start, end], including one still going on."""
        total = longest = 0.0
        spans = list(self._stalls)
        if self.last_tick is not None and end - self.last_tick - TICK > STALL_MIN:
            spans.append((self.last_tick + TICK, end))  # the watch itself has not run since: the loop is held
        for begin, finish in reversed(spans):
            if finish < start:
                break  # recorded in order: every earlier stall ended earlier still
            overlap = min(finish, end) - max(begin, start)
            if overlap > 0:
                total += overlap
                longest = max(longest, overlap)
        return total, longest

    def blame(self, start: float, end: float, span: float, what: str) -> str | None:
        """Return evidence that a timeout over [start, end] was the monitor's own stall, or None.

        The one stall rule of probes and DNS checks alike: the loop stalled for at least
        STALL_SHARE of `span` (the time the timed-out work was given) within the window.
        """
        total, longest = self.stalled(start, end)
        if total < STALL_SHARE * span:
            return None
        return (
            f"the monitor's event loop stalled for {total * 1000:.0f} ms (longest {longest * 1000:.0f} ms) "
            f"of {what}'s {(end - start) * 1000:.0f} ms: the timeout is the monitor's, not the network's"
        )


watch = LoopWatch()  # one event loop per process runs probes: its stalls are the process's
