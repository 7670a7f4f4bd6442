"""Recent results per (target, route), run counters, histograms, rankings and reload state.

Plain data only: the metrics collector rebuilds every series from here on each scrape,
so nothing outlives the config it came from (retain() drops the rest). The rankings'
hysteresis state (who holds rank 1) moves only when a result is recorded, never on a read.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections import deque
from collections.abc import Callable, Sequence

from probe import ranking
from probe.config import Config, Target
from probe.models import DnsResult, Outcome, Phase, ProbeResult
from probe.ranking import Candidate, Ranked

LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

Pair = tuple[str, str]


class Histogram:
    """A cumulative-on-export histogram with fixed upper bounds (+Inf implied)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0

    @property
    def count(self) -> int:
        """Return the number of observations."""
        return sum(self.counts)

    def observe(self, value: float) -> None:
        """Add one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """Return (upper bound, observations <= bound) pairs, ending with +Inf."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class ResultStore:
    """The monitor's state between probes and exporters; one per running service."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._pairs = _pairs(config)
        self._targets = frozenset(t.name for t in config.targets)
        self._clock = clock
        self._history: dict[Pair, deque[ProbeResult]] = {}  # the last ranking.WINDOW runs, oldest first
        self._route_leaders: dict[str, str] = {}  # target -> the route holding rank 1
        self._group_leaders: dict[str, Pair] = {}  # group -> the (target, route) holding rank 1
        self._dns: dict[str, tuple[DnsResult, ...]] = {}
        self._runs: dict[Pair, dict[Outcome, int]] = {}
        self._phases: dict[Pair, dict[Phase, Histogram]] = {}
        self.lag = Histogram()
        self.reload_successful = True
        self.last_reload_success = clock()
        self.last_reload_error: str | None = None

    # --- recording ------------------------------------------------------------------

    def record(self, result: ProbeResult) -> bool:
        """Keep `result` as the latest of its pair and re-rank; return False if the pair is no longer configured."""
        pair = (result.target, result.route)
        if pair not in self._pairs:
            return False
        self._history.setdefault(pair, deque(maxlen=ranking.WINDOW)).append(result)
        runs = self._runs.setdefault(pair, {})
        runs[result.outcome] = runs.get(result.outcome, 0) + 1
        hists = self._phases.setdefault(pair, {})
        for phase, seconds in result.phases.items():
            hists.setdefault(phase, Histogram()).observe(seconds)
        self._update_leaders(self.config.target(result.target))
        return True

    def record_dns(self, target_name: str, results: Sequence[DnsResult]) -> bool:
        """Keep `results` as the latest DNS check of a target; return False if it is not configured."""
        if target_name not in self._targets:
            return False
        self._dns[target_name] = tuple(results)
        return True

    def observe_lag(self, seconds: float) -> None:
        """Record how late a scheduled probe started."""
        self.lag.observe(max(0.0, seconds))

    # --- config changes -------------------------------------------------------------

    def retain(self, config: Config) -> None:
        """Adopt `config` and drop every series of targets, routes and resolvers it no longer has."""
        self.config = config
        self._pairs = _pairs(config)
        self._targets = frozenset(t.name for t in config.targets)
        for table in (self._history, self._runs, self._phases):
            for pair in [p for p in table if p not in self._pairs]:
                del table[pair]
        self._route_leaders = {t: r for t, r in self._route_leaders.items() if (t, r) in self._pairs}
        groups = {t.group for t in config.targets if t.group is not None}
        self._group_leaders = {
            g: pair for g, pair in self._group_leaders.items()
            if g in groups and pair in self._pairs and config.target(pair[0]).group == g
        }
        resolvers = {t.name: set(t.resolvers) for t in config.targets if t.needs_dns}
        for name in list(self._dns):
            if name not in resolvers:
                del self._dns[name]
            else:
                self._dns[name] = tuple(d for d in self._dns[name] if d.resolver in resolvers[name])

    def reload_succeeded(self, config: Config) -> None:
        """Adopt a freshly loaded config (see retain) and mark the reload successful."""
        self.retain(config)
        self.reload_successful = True
        self.last_reload_success = self._clock()
        self.last_reload_error = None

    def reload_failed(self, error: str) -> None:
        """Mark the last reload failed; the running config stays."""
        self.reload_successful = False
        self.last_reload_error = error

    # --- reading --------------------------------------------------------------------

    def latest(self, target: str, route: str) -> ProbeResult | None:
        """Return the latest result of one pair, as recorded (without the DNS check)."""
        history = self._history.get((target, route))
        return history[-1] if history else None

    def history(self, target: str, route: str) -> tuple[ProbeResult, ...]:
        """Return the recent results of one pair that the ranking uses, oldest first."""
        return tuple(self._history.get((target, route), ()))

    def dns(self, target: str) -> tuple[DnsResult, ...]:
        """Return the latest DNS check of a target; () when none ran yet."""
        return self._dns.get(target, ())

    def runs(self, target: str, route: str) -> dict[Outcome, int]:
        """Return the run count per outcome of one pair (outcomes never seen are absent)."""
        return dict(self._runs.get((target, route), {}))

    def phase_histogram(self, target: str, route: str, phase: Phase) -> Histogram | None:
        """Return the histogram of one phase of one pair; None before its first observation."""
        return self._phases.get((target, route), {}).get(phase)

    def results(self) -> list[ProbeResult]:
        """Return the latest results in config order, `dns` filled from the target's latest check."""
        out = []
        for target in self.config.targets:
            dns = self._dns.get(target.name)
            for route in target.routes:
                result = self.latest(target.name, route)
                if result is None:
                    continue
                out.append(result if dns is None else dataclasses.replace(result, dns=dns))
        return out

    def ranking(self, config: Config | None = None) -> dict[str, list[Ranked]]:
        """Return, per target in config order, its routes best first (rank 1 = the one to use)."""
        config = config or self.config
        return {
            t.name: ranking.rank(self._candidates([t]), self._route_leader(t.name)) for t in config.targets
        }

    def group_ranking(self, config: Config | None = None) -> dict[str, list[Ranked]]:
        """Return, per endpoint group, every (target, route) of its targets best first."""
        config = config or self.config
        return {
            group: ranking.rank(self._candidates(members), self._group_leaders.get(group))
            for group, members in _groups(config).items()
        }

    def _route_leader(self, target: str) -> Pair | None:
        route = self._route_leaders.get(target)
        return None if route is None else (target, route)

    def _candidates(self, targets: Sequence[Target]) -> list[Candidate]:
        return [
            Candidate(t.name, route, tuple(self._history.get((t.name, route), ())), t.timeout)
            for t in targets
            for route in t.routes
        ]

    def _update_leaders(self, target: Target) -> None:
        leader = ranking.leader_of(ranking.rank(self._candidates([target]), self._route_leader(target.name)))
        if leader is None:
            self._route_leaders.pop(target.name, None)
        else:
            self._route_leaders[target.name] = leader[1]
        if target.group is not None:
            members = _groups(self.config)[target.group]
            group_leader = ranking.leader_of(
                ranking.rank(self._candidates(members), self._group_leaders.get(target.group))
            )
            if group_leader is None:
                self._group_leaders.pop(target.group, None)
            else:
                self._group_leaders[target.group] = group_leader


def _groups(config: Config) -> dict[str, list[Target]]:
    out: dict[str, list[Target]] = {}
    for t in config.targets:
        if t.group is not None:
            out.setdefault(t.group, []).append(t)
    return out


def _pairs(config: Config) -> frozenset[Pair]:
    return frozenset((t.name, r) for t in config.targets for r in t.routes)
