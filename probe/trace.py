"""Per-probe bookkeeping: the current stage, phase timings and evidence."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager

from probe.classify import Stage
from probe.models import Phase, TlsInfo


class Trace:
    """Records what one probe did; probers fill it, the runner turns it into a result."""

    __slots__ = (
        "_loop", "started", "wall_started", "stage", "stage_started", "phases", "evidence",
        "address", "peer", "sni", "http_host", "body_bytes", "http_status", "throughput", "tls",
    )

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.started = self._loop.time()
        self.wall_started = time.time()
        self.stage = Stage.RESOLVE
        self.stage_started = self.started
        self.phases: dict[Phase, float] = {}
        self.evidence: list[str] = []
        self.address: str | None = None  # the address connected to (or the name, via a proxy)
        self.peer: str | None = None  # "address:port" of the current connection
        self.sni: str | None = None
        self.http_host: str | None = None
        self.body_bytes = 0  # bytes of the current body read so far
        self.http_status: int | None = None
        self.throughput: float | None = None
        self.tls: TlsInfo | None = None

    def now(self) -> float:
        """Return the loop's monotonic time."""
        return self._loop.time()

    def elapsed(self) -> float:
        """Return seconds since the probe began."""
        return self._loop.time() - self.started

    @contextmanager
    def phase(self, phase: Phase | None, stage: Stage) -> Iterator[None]:
        """Enter `stage`; on success add the time spent to `phase` (phases add up over redirects)."""
        self.enter(stage)
        begin = self.stage_started
        yield
        if phase is not None:
            self.phases[phase] = self.phases.get(phase, 0.0) + (self._loop.time() - begin)

    def enter(self, stage: Stage) -> None:
        """Mark the start of `stage`."""
        self.stage = stage
        self.stage_started = self._loop.time()

    def in_stage(self) -> float:
        """Return seconds spent in the current stage."""
        return self._loop.time() - self.stage_started

    def add_phase(self, phase: Phase, seconds: float) -> None:
        """Add `seconds` to `phase`."""
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def note(self, line: str) -> None:
        """Add a line of human-readable evidence."""
        self.evidence.append(line)
