"""What a prober writes into a debug trace (`/probe?debug=true`) besides what dns and net record."""

from __future__ import annotations

from probe import debuglog
from probe.classify import describe
from probe.config import Route, Target
from probe.models import Outcome
from probe.trace import Trace


def debug_section(target: Target, route: Route) -> str:
    """Return the heading of one probe's steps in a debug trace."""
    how = ", ".join(x for x in (
        f"proxy {route.proxy.redacted()}" if route.proxy else "",
        f"from {route.source_address}" if route.source_address else "",
        f"resolver {route.resolver}" if route.resolver else "",
    ) if x)
    return f"{target.name} over route {route.name}" + (f" ({how})" if how else "")


def log_classification(
    log: debuglog.DebugLog, target: Target, route: Route, trace: Trace, outcome: Outcome, exc: BaseException | None
) -> None:
    """Record the probe's outcome and why: the stage it stopped in and what stopped it."""
    where = debug_section(target, route)
    if exc is None:
        log.add(f"classified {outcome}: every stage passed and the expectations were met", where)
    else:
        log.add(f"stopped in stage {trace.stage} by {describe(exc)}", where)
        log.add(f"classified {outcome} ({'blocked' if outcome.blocked else 'not blocked'}): {trace.stage} stage, "
                f"{type(exc).__name__}", where)
    for line in trace.evidence:
        log.add(f"evidence: {line}", where)
