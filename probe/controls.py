"""When to send a control handshake, and what recent TLS-stage failures say about the next run.

A control handshake (DESIGN.md "Control handshakes") carries a name nobody filters to the
target's own address and port *before* the target's handshake, so that a failure of the
target can be told apart: name filtered, or address blocked. It costs a handshake, so:

- without history (`probe once`, `probe routes`, `/probe`) it is sent whenever the target
  has a `control_sni`;
- with history (`probe run`) only for pairs whose last run failed at the TLS stage, and then
  first on every run until a run of the pair gets past the handshake.

Censors keep blocking an (address, port) for 90-180 s after they fire (residual blocking),
so a failure on an address whose previous run failed at the TLS stage within RESIDUAL_WINDOW
may be the echo of that run, not news about this one.
"""

from __future__ import annotations

import contextvars
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from probe.models import Outcome

RESIDUAL_WINDOW = 180.0  # seconds: the GFW's longest documented residual block (QUIC and TLS)
MAX_REMEMBERED = 65536  # (address, port, transport) entries kept; the oldest go first
TLS_STAGE_FAILURES = frozenset({Outcome.TLS_RESET, Outcome.TLS_TIMEOUT})
# Outcomes of runs that got past the target's handshake: the pair passes, its control stops.
_PAST_HANDSHAKE = frozenset(
    {Outcome.OK, Outcome.TLS_CERT_INVALID, Outcome.HTTP_RESET, Outcome.HTTP_TIMEOUT, Outcome.HTTP_UNEXPECTED,
     Outcome.THROTTLED}
)

_without_history: contextvars.ContextVar[bool] = contextvars.ContextVar("probe_controls_without_history", default=False)


@contextmanager
def without_history() -> Iterator[None]:
    """Within this block (and the tasks it starts) probes send the control whenever one is configured (/probe)."""
    token = _without_history.set(True)
    try:
        yield
    finally:
        _without_history.reset(token)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a handshake went: the censor's residual block is per (client, server address, port, protocol)."""

    address: str
    port: int
    transport: str  # "tcp" or "udp" (QUIC)

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}/{self.transport}"


class ControlState:
    """Which pairs want a control first, and when each endpoint last failed at the TLS stage."""

    def __init__(self, *, history: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.history = history
        self._pending: set[tuple[str, str]] = set()
        self._failed_at: OrderedDict[Endpoint, float] = OrderedDict()
        self._clock = clock

    def now(self) -> float:
        """Return the monotonic time this state measures windows with."""
        return self._clock()

    def wants_control(self, target: str, route: str) -> bool:
        """Return whether the probe of (target, route) should send its control first."""
        if not self.history or _without_history.get():
            return True
        return (target, route) in self._pending

    def residual_age(self, endpoint: Endpoint, before: float) -> float | None:
        """Return how long before `before` the endpoint last failed at the TLS stage, if within the window."""
        at = self._failed_at.get(endpoint)
        if at is None or at >= before or before - at > RESIDUAL_WINDOW:
            return None
        return before - at

    def record(
        self, target: str, route: str, endpoint: Endpoint | None, outcome: Outcome, started: float | None = None
    ) -> None:
        """Learn from a finished run that began at `started`: a TLS-stage failure marks the pair and the endpoint.

        The endpoint is marked as of the run's start, not its end: a run that overlapped it (a
        /probe beside the scheduled run) began after the trigger and may meet its residual block.
        """
        pair = (target, route)
        if outcome in TLS_STAGE_FAILURES:
            self._pending.add(pair)
            if endpoint is not None:
                at = self.now() if started is None else started
                self._failed_at[endpoint] = max(at, self._failed_at.get(endpoint, at))
                self._failed_at.move_to_end(endpoint)
                while len(self._failed_at) > MAX_REMEMBERED:
                    self._failed_at.popitem(last=False)
        elif outcome in _PAST_HANDSHAKE:
            self._pending.discard(pair)

    def forget(self, keep: set[tuple[str, str]]) -> None:
        """Drop pending pairs no longer configured (after a reload)."""
        self._pending &= keep
