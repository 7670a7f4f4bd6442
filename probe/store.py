"""Recent results per (target, route), run counters, histograms, rankings and reload state.

Plain data only: the metrics collector rebuilds every series from here on each scrape,
so nothing outlives the config it came from (retain() drops the rest). The rankings'
hysteresis state (who holds rank 1) moves only when a result is recorded, never on a read.

Sized for 10,000 pairs: per pair one PairState holds the latest full result, the ranking's
History (outcome, request time and throughput of the last runs, not whole results), the run
counters and the phase histograms as flat arrays. Rankings are kept between records: a
target's ranking changes only when one of its pairs records (record() ranks it then anyway)
or the config changes.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from array import array
from collections.abc import Callable, Sequence

from probe import ranking
from probe.config import Config, Target
from probe.models import DnsResult, Localisation, Outcome, PathResult, Phase, ProbeResult
from probe.ranking import Candidate, History, PathHistory, Ranked

# prober_scheduler_lag_seconds: one histogram per process, so fine-grained is cheap.
LAG_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# probe_phase_seconds (opt-in, `histograms: true`): per pair and phase, so at most 10 buckets with
# +Inf (DESIGN "Series budget"). Chosen for cross-border paths: 10 ms same city, 25-50 ms within a
# region (Shanghai-Hong Kong), 100-200 ms across an ocean, 400-800 ms a congested evening or a
# handshake of several round trips, 1.5 s and 3 s a SYN or ClientHello retransmitted once (the
# first RTO is 1 s) and twice.
PHASE_BUCKETS: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3.0)

Pair = tuple[str, str]

OUTCOMES = tuple(Outcome)  # the order of PairState.runs
PHASES = tuple(Phase)  # the order of PairState.counts and .sums
SLOTS = len(PHASE_BUCKETS) + 1  # counts per phase in PairState.counts: one per bound, then +Inf
_CODE = {o: i for i, o in enumerate(OUTCOMES)}
_INDEX = {p: i for i, p in enumerate(PHASES)}
_NO_PHASES = array("d", bytes(8 * len(PHASES)))


class Histogram:
    """A cumulative-on-export histogram with fixed upper bounds (+Inf implied)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = LAG_BUCKETS) -> None:
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


class PairState:
    """What the store keeps of one (target, route).

    With a full ranking window and the results shared, 1.3 KB per pair (tracemalloc; 1.8 KB
    when every pair kept histograms, before they became opt-in) and 0.4 KB more with histograms.

    Flat arrays, in the order /metrics writes them: `runs` per outcome (OUTCOMES order);
    `phases` the latest result's phase times, 0.0 for a phase it did not complete. Only for a
    target with `histograms: true` (else None, not even allocated): `counts` per phase (PHASES
    order) SLOTS cumulative bucket counts, the last (+Inf) being the phase's observation count,
    and `sums` per phase.
    """

    __slots__ = ("counts", "history", "latest", "memo", "phases", "runs", "seen", "since", "sums")

    def __init__(self, first: ProbeResult, histograms: bool = False) -> None:
        self.latest = first
        self.since = first.started_at  # when the pair entered its latest outcome (wall clock), as far as we saw
        self.history = History()  # for the ranking
        # Unsigned 32-bit counters (4 bytes, not 8: 10,000 pairs x 17 of them, 67 with histograms): 4.29e9 runs of one
        # pair is 136 years at one probe a second.
        self.runs = array("I", bytes(4 * len(OUTCOMES)))
        self.seen = b""  # the indexes into `runs` of the outcomes that happened, ascending
        self.counts: array[int] | None = None
        self.sums: array[float] | None = None
        self.phases = array("d", bytes(8 * len(PHASES)))
        self.memo: bytes | None = None  # exposition's text of the float values and run counters; None: changed
        self.keep_histograms(histograms)
        self.record(first)

    def keep_histograms(self, on: bool) -> None:
        """Start keeping the phase histograms (from zero), or drop them."""
        if not on:
            self.counts = self.sums = None
        elif self.counts is None:
            self.counts = array("I", bytes(4 * SLOTS * len(PHASES)))
            self.sums = array("d", bytes(8 * len(PHASES)))
        self.memo = None

    def record(self, result: ProbeResult) -> None:
        """Count `result` in and keep it as the latest."""
        if result.outcome is not self.latest.outcome:
            self.since = result.started_at
        self.latest = result
        self.memo = None
        code = _CODE[result.outcome]
        if not self.runs[code]:
            self.seen = bytes(sorted((*self.seen, code)))
        self.runs[code] += 1
        counts, sums, latest = self.counts, self.sums, self.phases
        latest[:] = _NO_PHASES
        total = 0.0
        for phase, seconds in result.phases.items():
            i = _INDEX[phase]
            if counts is not None and sums is not None:
                base = i * SLOTS
                for slot in range(base + bisect.bisect_left(PHASE_BUCKETS, seconds), base + SLOTS):
                    counts[slot] += 1  # cumulative: every bucket whose bound is >= seconds, and +Inf
                sums[i] += seconds
            latest[i] = seconds
            total += seconds  # as ranking.request_seconds() adds them
        self.history.append(result, total)

    def histogram(self, phase: Phase) -> Histogram | None:
        """Return one phase's histogram; None before its first observation or when histograms are off."""
        if self.counts is None or self.sums is None:
            return None
        i = _INDEX[phase]
        cumulative = self.counts[i * SLOTS:(i + 1) * SLOTS]
        if not cumulative[-1]:
            return None
        h = Histogram(PHASE_BUCKETS)
        h.counts = [n - before for n, before in zip(cumulative, [0, *cumulative[:-1]], strict=True)]
        h.sum = self.sums[i]
        return h


class ResultStore:
    """The monitor's state between probes and exporters; one per running service."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._pairs = _pairs(config)
        self._targets = frozenset(t.name for t in config.targets)
        self._groups = _groups(config)
        self._clock = clock
        self._state: dict[Pair, PairState] = {}  # pairs with a result since configured
        self._ranked: dict[str, list[Ranked]] = {}  # target -> its ranking, as of its last record
        self._group_ranked: dict[str, list[Ranked]] = {}  # group -> its ranking, as of its last record
        self._route_leaders: dict[str, str] = {}  # target -> the route holding rank 1
        self._group_leaders: dict[str, Pair] = {}  # group -> the (target, route) holding rank 1
        self._dns: dict[str, tuple[DnsResult, ...]] = {}
        self._path: dict[Pair, PathHistory] = {}  # pairs with path sampling configured and run
        self._path_pairs = _path_pairs(config)
        self._located: dict[Pair, Localisation] = {}  # kept until the pair's next localisation
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
        state = self._state.get(pair)
        if state is None:
            self._state[pair] = PairState(result, self.config.target(result.target).histograms)
        else:
            state.record(result)
        self._update_leaders(self.config.target(result.target))
        return True

    def record_dns(self, target_name: str, results: Sequence[DnsResult]) -> bool:
        """Keep `results` as the latest DNS check of a target; return False if it is not configured."""
        if target_name not in self._targets:
            return False
        self._dns[target_name] = tuple(results)
        return True

    def record_path(self, result: PathResult) -> bool:
        """Keep a path sampling run as its pair's latest, count it in and re-rank; False if not configured."""
        pair = (result.target, result.route)
        if pair not in self._path_pairs:
            return False
        history = self._path.get(pair)
        if history is None:
            history = self._path[pair] = PathHistory()
        history.append(result)
        state = self._state.get(pair)
        if state is not None:
            state.memo = None  # the route score may change
        self._update_leaders(self.config.target(result.target))
        return True

    def record_locate(self, target: str, route: str, found: Localisation) -> bool:
        """Keep `found` as the pair's localisation; return False if the pair is no longer configured."""
        if (target, route) not in self._pairs:
            return False
        self._located[(target, route)] = found
        return True

    def observe_lag(self, seconds: float) -> None:
        """Record how late a scheduled probe started."""
        self.lag.observe(max(0.0, seconds))

    # --- config changes -------------------------------------------------------------

    def retain(self, config: Config) -> None:
        """Adopt `config` and drop every series of targets, routes and resolvers it no longer has."""
        old_paths = {t.name: t.path for t in self.config.targets}
        changed = {t.name for t in config.targets if t.path != old_paths.get(t.name, t.path)}
        self.config = config
        self._pairs = _pairs(config)
        self._targets = frozenset(t.name for t in config.targets)
        self._groups = _groups(config)
        for pair in [p for p in self._state if p not in self._pairs]:
            del self._state[pair]
        self._path_pairs = _path_pairs(config)
        for pair in [p for p in self._path if p not in self._path_pairs or p[0] in changed]:
            del self._path[pair]  # switched off, or other samples (method, count): its series start afresh
        self._located = {p: found for p, found in self._located.items() if p in self._pairs}
        for (target, _), state in self._state.items():
            state.memo = None  # a timeout may have changed, and with it the score
            state.keep_histograms(config.target(target).histograms)
        self._ranked.clear()  # timeouts, routes and groups may have changed
        self._group_ranked.clear()
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
        state = self._state.get((target, route))
        return None if state is None else state.latest

    def state(self, target: str, route: str) -> PairState | None:
        """Return everything kept of one pair (None before its first result); for exposition, read only."""
        return self._state.get((target, route))

    def states(self, pairs: Sequence[Pair]) -> list[PairState | None]:
        """Return state() of each of `pairs`, in their order; for exposition, read only."""
        get = self._state.get
        return [get(pair) for pair in pairs]

    def rank_some(self, most: int) -> bool:
        """Rank up to `most` targets with no ranking kept (after a start or a reload); return whether any remain.

        /metrics calls it in steps, letting the loop run between them, before it reads ranks()
        (ranking 10,000 targets at once held the loop ~280 ms).
        """
        done = 0
        for t in self.config.targets:
            if t.name not in self._ranked:
                if done == most:
                    return True
                self._ranked[t.name] = ranking.rank(self._candidates([t]), self._route_leader(t.name))
                done += 1
        return False

    def ranks(self, config: Config | None = None) -> list[Ranked]:
        """Return each pair's place in its target's ranking (see ranking()), pairs in config order (target, route)."""
        config = config or self.config
        other = None if config is self.config else self.ranking(config)
        out: list[Ranked] = []
        for t in config.targets:
            ranked = other[t.name] if other is not None else self._ranked.get(t.name)
            if ranked is None:
                ranked = self._ranked[t.name] = ranking.rank(self._candidates([t]), self._route_leader(t.name))
            if len(ranked) == 1:
                out.append(ranked[0])
            else:
                by_route = {x.route: x for x in ranked}
                out += [by_route[route] for route in t.routes]
        return out

    def history(self, target: str, route: str) -> History:
        """Return what the ranking keeps of the recent runs of one pair (a copy)."""
        state = self._state.get((target, route))
        return History() if state is None else state.history.copy()

    def path(self, target: str, route: str) -> PathHistory | None:
        """Return what is kept of one pair's path sampling (latest run, totals); None before its first run."""
        return self._path.get((target, route))

    def streak(self, target: str, route: str) -> tuple[list[Outcome], float | None]:
        """Return one pair's last outcomes (oldest first, ranking.WINDOW at most) and when its outcome last changed."""
        state = self._state.get((target, route))
        return ([], None) if state is None else (state.history.outcomes(), state.since)

    def dns(self, target: str) -> tuple[DnsResult, ...]:
        """Return the latest DNS check of a target; () when none ran yet."""
        return self._dns.get(target, ())

    def localisation(self, target: str, route: str) -> Localisation | None:
        """Return the pair's latest localisation (recorded by itself or with a result), None if none ran."""
        found = self._located.get((target, route))
        if found is None and (state := self._state.get((target, route))) is not None:
            found = state.latest.locate
        return found

    def runs(self, target: str, route: str) -> dict[Outcome, int]:
        """Return the run count per outcome of one pair (outcomes never seen are absent)."""
        state = self._state.get((target, route))
        return {} if state is None else {o: n for o, n in zip(OUTCOMES, state.runs, strict=True) if n}

    def phase_histogram(self, target: str, route: str, phase: Phase) -> Histogram | None:
        """Return the histogram of one phase of one pair; None before its first observation or with histograms off."""
        state = self._state.get((target, route))
        return None if state is None else state.histogram(phase)

    def results(self) -> list[ProbeResult]:
        """Return the latest results in config order, `dns` from the target's latest check, `path` from its pair's."""
        out = []
        for target in self.config.targets:
            dns = self._dns.get(target.name)
            for route in target.routes:
                result = self.latest(target.name, route)
                if result is None:
                    continue
                if dns is not None:
                    result = dataclasses.replace(result, dns=dns)
                if (path := self._path.get((target.name, route))) is not None:
                    result = dataclasses.replace(result, path=path.latest)
                if (found := self._located.get((target.name, route))) is not None:
                    result = dataclasses.replace(result, locate=found)
                out.append(result)
        return out

    def ranking(self, config: Config | None = None) -> dict[str, list[Ranked]]:
        """Return, per target in config order, its routes best first (rank 1 = the one to use)."""
        config = config or self.config
        if config is not self.config:
            return {
                t.name: ranking.rank(self._candidates([t]), self._route_leader(t.name)) for t in config.targets
            }
        out = {}
        for t in config.targets:
            ranked = self._ranked.get(t.name)
            if ranked is None:
                ranked = self._ranked[t.name] = ranking.rank(self._candidates([t]), self._route_leader(t.name))
            out[t.name] = list(ranked)
        return out

    def group_ranking(self, config: Config | None = None) -> dict[str, list[Ranked]]:
        """Return, per endpoint group, every (target, route) of its targets best first."""
        config = config or self.config
        if config is not self.config:
            return {
                group: ranking.rank(self._candidates(members), self._group_leaders.get(group))
                for group, members in _groups(config).items()
            }
        out = {}
        for group, members in self._groups.items():
            ranked = self._group_ranked.get(group)
            if ranked is None:
                ranked = self._group_ranked[group] = ranking.rank(
                    self._candidates(members), self._group_leaders.get(group))
            out[group] = list(ranked)
        return out

    def _route_leader(self, target: str) -> Pair | None:
        route = self._route_leaders.get(target)
        return None if route is None else (target, route)

    def _candidates(self, targets: Sequence[Target]) -> list[Candidate]:
        return [
            Candidate(t.name, route, state.history if (state := self._state.get((t.name, route))) else _NO_RUNS,
                      t.timeout, path.stats() if (path := self._path.get((t.name, route))) else None)
            for t in targets
            for route in t.routes
        ]

    def _update_leaders(self, target: Target) -> None:
        # Ranked again with the leader it picks, the order is the same (that leader is its rank 1,
        # or nothing works), so this ranking is what readers get until the target records again.
        ranked = ranking.rank(self._candidates([target]), self._route_leader(target.name))
        self._ranked[target.name] = ranked
        leader = ranking.leader_of(ranked)
        if leader is None:
            self._route_leaders.pop(target.name, None)
        else:
            self._route_leaders[target.name] = leader[1]
        if target.group is not None:
            members = self._groups[target.group]
            group_ranked = ranking.rank(self._candidates(members), self._group_leaders.get(target.group))
            self._group_ranked[target.group] = group_ranked
            group_leader = ranking.leader_of(group_ranked)
            if group_leader is None:
                self._group_leaders.pop(target.group, None)
            else:
                self._group_leaders[target.group] = group_leader


_NO_RUNS = History()


def _groups(config: Config) -> dict[str, list[Target]]:
    out: dict[str, list[Target]] = {}
    for t in config.targets:
        if t.group is not None:
            out.setdefault(t.group, []).append(t)
    return out


def _path_pairs(config: Config) -> frozenset[Pair]:
    return frozenset((t.name, r) for t in config.targets if t.path is not None for r in t.routes)


def _pairs(config: Config) -> frozenset[Pair]:
    return frozenset((t.name, r) for t in config.targets for r in t.routes)
