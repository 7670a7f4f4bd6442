"""The benchmark against blackbox_exporter: `python -m bench` (or `scripts/bench`, which installs what it needs).

    python -m bench [--smoke] [--out bench-results.json] [--skip-accuracy] [--only PART ...]

Starts its own loopback targets, runs the project (`probe run`) and blackbox_exporter (driven at
the same rate by bench.driver) against them, and prints a table; the JSON file holds every
figure and the conditions (load average, CPU of the targets and the driver). --smoke runs
every scenario tiny and short, to check the benchmark still works (the test suite does).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import accuracy, floor, lab, render, scenarios
from bench.procstat import load_average

TARGETS = {
    "cpu_ratio": 0.5, "rate": 600, "rss_10000_mb": 120, "metrics_10000_ms": 250, "metrics_lag_p99_ms": 50,
    "metrics_gzip_10000_mib": 5, "series_per_pair": 30,
    "connect_median_ms": 1.0, "connect_p99_ms": 2.0,
}


@dataclass(frozen=True)
class Plan:
    cpu_rate: int
    cpu_seconds: float
    rates: list[int]
    rate_seconds: float
    rate_interval: float
    pairs: list[int]
    scale_rounds: list[int]
    scale_min_interval: float
    accuracy_seconds: float
    in_flight: int
    delay_ms: float
    h3_rate: int  # HTTP/3 probes a second for its CPU figure (aioquic is pure Python: far below HTTPS)


FULL = Plan(300, 20, [200, 400, 500, 600, 700, 800, 900, 1000, 1200], 12, 2.0, [1000, 10000], [20, 5], 4.0, 12,
            200, 20.0, 50)
SMOKE = Plan(20, 2, [20], 2, 1.0, [20, 100], [3, 3], 0.5, 2, 20, 20.0, 10)


PARTS = ("cpu", "http3", "rate", "scale", "accuracy")


def run(plan: Plan, workdir: Path, skip_accuracy: bool, only: tuple[str, ...] = PARTS) -> dict[str, Any]:
    """Run every scenario (or those of `only`); return the figures (None for a part not run)."""
    out: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
                    "load_average_start": load_average()},
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    pki = lab.make_pki(workdir, "127.0.0.1", accuracy.SERVER_IP)
    targets, ports = lab.start_targets(workdir, pki)
    env = scenarios.Env(workdir, pki, targets, ports)
    out["cpu"] = out["rate"] = out["scale"] = out["http3"] = out["render"] = None
    try:
        cpu: dict[str, dict[str, Any]] = {}
        for kind in ("https", "tcp") if "cpu" in only else ():
            cpu[kind] = {
                "probe": scenarios.project_cpu(env, kind, plan.cpu_rate, plan.cpu_seconds),
                "blackbox": scenarios.blackbox_cpu(env, kind, plan.cpu_rate, plan.cpu_seconds),
            }
            cpu[kind]["ratio"] = cpu[kind]["probe"]["cpu_seconds_per_1000"] / max(
                cpu[kind]["blackbox"]["cpu_seconds_per_1000"], 1e-9)
        if cpu:  # the same HTTPS requests with nothing of the project around them
            cpu["https"]["floor"] = floor.run_beside(workdir, env.url("https"), pki.ca_file, plan.cpu_rate,
                                                     plan.cpu_seconds)

            out["cpu"] = cpu
        if "http3" in only:  # blackbox_exporter 0.23 (Debian's) has no HTTP/3: the project's figure alone
            out["http3"] = scenarios.project_cpu(env, "http3", plan.h3_rate, plan.cpu_seconds)
        if "rate" in only:
            out["rate"] = scenarios.max_rate(env, plan.rates, plan.rate_seconds, plan.rate_interval)
        if "scale" in only:
            out["scale"] = [
                scenarios.scale(env, pairs, rounds, min_interval=plan.scale_min_interval)
                for pairs, rounds in zip(plan.pairs, plan.scale_rounds, strict=True)
            ]
            out["render"] = render.measure(plan.pairs[-1], Path(pki.ca_file))
    finally:
        targets.stop()
    if skip_accuracy or "accuracy" not in only:
        out["accuracy"] = None
    else:
        out["accuracy"] = accuracy.run(workdir, pki, plan.delay_ms, plan.accuracy_seconds, plan.in_flight)
    out["machine"]["load_average_end"] = load_average()
    return out


def table(r: dict[str, Any]) -> str:
    """Return the results as a plain-text table."""
    rows = [("figure", "probe", "blackbox_exporter", "target", "met")]

    def add(name: str, ours: str, theirs: str, target: str, met: bool | None) -> None:
        rows.append((name, ours, theirs, target, "" if met is None else ("yes" if met else "NO")))

    for kind in ("https", "tcp") if r["cpu"] else ():
        c = r["cpu"][kind]
        add(f"CPU s per 1,000 {kind.upper()} probes", f"{c['probe']['cpu_seconds_per_1000']:.2f}",
            f"{c['blackbox']['cpu_seconds_per_1000']:.2f}",
            f"ratio <= {TARGETS['cpu_ratio']}" if kind == "https" else "",
            c["ratio"] <= TARGETS["cpu_ratio"] if kind == "https" else None)
        add(f"  ratio probe/blackbox ({kind}, {c['probe']['rate_wanted']}/s)", f"{c['ratio']:.2f}", "", "", None)
        if "floor" in c:
            ms = float(c["floor"]["cpu_ms_per_probe"])
            add("  floor: bare TLS client, same requests (bench.floor)", f"{ms:.2f}", "",
                f"ratio {ms / max(c['blackbox']['cpu_ms_per_probe'], 1e-9):.2f}", None)
    if r.get("http3"):
        h = r["http3"]
        add(f"CPU s per 1,000 HTTP/3 probes ({h['rate_wanted']}/s)", f"{h['cpu_seconds_per_1000']:.2f}",
            "(no HTTP/3)", "", None)
    if r["rate"]:
        rate = r["rate"]["highest_sustained_rate"]
        every = all(step["sustained"] for step in r["rate"]["steps"])  # the plan's top rate passed: a lower bound
        add("highest HTTPS rate, lag p99 < 100 ms", f"{'>= ' if every else ''}{rate:.0f}/s", "",
            f">= {TARGETS['rate']}/s", rate >= TARGETS["rate"])
    for s in r["scale"] or ():
        big = s["pairs"] >= 10000
        full = s["rounds"] >= s["history_window"]
        label = f"peak RSS at {s['pairs']:,} pairs"
        if not full:
            label += f" ({s['rounds']} of {s['history_window']} rounds)"
        add(label, f"{s['peak_rss_bytes'] / 2**20:.0f} MB", "", f"< {TARGETS['rss_10000_mb']} MB" if big else "",
            s["peak_rss_bytes"] / 2**20 < TARGETS["rss_10000_mb"] if big and full else None)
        if not full:
            projected = s["projected_peak_rss_full_history_bytes"] / 2**20
            add(f"  projected at a full history ({s['history_window']} rounds)", f"{projected:.0f} MB", "",
                f"< {TARGETS['rss_10000_mb']} MB" if big else "", projected < TARGETS["rss_10000_mb"] if big else None)
    for s in r["scale"] or ():
        big = s["pairs"] >= 10000
        series = s["series_per_pair"]
        add(f"series per pair, default HTTPS target ({s['pairs']:,} pairs)",
            f"{series['max']}" + (f" (min {series['min']})" if series["min"] != series["max"] else ""), "",
            f"<= {TARGETS['series_per_pair']}", series["max"] <= TARGETS["series_per_pair"])
        gzip_mib = s["metrics_gzip_bytes"] / 2**20
        add(f"bytes per scrape at {s['pairs']:,} pairs: gzip (identity)",
            f"{gzip_mib:.2f} MiB ({s['metrics_bytes'] / 2**20:.1f} MiB)", "",
            f"gzip < {TARGETS['metrics_gzip_10000_mib']} MiB" if big else "",
            gzip_mib < TARGETS["metrics_gzip_10000_mib"] if big else None)
        for key, how, lag_key in (("metrics_gzip_seconds", "gzip", "lag_during_gzip_scrapes"),
                                  ("metrics_seconds", "identity", "lag_during_scrapes")):
            gz = how == "gzip"
            add(f"/metrics at {s['pairs']:,} pairs, {how}, while probing", f"{s[key + '_median'] * 1000:.0f} ms", "",
                f"< {TARGETS['metrics_10000_ms']} ms" if big and gz else "",
                s[key + "_median"] * 1000 < TARGETS["metrics_10000_ms"] if big and gz else None)
            lag = s.get(lag_key)
            if lag:
                add(f"  scheduler lag p99 during those scrapes ({s['pairs']:,} pairs)", f"{lag['p99'] * 1000:.0f} ms",
                    "", f"< {TARGETS['metrics_lag_p99_ms']} ms" if big and gz else "",
                    lag["p99"] * 1000 < TARGETS["metrics_lag_p99_ms"] if big and gz else None)
    if r.get("render"):
        rd = r["render"]
        for shape, label in (("address", "HTTPS by address"), ("host_name", "HTTPS by host name, 2 resolvers")):
            f = rd[shape]
            add(f"/metrics render CPU in-process, {rd['pairs']:,} pairs, {label}: warm (after {rd['dirty_share']:.0%} "
                "recorded)", f"{f['render_cpu_ms_warm']:.0f} ms ({f['render_cpu_ms_dirty']:.0f} ms)", "", "", None)
    a = r["accuracy"]
    if a:
        add(f"lab: plain connect() - {a['delay_ms']:.0f} ms delay", f"{a['reference']['error_ms_median']:.2f} ms",
            "", "(median; the lab's own overhead)", None)
        for case, label in (("rest", "at rest"), ("loaded", "~200 in flight")):
            p, b = a[f"probe_{case}"], a[f"blackbox_{case}"]
            loaded = case == "loaded"
            add(f"connect error median, {label}", f"{p['error_ms_median']:.2f} ms", f"{b['error_ms_median']:.2f} ms",
                f"< {TARGETS['connect_median_ms']} ms" if loaded else "",
                p["error_ms_median"] < TARGETS["connect_median_ms"] if loaded else None)
            add(f"connect error p99, {label}", f"{p['error_ms_p99']:.2f} ms", f"{b['error_ms_p99']:.2f} ms",
                f"< {TARGETS['connect_p99_ms']} ms" if loaded else "",
                p["error_ms_p99"] < TARGETS["connect_p99_ms"] if loaded else None)
        add("lab: plain connect() error beside ~200 in flight, median",
            f"{a['reference_probe_loaded']['error_ms_median']:.2f} ms",
            f"{a['reference_blackbox_loaded']['error_ms_median']:.2f} ms", "(userspace clock, normal priority)", None)
        add("lab: plain connect() error beside ~200 in flight, p99",
            f"{a['reference_probe_loaded']['error_ms_p99']:.2f} ms",
            f"{a['reference_blackbox_loaded']['error_ms_p99']:.2f} ms", "", None)
        add("  probes in flight (mean)", f"{a['probe_loaded']['in_flight_mean']:.0f}",
            f"{a['blackbox_loaded']['in_flight_mean']:.0f}", "", None)
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"load average: {r['machine']['load_average_start']} at start, {r['machine']['load_average_end']} "
                 f"at end ({r['machine']['cpus']} CPUs)")
    if r["cpu"]:
        h = r["cpu"]["https"]
        lines.append(
            "not the limit: targets server {:.2f} ms CPU/probe ({:.0%} of a core); driver {:.2f} ms CPU/probe, "
            "its schedule p99 late {:.1f} ms".format(
                h["blackbox"]["targets_cpu_ms_per_probe"], h["blackbox"]["targets_cpu_share_of_a_core"],
                h["blackbox"]["driver_cpu_ms_per_probe"], h["blackbox"]["driver_lateness_p99"] * 1000))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny and short: checks the benchmark works")
    parser.add_argument("--out", default="bench-results.json", help="where to write the JSON figures")
    parser.add_argument("--skip-accuracy", action="store_true",
                        help="skip the namespace scenario (it needs root, iptables and netfilterqueue)")
    parser.add_argument("--full-history", action="store_true",
                        help="run 10,000 pairs for a whole ranking window (20 rounds, ~9 minutes more) instead of "
                             "projecting the RSS from 5")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS),
                        help="run only these parts (default: all): cpu, http3 (the project's CPU per HTTP/3 "
                             "probe), rate, scale (RSS and /metrics), accuracy")
    parser.add_argument("--workdir", help="keep configs and logs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else FULL
    if args.full_history:
        plan = dataclasses.replace(plan, scale_rounds=[20] * len(plan.pairs))
    with tempfile.TemporaryDirectory(prefix="pb-bench-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = run(plan, workdir, args.skip_accuracy, tuple(args.only))
    results["plan"] = plan.__dict__
    results["smoke"] = args.smoke
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"\nfigures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
