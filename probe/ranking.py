"""Route ranking: a score per (target, route) from its recent runs, tiers, and hysteresis.

The rule, as an operator checks it by hand from /api/routes (README "Route ranking"):

  score = (p90 + path p90) x (1 + 4 x failure share + 6 x path loss) + seconds per MiB + tier offset,
  lower is better.
  p90 is the 90th-percentile request time (the sum of the phases) of the successful runs
  among the last WINDOW, the target's timeout when none succeeded; the failure share counts
  every failed run of the window (blocked, refused, timed out: lost); where `path` is
  configured, path loss is the share of the last PATH_WINDOW sampling runs' samples that went
  unanswered and path p90 the median of those runs' p90 RTTs (both 0 without sampling); seconds per MiB is
  1048576 / the median download throughput, 0 without a download; the tier offset is 0
  for a working route, 1000 for one never probed, 2000 for a failing one, 3000 for a
  blocked one. Rank 1 moves only when the route holding it stops working, a challenger
  scores at least SWITCH_RATIO lower and SWITCH_SECONDS lower, or a better-scoring challenger
  loses at least SWITCH_LOSS less of its path samples.

A route is working when its last run succeeded and at most MAX_FAILURE_SHARE of its
window failed; otherwise it is blocked if its latest failure was an interference class,
else failing.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from array import array
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from probe.models import BLOCKED_OUTCOMES, Outcome, PathResult, ProbeResult

WINDOW = 20  # runs per (target, route) that the score looks at
MAX_FAILURE_SHARE = 0.25  # more failed runs than this in the window: not working
FAILURE_WEIGHT = 4.0  # one failed run in 20 costs as much as a 20% slower route
# One lost path sample in 20 costs as much as a 30% slower route: 10% loss (x1.6) outweighs a
# 20% latency edge even past the 20% switch margin (1.2 / 1.6 = 0.75 < 0.8).
LOSS_WEIGHT = 6.0
PATH_WINDOW = 5  # path sampling runs per (target, route) that the score looks at
MIB = 1024 * 1024
SWITCH_RATIO = 0.2  # a challenger must score this much lower than the current best...
SWITCH_SECONDS = 0.010  # ...and at least this much lower, to take rank 1 from a working route
SWITCH_LOSS = 0.05  # or lose this much less of its path samples: loss is not noise to ride out
TIER_WIDTH = 1000.0  # tier offsets are multiples of this; latency is capped below it

Key = tuple[str, str]  # (target, route)


class Tier(StrEnum):
    """How usable a route is; every route of a better tier outranks every route of a worse one."""

    WORKING = "working"
    UNPROBED = "unprobed"
    FAILING = "failing"
    BLOCKED = "blocked"

    @property
    def offset(self) -> float:
        """Return what the tier adds to the score."""
        return _OFFSETS[self]


_OFFSETS = {Tier.WORKING: 0.0, Tier.UNPROBED: TIER_WIDTH, Tier.FAILING: 2 * TIER_WIDTH, Tier.BLOCKED: 3 * TIER_WIDTH}


@dataclass(frozen=True, slots=True)
class RouteStats:
    """What the last WINDOW runs of one (target, route) say."""

    runs: int = 0
    failures: int = 0
    blocked: int = 0  # failures that were interference classes
    latency_seconds: float | None = None  # p90 request time (sum of the phases) of the successful runs
    throughput_bytes_per_second: float | None = None  # median over the runs that measured it
    last_outcome: Outcome | None = None
    last_duration_seconds: float | None = None
    last_failure: Outcome | None = None  # the outcome of the latest failed run in the window
    path_loss: float | None = None  # share of the recent path samples unanswered; None without sampling
    path_p90_seconds: float | None = None  # median p90 RTT of the recent path sampling runs

    @property
    def failure_share(self) -> float:
        """Return the share of failed runs in the window (0 before any run)."""
        return self.failures / self.runs if self.runs else 0.0

    @property
    def tier(self) -> Tier:
        """Return the tier: working, unprobed, failing or blocked."""
        if self.runs == 0:
            return Tier.UNPROBED
        if self.last_outcome is Outcome.OK and self.failure_share <= MAX_FAILURE_SHARE:
            return Tier.WORKING
        return Tier.BLOCKED if self.last_failure is not None and self.last_failure.blocked else Tier.FAILING


_OUTCOMES = tuple(Outcome)
_CODE = {o: i for i, o in enumerate(_OUTCOMES)}
_OK = _CODE[Outcome.OK]
_BLOCKED = bytes(o in BLOCKED_OUTCOMES for o in _OUTCOMES)  # code -> 1 for an interference class


class History:
    """The last WINDOW runs of one (target, route), oldest first, as the ranking reads them.

    Per run only its outcome, request time and throughput, packed in three small arrays
    (about 0.6 KB per pair in all), where a deque of WINDOW whole ProbeResults costs ~6 KB:
    the store keeps one per pair, 10,000 of them at 10,000 pairs.
    """

    __slots__ = ("_outcomes", "_rates", "_seconds", "last_duration_seconds")

    def __init__(self, results: Iterable[ProbeResult] = ()) -> None:
        self._outcomes = bytearray()  # outcome codes (index in Outcome)
        self._seconds = array("d")  # request_seconds() of each run
        self._rates: array[float] | None = None  # throughput, NaN for none; None until a run measured one
        self.last_duration_seconds: float | None = None  # of the latest run
        for result in results:
            self.append(result)

    def append(self, result: ProbeResult, seconds: float | None = None) -> None:
        """Add the latest run (`seconds`: its request_seconds(), if known); the oldest goes once WINDOW are kept."""
        rate = result.throughput_bytes_per_second
        if rate is not None and self._rates is None:  # most targets never download: no array for them
            self._rates = array("d", [math.nan]) * len(self._outcomes)
        if len(self._outcomes) >= WINDOW:
            del self._outcomes[0], self._seconds[0]
            if self._rates is not None:
                del self._rates[0]
        self._outcomes.append(_CODE[result.outcome])
        self._seconds.append(request_seconds(result) if seconds is None else seconds)
        if self._rates is not None:
            self._rates.append(math.nan if rate is None else rate)
        self.last_duration_seconds = result.duration_seconds

    def __len__(self) -> int:
        return len(self._outcomes)

    def copy(self) -> History:
        """Return an independent copy."""
        other = History()
        other._outcomes[:] = self._outcomes
        other._seconds[:] = self._seconds
        other._rates = None if self._rates is None else array("d", self._rates)
        other.last_duration_seconds = self.last_duration_seconds
        return other

    def outcomes(self) -> list[Outcome]:
        """Return the outcomes of the kept runs, oldest first."""
        return [_OUTCOMES[c] for c in self._outcomes]

    def stats(self) -> RouteStats:
        """Return what the kept runs say."""
        codes = self._outcomes
        if not codes:
            return RouteStats()
        ok = sorted(s for c, s in zip(codes, self._seconds, strict=True) if c == _OK)
        failed = [c for c in codes if c != _OK]
        rates = [r for r in self._rates if r == r] if self._rates is not None else []  # NaN: the run measured none
        return RouteStats(
            runs=len(codes),
            failures=len(failed),
            blocked=sum(_BLOCKED[c] for c in failed),
            latency_seconds=p90(ok) if ok else None,
            throughput_bytes_per_second=statistics.median(rates) if rates else None,
            last_outcome=_OUTCOMES[codes[-1]],
            last_duration_seconds=self.last_duration_seconds,
            last_failure=_OUTCOMES[failed[-1]] if failed else None,
        )


@dataclass(frozen=True, slots=True)
class PathStats:
    """What the last PATH_WINDOW path sampling runs of one (target, route) say."""

    sent: int
    lost: int
    p90_seconds: float | None  # median of the runs' p90 RTTs; None when no sample was answered

    @property
    def loss(self) -> float | None:
        """Return lost / sent; None before a sample was sent."""
        return self.lost / self.sent if self.sent else None


class PathHistory:
    """One pair's path sampling: the latest run, totals since configured, and the ranking's window."""

    __slots__ = ("latest", "lost_total", "memo", "sent_total", "_window")

    def __init__(self) -> None:
        self.latest: PathResult | None = None
        self.memo: tuple[bytes, bytes] | None = None  # the exporter's text of the latest run; None: changed
        self.sent_total = 0
        self.lost_total = 0
        self._window: deque[tuple[int, int, float | None]] = deque(maxlen=PATH_WINDOW)  # (sent, lost, p90)

    def append(self, result: PathResult) -> None:
        """Count a run in and keep it as the latest."""
        self.latest = result
        self.memo = None
        self.sent_total += result.sent
        self.lost_total += result.lost
        if result.sent:  # a run that sent nothing (a local fault) says nothing about the path
            self._window.append((result.sent, result.lost, result.rtt("p90")))

    def stats(self) -> PathStats:
        """Return the window's loss and p90."""
        p90s = [p for _, _, p in self._window if p is not None]
        return PathStats(
            sent=sum(s for s, _, _ in self._window),
            lost=sum(lost for _, lost, _ in self._window),
            p90_seconds=statistics.median(p90s) if p90s else None,
        )


def summarize(history: Sequence[ProbeResult] | History) -> RouteStats:
    """Return the statistics of the last WINDOW runs of `history` (oldest first)."""
    if not isinstance(history, History):
        history = History(list(history)[-WINDOW:])
    return history.stats()


def request_seconds(result: ProbeResult) -> float:
    """Return the time a run spent in its phases: its latency without the download."""
    return sum(result.phases.values())


def p90(ordered: Sequence[float]) -> float:
    """Return the 90th percentile by nearest rank (of 20 values, the 18th smallest)."""
    return ordered[(9 * len(ordered) + 9) // 10 - 1]


def score(stats: RouteStats, timeout: float) -> float:
    """Return (p90 + path p90) x (1 + 4 x failure share + 6 x path loss) + s/MiB + the tier offset; lower is better."""
    if stats.runs == 0:
        return stats.tier.offset
    latency = stats.latency_seconds if stats.latency_seconds is not None else timeout
    latency += stats.path_p90_seconds or 0.0
    penalty = 1.0 + FAILURE_WEIGHT * stats.failure_share + LOSS_WEIGHT * (stats.path_loss or 0.0)
    rate = stats.throughput_bytes_per_second
    per_mib = MIB / rate if rate else 0.0
    return stats.tier.offset + min(latency * penalty + per_mib, TIER_WIDTH - 1.0)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One (target, route) to rank: its recent runs (whole results, or the store's History) and the target's timeout."""

    target: str
    route: str
    history: Sequence[ProbeResult] | History
    timeout: float
    path: PathStats | None = None  # the pair's path sampling, where configured


@dataclass(frozen=True, slots=True)
class Ranked:
    """One (target, route) in a ranking."""

    target: str
    route: str
    rank: int  # 1 = best
    score: float
    stats: RouteStats

    @property
    def key(self) -> Key:
        """Return (target, route)."""
        return (self.target, self.route)

    @property
    def tier(self) -> Tier:
        """Return the route's tier."""
        return self.stats.tier

    @property
    def recommended(self) -> bool:
        """Return whether this is the one to use: rank 1 and working."""
        return self.rank == 1 and self.tier is Tier.WORKING

    def to_json(self, *, with_target: bool = True) -> dict[str, object]:
        """Return the JSON form used by /api/routes and `probe routes --json`."""
        s = self.stats
        doc: dict[str, object] = {"target": self.target} if with_target else {}
        doc |= {
            "route": self.route,
            "rank": self.rank,
            "score": round(self.score, 6),
            "tier": str(self.tier),
            "recommended": self.recommended,
            "runs": s.runs,
            "failures": s.failures,
            "blocked": s.blocked,
            "latency_p90_seconds": _round(s.latency_seconds),
            "throughput_bytes_per_second": _round(s.throughput_bytes_per_second),
            "last_outcome": str(s.last_outcome) if s.last_outcome is not None else None,
        }
        if s.path_loss is not None:  # only where path sampling is configured and ran
            doc |= {"path_loss": _round(s.path_loss), "path_p90_seconds": _round(s.path_p90_seconds)}
        return doc


def rank(candidates: Sequence[Candidate], leader: Key | None = None) -> list[Ranked]:
    """Return `candidates` best first; `leader` keeps rank 1 unless it stops working or is clearly beaten.

    Ties keep the order of `candidates` (config order).
    """
    scored = [(c, _with_path(summarize(c.history), c.path)) for c in candidates]
    order = sorted(
        ((score(stats, c.timeout), i, c, stats) for i, (c, stats) in enumerate(scored)),
        key=lambda item: (item[0], item[1]),
    )
    if leader is not None and order:
        held = next((item for item in order if (item[2].target, item[2].route) == leader), None)
        if held is not None and held[3].tier is Tier.WORKING and not _beats(order[0][3], held[3], order[0][0], held[0]):
            order.remove(held)
            order.insert(0, held)
    return [
        Ranked(c.target, c.route, n, s, stats) for n, (s, _, c, stats) in enumerate(order, start=1)
    ]


def _with_path(stats: RouteStats, path: PathStats | None) -> RouteStats:
    if path is None or path.loss is None:
        return stats
    return dataclasses.replace(stats, path_loss=path.loss, path_p90_seconds=path.p90_seconds)


def _beats(challenger: RouteStats, leader: RouteStats, challenger_score: float, leader_score: float) -> bool:
    if challenger_score <= leader_score * (1.0 - SWITCH_RATIO) and leader_score - challenger_score >= SWITCH_SECONDS:
        return True
    lossier = (leader.path_loss or 0.0) - (challenger.path_loss or 0.0) >= SWITCH_LOSS - 1e-9  # 0.15 - 0.1 < 0.05
    return lossier and challenger_score < leader_score


def leader_of(ranked: Sequence[Ranked]) -> Key | None:
    """Return the key that holds rank 1 for hysteresis, or None when nothing works."""
    return ranked[0].key if ranked and ranked[0].tier is Tier.WORKING else None


def to_json(
    routes: Mapping[str, Sequence[Ranked]], groups: Mapping[str, Sequence[Ranked]]
) -> dict[str, object]:
    """Return {"routes": {target: [...]}, "groups": {group: [...]}}, each list best first."""
    return {
        "routes": {t: [r.to_json(with_target=False) for r in ranked] for t, ranked in routes.items()},
        "groups": {g: [r.to_json() for r in ranked] for g, ranked in groups.items()},
    }


def order(routes: Mapping[str, Sequence[Ranked]]) -> dict[str, list[str]]:
    """Return the DESIGN.md `routes` key of the results JSON: per target, route names best first."""
    return {t: [r.route for r in ranked] for t, ranked in routes.items()}


def group_order(groups: Mapping[str, Sequence[Ranked]]) -> dict[str, list[dict[str, object]]]:
    """Return the `groups` key of the results JSON: per group, (target, route, score) best first."""
    return {
        g: [{"target": r.target, "route": r.route, "rank": r.rank, "score": round(r.score, 6)} for r in ranked]
        for g, ranked in groups.items()
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
