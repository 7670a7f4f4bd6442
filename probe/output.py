"""Human output of `probe once` and `probe routes`: progress and tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TextIO

from probe.models import Outcome, ProbeResult

_GREEN, _RED, _YELLOW, _DIM, _RESET = "\033[32m", "\033[31m", "\033[33m", "\033[2m", "\033[0m"


def outcome_color(outcome: Outcome) -> str:
    """Return the ANSI colour for an outcome: green ok, red interference, yellow other failures."""
    if outcome is Outcome.OK:
        return _GREEN
    return _RED if outcome.blocked else _YELLOW


class Progress:
    """A one-line progress counter on a terminal, rewritten in place."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream, self.count, self.bad = total, stream, 0, 0

    def update(self, result: ProbeResult) -> None:
        """Count one finished probe."""
        self.count += 1
        self.bad += result.outcome is not Outcome.OK
        self.stream.write(
            f"\r\033[K[{self.count}/{self.total}] {self.bad} not ok; last: {result.target}/{result.route} "
            f"{result.outcome}"
        )
        self.stream.flush()

    def done(self) -> None:
        """Clear the progress line."""
        self.stream.write("\r\033[K")
        self.stream.flush()


def results_table(results: Sequence[ProbeResult], *, color: bool) -> str:
    """Return the results as an aligned table, one (target, route) a row, then a summary."""
    header = ("TARGET", "ROUTE", "OUTCOME", "TIME", "ADDRESS", "DETAIL")
    rows = [
        (
            r.target,
            r.route,
            str(r.outcome) + (" (blocked)" if r.blocked else ""),
            f"{r.duration_seconds * 1000:.0f} ms",
            r.address or "-",
            _detail(r),
        )
        for r in results
    ]
    colors = [outcome_color(r.outcome) for r in results]
    lines = _align([header, *rows], [None, *colors] if color else None)
    counts: dict[str, int] = {}
    for r in results:
        counts[str(r.outcome)] = counts.get(str(r.outcome), 0) + 1
    summary = ", ".join(f"{n} {o}" for o, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    blocked = sum(r.blocked for r in results)
    lines.append(f"\n{len(results)} probes: {summary}" + (f"; {blocked} blocked" if blocked else ""))
    return "\n".join(lines) + "\n"


def ranking_table(
    ranking: Mapping[str, Sequence[tuple[str, float]]], results: Sequence[ProbeResult], *, color: bool
) -> str:
    """Return the route ranking per target: best first, with the last outcome and time."""
    last = {(r.target, r.route): r for r in results}
    header = ("TARGET", "RANK", "ROUTE", "SCORE", "OUTCOME", "TIME")
    rows: list[tuple[str, ...]] = []
    colors: list[str | None] = [None]
    for target, routes in ranking.items():
        for i, (route, score) in enumerate(routes):
            r = last.get((target, route))
            rows.append((
                target if i == 0 else "",
                str(i + 1),
                route + (" <- use" if i == 0 and r is not None and r.success else ""),
                f"{score:.3f}",
                str(r.outcome) if r else "-",
                f"{r.duration_seconds * 1000:.0f} ms" if r else "-",
            ))
            colors.append(outcome_color(r.outcome) if r else None)
    return "\n".join(_align([header, *rows], colors if color else None)) + "\n"


def _detail(r: ProbeResult) -> str:
    if r.outcome is not Outcome.OK and r.evidence:
        return r.evidence[-1]
    parts = [f"{p} {s * 1000:.0f}" for p, s in r.phases.items()]
    extra = []
    if r.http_status is not None:
        extra.append(f"HTTP {r.http_status}")
    if r.tls is not None:
        extra.append(r.tls.version)
    if r.throughput_bytes_per_second is not None:
        extra.append(f"{r.throughput_bytes_per_second / 1e6:.2f} MB/s")
    return " ".join(extra + ([f"({', '.join(parts)} ms)"] if parts else []))


def _align(rows: list[tuple[str, ...]], colors: list[str | None] | None) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    out = []
    for n, row in enumerate(rows):
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)] + [row[-1]]
        line = "  ".join(cells).rstrip()
        if colors is not None:
            if n == 0:
                line = f"{_DIM}{line}{_RESET}"
            elif colors[n]:
                cells[2] = f"{colors[n]}{cells[2]}{_RESET}"
                line = "  ".join(cells).rstrip()
        out.append(line)
    return out
