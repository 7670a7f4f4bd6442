"""Soak benchmark: the real scheduler at thousands of (target, route) pairs for a long time.

    .venv/bin/python -m bench.soak --minutes 30 --pairs 2000 --out docs/soak-figures.json

A child process serves loopback ports that randomly answer, fail (HTTP 500), reset, stall
past the probe timeout and recover (each port changes its mood every few seconds). This
process runs `probe.service.Service` (scheduler, store, probe contexts) with the real
probers against them and reloads a changed config every few seconds (targets added and
removed, intervals changed). Every `--sample` seconds it records its own RSS, open file
descriptors, asyncio tasks and the probes done. At the end it judges flatness after the
warm-up: RSS growth under 5 % and no growth of fds or tasks (medians of the first and the
last third compared, with a small slack for in-flight probes; for tasks, those that outlive
a few probe intervals, since a leaked task lives on while a busy loop's queued ones do not),
prints the table and a verdict, and exits 1 if not flat.

With `--hostile N`, N more targets point at hostile ports (endless 1-byte chunks, an endless
body, headers trickled one a second), and `--healthy N` targets (4 routes each) at a port
that always answers: every outcome of a healthy pair other than `ok` is a false outcome,
counted, and the verdict fails on any.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MOODS = ("ok", "ok", "ok", "fail", "reset", "stall", "close")
ROUTES = ("direct", "b1", "b2", "b3")


# --- the misbehaving servers (child process) -------------------------------------------


async def _one_byte_chunks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"1\r\nx\r\n" * 10000
    while True:
        writer.write(piece)
        await writer.drain()


async def _endless_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
    piece = b"x" * 65536
    while True:
        writer.write(piece)
        await writer.drain()


async def _trickled_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\n")
    for i in range(3600):
        writer.write(b"X-Slow-%d: 1\r\n" % i)
        await writer.drain()
        await asyncio.sleep(1)


HOSTILE = (_one_byte_chunks, _one_byte_chunks, _endless_body, _trickled_headers)


async def _serve(ports: int, stall: float, mood_seconds: float, seed: int, hostile: int) -> None:
    rng = random.Random(seed)
    moods: dict[int, str] = {}

    async def handle(index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mood = moods[index] if rng.random() < 0.8 else rng.choice(MOODS)
        try:
            if mood == "stall":
                await asyncio.sleep(stall)
            elif mood == "close":
                pass
            elif mood == "reset":
                writer.transport.abort()
                return
            else:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), stall)
                if head.startswith(b"GET"):
                    status = b"200 OK" if mood == "ok" else b"500 Internal Server Error"
                    writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 4\r\nConnection: close\r\n\r\npong")
                    await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        except asyncio.CancelledError:  # the child is stopping
            pass
        finally:
            writer.transport.abort()

    async def healthy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\npong")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()

    def hostile_handler(index: int) -> Any:
        behave = HOSTILE[index % len(HOSTILE)]

        async def handle_hostile(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                await behave(reader, writer)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.CancelledError):
                pass
            finally:
                writer.transport.abort()

        return handle_hostile

    servers = []
    for i in range(ports):
        moods[i] = "ok"
        server = await asyncio.start_server(functools.partial(handle, i), "127.0.0.1", 0, backlog=512)
        servers.append(server)
    good = await asyncio.start_server(healthy, "127.0.0.1", 0, backlog=512)
    bad = [await asyncio.start_server(hostile_handler(i), "127.0.0.1", 0, backlog=512) for i in range(hostile)]
    print(json.dumps({
        "ports": [s.sockets[0].getsockname()[1] for s in servers],
        "healthy": good.sockets[0].getsockname()[1],
        "hostile": [s.sockets[0].getsockname()[1] for s in bad],
    }), flush=True)
    servers += [good, *bad]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        for i in moods:
            if rng.random() < 0.3:
                moods[i] = rng.choice(MOODS)
        try:
            await asyncio.wait_for(stop.wait(), mood_seconds)
        except TimeoutError:
            pass
    for server in servers:
        server.close()


# --- the monitor under test (this process) ---------------------------------------------


@dataclass(frozen=True)
class Sample:
    t: float
    rss_mib: float
    fds: int
    tasks: int
    probes: int
    reloads: int
    lag_p99_ms: float
    inflight: int = -1  # probes running at the sample (-1: not recorded)
    healthy_probes: int = 0  # probes of the always-answering port so far
    healthy_false: int = 0  # ... whose outcome blamed the network (neither ok nor error)
    healthy_error: int = 0  # ... whose outcome was error (the monitor's own fault, said so)
    hostile_probes: int = 0
    stall_p99_ms: float = float("nan")  # p99 bucket of prober_loop_stall_seconds so far
    lasting: int = -1  # tasks already alive `lasting_after(args)` seconds before the sample (-1: not recorded)


def lasting_after(args: argparse.Namespace) -> float:
    """Return the age after which a task counts as lasting: past any probe's timeout and interval."""
    return max(5.0, 2 * (float(args.timeout) + float(args.interval)))


def rss_mib() -> float:
    """Return this process's resident set size in MiB (from /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_fds() -> int:
    """Return how many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def config_text(
    ports: list[int], pairs: int, interval: float, timeout: float, generation: int,
    healthy: tuple[int, int] = (0, 0), hostile: list[int] | None = None,
) -> str:
    """Return a config with `pairs` (target, route) pairs; generations differ in names and intervals.

    `healthy` is (port, count): count targets on the port that always answers, with a timeout of
    500 ms; `hostile` ports get one target each, on the direct route.
    """
    n_targets = pairs // len(ROUTES)
    routes = "".join(f"  - {{name: {r}, source_address: 127.0.0.1}}\n" for r in ROUTES[1:])
    lines = []
    for i in range(n_targets):
        # A tenth of the targets is renamed every generation (removed + added), another
        # tenth alternates its interval (rescheduled).
        name = f"t{i}-g{generation % 2}" if i % 10 == 0 else f"t{i}"
        every = interval * (1.5 if (i % 10 == 1 and generation % 2) else 1.0)
        port = ports[i % len(ports)]
        where = f"url: 'http://127.0.0.1:{port}/ping'" if i % 2 else f"address: '127.0.0.1:{port}'"
        lines.append(f"  - {{name: {name}, {where}, interval: {every}s, routes: [{', '.join(ROUTES)}]}}\n")
    port, count = healthy
    for i in range(count):
        where = f"url: 'http://127.0.0.1:{port}/ping'" if i % 2 else f"address: '127.0.0.1:{port}'"
        lines.append(f"  - {{name: healthy{i}, {where}, interval: {interval}s, timeout: 500ms, "
                     f"routes: [{', '.join(ROUTES)}]}}\n")
    for i, port in enumerate(hostile or ()):
        lines.append(f"  - {{name: hostile{i}, url: 'http://127.0.0.1:{port}/', interval: {interval}s}}\n")
    return (
        f"vantage: soak\ndefaults: {{timeout: {timeout}s}}\nroutes:\n  - {{name: direct}}\n{routes}"
        f"targets:\n{''.join(lines)}"
    )


async def soak(args: argparse.Namespace) -> tuple[list[Sample], list[str]]:
    from probe import loop
    from probe.config import Route, Target
    from probe.context import ProbeContext
    from probe.models import ProbeResult
    from probe.runner import run_probe
    from probe.service import Service, load_config

    lasting_names: list[str] = []  # what the lasting tasks of the last sample run
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.soak", "--serve", str(args.ports), "--stall", str(args.timeout * 1.5),
         "--seed", str(args.seed), "--hostile", str(args.hostile)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None
        served = json.loads(child.stdout.readline())
        ports = served["ports"]
        extra = {"healthy": (served["healthy"], args.healthy), "hostile": served["hostile"]}
        workdir = Path(tempfile.mkdtemp(prefix="soak-"))
        path = workdir / "targets.yml"
        path.write_text(config_text(ports, args.pairs, args.interval, args.timeout, 0, **extra))
        done = inflight = healthy_done = healthy_false = healthy_error = hostile_done = 0

        async def counted(target: Target, route: Route, ctx: ProbeContext) -> ProbeResult:
            nonlocal done, inflight, healthy_done, healthy_false, healthy_error, hostile_done
            inflight += 1
            try:
                result = await run_probe(target, route, ctx)
            finally:
                inflight -= 1
            done += 1
            if target.name.startswith("healthy"):
                healthy_done += 1
                if result.outcome != "ok":
                    healthy_error += result.outcome == "error"
                    healthy_false += result.outcome != "error"
                    if healthy_false + healthy_error <= 20:  # say what it was, a bounded number of times
                        print(f"false outcome {result.outcome} for {target.name}/{route.name}: "
                              f"{' | '.join(result.evidence)}", file=sys.stderr, flush=True)
            elif target.name.startswith("hostile"):
                hostile_done += 1
            return result

        service = Service(str(path), load_config(str(path), None), probe_fn=counted)
        service.start()
        samples: list[Sample] = []
        born: weakref.WeakKeyDictionary[asyncio.Task[Any], float] = weakref.WeakKeyDictionary()
        started = time.monotonic()
        end = started + args.minutes * 60
        next_reload = started + args.reload
        generation = reloads = 0
        try:
            while (now := time.monotonic()) < end:
                if now >= next_reload:
                    generation += 1
                    path.write_text(config_text(ports, args.pairs, args.interval, args.timeout, generation, **extra))
                    error = await service.reload()
                    if error is not None:
                        raise RuntimeError(error)
                    reloads += 1
                    next_reload = now + args.reload
                await asyncio.sleep(min(args.sample, max(0.0, next_reload - time.monotonic())) or 0.01)
                if not samples or time.monotonic() - started - samples[-1].t >= args.sample:
                    gc.collect()
                    now, tasks = time.monotonic(), asyncio.all_tasks()
                    for task in tasks:
                        born.setdefault(task, now)
                    old = [task for task in tasks if now - born[task] >= lasting_after(args)]
                    samples.append(Sample(
                        t=round(time.monotonic() - started, 1), rss_mib=round(rss_mib(), 2), fds=open_fds(),
                        tasks=len(tasks), probes=done, reloads=reloads,
                        lag_p99_ms=round(_lag_p99(service) * 1000, 1), inflight=inflight,
                        healthy_probes=healthy_done, healthy_false=healthy_false, hostile_probes=hostile_done,
                        healthy_error=healthy_error, stall_p99_ms=round(_p99(loop.watch.cumulative()) * 1000, 1),
                        lasting=len(old),
                    ))
                    lasting_names = sorted(_task_name(task) for task in old)
                    if args.verbose:
                        print(json.dumps(asdict(samples[-1])), file=sys.stderr, flush=True)
        finally:
            await service.close()
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    return samples, lasting_names


def _task_name(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return getattr(coro, "__qualname__", None) or task.get_name()


def _lag_p99(service: object) -> float:
    hist = getattr(getattr(service, "store", None), "lag", None)
    cumulative = getattr(hist, "cumulative", None)
    if cumulative is None:
        return float("nan")
    return _p99(cumulative())


def _p99(buckets: list[tuple[float, int]]) -> float:
    total = buckets[-1][1] if buckets else 0
    for bound, count in buckets:
        if total and count >= 0.99 * total:
            return float(bound)
    return float("nan")


@dataclass(frozen=True)
class Verdict:
    rss_growth_percent: float
    fds_first: float
    fds_last: float
    tasks_first: float
    tasks_last: float
    fds_idle_first: float
    fds_idle_last: float
    tasks_idle_first: float
    tasks_idle_last: float
    probes_per_second: float
    flat: bool
    healthy_probes: int = 0
    healthy_false: int = 0
    healthy_error: int = 0
    hostile_probes: int = 0
    tasks_lasting_first: float = -1.0
    tasks_lasting_last: float = -1.0


def judge(samples: list[Sample], warmup: float) -> Verdict:
    """Compare the first and the last third after warm-up: RSS within 5 %, fds and tasks not growing."""
    steady = [s for s in samples if s.t >= warmup]
    if len(steady) < 6:
        raise SystemExit(f"too few samples after the warm-up ({len(steady)}); run longer")
    third = len(steady) // 3
    first, last = steady[:third], steady[-third:]
    rss0 = statistics.median(s.rss_mib for s in first)
    rss1 = statistics.median(s.rss_mib for s in last)
    fds0, fds1 = statistics.median(s.fds for s in first), statistics.median(s.fds for s in last)
    tasks0, tasks1 = statistics.median(s.tasks for s in first), statistics.median(s.tasks for s in last)
    growth = (rss1 - rss0) / rss0 * 100

    # In-flight probes hold a socket and a task each: allow their noise, not a trend.
    def grows(a: float, b: float) -> bool:
        return b > a * 1.10 + 5

    # What is left with the in-flight probes taken out (one task and at most one socket each)
    # must not grow at all: that is where a leak would show.
    idle = {
        (k, i): statistics.median(getattr(s, k) - s.inflight for s in part)
        for k in ("fds", "tasks") for i, part in enumerate((first, last))
    }
    # A leaked task lives on; a task queued behind a busy loop (a job waiting for its turn, a
    # server handler finishing a write) is gone a few intervals later. CI once saw the tasks
    # without in-flight probes at 3 -> 12 on a loaded machine while none of them lasted.
    recorded = all(s.lasting >= 0 for s in steady)
    lasting = [statistics.median(s.lasting for s in part) if recorded else -1.0 for part in (first, last)]
    if recorded:
        tasks_ok = lasting[1] <= lasting[0] + 2
    else:
        tasks_ok = not grows(tasks0, tasks1) and idle["tasks", 1] <= idle["tasks", 0] + 2
    rate = (steady[-1].probes - steady[0].probes) / max(steady[-1].t - steady[0].t, 1e-9)
    healthy_false = samples[-1].healthy_false
    flat = (growth < 5.0 and not grows(fds0, fds1)
            and idle["fds", 1] <= idle["fds", 0] + 2 and tasks_ok
            and healthy_false == 0)
    return Verdict(
        rss_growth_percent=round(growth, 2), fds_first=fds0, fds_last=fds1, tasks_first=tasks0, tasks_last=tasks1,
        fds_idle_first=idle["fds", 0], fds_idle_last=idle["fds", 1],
        tasks_idle_first=idle["tasks", 0], tasks_idle_last=idle["tasks", 1],
        probes_per_second=round(rate, 1), flat=flat,
        tasks_lasting_first=lasting[0], tasks_lasting_last=lasting[1], healthy_probes=samples[-1].healthy_probes,
        healthy_false=healthy_false, healthy_error=samples[-1].healthy_error,
        hostile_probes=samples[-1].hostile_probes,
    )


def markdown(doc: dict[str, Any], every: int = 6) -> str:
    """Return a saved run (from --out) as Markdown: its settings, every `every`-th sample, the verdict."""
    a, v, samples = doc["args"], doc["verdict"], doc["samples"]
    lines = [
        f"{a['pairs']} pairs, interval {a['interval']} s, timeout {a['timeout']} s, reload every {a['reload']} s, "
        f"{a['minutes']} min, warm-up {a['warmup']} s",
        "",
        "| t (s) | RSS (MiB) | open fds | asyncio tasks | probes in flight | probes done | reloads "
        "| lag p99 (ms, cumulative) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    mixed = bool(a.get("healthy") or a.get("hostile"))
    if mixed:
        lines[2] += " healthy probes | false | error | hostile probes | loop stall p99 (ms, cumulative) |"
        lines[3] += "---:|---:|---:|---:|---:|"
    shown = samples[::every] + ([samples[-1]] if (len(samples) - 1) % every else [])
    for s in shown:
        lines.append(f"| {s['t']:.0f} | {s['rss_mib']:.1f} | {s['fds']} | {s['tasks']} | {s.get('inflight', '?')} "
                     f"| {s['probes']} | "
                     f"{s['reloads']} | {s['lag_p99_ms']:.0f} |")
        if mixed:
            lines[-1] += (f" {s['healthy_probes']} | {s['healthy_false']} | {s['healthy_error']} | "
                          f"{s['hostile_probes']} | {s['stall_p99_ms']:.0f} |")
    lines += ["", f"Verdict: RSS {v['rss_growth_percent']:+.2f} % after warm-up (median of the first third against "
              f"the last), fds {v['fds_first']:.0f} -> {v['fds_last']:.0f}, tasks {v['tasks_first']:.0f} -> "
              f"{v['tasks_last']:.0f} (medians; without in-flight probes: fds "
              f"{v.get('fds_idle_first', '?')} -> {v.get('fds_idle_last', '?')}, tasks "
              f"{v.get('tasks_idle_first', '?')} -> {v.get('tasks_idle_last', '?')}; tasks alive for a few "
              f"intervals: {v.get('tasks_lasting_first', '?')} -> {v.get('tasks_lasting_last', '?')}), "
              f"{v['probes_per_second']} probes/s: "
              f"{'FLAT' if v['flat'] else 'NOT FLAT'}."]
    if mixed:
        lines += ["", f"Healthy pairs: {v['healthy_false']} false outcomes and {v['healthy_error']} errors in "
                      f"{v['healthy_probes']} probes; {v['hostile_probes']} probes of hostile targets."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--ports", type=int, default=50)
    parser.add_argument("--interval", type=float, default=15.0, help="probe interval, seconds")
    parser.add_argument("--timeout", type=float, default=2.0, help="probe timeout, seconds")
    parser.add_argument("--reload", type=float, default=5.0, help="seconds between config reloads")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=120.0, help="seconds ignored by the verdict")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--hostile", type=int, default=0, help="targets on hostile ports (1-byte chunks, ...)")
    parser.add_argument("--healthy", type=int, default=0,
                        help="targets (x4 routes, timeout 500 ms) on a port that always answers: false outcomes fail")
    parser.add_argument("--out", help="write samples and verdict as JSON here")
    parser.add_argument("--verbose", action="store_true", help="print each sample to stderr")
    parser.add_argument("--report", metavar="JSON", help="print a Markdown table of a saved run (from --out) and exit")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stall", type=float, default=3.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.serve, args.stall, 5.0, args.seed, args.hostile))
        return 0
    if args.report:
        print(markdown(json.loads(Path(args.report).read_text())))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("probe").setLevel(logging.WARNING)
    samples, lasting_names = asyncio.run(soak(args))
    verdict = judge(samples, args.warmup)
    print(f"{'t s':>7} {'RSS MiB':>8} {'fds':>5} {'tasks':>6} {'probes':>8} {'reloads':>7} {'lag p99 ms':>10}")
    for s in samples:
        print(f"{s.t:7.0f} {s.rss_mib:8.1f} {s.fds:5d} {s.tasks:6d} {s.probes:8d} {s.reloads:7d} {s.lag_p99_ms:10.1f}")
    print(
        f"after {args.warmup:.0f} s warm-up: RSS {verdict.rss_growth_percent:+.2f} %, "
        f"fds {verdict.fds_first:.0f} -> {verdict.fds_last:.0f}, tasks {verdict.tasks_first:.0f} -> "
        f"{verdict.tasks_last:.0f} (medians; without in-flight probes: fds "
        f"{verdict.fds_idle_first:.0f} -> {verdict.fds_idle_last:.0f}, tasks {verdict.tasks_idle_first:.0f} -> "
        f"{verdict.tasks_idle_last:.0f}; tasks alive for {lasting_after(args):.0f} s or more: "
        f"{verdict.tasks_lasting_first:.0f} -> {verdict.tasks_lasting_last:.0f}), "
        f"{verdict.probes_per_second} probes/s: "
        f"{'FLAT' if verdict.flat else 'NOT FLAT'}"
    )
    if not verdict.flat:
        print(f"tasks alive for {lasting_after(args):.0f} s or more at the end: {', '.join(lasting_names)}")
    if args.healthy or args.hostile:
        print(f"healthy pairs: {verdict.healthy_false} false outcomes and {verdict.healthy_error} errors in "
              f"{verdict.healthy_probes} probes; {verdict.hostile_probes} probes of hostile targets")
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"args": {k: v for k, v in vars(args).items() if k not in ("serve", "out")},
             "samples": [asdict(s) for s in samples], "verdict": asdict(verdict)}, indent=1) + "\n")
    return 0 if verdict.flat else 1


if __name__ == "__main__":
    sys.exit(main())
