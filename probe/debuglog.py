"""A step-by-step record of one on-demand probe (`/probe?target=NAME&debug=true`).

Off unless a caller switches it on with `recording()`: every hook in the probe path is
`if (log := debuglog.current()) is not None: log.add(...)`, one ContextVar read when off,
so normal probes pay nothing else. The recorder travels in a ContextVar because asyncio
copies the context into every task a probe starts (the DNS check's resolvers, canaries,
the routes of a round): the DNS layer, the dialer and the probers write to it without
any of them knowing the exporter that reads it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

MAX_STEPS = 5000  # a hostile peer (a flood of DNS replies, redirects) cannot grow the log without bound
MAX_LINE = 2000
# Request and response headers whose values are credentials: shown as ***.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key",
                            "x-auth-token", "x-amz-security-token"})

_CURRENT: ContextVar[DebugLog | None] = ContextVar("probe_debuglog", default=None)
_SECTION: ContextVar[str] = ContextVar("probe_debuglog_section", default="")


@dataclass(frozen=True, slots=True)
class Step:
    """One line of the log: when (perf_counter), in which part of the probe, what happened."""

    at: float
    section: str
    text: str


class DebugLog:
    """The steps of one probe, in the order they happened, with secrets scrubbed on the way out."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.started = time.perf_counter()
        self.wall_started = time.time()
        self.steps: list[Step] = []
        self.dropped = 0
        # Longest first, so a secret that contains another is replaced whole.
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def add(self, text: str, section: str | None = None) -> None:
        """Record one step in `section` (default: the current one)."""
        if len(self.steps) >= MAX_STEPS:
            self.dropped += 1
            return
        if len(text) > MAX_LINE:
            text = text[:MAX_LINE] + f"... ({len(text) - MAX_LINE} more characters)"
        self.steps.append(Step(time.perf_counter(), _SECTION.get() if section is None else section, text))

    def scrub(self, text: str) -> str:
        """Return `text` with every known secret replaced by ***."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def render(self, head: Iterable[str] = (), tail: Iterable[str] = ()) -> str:
        """Return the plain-text trace: `head`, the steps per section with times, `tail`."""
        lines = list(head)
        sections: dict[str, list[Step]] = {}
        for step in self.steps:
            sections.setdefault(step.section, []).append(step)
        for name, steps in sections.items():
            lines.append("")
            lines.append(f"== {name or 'probe'}")
            for step in steps:
                ms = (step.at - self.started) * 1000
                lines.append(f"{ms:10.3f} ms  {step.text}")
        if self.dropped:
            lines.append(f"({self.dropped} further steps not recorded: the log keeps at most {MAX_STEPS})")
        lines.extend(tail)
        return self.scrub("\n".join(lines) + "\n")


def current() -> DebugLog | None:
    """Return the log being recorded in this context, or None (the normal case)."""
    return _CURRENT.get()


@contextmanager
def recording(log: DebugLog) -> Iterator[DebugLog]:
    """Record every step of the probes started inside this block (and their tasks) into `log`."""
    token = _CURRENT.set(log)
    try:
        yield log
    finally:
        _CURRENT.reset(token)


@contextmanager
def section(name: str) -> Iterator[None]:
    """Group the steps recorded inside this block (and the tasks it starts) under `name`."""
    if _CURRENT.get() is None:
        yield
        return
    token = _SECTION.set(name)
    try:
        yield
    finally:
        _SECTION.reset(token)


def header_lines(headers: Iterable[tuple[str, str]]) -> list[str]:
    """Return `Name: value` lines with the values of credential headers replaced by ***."""
    return [f"{k}: {'***' if k.lower() in SECRET_HEADERS else v}" for k, v in headers]
