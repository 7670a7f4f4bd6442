"""Project configs for the benchmark, and the few figures read back from its /metrics and /api/results."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path


def write_config(path: Path, urls: Sequence[str], *, interval: float, timeout: float | None = None,
                 ca_file: str | None = None, routes: int = 1, source: str = "127.0.0.1",
                 http_version: int | None = None) -> Path:
    """Write a targets.yml (JSON is YAML) with one target per URL or host:port, over `routes` routes."""
    route_defs: list[dict[str, str]] = [{"name": "direct"}]
    route_defs += [{"name": f"bound{i}", "source_address": source} for i in range(1, routes)]
    targets: list[dict[str, object]] = []
    for i, url in enumerate(urls):
        key = "url" if "://" in url else "address"
        targets.append({"name": f"t{i:05d}", key: url, "routes": [r["name"] for r in route_defs]})
        if http_version is not None:
            targets[-1]["http_version"] = http_version
    config = {
        "vantage": "bench",
        "defaults": {"interval": f"{int(interval * 1000)}ms", "timeout": f"{int((timeout or interval) * 1000)}ms",
                     "ca_file": ca_file},
        "routes": route_defs,
        "targets": targets,
    }
    path.write_text(json.dumps(config, indent=1))
    return path


class Scrape:
    """What the benchmark reads from one /metrics response."""

    def __init__(self, text: str) -> None:
        self.runs: dict[str, float] = {}
        self.lag: dict[float, float] = {}
        self.lag_count = 0.0
        self.success_series = 0
        self.samples = 0
        self.pair_series: dict[tuple[str, str], int] = {}  # series per (target, route): the series budget
        for line in text.splitlines():
            if not line or line[0] == "#":
                continue
            self.samples += 1
            if ',route="' in line:
                target = line.partition('target="')[2].partition('"')[0]
                pair = (target, line.partition(',route="')[2].partition('"')[0])
                self.pair_series[pair] = self.pair_series.get(pair, 0) + 1
            if line.startswith("probe_runs_total{"):
                outcome = line.partition('outcome="')[2].partition('"')[0]
                self.runs[outcome] = self.runs.get(outcome, 0.0) + float(line.rpartition(" ")[2])
            elif line.startswith("probe_success{"):
                self.success_series += 1
            elif line.startswith("prober_scheduler_lag_seconds_bucket{"):
                le = line.partition('le="')[2].partition('"')[0]
                self.lag[math.inf if le == "+Inf" else float(le)] = float(line.rpartition(" ")[2])
            elif line.startswith("prober_scheduler_lag_seconds_count{"):
                self.lag_count = float(line.rpartition(" ")[2])

    @property
    def total_runs(self) -> float:
        return sum(self.runs.values())

    def series_per_pair(self) -> dict[str, float]:
        """Return the most, the fewest and the mean series of a (target, route) pair."""
        counts = list(self.pair_series.values()) or [0]
        return {"max": max(counts), "min": min(counts), "mean": sum(counts) / len(counts)}


def quantile(q: float, buckets: dict[float, float]) -> float:
    """Return the q-quantile of a cumulative histogram, interpolated within the bucket (as PromQL does)."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return 0.0
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def lag_between(before: Scrape, after: Scrape) -> dict[str, float]:
    """Return the lag p99, p50 and the share of starts within 100 ms between two scrapes."""
    delta = {b: after.lag.get(b, 0.0) - before.lag.get(b, 0.0) for b in after.lag}
    count = after.lag_count - before.lag_count
    within = delta.get(0.1, 0.0)
    return {
        "p50": quantile(0.5, delta),
        "p99": quantile(0.99, delta),
        "share_within_100ms": within / count if count else 0.0,
        "starts": count,
    }


def percentile(values: Sequence[float], q: float) -> float:
    """Return the q-quantile (0..1) of `values`, nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
