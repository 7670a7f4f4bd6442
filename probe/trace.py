"""Per-probe bookkeeping: the current stage, phase timings and evidence."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from probe.classify import Stage
from probe.models import ControlHandshake, Phase, TlsInfo

_clock = time.perf_counter


class Trace:
    """Records what one probe did; probers fill it, the runner turns it into a result."""

    __slots__ = (
        "started", "wall_started", "stage", "stage_started", "phases", "evidence",
        "address", "peer", "sni", "http_host", "body_bytes", "http_status", "throughput", "tls",
        "port", "quic", "control", "kernel_connected",
    )

    def __init__(self) -> None:
        # Timings come from perf_counter, not the loop's clock: uvloop's loop.time() is libuv's
        # millisecond clock, cached once per loop iteration, too coarse for phases of a few ms.
        self.started = _clock()
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
        self.port: int | None = None  # the port of the target's own handshake
        self.quic = False  # the handshake runs over QUIC (UDP), not TCP
        self.control: ControlHandshake | None = None  # the control handshake, when one was sent
        # The kernel's handshake time of a connect the deadline interrupted though the kernel had
        # completed it: the answer came in time and the monitor did not get to it.
        self.kernel_connected: float | None = None

    def now(self) -> float:
        """Return the monotonic time of the phase clock."""
        return _clock()

    def elapsed(self) -> float:
        """Return seconds since the probe began."""
        return _clock() - self.started

    @contextmanager
    def phase(self, phase: Phase | None, stage: Stage) -> Iterator[None]:
        """Enter `stage`; on success add the time spent to `phase` (phases add up over redirects)."""
        self.enter(stage)
        begin = self.stage_started
        yield
        if phase is not None:
            self.phases[phase] = self.phases.get(phase, 0.0) + (_clock() - begin)

    def enter(self, stage: Stage) -> None:
        """Mark the start of `stage`."""
        self.stage = stage
        self.stage_started = _clock()

    def in_stage(self) -> float:
        """Return seconds spent in the current stage."""
        return _clock() - self.stage_started

    def add_phase(self, phase: Phase, seconds: float) -> None:
        """Add `seconds` to `phase`."""
        self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def note(self, line: str) -> None:
        """Add a line of human-readable evidence."""
        self.evidence.append(line)


_PHASES = tuple(Phase)
_BIT = {p: 1 << i for i, p in enumerate(_PHASES)}
_DOUBLE = struct.Struct("=d")


class PhaseTimes(Mapping[Phase, float]):
    """The completed phases of one probe, packed into one bytes object.

    The store keeps the last runs of every pair: at 10,000 pairs that is 200,000 results, and
    a dict of five floats costs ~350 bytes where this costs ~120.
    """

    __slots__ = ("_mask", "_packed")

    def __init__(self, phases: Mapping[Phase, float]) -> None:
        mask, values = 0, []
        for phase in _PHASES:
            if phase in phases:
                mask |= _BIT[phase]
                values.append(float(phases[phase]))
        self._mask = mask
        self._packed = struct.pack(f"={len(values)}d", *values)

    def __getitem__(self, phase: Phase) -> float:
        bit = _BIT.get(phase, 0)
        if not self._mask & bit:
            raise KeyError(phase)
        value: float = _DOUBLE.unpack_from(self._packed, 8 * (self._mask & (bit - 1)).bit_count())[0]
        return value

    def __iter__(self) -> Iterator[Phase]:
        return (p for p in _PHASES if self._mask & _BIT[p])

    def __len__(self) -> int:
        return self._mask.bit_count()

    def __repr__(self) -> str:
        return f"PhaseTimes({dict(self)!r})"
