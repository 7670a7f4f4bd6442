"""The scheduler with fake probe functions: spreading, overlap, coalescing, bounds, lag, reloads."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from probe import scheduler as scheduler_module
from probe.config import Config, Route, Target, loads
from probe.context import ProbeContext
from probe.models import Deadline, DnsResult, Outcome, ProbeResult
from probe.scheduler import START_GRID_SECONDS, Scheduler, dns_job_id, probe_job_id, spread, start_offset
from probe.store import ResultStore


@pytest.fixture(autouse=True)
def _no_vantage_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROBE_VANTAGE", raising=False)


def make_config(n: int = 1, interval: str = "200ms", routes: int = 1, extra: str = "") -> Config:
    route_names = ["direct"] + [f"r{i}" for i in range(1, routes)]
    route_defs = "".join(f"  - {{name: r{i}, source_address: 127.0.0.1}}\n" for i in range(1, routes))
    targets = "".join(
        f"  - {{name: t{i}, address: '127.0.0.1:{1000 + i}', routes: [{', '.join(route_names)}]}}\n"
        for i in range(n)
    )
    return loads(
        f"vantage: v\ndefaults: {{interval: {interval}}}\nroutes:\n  - {{name: direct}}\n{route_defs}"
        f"targets:\n{targets}{extra}"
    )


class FakeProbe:
    """Counts calls and concurrency; sleeps `delay` (or forever with delay None)."""

    def __init__(self, delay: float | None = 0.0, outcome: Outcome = Outcome.OK) -> None:
        self.delay, self.outcome = delay, outcome
        self.calls: Counter[tuple[str, str]] = Counter()
        self.active: Counter[tuple[str, str]] = Counter()
        self.max_active_per_pair = 0
        self.total_active = self.max_total_active = 0
        self.cancelled = 0

    async def __call__(self, target: Target, route: Route, ctx: ProbeContext) -> ProbeResult:
        pair = (target.name, route.name)
        self.calls[pair] += 1
        self.active[pair] += 1
        self.total_active += 1
        self.max_active_per_pair = max(self.max_active_per_pair, self.active[pair])
        self.max_total_active = max(self.max_total_active, self.total_active)
        try:
            if self.delay is None:
                await asyncio.Event().wait()
            else:
                await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active[pair] -= 1
            self.total_active -= 1
        return ProbeResult(target.name, route.name, self.outcome, time.time(), self.delay or 0.0)


async def no_dns(target: Target, deadline: Deadline, ctx: ProbeContext) -> tuple[DnsResult, ...]:
    return tuple(DnsResult(r, Outcome.OK, ("198.51.100.1",), replies=1) for r in target.resolvers)


@asynccontextmanager
async def running(
    config: Config, probe: Callable[..., object], concurrency: int = 256, start: bool = True
) -> AsyncIterator[Scheduler]:
    store = ResultStore(config)
    ctx = ProbeContext(config)
    scheduler = Scheduler(config, ctx, store, probe_fn=probe, dns_fn=no_dns,  # type: ignore[arg-type]
                          concurrency=concurrency)
    if start:
        scheduler.start()
    try:
        yield scheduler
    finally:
        await scheduler.shutdown()
        await ctx.close()


async def wait_for(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_start_times_spread_over_the_interval_deterministically() -> None:
    config = make_config(n=40, interval="10s")
    before = time.time()
    async with running(config, FakeProbe()) as scheduler:
        after = time.time()
        next_runs = {job_id: scheduler.next_run_time(job_id) for job_id in scheduler.job_ids()}
    assert len(next_runs) == 40
    for job_id, at in next_runs.items():
        assert at is not None and before <= at <= after + 10.0
        assert at % 10.0 == pytest.approx(start_offset(job_id, 10.0), abs=1e-3)  # stable phase per job
    slots = {int((at or 0) % 10.0) for at in next_runs.values()}
    assert len(slots) >= 8, "runs should spread over the interval, not start at once"
    async with running(config, FakeProbe()) as again:
        for job_id, at in next_runs.items():
            again_at = again.next_run_time(job_id)
            assert again_at is not None and at is not None
            assert (again_at - at) % 10.0 == pytest.approx(0.0, abs=1e-3) or (again_at - at) % 10.0 == (
                pytest.approx(10.0, abs=1e-3))


def test_start_offsets_lie_on_the_grid_within_one_slot_of_the_spread() -> None:
    for i in range(200):
        job_id = probe_job_id(f"t{i}", "direct")
        offset = start_offset(job_id, 30.0)
        slots = offset / START_GRID_SECONDS
        assert slots == pytest.approx(round(slots), abs=1e-6)  # on the grid: jobs of one slot start together
        assert 0.0 <= spread(job_id) * 30.0 - offset < START_GRID_SECONDS
    # An interval of a few slots keeps the exact spread (rounding would bunch every job at 0).
    assert start_offset("probe:t0:direct", 0.1) == spread("probe:t0:direct") * 0.1


async def test_jobs_of_one_grid_slot_start_together() -> None:
    probe = FakeProbe()
    config = make_config(n=60, interval="1s")  # 60 jobs in 20 slots: most slots hold several
    async with running(config, probe) as scheduler:
        planned = {job_id: scheduler.next_run_time(job_id) for job_id in scheduler.job_ids()}
    distinct = {round(at or 0.0, 3) for at in planned.values()}
    assert len(distinct) <= round(1.0 / START_GRID_SECONDS) + 1 < len(planned)  # 20 slots in the next second, or 21


async def test_a_pair_never_overlaps_when_the_probe_outlasts_its_interval() -> None:
    probe = FakeProbe(delay=0.45)
    async with running(make_config(interval="100ms"), probe) as scheduler:
        await asyncio.sleep(1.2)
        assert scheduler.job_options(probe_job_id("t0", "direct")) == {
            "max_instances": 1, "coalesce": True, "misfire_grace_time": 1}
    assert probe.max_active_per_pair == 1
    assert 2 <= probe.calls[("t0", "direct")] <= 3


async def test_runs_missed_while_the_loop_stalled_coalesce_into_one() -> None:
    probe = FakeProbe()
    async with running(make_config(interval="100ms"), probe):
        await wait_for(lambda: probe.calls[("t0", "direct")] >= 1)
        before = probe.calls[("t0", "direct")]
        time.sleep(0.6)  # block the loop: six planned runs pass
        await asyncio.sleep(0.02)
        after = probe.calls[("t0", "direct")]
    assert 1 <= after - before <= 2


async def test_global_concurrency_bound_holds() -> None:
    probe = FakeProbe(delay=0.1)
    async with running(make_config(n=10, interval="100ms"), probe, concurrency=3):
        await asyncio.sleep(0.6)
    assert probe.max_total_active == 3
    assert sum(probe.calls.values()) >= 6


async def test_lag_from_the_planned_time_is_recorded() -> None:
    probe = FakeProbe(delay=0.05)
    async with running(make_config(n=6, interval="100ms"), probe, concurrency=1) as scheduler:
        await wait_for(lambda: scheduler.store.lag.count >= 6)
    lag = scheduler.store.lag
    assert lag.sum > 0.05  # with one slot, most runs waited behind others
    assert all(n >= 0 for n in lag.counts)


async def test_results_and_dns_checks_go_to_the_store() -> None:
    config = loads("""
vantage: v
defaults: {interval: 100ms}
resolvers: [{name: system, type: system}, {name: ali, type: udp, address: 127.0.0.1}]
targets:
  - {name: named, address: "svc.example:443"}
  - {name: literal, address: "127.0.0.1:443"}
""")
    probe = FakeProbe()
    async with running(config, probe) as scheduler:
        assert scheduler.job_ids() == {probe_job_id("named", "direct"), probe_job_id("literal", "direct"),
                                       dns_job_id("named")}
        store = scheduler.store
        await wait_for(lambda: len(store.results()) == 2 and bool(store.dns("named")))
    assert [d.resolver for d in store.dns("named")] == ["system", "ali"]
    assert store.dns("literal") == ()


async def test_a_raising_probe_is_recorded_as_error() -> None:
    async def broken(target: Target, route: Route, ctx: ProbeContext) -> ProbeResult:
        raise RuntimeError("bug in a prober")

    async def broken_dns(target: Target, deadline: Deadline, ctx: ProbeContext) -> tuple[DnsResult, ...]:
        raise NotImplementedError

    config = loads("vantage: v\ndefaults: {interval: 100ms}\ntargets: [{name: t, address: 'x.example:1'}]")
    store = ResultStore(config)
    ctx = ProbeContext(config)
    scheduler = Scheduler(config, ctx, store, probe_fn=broken, dns_fn=broken_dns)
    scheduler.start()
    try:
        await wait_for(lambda: store.latest("t", "direct") is not None and bool(store.dns("t")))
    finally:
        await scheduler.shutdown()
    latest = store.latest("t", "direct")
    assert latest is not None and latest.outcome is Outcome.ERROR
    assert latest.error == "RuntimeError: bug in a prober"
    assert {d.outcome for d in store.dns("t")} == {Outcome.ERROR}


async def test_shutdown_cancels_and_awaits_in_flight_probes() -> None:
    probe = FakeProbe(delay=None)
    async with running(make_config(n=3, interval="100ms"), probe):
        await wait_for(lambda: probe.total_active == 3)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 0.5
    assert probe.cancelled == 3 and probe.total_active == 0


async def test_apply_adds_removes_and_reschedules_jobs_without_restarting() -> None:
    config = make_config(n=3, interval="10s")
    probe = FakeProbe()
    async with running(config, probe) as scheduler:
        kept = probe_job_id("t0", "direct")
        kept_next = scheduler.next_run_time(kept)
        new = loads(
            "vantage: v\ndefaults: {interval: 10s}\ntargets:\n"
            "  - {name: t0, address: '127.0.0.1:1000'}\n"
            "  - {name: t1, address: '127.0.0.1:1001', interval: 20s}\n"
            "  - {name: t9, address: '127.0.0.1:1009'}\n"
        )
        changes = scheduler.apply(new)
        assert (changes.added, changes.removed, changes.rescheduled) == (1, 1, 1)
        assert str(changes) == "3 jobs (1 added, 1 removed, 1 rescheduled)"
        assert scheduler.job_ids() == {kept, probe_job_id("t1", "direct"), probe_job_id("t9", "direct")}
        assert scheduler.next_run_time(kept) == kept_next  # unchanged jobs keep their schedule
        t1_next = scheduler.next_run_time(probe_job_id("t1", "direct"))
        assert t1_next is not None and t1_next % 20.0 == pytest.approx(
            start_offset(probe_job_id("t1", "direct"), 20.0), abs=1e-3)
        assert scheduler.job_options(probe_job_id("t1", "direct"))["misfire_grace_time"] == 20
        assert scheduler.next_run_time(probe_job_id("t2", "direct")) is None


async def test_apply_cancels_in_flight_runs_of_removed_pairs() -> None:
    probe = FakeProbe(delay=None)
    async with running(make_config(n=2, interval="100ms"), probe) as scheduler:
        await wait_for(lambda: probe.total_active == 2)
        scheduler.apply(make_config(n=1, interval="100ms"))
        await wait_for(lambda: probe.cancelled == 1)
        assert probe.active[("t0", "direct")] == 1


async def test_run_target_probes_every_route_and_checks_dns_now() -> None:
    config = loads("""
vantage: v
routes: [{name: direct}, {name: b, source_address: 127.0.0.1}]
targets: [{name: t, address: "svc.example:443", routes: [direct, b], interval: 1h}]
""")
    probe = FakeProbe()
    async with running(config, probe, start=False) as scheduler:
        results = await scheduler.run_target("t")
        with pytest.raises(KeyError):
            await scheduler.run_target("nope")
    assert [(r.target, r.route) for r in results] == [("t", "direct"), ("t", "b")]
    assert all(r.dns and r.dns[0].resolver == "system" for r in results)
    assert scheduler.store.latest("t", "b") is not None


def named_config(names: list[str], interval: str = "100ms") -> Config:
    targets = "".join(f"  - {{name: {n}, address: '127.0.0.1:1'}}\n" for n in names)
    return loads(f"vantage: v\ndefaults: {{interval: {interval}}}\ntargets:\n{targets}")


async def test_switch_yields_to_the_loop_and_no_run_starts_with_a_half_switched_job_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reload's switch runs in slices; a run sees either the old config and jobs or the new ones, never a mix."""
    monkeypatch.setattr(scheduler_module, "SWITCH_SLICE_SECONDS", 0.0)  # yield after every job: the worst case
    old = named_config([f"old{i}" for i in range(150)] + [f"kept{i}" for i in range(150)])
    new = named_config([f"new{i}" for i in range(150)] + [f"kept{i}" for i in range(150)], interval="150ms")
    wanted = {id(c): frozenset(probe_job_id(t.name, "direct") for t in c.targets) for c in (old, new)}
    seen: list[tuple[str, bool, bool]] = []  # (target, config and jobs agree, a switch was under way)
    holder: list[Scheduler] = []

    async def probe(target: Target, route: Route, ctx: ProbeContext) -> ProbeResult:
        s = holder[0]
        agree = s.job_ids() == wanted[id(s.config)] and ctx is s.ctx and target in s.config.targets
        seen.append((target.name, agree, s._switching.locked()))
        return ProbeResult(target.name, route.name, Outcome.OK, time.time(), 0.0)

    async with running(old, probe) as scheduler:
        holder.append(scheduler)
        await wait_for(lambda: len(seen) >= 300)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        counting = asyncio.create_task(ticker())
        new_ctx = ProbeContext(new)
        started = len(seen)
        changes = await scheduler.switch(new, new_ctx)
        during, switched_at = ticks, len(seen)
        counting.cancel()
        await wait_for(lambda: sum(1 for name, _, _ in seen[switched_at:] if name.startswith("new")) >= 150)
        await new_ctx.close()
    assert (changes.added, changes.removed, changes.rescheduled) == (150, 150, 150)
    assert scheduler.config is new and scheduler.job_ids() == wanted[id(new)]
    assert during > 300, "the switch should have yielded to the loop between its steps"
    assert not [s for s in seen if not s[1]], [s for s in seen if not s[1]][:5]
    assert not [s for s in seen if s[2]], "a run started while the job set was being switched"
    assert seen[started:switched_at] == []  # runs that came due meanwhile waited for the switch to end
    assert not [name for name, _, _ in seen[switched_at:] if name.startswith("old")]


async def test_a_switch_that_fails_half_way_keeps_the_running_jobs_and_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler_module, "SWITCH_SLICE_SECONDS", 0.0)
    old = named_config([f"old{i}" for i in range(50)])
    new = named_config([f"new{i}" for i in range(50)])
    probe = FakeProbe()
    async with running(old, probe) as scheduler:
        before = scheduler.job_ids()
        real_add, added = scheduler._aps.add_job, 0

        def flaky_add(*args: object, **kwargs: object) -> object:
            nonlocal added
            added += 1
            if added > 20 and str(kwargs.get("id", "")).startswith("probe:new"):
                raise RuntimeError("jobstore broke")
            return real_add(*args, **kwargs)

        monkeypatch.setattr(scheduler._aps, "add_job", flaky_add)
        with pytest.raises(RuntimeError, match="jobstore broke"):
            await scheduler.switch(new, ProbeContext(new))
        monkeypatch.setattr(scheduler._aps, "add_job", real_add)
        assert scheduler.config is old and scheduler.job_ids() == before
        assert all(scheduler.next_run_time(j) is not None for j in before)
        calls = sum(probe.calls.values())
        await wait_for(lambda: sum(probe.calls.values()) >= calls + 50)  # resumed: the old jobs run on
    assert not [pair for pair in probe.calls if pair[0].startswith("new")]
