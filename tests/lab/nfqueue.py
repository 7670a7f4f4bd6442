"""The loop every NFQUEUE program of the lab runs: packets in, verdicts now or at a precise later time.

A held packet's verdict is due at an absolute monotonic time kept in a heap; the loop waits in
select() (microsecond timeouts, unlike epoll's milliseconds) for the next packet or the next
due verdict, whichever comes first. Nothing sleeps in the callback, so one held packet never
delays another: the added delay is the configured one to within a few tens of microseconds.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import os
import select
import signal
import sys
import time
from collections.abc import Callable

from netfilterqueue import NetfilterQueue, Packet

READY = "ready"


class QueueLoop:
    """Bind one NFQUEUE number and run callbacks and timers until stopped or `max_seconds` pass."""

    def __init__(
        self, queue_num: int, on_packet: Callable[[Packet], None], max_seconds: float, *, realtime: bool = False
    ) -> None:
        if realtime:
            # On a loaded machine an ordinary process wakes late from select(); a real-time one
            # does not, so the delay it adds is the configured one. Its loop sleeps, never spins.
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(20))
            except OSError as e:
                log(f"no real-time priority ({e}): delays may run long on a loaded machine")
        self.queue = NetfilterQueue()
        self.queue.bind(queue_num, on_packet, max_len=4096)
        self.max_seconds = max_seconds
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._stop = False

    def at(self, when: float, action: Callable[[], None]) -> None:
        """Run `action` at monotonic time `when`."""
        heapq.heappush(self._timers, (when, next(self._order), action))

    def later(self, seconds: float, action: Callable[[], None]) -> None:
        """Run `action` `seconds` from now."""
        self.at(time.monotonic() + seconds, action)

    def stop(self, *_: object) -> None:
        """End the loop after the current step (a signal handler)."""
        self._stop = True

    def run(self) -> None:
        """Announce readiness on stdout, then serve the queue; bounded by max_seconds."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        fd = self.queue.get_fd()
        end = time.monotonic() + self.max_seconds
        print(READY, flush=True)
        try:
            while not self._stop:
                now = time.monotonic()
                if now >= end:
                    break
                while self._timers and self._timers[0][0] <= now:
                    heapq.heappop(self._timers)[2]()
                wait = min(end - now, self._timers[0][0] - now if self._timers else 0.5)
                try:
                    readable, _, _ = select.select([fd], [], [], max(0.0, wait))
                except InterruptedError:
                    continue
                if readable:
                    self.queue.run(block=False)
        finally:
            self.queue.unbind()


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --queue and --max-seconds."""
    parser.add_argument("--queue", type=int, required=True, help="NFQUEUE number to bind")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="exit by itself after this long")


def log(text: str) -> None:
    """Write one line to stderr (the lab keeps it for failure reports)."""
    print(text, file=sys.stderr, flush=True)
