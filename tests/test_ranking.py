"""Route ranking: the score by hand, tiers, hysteresis under recorded noise, endpoint groups."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probe import ranking
from probe.config import Config, loads
from probe.models import Outcome, Phase, ProbeResult
from probe.output import ranking_table
from probe.ranking import Candidate, Tier
from probe.store import ResultStore

CONFIG = """
vantage: lab-cn
routes: [{name: a, source_address: 127.0.0.2}, {name: b, source_address: 127.0.0.3}]
targets:
  - {name: t, address: "127.0.0.1:443", routes: [a, b], timeout: 10s}
"""

GROUP_CONFIG = """
vantage: lab-cn
routes: [{name: cn2, source_address: 127.0.0.2}, {name: hk-socks, proxy: "socks5://127.0.0.1:1080"}]
targets:
  - {name: mirror-hk, address: "127.0.0.1:443", group: sesame-storage, routes: [direct, hk-socks]}
  - {name: mirror-sh, address: "127.0.0.1:444", group: sesame-storage, routes: [direct, cn2]}
  - {name: other, address: "127.0.0.1:445"}
"""


def run(
    route: str, ms: float, outcome: Outcome = Outcome.OK, *, target: str = "t", rate: float | None = None
) -> ProbeResult:
    """One recorded run; a successful one spent `ms` in its phases (its request time)."""
    seconds = ms / 1000
    phases = {Phase.CONNECT: seconds / 2, Phase.TLS: seconds / 2} if outcome is Outcome.OK else {}
    return ProbeResult(target, route, outcome, time.time(), seconds, phases, throughput_bytes_per_second=rate)


def scored(history: Sequence[ProbeResult], timeout: float = 10.0) -> tuple[float, Tier]:
    [r] = ranking.rank([Candidate("t", "a", history, timeout)])
    return round(r.score, 6), r.tier


# Figures worked out by hand with the README's rule, as an operator would check them.
BY_HAND = [
    pytest.param([run("a", ms) for ms in range(10, 201, 10)], (0.18, Tier.WORKING),
                 id="p90-of-20-is-the-18th-smallest"),
    pytest.param([run("a", 30), run("a", 10), run("a", 20)], (0.03, Tier.WORKING), id="p90-of-3-is-the-largest"),
    pytest.param(
        [run("a", 0, Outcome.TLS_RESET), run("a", 0, Outcome.TCP_TIMEOUT), *(run("a", t) for t in range(10, 181, 10))],
        (0.238, Tier.WORKING),  # p90 of 18 = 17th smallest = 0.17; x (1 + 4 x 2/20) = 0.238
        id="two-failures-in-20-cost-40-percent",
    ),
    pytest.param([run("a", 100, rate=2 * 1024 * 1024)] * 5, (0.6, Tier.WORKING),
                 id="download-adds-seconds-per-mib"),
    pytest.param([run("a", 50), run("a", 0, Outcome.TLS_RESET)], (3000.15, Tier.BLOCKED),
                 id="blocked-offset-3000"),  # 0.05 x (1 + 4 x 1/2)
    pytest.param([run("a", 0, Outcome.TCP_REFUSED)] * 3, (2050.0, Tier.FAILING),
                 id="none-succeeded-uses-the-timeout"),  # 10 x (1 + 4 x 1)
    pytest.param([], (1000.0, Tier.UNPROBED), id="unprobed-offset-1000"),
]


@pytest.mark.parametrize(("history", "expected"), BY_HAND)
def test_score_follows_the_readme_rule(history: list[ProbeResult], expected: tuple[float, Tier]) -> None:
    assert scored(history) == expected


def test_more_than_a_quarter_failed_is_not_working_even_when_the_last_run_succeeded() -> None:
    five_of_twenty = [run("a", 0, Outcome.HTTP_TIMEOUT)] * 5 + [run("a", 100)] * 15
    six_of_twenty = [run("a", 0, Outcome.HTTP_TIMEOUT)] * 6 + [run("a", 100)] * 14
    assert scored(five_of_twenty) == (0.2, Tier.WORKING)  # 0.1 x (1 + 4 x 0.25)
    assert scored(six_of_twenty)[1] is Tier.FAILING


def test_only_the_last_window_of_runs_counts() -> None:
    old_failures = [run("a", 0, Outcome.TLS_RESET)] * 30
    assert scored(old_failures + [run("a", 40)] * ranking.WINDOW) == (0.04, Tier.WORKING)


Run = tuple[Outcome, float, float | None]  # outcome, seconds, throughput
outcomes = st.sampled_from(list(Outcome))
histories = st.lists(
    st.tuples(outcomes, st.floats(min_value=0.001, max_value=20.0), st.none() | st.floats(1.0, 1e9)),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(st.lists(histories, min_size=2, max_size=4))
def test_a_blocked_or_failing_route_never_ranks_above_a_working_one(routes: list[list[Run]]) -> None:
    candidates = [
        Candidate("t", f"r{i}", [run(f"r{i}", s * 1000, o, rate=rate) for o, s, rate in h], 10.0)
        for i, h in enumerate(routes)
    ]
    for leader in [None, *((c.target, c.route) for c in candidates)]:
        ranked = ranking.rank(candidates, leader)
        tiers = [r.tier for r in ranked]
        order = [Tier.WORKING, Tier.UNPROBED, Tier.FAILING, Tier.BLOCKED]
        assert tiers == sorted(tiers, key=order.index), (leader, [(r.route, r.tier, r.score) for r in ranked])
        assert [r.rank for r in ranked] == list(range(1, len(ranked) + 1))


# ---- hysteresis -------------------------------------------------------------------------------------


def feed(store: ResultStore, results: Sequence[ProbeResult]) -> list[str]:
    """Record `results` one by one; return the recommended route after each."""
    out = []
    for r in results:
        store.record(r)
        out.append(store.ranking()["t"][0].route)
    return out


def changes(seq: Sequence[object]) -> int:
    return sum(1 for x, y in zip(seq, seq[1:], strict=False) if x != y)


def noisy_rounds(rng: random.Random, means: dict[str, float], jitter: float, rounds: int) -> list[ProbeResult]:
    """Rounds of both routes, each run's time spread uniformly over mean +- jitter."""
    spread = [(route, mean) for _ in range(rounds) for route, mean in means.items()]
    return [run(route, mean * rng.uniform(1 - jitter, 1 + jitter)) for route, mean in spread]


NOISE = [
    pytest.param({"a": 100, "b": 100}, 0.10, id="equal-routes-10pct-jitter"),
    pytest.param({"a": 100, "b": 100}, 0.30, id="equal-routes-30pct-jitter"),
    pytest.param({"a": 100, "b": 106}, 0.20, id="6pct-apart-20pct-jitter"),
    pytest.param({"a": 20, "b": 21}, 0.50, id="fast-routes-50pct-jitter"),
]


@pytest.mark.parametrize(("means", "jitter"), NOISE)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_recommendation_holds_between_near_equal_routes_under_noise(
    means: dict[str, float], jitter: float, seed: int
) -> None:
    results = noisy_rounds(random.Random(seed), means, jitter, rounds=200)
    recommended = feed(ResultStore(loads(CONFIG)), results)
    settled = recommended[2 * ranking.WINDOW:]  # once both windows are full
    assert changes(settled) == 0, settled
    # The same runs without hysteresis: the best score alone flips on the noise.
    store = ResultStore(loads(CONFIG))
    raw = []
    for r in results:
        store.record(r)
        history = [Candidate("t", route, store.history("t", route), 10.0) for route in ("a", "b")]
        raw.append(ranking.rank(history)[0].route)
    if means["a"] == means["b"]:
        assert changes(raw[2 * ranking.WINDOW:]) >= 3


def test_recommendation_moves_on_a_clear_margin_within_a_window() -> None:
    rng = random.Random(7)
    store = ResultStore(loads(CONFIG))
    before = feed(store, noisy_rounds(rng, {"a": 100, "b": 110}, 0.05, rounds=40))
    assert before[-1] == "a"
    after = feed(store, noisy_rounds(rng, {"a": 100, "b": 60}, 0.05, rounds=ranking.WINDOW))
    assert after[-1] == "b" and changes(after) == 1
    [best, second] = store.ranking()["t"]
    assert (best.route, best.recommended, second.route, second.recommended) == ("b", True, "a", False)


@pytest.mark.parametrize("failure", [Outcome.TLS_RESET, Outcome.TCP_REFUSED, Outcome.HTTP_TIMEOUT])
def test_recommendation_moves_at_once_when_its_route_fails_and_does_not_flap_back(failure: Outcome) -> None:
    rng = random.Random(11)
    store = ResultStore(loads(CONFIG))
    assert feed(store, noisy_rounds(rng, {"a": 100, "b": 105}, 0.05, rounds=30))[-1] == "a"
    assert feed(store, [run("a", 0, failure)]) == ["b"]
    a = next(r for r in store.ranking()["t"] if r.route == "a")
    assert a.tier is (Tier.BLOCKED if failure.blocked else Tier.FAILING) and a.rank == 2
    # a works again and is a little faster: b keeps the recommendation (no clear margin).
    assert set(feed(store, noisy_rounds(rng, {"a": 95, "b": 105}, 0.05, rounds=30))) == {"b"}
    # a clearly faster once its failure has left the window: it takes rank 1 back.
    assert feed(store, noisy_rounds(rng, {"a": 50, "b": 105}, 0.05, rounds=ranking.WINDOW))[-1] == "a"


def test_the_recommendation_is_dropped_when_nothing_works() -> None:
    store = ResultStore(loads(CONFIG))
    feed(store, [run("a", 100), run("b", 120), run("a", 0, Outcome.TLS_RESET), run("b", 0, Outcome.TCP_TIMEOUT)])
    ranked = store.ranking()["t"]
    assert not any(r.recommended for r in ranked)
    assert [r.tier for r in ranked] == [Tier.BLOCKED, Tier.BLOCKED]


# ---- endpoint groups --------------------------------------------------------------------------------


def group_store() -> tuple[Config, ResultStore]:
    cfg = loads(GROUP_CONFIG)
    return cfg, ResultStore(cfg)


def test_group_ranking_says_which_endpoint_and_route_to_use() -> None:
    cfg, store = group_store()
    for r in [
        run("direct", 30, Outcome.TLS_RESET, target="mirror-hk"),  # fast but blocked
        run("hk-socks", 180, target="mirror-hk"),
        run("direct", 0, Outcome.TCP_TIMEOUT, target="mirror-sh"),
        run("cn2", 90, target="mirror-sh"),
        run("direct", 5, target="other"),  # not in the group
    ]:
        store.record(r)
    [group] = store.group_ranking().values()
    assert [(r.target, r.route, r.tier) for r in group] == [
        ("mirror-sh", "cn2", Tier.WORKING),
        ("mirror-hk", "hk-socks", Tier.WORKING),
        ("mirror-hk", "direct", Tier.BLOCKED),  # equal scores (nothing succeeded): config order
        ("mirror-sh", "direct", Tier.BLOCKED),
    ]
    assert [r.recommended for r in group] == [True, False, False, False]
    table = ranking_table(store.ranking(), store.group_ranking(), color=False)
    lines = table.splitlines()
    group_header = next(i for i, line in enumerate(lines) if line.startswith("GROUP"))
    assert lines[group_header].split() == ["GROUP", "RANK", "TARGET", "ROUTE", "TIER", "SCORE"]
    best = lines[group_header + 1].split()
    assert best[:5] == ["sesame-storage", "1", "mirror-sh", "cn2", "working"] and best[-2:] == ["<-", "use"]
    assert "other" not in "\n".join(lines[group_header:])


def test_group_recommendation_has_hysteresis_across_endpoints_and_moves_on_failure() -> None:
    cfg, store = group_store()
    rng = random.Random(5)
    picks = []
    for _ in range(60):
        store.record(run("hk-socks", 100 * rng.uniform(0.8, 1.2), target="mirror-hk"))
        store.record(run("cn2", 100 * rng.uniform(0.8, 1.2), target="mirror-sh"))
        picks.append(store.group_ranking()["sesame-storage"][0].key)
    assert changes(picks[ranking.WINDOW:]) == 0
    held = picks[-1]
    store.record(run(held[1], 0, Outcome.TLS_RESET, target=held[0]))
    now = store.group_ranking()["sesame-storage"][0]
    assert now.key != held and now.recommended


def test_routes_json_and_table_show_what_the_score_is_made_of() -> None:
    cfg = loads(CONFIG)
    store = ResultStore(cfg)
    for r in [run("a", 100), run("a", 0, Outcome.TLS_RESET), run("b", 50, rate=1024 * 1024)]:
        store.record(r)
    doc = ranking.to_json(store.ranking(), store.group_ranking())
    [b, a] = doc["routes"]["t"]  # type: ignore[index]
    assert b == {
        "route": "b", "rank": 1, "score": 1.05, "tier": "working", "recommended": True, "runs": 1, "failures": 0,
        "blocked": 0, "latency_p90_seconds": 0.05, "throughput_bytes_per_second": 1048576.0, "last_outcome": "ok",
    }
    assert (a["tier"], a["score"], a["failures"], a["blocked"], a["last_outcome"]) == (
        "blocked", 3000.3, 1, 1, "tls_reset")  # 0.1 x (1 + 4 x 1/2)
    table = ranking_table(store.ranking(), {}, color=False).splitlines()
    assert table[0].split() == ["TARGET", "RANK", "ROUTE", "TIER", "SCORE", "P90", "FAILED", "LAST"]
    assert table[1].split() == ["t", "1", "b", "working", "1.050", "50", "ms", "0/1", "ok", "50", "ms", "<-", "use"]
    assert table[2].split()[:5] == ["2", "a", "blocked", "3000.300", "100"]


def test_a_reload_without_the_recommended_route_ranks_afresh_and_keeps_the_others_history() -> None:
    store = ResultStore(loads(CONFIG))
    feed(store, [run("a", 50), run("b", 100)] * 5)
    assert store.ranking()["t"][0].route == "a"
    smaller = loads(CONFIG.replace("routes: [a, b], timeout", "routes: [b], timeout"))
    store.reload_succeeded(smaller)
    [only] = store.ranking()["t"]
    assert (only.route, only.rank, only.recommended, only.stats.runs) == ("b", 1, True, 5)
    store.reload_succeeded(loads(CONFIG))  # a comes back without history: unprobed, below the working b
    assert [(r.route, r.tier) for r in store.ranking()["t"]] == [("b", Tier.WORKING), ("a", Tier.UNPROBED)]


def _reference_stats(results: Sequence[ProbeResult]) -> ranking.RouteStats:
    """The statistics as summarize() computed them from whole results, before the compact History."""
    runs = list(results)[-ranking.WINDOW:]
    if not runs:
        return ranking.RouteStats()
    ok = sorted(sum(r.phases.values()) for r in runs if r.success)
    failed = [r for r in runs if not r.success]
    rates = [r.throughput_bytes_per_second for r in runs if r.throughput_bytes_per_second is not None]
    return ranking.RouteStats(
        runs=len(runs), failures=len(failed), blocked=sum(r.blocked for r in failed),
        latency_seconds=ranking.p90(ok) if ok else None,
        throughput_bytes_per_second=statistics.median(rates) if rates else None,
        last_outcome=runs[-1].outcome, last_duration_seconds=runs[-1].duration_seconds,
        last_failure=failed[-1].outcome if failed else None,
    )


@pytest.mark.parametrize("seed", range(5))
def test_the_compact_history_says_what_the_whole_results_say(seed: int) -> None:
    rng = random.Random(seed)
    store = ResultStore(loads(CONFIG))
    kept: list[ProbeResult] = []
    for _ in range(3 * ranking.WINDOW):
        outcome = Outcome.OK if rng.random() < 0.6 else rng.choice(list(Outcome))
        phases = {p: rng.expovariate(20) for p in Phase if rng.random() < 0.7}
        rate = rng.choice([None, None, rng.random() * 1e6])  # downloads start and stop
        r = ProbeResult("t", "a", outcome, time.time(), rng.random(), phases, throughput_bytes_per_second=rate)
        store.record(r)
        kept.append(r)
        assert ranking.summarize(store.history("t", "a")) == _reference_stats(kept)
        assert ranking.summarize(kept) == _reference_stats(kept)
