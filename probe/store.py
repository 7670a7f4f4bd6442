"""The latest results per (target, route), run counters, histograms and reload state.

Plain data only: the metrics collector rebuilds every series from here on each scrape,
so nothing outlives the config it came from (retain() drops the rest).
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections.abc import Callable, Sequence

from probe.config import Config
from probe.models import DnsResult, Outcome, Phase, ProbeResult

LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

# Route score tiers (lower is better): a working route always beats an unprobed one,
# which beats a failing one; an interference class ranks last. Within a tier, the last
# duration orders the routes; it is capped so it can never reach the next tier.
_TIER_WIDTH = 1000.0
_TIER_OK, _TIER_UNPROBED, _TIER_FAILED, _TIER_BLOCKED = 0, 1, 2, 3

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
        self._results: dict[Pair, ProbeResult] = {}
        self._dns: dict[str, tuple[DnsResult, ...]] = {}
        self._runs: dict[Pair, dict[Outcome, int]] = {}
        self._phases: dict[Pair, dict[Phase, Histogram]] = {}
        self.lag = Histogram()
        self.reload_successful = True
        self.last_reload_success = clock()
        self.last_reload_error: str | None = None

    # --- recording ------------------------------------------------------------------

    def record(self, result: ProbeResult) -> bool:
        """Keep `result` as the latest of its pair; return False if the pair is no longer configured."""
        pair = (result.target, result.route)
        if pair not in self._pairs:
            return False
        self._results[pair] = result
        runs = self._runs.setdefault(pair, {})
        runs[result.outcome] = runs.get(result.outcome, 0) + 1
        hists = self._phases.setdefault(pair, {})
        for phase, seconds in result.phases.items():
            hists.setdefault(phase, Histogram()).observe(seconds)
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
        for table in (self._results, self._runs, self._phases):
            for pair in [p for p in table if p not in self._pairs]:
                del table[pair]
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
        return self._results.get((target, route))

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
                result = self._results.get((target.name, route))
                if result is None:
                    continue
                out.append(result if dns is None else dataclasses.replace(result, dns=dns))
        return out

    def ranking(self, config: Config | None = None) -> dict[str, list[tuple[str, float]]]:
        """Return, per target, its routes best first with a score (lower is better)."""
        config = config or self.config
        ranked: dict[str, list[tuple[str, float]]] = {}
        for target in config.targets:
            scored = [(route, self._score(self._results.get((target.name, route)))) for route in target.routes]
            ranked[target.name] = sorted(scored, key=lambda item: item[1])  # stable: config order on ties
        return ranked

    @staticmethod
    def _score(result: ProbeResult | None) -> float:
        if result is None:
            return _TIER_UNPROBED * _TIER_WIDTH
        if result.success:
            tier = _TIER_OK
        else:
            tier = _TIER_BLOCKED if result.blocked else _TIER_FAILED
        return tier * _TIER_WIDTH + min(max(result.duration_seconds, 0.0), _TIER_WIDTH - 1.0)


def _pairs(config: Config) -> frozenset[Pair]:
    return frozenset((t.name, r) for t in config.targets for r in t.routes)
