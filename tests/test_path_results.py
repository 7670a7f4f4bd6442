"""Path results after sampling: statistics, the store, the scheduler's jobs, JSON, `probe once`, ranking."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probe import ranking
from probe.config import Config, Route, Target, loads
from probe.context import ProbeContext
from probe.models import Outcome, PathMethod, PathResult, Phase, ProbeResult
from probe.ranking import Candidate, PathStats
from probe.scheduler import Scheduler, path_job_id, probe_job_id
from probe.store import ResultStore


def make_config(extra_target: str = "", path: str = "{samples: 2, spread: 100ms}") -> Config:
    return loads(f"""
vantage: v
routes:
  - {{name: lo2, source_address: 127.0.0.2}}
targets:
  - {{name: sampled, address: "127.0.0.1:9", routes: [direct, lo2], interval: 300ms, timeout: 200ms, path: {path}}}
  - {{name: plain, address: "127.0.0.1:9", interval: 300ms}}
{extra_target}""")


def path_result(target: str, route: str, rtts: tuple[float, ...], lost: int = 0) -> PathResult:
    return PathResult(target, route, PathMethod.TCP, time.time(), len(rtts) + lost, lost, rtts)


# --- statistics ------------------------------------------------------------------------


def test_statistics_of_a_run_by_nearest_rank() -> None:
    rtts = tuple(i / 1000 for i in (30, 10, 20, 50, 40, 60, 70, 80, 90, 100))  # in send order
    r = path_result("t", "direct", rtts, lost=2)
    assert (r.sent, r.lost, r.loss) == (12, 2, 2 / 12)
    assert [r.rtt(s) for s in ("min", "p50", "p90", "max")] == [0.01, 0.05, 0.09, 0.1]
    # |10-30| + |20-10| + |50-20| + |40-50| + |60-40| + 10 x 4 = 130 ms over 9 differences
    assert r.jitter == pytest.approx(0.130 / 9)


def test_a_run_without_answers_has_no_rtt_or_jitter() -> None:
    r = path_result("t", "direct", (), lost=5)
    assert (r.loss, r.rtt("p50"), r.jitter) == (1.0, None, None)
    doc = r.to_json()
    assert doc["rtt_seconds"] == {"min": None, "p50": None, "p90": None, "max": None}
    assert (doc["sent"], doc["lost"], doc["method"], doc["jitter_seconds"]) == (5, 5, "tcp", None)


# --- the store -------------------------------------------------------------------------


def test_the_store_keeps_the_latest_run_and_counts_samples() -> None:
    cfg = make_config()
    store = ResultStore(cfg)
    store.record(ProbeResult("sampled", "direct", Outcome.OK, time.time(), 0.01, {Phase.CONNECT: 0.01}))
    assert store.record_path(path_result("sampled", "direct", (0.01, 0.02), lost=2))
    assert store.record_path(path_result("sampled", "direct", (0.01, 0.03, 0.02), lost=1))
    assert not store.record_path(path_result("plain", "direct", (0.01,)))  # no path configured there
    history = store.path("sampled", "direct")
    assert history is not None and (history.sent_total, history.lost_total) == (8, 3)
    (result,) = [r for r in store.results() if r.target == "sampled"]
    assert result.path is not None and result.path.rtts == (0.01, 0.03, 0.02)
    assert json.loads(json.dumps(result.to_json()))["path"]["lost"] == 1


def test_switching_path_off_drops_its_state() -> None:
    store = ResultStore(make_config())
    store.record_path(path_result("sampled", "direct", (0.01,)))
    store.retain(make_config(path="null"))
    assert store.path("sampled", "direct") is None
    assert not store.record_path(path_result("sampled", "direct", (0.01,)))


def test_changing_the_samples_starts_the_totals_afresh() -> None:
    store = ResultStore(make_config())
    store.record_path(path_result("sampled", "direct", (0.01,), lost=3))
    store.retain(make_config(path="{samples: 2, spread: 100ms, method: icmp}"))
    assert store.path("sampled", "direct") is None


# --- the scheduler ---------------------------------------------------------------------


async def test_the_scheduler_samples_every_configured_pair_on_its_interval() -> None:
    cfg = make_config()
    store = ResultStore(cfg)
    runs: list[tuple[str, str]] = []

    async def fake_probe(target: Target, route: Route, ctx: ProbeContext) -> ProbeResult:
        return ProbeResult(target.name, route.name, Outcome.OK, time.time(), 0.001, {Phase.CONNECT: 0.001})

    async def fake_path(target: Target, route: Route, ctx: ProbeContext) -> PathResult:
        runs.append((target.name, route.name))
        return path_result(target.name, route.name, (0.002, 0.003, 0.004), lost=1)

    ctx = ProbeContext(cfg)
    scheduler = Scheduler(cfg, ctx, store, probe_fn=fake_probe, path_fn=fake_path)
    assert scheduler.job_ids() >= {path_job_id("sampled", "direct"), path_job_id("sampled", "lo2")}
    assert not any(j.startswith("path:plain") for j in scheduler.job_ids())
    scheduler.start()
    try:
        await asyncio.sleep(1.0)
    finally:
        await scheduler.shutdown()
        await ctx.close()
    assert 2 <= runs.count(("sampled", "direct")) <= 4  # every 300 ms for 1 s
    assert 2 <= runs.count(("sampled", "lo2")) <= 4
    history = store.path("sampled", "lo2")
    assert history is not None and history.lost_total == runs.count(("sampled", "lo2"))
    assert store.lag.count >= len(runs)  # the lag histogram covers path runs too


async def test_a_sampler_that_raises_is_an_error_of_the_run() -> None:
    cfg = make_config()
    store = ResultStore(cfg)

    async def broken(target: Target, route: Route, ctx: ProbeContext) -> PathResult:
        raise RuntimeError("bug")

    ctx = ProbeContext(cfg)
    scheduler = Scheduler(cfg, ctx, store, path_fn=broken)
    try:
        await scheduler._run_path("sampled", "direct")
    finally:
        await ctx.close()
    history = store.path("sampled", "direct")
    assert history is not None and history.latest is not None
    assert (history.latest.sent, history.latest.lost, history.latest.error) == (0, 0, "RuntimeError: bug")


def test_removing_path_removes_the_jobs() -> None:
    async def main() -> None:
        cfg = make_config()
        ctx = ProbeContext(cfg)
        scheduler = Scheduler(cfg, ctx, ResultStore(cfg))
        changes = scheduler.apply(make_config(path="null"))
        assert changes.removed == 2
        assert probe_job_id("sampled", "direct") in scheduler.job_ids()
        assert path_job_id("sampled", "direct") not in scheduler.job_ids()
        await ctx.close()

    asyncio.run(main())


# --- ranking ---------------------------------------------------------------------------


def ok_runs(seconds: float, n: int = 20) -> list[ProbeResult]:
    return [ProbeResult("t", "x", Outcome.OK, 0.0, seconds, {Phase.CONNECT: seconds}) for _ in range(n)]


def candidate(route: str, seconds: float, path_p90: float, lost: int, sent: int = 100) -> Candidate:
    return Candidate("t", route, ok_runs(seconds), 10.0, PathStats(sent, lost, path_p90))


@settings(max_examples=300, deadline=None)
@given(
    request=st.floats(1e-5, 2.0),  # loopback-fast to cross-border-slow: hysteresis must not save the lossy
    path_p90=st.floats(0.0, 0.5),
    ratio=st.floats(1 / 1.2, 1.2),
    path_ratio=st.floats(1 / 1.2, 1.2),
    lossy_leads=st.booleans(),
    lossy_first=st.booleans(),
)
def test_a_route_with_10_percent_loss_never_ranks_above_a_clean_one_of_similar_latency(
    request: float, path_p90: float, ratio: float, path_ratio: float, lossy_leads: bool, lossy_first: bool
) -> None:
    """Similar: the clean route's request and path p90 within 20% of the lossy one's; either may hold rank 1."""
    lossy = candidate("lossy", request, path_p90, lost=10)
    clean = candidate("clean", request * ratio, path_p90 * path_ratio, lost=0)
    order = [lossy, clean] if lossy_first else [clean, lossy]
    leader = ("t", "lossy") if lossy_leads else ("t", "clean")
    ranked = ranking.rank(order, leader)
    assert [r.route for r in ranked] == ["clean", "lossy"]


@pytest.mark.parametrize(
    ("lossy", "clean", "first"),
    [
        pytest.param((0.050, 0.040, 2), (0.060, 0.045, 0), "clean", id="10pct-loss-vs-20pct-slower"),
        pytest.param((0.050, 0.040, 0), (0.051, 0.041, 0), "lossy", id="no-loss-either-faster-wins"),
        pytest.param((0.050, 0.040, 1), (0.150, 0.120, 0), "lossy", id="5pct-loss-vs-3x-slower"),
    ],
)
def test_loss_against_latency(lossy: tuple[float, float, int], clean: tuple[float, float, int], first: str) -> None:
    a = Candidate("t", "lossy", ok_runs(lossy[0]), 10.0, PathStats(20, lossy[2], lossy[1]))
    b = Candidate("t", "clean", ok_runs(clean[0]), 10.0, PathStats(20, clean[2], clean[1]))
    assert ranking.rank([a, b])[0].route == first


def test_the_score_adds_path_p90_and_weighs_loss() -> None:
    (r,) = ranking.rank([Candidate("t", "x", ok_runs(0.1), 10.0, PathStats(20, 2, 0.05))])
    assert r.score == pytest.approx((0.1 + 0.05) * (1 + 6 * 0.1))
    doc: dict[str, Any] = r.to_json()
    assert (doc["path_loss"], doc["path_p90_seconds"]) == (0.1, 0.05)
    (plain,) = ranking.rank([Candidate("t", "x", ok_runs(0.1), 10.0)])
    assert plain.score == pytest.approx(0.1) and "path_loss" not in plain.to_json()


# --- metrics and the table ---------------------------------------------------------------


def test_path_series_only_where_configured() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from probe.exporter.metrics import render

    cfg = make_config()
    store = ResultStore(cfg)
    store.record_path(path_result("sampled", "direct", (0.010, 0.030, 0.020), lost=1))
    samples = {
        (s.name, s.labels.get("target"), s.labels.get("route"), s.labels.get("stat")): s.value
        for family in text_string_to_metric_families(render(store, cfg).decode())
        for s in family.samples
        if s.name.startswith("probe_path_")
    }
    assert samples == {
        ("probe_path_sent_total", "sampled", "direct", None): 4.0,
        ("probe_path_lost_total", "sampled", "direct", None): 1.0,
        ("probe_path_sent_total", "sampled", "lo2", None): 0.0,  # configured, not yet run: counters from 0
        ("probe_path_lost_total", "sampled", "lo2", None): 0.0,
        ("probe_path_rtt_seconds", "sampled", "direct", "min"): 0.010,
        ("probe_path_rtt_seconds", "sampled", "direct", "p50"): 0.020,
        ("probe_path_rtt_seconds", "sampled", "direct", "p90"): 0.030,
        ("probe_path_rtt_seconds", "sampled", "direct", "max"): 0.030,
        ("probe_path_jitter_seconds", "sampled", "direct", None): pytest.approx(0.015),
    }


def test_the_once_table_has_loss_and_p50_when_a_path_ran() -> None:
    from probe.output import results_table

    probe = ProbeResult("sampled", "direct", Outcome.OK, 0.0, 0.01, {Phase.CONNECT: 0.01}, address="127.0.0.1")
    lossy = dataclasses.replace(probe, path=path_result("sampled", "direct", (0.010, 0.0125, 0.020), lost=1))
    failed = dataclasses.replace(probe, route="lo2", path=PathResult("sampled", "lo2", PathMethod.TCP, 0.0, 0, 0,
                                                                     error="cannot send from 127.0.0.2"))
    plain = dataclasses.replace(probe, target="plain")
    lines = results_table([lossy, failed, plain], color=False).splitlines()
    assert lines[0].split() == ["TARGET", "ROUTE", "OUTCOME", "TIME", "LOSS", "P50", "ADDRESS", "DETAIL"]
    assert lines[1].split()[5:9] == ["1/4", "25%", "12.5", "ms"]
    assert lines[2].split()[5:7] == ["error", "-"]
    assert lines[3].split()[5:7] == ["-", "-"]
    assert "LOSS" not in results_table([plain], color=False)


def test_a_lossy_leader_loses_rank_1_even_when_the_gap_is_below_the_switch_margin() -> None:
    # 50 us against 40 us: far under SWITCH_SECONDS, yet 20% loss against none moves rank 1.
    lossy = Candidate("t", "lossy", ok_runs(0.00004), 10.0, PathStats(100, 20, 0.00002))
    clean = Candidate("t", "clean", ok_runs(0.00005), 10.0, PathStats(100, 0, 0.00002))
    assert [r.route for r in ranking.rank([lossy, clean], leader=("t", "lossy"))] == ["clean", "lossy"]
    # Both clean: the leader keeps rank 1 against a challenger that is not clearly better.
    steady = Candidate("t", "steady", ok_runs(0.00005), 10.0, PathStats(100, 0, 0.00002))
    assert [r.route for r in ranking.rank([clean, steady], leader=("t", "steady"))] == ["steady", "clean"]


# --- time of day ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timezone", "utc", "hour"),
    [
        ("Asia/Shanghai", (2026, 1, 15, 11, 30), 19),
        ("Asia/Shanghai", (2026, 1, 15, 16, 30), 0),  # past midnight there, the same day in UTC
        ("Europe/Berlin", (2026, 1, 15, 11, 30), 12),  # CET
        ("Europe/Berlin", (2026, 7, 15, 11, 30), 13),  # CEST: DST comes from the zone
        ("UTC", (2026, 7, 15, 11, 30), 11),
    ],
)
def test_local_hour_of_the_vantage(timezone: str, utc: tuple[int, ...], hour: int) -> None:
    from datetime import UTC, datetime

    from probe.exporter.metrics import local_hour

    assert local_hour(timezone, datetime(*utc, tzinfo=UTC)) == hour


def test_the_local_hour_is_exported_once_with_the_configured_zone() -> None:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from prometheus_client.parser import text_string_to_metric_families

    from probe.exporter.metrics import render, render_target

    cfg = loads("vantage: v\ntimezone: Asia/Shanghai\ntargets:\n  - {name: a, address: '127.0.0.1:9'}\n")
    before = datetime.now(ZoneInfo("Asia/Shanghai")).hour
    samples = [s for f in text_string_to_metric_families(render(ResultStore(cfg), cfg).decode()) for s in f.samples
               if s.name == "probe_vantage_local_hour_info"]
    after = datetime.now(ZoneInfo("Asia/Shanghai")).hour
    assert len(samples) == 1 and samples[0].value == 1.0
    assert samples[0].labels["vantage"] == "v" and samples[0].labels["timezone"] == "Asia/Shanghai"
    assert int(samples[0].labels["hour"]) in {before, after}
    assert b"probe_vantage_local_hour_info" not in render_target(ResultStore(cfg), cfg, "a")  # /probe: pairs only
