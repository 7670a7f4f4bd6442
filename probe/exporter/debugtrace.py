"""The text of `/probe?target=NAME&debug=true`: one probe's steps, its results, and no secrets."""

from __future__ import annotations

import time
from collections.abc import Sequence

from probe import debuglog
from probe.config import Config, Target
from probe.debuglog import DebugLog
from probe.models import ProbeResult


def secrets_of(config: Config) -> list[str]:
    """Return every credential the config holds: proxy passwords and credential header values."""
    out = [r.proxy.password for r in config.routes if r.proxy is not None and r.proxy.password]
    for t in config.targets:
        if t.http is not None:
            out += [v for k, v in t.http.headers if k.lower() in debuglog.SECRET_HEADERS and len(v) >= 4]
    return out


def render(log: DebugLog, config: Config, target: Target, results: Sequence[ProbeResult]) -> str:
    """Return the whole trace: what was probed, every step with its time, then the results and why."""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(log.wall_started))
    head = [
        f"probe debug trace: target {target.name}, vantage {config.vantage}, started {started}",
        f"what: {target.url or f'{target.host}:{target.port}'} ({target.kind}), timeout {target.timeout:g} s, "
        f"routes {', '.join(target.routes)}, resolvers {', '.join(target.resolvers) or 'none'}",
        "times: milliseconds since the trace began; DNS replies also say how long after their query they came",
    ]
    tail = ["", "== results (after the DNS verdicts; this is what /metrics and /api/results now show)"]
    for r in results:
        tail.append(f"{r.route}: {r.outcome}{' (blocked)' if r.blocked else ''} in {r.duration_seconds * 1000:.1f} ms"
                    + (f", address {r.address}" if r.address else ""))
        tail += [f"  evidence: {line}" for line in r.evidence]
        if r.error:
            tail.append(f"  error: {r.error}")
    for d in results[0].dns if results else ():
        tail.append(f"dns {d.resolver}: {d.outcome}, answers {', '.join(d.answers) or 'none'}, "
                    f"{d.replies} replies, consistent={d.consistent}")
    return log.render(head, tail)
