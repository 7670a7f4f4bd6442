"""The loopback scenarios: CPU per probe for both tools, the project's highest sustained rate, scale."""

from __future__ import annotations

import gzip
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from bench import lab
from bench.figures import Scrape, lag_between, write_config
from bench.procstat import CpuMeter, cpu_seconds, load_average, memory
from probe.ranking import WINDOW

HOST = "127.0.0.1"


@dataclass
class Env:
    """What every scenario shares: the work directory, the PKI and the running targets."""

    workdir: Path
    pki: lab.Pki
    targets: lab.Proc
    ports: dict[str, int]

    def url(self, kind: str) -> str:
        if kind == "http3":
            return f"https://{HOST}:{self.ports['h3']}/api/ping"
        return f"https://{HOST}:{self.ports['https']}/" if kind == "https" else f"{HOST}:{self.ports['tcp']}"


def _scrape(base: str) -> Scrape:
    return Scrape(_fetch_metrics(base).decode())


def _fetch_metrics(base: str) -> bytes:
    body, _ = lab.http_get(base + "/metrics", timeout=60)
    return body


def project_cpu(env: Env, kind: str, rate: int, seconds: float, interval: float = 1.0) -> dict[str, object]:
    """Run the project at `rate` probes/s of `kind`; return CPU seconds per 1,000 probes and lag."""
    n = max(1, round(rate * interval))
    cfg = write_config(env.workdir / f"cpu-{kind}-{rate}.yml", [env.url(kind)] * n, interval=interval,
                       ca_file=env.pki.ca_file, http_version=3 if kind == "http3" else None)
    with lab.project(env.workdir, str(cfg), f"{kind}-{rate}") as (proc, base):
        time.sleep(interval * 2 + 0.5)  # every job has run at least once: the steady state
        meter = CpuMeter({"project": proc.pid, "targets": env.targets.pid})
        # The window runs from one scrape's arrival to the next's: parsing a scrape (~1 s for 1,200
        # pairs) happens outside it, or it would count as time in which the project ran too few probes.
        first = _fetch_metrics(base)
        meter.start()
        load = load_average()
        before = Scrape(first.decode())
        time.sleep(max(0.0, seconds - (time.monotonic() - meter.started)))
        last = _fetch_metrics(base)
        cpu = meter.stop()
        after = Scrape(last.decode())
        rss = memory(proc.pid)
    probes = after.total_runs - before.total_runs
    ok = after.runs.get("ok", 0.0) - before.runs.get("ok", 0.0)
    return {
        "tool": "probe", "kind": kind, "rate_wanted": rate, "targets": n, "interval_seconds": interval,
        "probes": probes, "ok": ok, "rate": probes / cpu["wall"],
        "cpu_seconds": cpu["project"], "cpu_ms_per_probe": 1000 * cpu["project"] / max(probes, 1),
        "cpu_seconds_per_1000": 1000 * cpu["project"] / max(probes, 1),
        "cpu_share_of_a_core": cpu["project"] / cpu["wall"],
        "targets_cpu_share_of_a_core": cpu["targets"] / cpu["wall"],
        "targets_cpu_ms_per_probe": 1000 * cpu["targets"] / max(probes, 1),
        "lag": lag_between(before, after), "rss_bytes": rss.get("VmRSS"), "load_average": load,
    }


def blackbox_cpu(env: Env, kind: str, rate: int, seconds: float) -> dict[str, object]:
    """Drive blackbox_exporter's /probe at `rate`/s with `kind` probes; return CPU per 1,000 probes."""
    with lab.blackbox(env.workdir, env.pki, f"{kind}-{rate}") as (proc, exporter):
        target = env.url(kind) if kind == "https" else env.url("tcp")
        load = load_average()
        driver = lab.start_driver(env.workdir, exporter, kind, [target], rate, seconds, f"{kind}-{rate}")
        meter = CpuMeter({"blackbox": proc.pid, "targets": env.targets.pid})
        meter.start()
        result = json.loads(driver.wait(timeout=seconds + 60))
        cpu = meter.stop()
    cpu["driver"] = result["cpu_seconds"]
    probes = result["sent"]
    return {
        "tool": "blackbox_exporter", "kind": kind, "rate_wanted": rate, "probes": probes, "ok": result["ok"],
        "rate": probes / cpu["wall"], "cpu_seconds": cpu["blackbox"],
        "cpu_ms_per_probe": 1000 * cpu["blackbox"] / max(probes, 1),
        "cpu_seconds_per_1000": 1000 * cpu["blackbox"] / max(probes, 1),
        "cpu_share_of_a_core": cpu["blackbox"] / cpu["wall"],
        "targets_cpu_share_of_a_core": cpu["targets"] / cpu["wall"],
        "targets_cpu_ms_per_probe": 1000 * cpu["targets"] / max(probes, 1),
        "driver_cpu_share_of_a_core": cpu["driver"] / cpu["wall"],
        "driver_cpu_ms_per_probe": 1000 * cpu["driver"] / max(probes, 1),
        "driver_lateness_p99": result["lateness_p99"], "load_average": load,
    }


def max_rate(env: Env, rates: list[int], seconds: float, interval: float) -> dict[str, object]:
    """Step up the HTTPS rate; return every step and the highest with lag p99 < 100 ms and all probes ok."""
    steps = []
    best = 0.0
    for rate in rates:
        # A failed step is tried once more: other work on a shared machine can spoil one window.
        for _ in range(2):
            step = project_cpu(env, "https", rate, seconds, interval=interval)
            lag = step["lag"]
            assert isinstance(lag, dict)
            achieved = float(step["rate"])  # type: ignore[arg-type]
            ok_share = float(step["ok"]) / max(float(step["probes"]), 1.0)  # type: ignore[arg-type]
            step["sustained"] = lag["share_within_100ms"] >= 0.99 and ok_share >= 0.99 and achieved >= 0.97 * rate
            steps.append(step)
            if step["sustained"]:
                break
        if not step["sustained"]:
            break
        best = max(best, achieved)
    return {"steps": steps, "highest_sustained_rate": best}


def scale(env: Env, pairs: int, rounds: int, rate: float = 400.0, min_interval: float = 4.0,
          scrapes: int = 5) -> dict[str, object]:
    """Configure `pairs` (target, route) pairs, run `rounds` intervals, time /metrics, read the peak RSS.

    Each pair keeps its last ranking.WINDOW results: memory grows for WINDOW rounds. When
    `rounds` is fewer, the RSS at a full history is projected from the growth per round measured.
    """
    routes = 2
    n = pairs // routes
    interval = max(min_interval, pairs / rate)
    cfg = write_config(env.workdir / f"scale-{pairs}.yml", [env.url("https")] * n, interval=interval,
                       timeout=min(5.0, interval), ca_file=env.pki.ca_file, routes=routes)
    rss_by_round = []
    with lab.project(env.workdir, str(cfg), f"scale-{pairs}") as (proc, base):
        started = time.monotonic()
        for k in range(1, rounds + 1):
            # The first run of a job comes up to one interval after start: round k is done at k+1 intervals.
            time.sleep(max(0.0, started + (k + 1) * interval + 0.5 - time.monotonic()))
            rss_by_round.append(memory(proc.pid)["VmRSS"])
        body, _ = lab.timed_fetch(base, "/metrics")
        scrape = Scrape(body.decode())
        load = load_average()
        # As Prometheus scrapes (Accept-Encoding: gzip), then without compression; the scheduler's
        # lag is read over each set of scrapes (the figures between two parsed scrapes).
        times_gzip, times = [], []
        cpu0 = cpu_seconds(proc.pid)
        for _ in range(scrapes):
            zipped, took = lab.timed_fetch(base, "/metrics", gzip=True)
            times_gzip.append(took)
        scrape_cpu_gzip = (cpu_seconds(proc.pid) - cpu0) / scrapes
        after_gzip = Scrape(gzip.decompress(zipped).decode())
        cpu0 = cpu_seconds(proc.pid)
        for _ in range(scrapes):
            body, took = lab.timed_fetch(base, "/metrics")
            times.append(took)
        scrape_cpu = (cpu_seconds(proc.pid) - cpu0) / scrapes
        after = Scrape(body.decode())
        rss = memory(proc.pid)
    # Growth per round from the second round on (the first also holds the start-up and first-result
    # allocations); the scrapes' own peak comes on top of the RSS before them.
    later = rss_by_round[1:]
    growth = (later[-1] - later[0]) / (len(later) - 1) if len(later) >= 2 else 0.0
    scrape_peak = rss["VmHWM"] - rss_by_round[-1]
    projected = rss_by_round[-1] + max(0.0, growth) * max(0, WINDOW - rounds) + max(0, scrape_peak)
    return {
        "pairs": n * routes, "interval_seconds": interval, "rounds": rounds, "history_window": WINDOW,
        "pairs_with_results": after.success_series, "runs": after.total_runs,
        "ok_share": after.runs.get("ok", 0.0) / max(after.total_runs, 1.0),
        "metrics_gzip_seconds_median": statistics.median(times_gzip), "metrics_gzip_seconds_max": max(times_gzip),
        "metrics_gzip_cpu_seconds": scrape_cpu_gzip, "metrics_gzip_bytes": len(zipped),
        "lag_during_gzip_scrapes": lag_between(scrape, after_gzip),
        "metrics_seconds_median": statistics.median(times), "metrics_seconds_max": max(times),
        "metrics_cpu_seconds": scrape_cpu, "metrics_bytes": len(body), "metrics_samples": after.samples,
        "series_per_pair": after.series_per_pair(),
        "peak_rss_bytes": rss["VmHWM"], "rss_bytes": rss["VmRSS"], "rss_by_round": rss_by_round,
        "rss_growth_per_round_bytes": growth, "projected_peak_rss_full_history_bytes": projected,
        "scrape_peak_over_rss_bytes": scrape_peak,
        "lag_during_scrapes": lag_between(after_gzip, after),  # starts between the gzip and the last scrape
        "load_average": load, "first_scrape_pairs_with_results": scrape.success_series,
    }
