"""Human output of `probe once` and `probe routes`: progress and tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TextIO

from probe.models import Outcome, PathResult, ProbeResult
from probe.ranking import Ranked, Tier

_GREEN, _RED, _YELLOW, _DIM, _RESET = "\033[32m", "\033[31m", "\033[33m", "\033[2m", "\033[0m"
_TIER_COLORS = {Tier.WORKING: _GREEN, Tier.FAILING: _YELLOW, Tier.BLOCKED: _RED}


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
    sampled = any(r.path is not None for r in results)  # LOSS and P50 only where path sampling ran
    header = ("TARGET", "ROUTE", "OUTCOME", "TIME", *(("LOSS", "P50") if sampled else ()), "ADDRESS", "DETAIL")
    rows = [
        (
            r.target,
            r.route,
            str(r.outcome) + (" (blocked)" if r.blocked else ""),
            f"{r.duration_seconds * 1000:.0f} ms",
            *(_path_cells(r.path) if sampled else ()),
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
    routes: Mapping[str, Sequence[Ranked]], groups: Mapping[str, Sequence[Ranked]], *, color: bool
) -> str:
    """Return the route ranking per target, then per endpoint group: best first, the one to use marked."""
    header = ("TARGET", "RANK", "ROUTE", "TIER", "SCORE", "P90", "FAILED", "LAST")
    rows: list[tuple[str, ...]] = []
    colors: list[str | None] = [None]
    for target, ranked in routes.items():
        for r in ranked:
            s = r.stats
            last = "-" if s.last_duration_seconds is None else f"{s.last_outcome} {_ms(s.last_duration_seconds)}"
            rows.append((
                target if r.rank == 1 else "",
                str(r.rank),
                r.route,
                str(r.tier),
                f"{r.score:.3f}",
                "-" if s.latency_seconds is None else _ms(s.latency_seconds),
                f"{s.failures}/{s.runs}",
                last + ("  <- use" if r.recommended else ""),
            ))
            colors.append(_TIER_COLORS.get(r.tier))
    lines = _align([header, *rows], colors if color else None)
    if groups:
        group_header = ("GROUP", "RANK", "TARGET", "ROUTE", "TIER", "SCORE")
        group_rows: list[tuple[str, ...]] = []
        group_colors: list[str | None] = [None]
        for group, ranked in groups.items():
            for r in ranked:
                group_rows.append((
                    group if r.rank == 1 else "",
                    str(r.rank),
                    r.target,
                    r.route,
                    str(r.tier),
                    f"{r.score:.3f}" + ("  <- use" if r.recommended else ""),
                ))
                group_colors.append(_TIER_COLORS.get(r.tier))
        lines += ["", *_align([group_header, *group_rows], group_colors if color else None, colored=3)]
    return "\n".join(lines) + "\n"


def _path_cells(path: PathResult | None) -> tuple[str, str]:
    """Return the LOSS cell (lost/sent and the share) and the P50 cell of a path run."""
    if path is None:
        return "-", "-"
    if not path.sent:
        return "error", "-"
    p50 = path.rtt("p50")
    return f"{path.lost}/{path.sent} {path.lost / path.sent:.0%}", "-" if p50 is None else f"{p50 * 1000:.1f} ms"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


# Control characters (C0, C1, DEL), lone surrogates of undecodable bytes and invisible format
# characters: what a hostile server or proxy says (a reason phrase, a Location) is shown, never
# interpreted by the terminal as an escape sequence.
def printable(text: str) -> str:
    """Return `text` with every non-printable character shown as a \\xNN or \\uNNNN escape."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}") for c in text
    )


def _detail(r: ProbeResult) -> str:
    if r.outcome is not Outcome.OK and r.evidence:
        return printable(r.evidence[-1] + _located(r))
    parts = [f"{p} {s * 1000:.0f}" for p, s in r.phases.items()]
    extra = []
    if r.http_status is not None:
        extra.append(f"HTTP {r.http_status}")
    if r.tls is not None:
        extra.append(r.tls.version)
    if r.throughput_bytes_per_second is not None:
        extra.append(f"{r.throughput_bytes_per_second / 1e6:.2f} MB/s")
    return " ".join(extra + ([f"({', '.join(parts)} ms)"] if parts else []))


def _located(r: ProbeResult) -> str:
    if r.locate is None:
        return ""
    if r.locate.deferred is not None:
        return "; localisation deferred (residual block)"
    if r.locate.hop is None:
        return "; censor not localised (see --json)"
    return f"; censor at hop {r.locate.hop}"


def _align(rows: list[tuple[str, ...]], colors: list[str | None] | None, colored: int = 2) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    out = []
    for n, row in enumerate(rows):
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=False)] + [row[-1]]
        line = "  ".join(cells).rstrip()
        if colors is not None:
            if n == 0:
                line = f"{_DIM}{line}{_RESET}"
            elif colors[n]:
                cells[colored] = f"{colors[n]}{cells[colored]}{_RESET}"
                line = "  ".join(cells).rstrip()
        out.append(line)
    return out
