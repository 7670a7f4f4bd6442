"""Run every (target, route) probe and every target's DNS check on its interval.

APScheduler 3 decides *when*; a small executor runs each job as an asyncio task it
tracks, so removed jobs and shutdown cancel and await their probes, and so each run
knows its planned time for the lag histogram. A global semaphore bounds concurrency.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.executors.base import BaseExecutor
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.base import STATE_PAUSED, STATE_RUNNING
from apscheduler.triggers.interval import IntervalTrigger

from probe.config import Config, Route, Target
from probe.context import ProbeContext
from probe.locate import Locator
from probe.models import DnsResult, PathResult, ProbeResult
from probe.probers.path import run as sample_path
from probe.runner import DnsFn, ProbeFn, check_dns, guarded_dns, guarded_probe, run_probe, run_round
from probe.store import ResultStore

PathFn = Callable[[Target, Route, ProbeContext], Awaitable[PathResult]]

DEFAULT_CONCURRENCY = 256
# Runs start on a 50 ms grid: the pairs whose places in the interval fall in one slot start
# together, so the loop wakes 20 times a second instead of once per probe. A lone wake-up per
# probe cost ~25% more CPU per HTTPS probe at 300/s (a cold cache each time: docs/benchmarks.md).
START_GRID_SECONDS = 0.05
CLOCK_CHECK_SECONDS = 1.0  # how often the wall clock is compared with the monotonic one
CLOCK_STEP_SECONDS = 1.0  # a jump of the difference larger than this is a step (NTP, VM resume, an admin)
# A reload's job switch yields to the loop after this much work: at 10,000 targets it held the
# loop 0.12-0.13 s in one go (probes in flight looked late); sliced, its longest step was 7-12 ms
# (docs/benchmarks.md, "Reload: switching the jobs in slices").
SWITCH_SLICE_SECONDS = 0.005

log = logging.getLogger("probe")
_planned_at: ContextVar[float | None] = ContextVar("planned_at", default=None)


def probe_job_id(target: str, route: str) -> str:
    """Return the job id of one (target, route) probe."""
    return f"probe:{target}:{route}"


def path_job_id(target: str, route: str) -> str:
    """Return the job id of one (target, route)'s path sampling."""
    return f"path:{target}:{route}"


def dns_job_id(target: str) -> str:
    """Return the job id of one target's DNS check."""
    return f"dns:{target}"


def spread(job_id: str) -> float:
    """Return a stable fraction in [0, 1) that places a job's runs within its interval."""
    digest = hashlib.blake2b(job_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def start_offset(job_id: str, interval: float) -> float:
    """Return where in its interval a job runs: its spread, rounded down to the start grid.

    Intervals of less than four grid slots keep the exact spread.
    """
    offset = spread(job_id) * interval
    if interval >= 4 * START_GRID_SECONDS:
        offset = math.floor(offset / START_GRID_SECONDS) * START_GRID_SECONDS
    return offset


class _TaskExecutor(BaseExecutor):  # type: ignore[misc]  # apscheduler is untyped
    """Run coroutine jobs as tracked tasks; the planned run time goes into a context variable."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks: dict[str, set[asyncio.Task[None]]] = {}
        # The slot each job should run at next. Coalescing hands over only the *latest* missed
        # slot; the lag is measured from the earliest one, so a stalled loop or an overlong
        # previous run shows as the delay it really caused.
        self._due: dict[str, datetime] = {}
        # Closed while the job set is being switched (Scheduler.switch): no run starts until the
        # new set and its config are in place together.
        self.gate = asyncio.Event()
        self.gate.set()

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        run_time = run_times[-1]
        due = self._due.get(job.id)
        planned = due if due is not None and due < run_time else run_time
        interval = getattr(job.trigger, "interval", None)
        if isinstance(interval, timedelta):
            self._due[job.id] = run_time + interval
        task = asyncio.get_running_loop().create_task(self._run(job, run_time, planned), name=job.id)
        self.tasks.setdefault(job.id, set()).add(task)
        task.add_done_callback(lambda t: self._finished(job.id, t))

    async def _run(self, job: Any, run_time: datetime, planned: datetime) -> None:
        late = (datetime.now(UTC) - run_time).total_seconds()
        if job.misfire_grace_time is not None and late > job.misfire_grace_time:
            log.warning("%s: run skipped, %.1f s late", job.id, late)
            return
        await self.gate.wait()
        _planned_at.set(planned.timestamp())
        await job.func(*job.args, **job.kwargs)

    def forget(self, job_id: str) -> None:
        """Drop what is known of a job's next slot (it was removed or rescheduled)."""
        self._due.pop(job_id, None)

    def _finished(self, job_id: str, task: asyncio.Task[None]) -> None:
        running = self.tasks.get(job_id, set())
        running.discard(task)
        if not running:
            self.tasks.pop(job_id, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s: job failed: %s: %s", job_id, type(exc).__name__, exc, exc_info=exc)
        self._run_job_success(job_id, [])  # releases the max_instances slot

    def cancel(self, job_id: str) -> list[asyncio.Task[None]]:
        """Cancel the runs of one job; return their tasks."""
        tasks = list(self.tasks.get(job_id, ()))
        for task in tasks:
            task.cancel()
        return tasks

    def cancel_all(self) -> list[asyncio.Task[None]]:
        """Cancel every run; return their tasks."""
        return [task for job_id in list(self.tasks) for task in self.cancel(job_id)]

    def shutdown(self, wait: bool = True) -> None:
        self.cancel_all()


@dataclasses.dataclass(frozen=True, slots=True)
class JobChanges:
    """What apply() did to the job set."""

    before: int
    added: int
    removed: int
    rescheduled: int

    def __str__(self) -> str:
        after = self.before + self.added - self.removed
        return f"{after} jobs ({self.added} added, {self.removed} removed, {self.rescheduled} rescheduled)"


@dataclasses.dataclass(frozen=True, slots=True)
class _JobSpec:
    interval: float
    func: Callable[..., Awaitable[None]]
    args: tuple[str, ...]


class Scheduler:
    """Probe every configured pair and check every target's DNS on its interval; results go to the store."""

    def __init__(
        self,
        config: Config,
        ctx: ProbeContext,
        store: ResultStore,
        *,
        probe_fn: ProbeFn | None = None,
        dns_fn: DnsFn | None = None,
        path_fn: PathFn | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        wall_clock: Callable[[], float] = time.time,
        locator: Locator | None = None,
    ) -> None:
        self.config = config
        self.ctx = ctx
        self.store = store
        self._probe_fn = probe_fn or run_probe
        self._dns_fn = dns_fn or check_dns
        self._path_fn = path_fn or sample_path
        self.concurrency = concurrency
        self._limit = asyncio.Semaphore(concurrency)
        self._executor = _TaskExecutor()
        aps_logger = logging.getLogger("probe.apscheduler")
        if aps_logger.level == logging.NOTSET:
            aps_logger.setLevel(logging.WARNING)  # one "Added job" line per pair is noise
        self._aps = AsyncIOScheduler(
            timezone=UTC, executors={"default": self._executor}, logger=aps_logger
        )
        self._intervals: dict[str, float] = {}
        self._wall_clock = wall_clock
        self._clock_watch: asyncio.Task[None] | None = None
        self.clock_steps = 0
        # Localisations after a block (probe/locate); the service passes one that outlives reloads.
        self.locator = locator or Locator(wait_residual=True)
        self._locating: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._switching = asyncio.Lock()
        self._realign_due = False  # the clock stepped during a switch: realign once it is done
        self._apply(config)

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Start scheduling (inside the running event loop)."""
        self._aps.start()
        self._clock_watch = asyncio.get_running_loop().create_task(self._watch_clock(), name="clock-watch")
        log.info("scheduler started: %d jobs, concurrency %d", len(self._intervals), self.concurrency)

    async def shutdown(self) -> None:
        """Stop scheduling, cancel in-flight probes and wait for them to end."""
        if self._clock_watch is not None:
            self._clock_watch.cancel()
            await asyncio.gather(self._clock_watch, return_exceptions=True)
            self._clock_watch = None
        if self._aps.running:
            self._aps.shutdown(wait=False)
            while self._aps.running:  # AsyncIOScheduler stops in a loop callback
                await asyncio.sleep(0)
        tasks = self._executor.cancel_all() + list(self._locating.values())
        for task in self._locating.values():
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def apply(self, config: Config, ctx: ProbeContext | None = None) -> JobChanges:
        """Switch to `config` (and `ctx`) in one go: add new jobs, remove gone ones, reschedule changed intervals."""
        changes = self._apply(config)
        self.config = config
        if ctx is not None:
            self.ctx = ctx
        return changes

    async def switch(self, config: Config, ctx: ProbeContext | None = None) -> JobChanges:
        """Switch to `config` (and `ctx`) like apply(), yielding to the loop every SWITCH_SLICE_SECONDS.

        Atomic for runs: no scheduled run starts while the job set is between the two configs
        (APScheduler is paused and the executor's gate closed; runs already due wait at the gate),
        and the config, the context and the complete job set take effect in one step at the end.
        Runs in flight go on, and a gone job's are cancelled as before. If the switch fails
        half-way, the old job set is restored and the running config stays.
        """
        async with self._switching:
            pause = self._aps.state == STATE_RUNNING
            if pause:
                self._aps.pause()
            self._executor.gate.clear()
            before = len(self._intervals)
            counts = [0, 0, 0]
            try:
                wanted: dict[str, _JobSpec] = {}
                await _sliced(self._collect(config, wanted))
                await _sliced(self._changes(wanted, counts))
                await asyncio.sleep(0)  # the commit below, and the caller's own steps after it, start a fresh slice
            except BaseException:
                if self._aps.running:  # (not when cancelled by shutdown: no jobs are wanted any more)
                    for _ in self._changes(self._wanted(self.config), [0, 0, 0]):
                        pass  # back to the running config's jobs, in one go: a failed switch is rare
                raise
            else:
                self.config = config
                if ctx is not None:
                    self.ctx = ctx
            finally:
                self._executor.gate.set()
                if pause and self._aps.state == STATE_PAUSED:
                    self._aps.resume()
                if self._realign_due:
                    self.realign()
            return JobChanges(before, *counts)

    def _apply(self, config: Config) -> JobChanges:
        before, counts = len(self._intervals), [0, 0, 0]
        for _ in self._changes(self._wanted(config), counts):
            pass
        return JobChanges(before, *counts)

    # --- inspection -----------------------------------------------------------------

    def job_ids(self) -> frozenset[str]:
        """Return the ids of the scheduled jobs."""
        return frozenset(self._intervals)

    def next_run_time(self, job_id: str) -> float | None:
        """Return when a job runs next, unix seconds; None if unknown or not started."""
        job = self._aps.get_job(job_id)
        when = getattr(job, "next_run_time", None) if job is not None else None
        return when.timestamp() if isinstance(when, datetime) else None

    def job_options(self, job_id: str) -> dict[str, Any]:
        """Return max_instances, coalesce and misfire_grace_time of a job."""
        job = self._aps.get_job(job_id)
        if job is None:
            raise KeyError(job_id)
        return {k: getattr(job, k) for k in ("max_instances", "coalesce", "misfire_grace_time")}

    # --- running --------------------------------------------------------------------

    async def run_target(self, name: str) -> list[ProbeResult]:
        """Probe one configured target now over all its routes, its DNS check first (the one round); record."""
        config, ctx = self.config, self.ctx
        target = _find_target(config, name)
        if target is None:
            raise KeyError(name)
        return await run_round(
            config, ctx, [target], on_result=self.store.record, on_dns=self._record_dns, limit=self._limit,
            probe_fn=self._probe_fn, dns_fn=self._dns_fn,
        )

    def _record_dns(self, target: Target, checks: tuple[DnsResult, ...]) -> None:
        self.store.record_dns(target.name, checks)

    async def _run_pair(self, target_name: str, route_name: str) -> None:
        config, ctx = self.config, self.ctx
        target = _find_target(config, target_name)
        if target is None or route_name not in target.routes:
            return
        if (target_name, route_name) in self._locating:
            return  # its localisation runs or waits out a residual block, which a probe would renew
        async with self._limit:
            self._record_lag()
            result = await self._probe(target, config.route(route_name), ctx)
        self.store.record(result)
        log.debug("%s/%s: %s in %.3f s", target.name, route_name, result.outcome, result.duration_seconds)
        if self.locator.wanted(target, result):
            self._start_locate(target, config.route(route_name), result)

    def _start_locate(self, target: Target, route: Route, result: ProbeResult) -> None:
        pair = (target.name, route.name)
        if not result.dns:  # the DNS check runs as its own job: its latest says which resolver saw forgeries
            result = dataclasses.replace(result, dns=self.store.dns(target.name))

        async def run() -> None:
            found = await self.locator.locate(target, route, result, self.config, self.ctx)
            self.store.record_locate(target.name, route.name, found)
            log.info("%s/%s: localisation: hop %s (%s)", target.name, route.name, found.hop,
                     found.deferred or "; ".join(found.evidence[:1]))

        task = asyncio.get_running_loop().create_task(run(), name=f"locate:{target.name}:{route.name}")
        self._locating[pair] = task
        task.add_done_callback(lambda _: self._locating.pop(pair, None))

    async def _run_path(self, target_name: str, route_name: str) -> None:
        # Outside the probe semaphore: a run lasts `spread` and holds one socket per sample in
        # flight; the config caps the samples a second (PATH_MAX_RATE), not a slot count.
        config, ctx = self.config, self.ctx
        target = _find_target(config, target_name)
        if target is None or target.path is None or route_name not in target.routes:
            return
        self._record_lag()
        started = time.time()
        try:
            result = await self._path_fn(target, config.route(route_name), ctx)
        except Exception as e:  # a sampler bug: an error of this run, never loss
            log.exception("%s/%s: path sampling raised", target.name, route_name)
            result = PathResult(target.name, route_name, target.path.method, started, 0, 0,
                                error=f"{type(e).__name__}: {e}")
        self.store.record_path(result)

    async def _run_dns(self, target_name: str) -> None:
        config, ctx = self.config, self.ctx
        target = _find_target(config, target_name)
        if target is None or not target.needs_dns:
            return
        async with self._limit:
            self._record_lag()
            checks = await self._check_dns(target, ctx)
        self.store.record_dns(target.name, checks)

    def _record_lag(self) -> None:
        planned = _planned_at.get()
        if planned is not None:
            self.store.observe_lag(time.time() - planned)

    async def _probe(self, target: Target, route: Route, ctx: ProbeContext) -> ProbeResult:
        return await guarded_probe(target, route, ctx, self._probe_fn)

    async def _check_dns(self, target: Target, ctx: ProbeContext) -> tuple[DnsResult, ...]:
        return await guarded_dns(target, ctx, self._dns_fn)

    # --- clock steps ----------------------------------------------------------------

    async def _watch_clock(self) -> None:
        # APScheduler plans in wall-clock time: after a step back by an hour it would wait an
        # hour, after a step forward every job would fire at once. The monotonic clock does not
        # step, so a change of (wall - monotonic) is a step: then every job is planned afresh.
        offset = self._wall_clock() - time.monotonic()
        while True:
            await asyncio.sleep(CLOCK_CHECK_SECONDS)
            now = self._wall_clock() - time.monotonic()
            if abs(now - offset) > CLOCK_STEP_SECONDS:
                log.warning("wall clock stepped by %+.1f s; replanning %d jobs", now - offset, len(self._intervals))
                self.realign()
            offset = now

    def realign(self) -> None:
        """Plan every job's next run afresh from the current wall clock (after the clock stepped)."""
        if self._switching.locked():
            self._realign_due = True  # the job set is half-switched: switch() realigns when it is done
            return
        self._realign_due = False
        self.clock_steps += 1
        for job_id, interval in self._intervals.items():
            self._aps.reschedule_job(job_id, trigger=self._trigger(job_id, interval))
            self._executor.forget(job_id)

    # --- jobs -----------------------------------------------------------------------

    def _wanted(self, config: Config) -> dict[str, _JobSpec]:
        jobs: dict[str, _JobSpec] = {}
        for _ in self._collect(config, jobs):
            pass
        return jobs

    def _collect(self, config: Config, jobs: dict[str, _JobSpec]) -> Iterator[None]:
        """Fill `jobs` with the job set `config` wants, one target per step."""
        for t in config.targets:
            for r in t.routes:
                jobs[probe_job_id(t.name, r)] = _JobSpec(t.interval, self._run_pair, (t.name, r))
                if t.path is not None:
                    jobs[path_job_id(t.name, r)] = _JobSpec(t.interval, self._run_path, (t.name, r))
            if t.needs_dns:
                jobs[dns_job_id(t.name)] = _JobSpec(t.interval, self._run_dns, (t.name,))
            yield

    def _changes(self, wanted: dict[str, _JobSpec], counts: list[int]) -> Iterator[None]:
        """Make the job set `wanted`, one job per step; count [added, removed, rescheduled] into `counts`."""
        gone = [job_id for job_id in self._intervals if job_id not in wanted]
        yield
        for job_id in gone:
            self._aps.remove_job(job_id)
            self._executor.cancel(job_id)
            self._executor.forget(job_id)
            del self._intervals[job_id]
            counts[1] += 1
            yield
        for job_id, spec in wanted.items():
            old = self._intervals.get(job_id)
            if old is None:
                self._aps.add_job(
                    spec.func, trigger=self._trigger(job_id, spec.interval), args=spec.args, id=job_id,
                    name=job_id, max_instances=1, coalesce=True, misfire_grace_time=_grace(spec.interval),
                )
                counts[0] += 1
            elif old != spec.interval:
                self._aps.modify_job(job_id, misfire_grace_time=_grace(spec.interval))
                self._aps.reschedule_job(job_id, trigger=self._trigger(job_id, spec.interval))
                self._executor.forget(job_id)
                counts[2] += 1
            self._intervals[job_id] = spec.interval
            yield

    @staticmethod
    def _trigger(job_id: str, interval: float) -> IntervalTrigger:
        # Anchored on the epoch plus a stable fraction of the interval: the runs of many
        # jobs spread over the interval, and a job keeps its phase across restarts and reloads.
        anchor = datetime.fromtimestamp(start_offset(job_id, interval), tz=UTC)
        return IntervalTrigger(seconds=interval, start_date=anchor, timezone=UTC)


async def _sliced(steps: Iterator[None]) -> None:
    """Run `steps` to the end, yielding to the loop whenever SWITCH_SLICE_SECONDS of work have passed."""
    began = time.perf_counter()
    for _ in steps:
        if time.perf_counter() - began >= SWITCH_SLICE_SECONDS:
            await asyncio.sleep(0)
            began = time.perf_counter()


def _grace(interval: float) -> int:
    return max(1, math.ceil(interval))


def _find_target(config: Config, name: str) -> Target | None:
    try:
        return config.target(name)
    except KeyError:
        return None
