"""Path sampling cost and accuracy (docs/benchmarks.md, "Path sampling").

    python -m bench.path [--pairs 1000] [--samples 20] [--interval 30] [--seconds 120] [--out FILE]

1. **Lag at scale**: `probe run` with PAIRS TCP targets (the bench's own accepting TCP port on
   loopback), each with `path: {samples, spread: 5s}` every INTERVAL, besides its own TCP probe.
   Between two scrapes SECONDS apart: the scheduler lag (every probe and path run starts), the
   path samples sent and lost, and the process's CPU.
2. **Accuracy under load** (root: namespaces): the bench's accuracy lab (bench/accuracy.py), whose
   server holds every SYN-ACK DELAY ms in an NFQUEUE program, so a handshake takes DELAY plus the
   veth's microseconds. Path runs of the real sampler (probe.probers.path.run, in one process on
   uvloop, as `probe run` runs them) keep ~IN_FLIGHT samples waiting at once; each answered
   sample's RTT minus DELAY is its error. Plain blocking connects from another process at the
   same time show what the lab itself adds.

    python -m bench.path inner-accuracy ...   # runs inside the client namespace; started by the above
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import accuracy, lab, procstat
from bench.figures import Scrape, lag_between, percentile

SPREAD = 5.0


def path_config(path: Path, address: str, pairs: int, samples: int, interval: float, spread: float,
                timeout: float = 2.0) -> Path:
    """Write a targets.yml of `pairs` TCP targets at `address`, each sampling its path."""
    doc = {
        "vantage": "bench",
        "defaults": {"interval": f"{int(interval * 1000)}ms", "timeout": f"{int(timeout * 1000)}ms",
                     "path": {"samples": samples, "spread": f"{int(spread * 1000)}ms"}},
        "targets": [{"name": f"t{i:05d}", "address": address} for i in range(pairs)],
    }
    path.write_text(json.dumps(doc, indent=1))
    return path


def path_totals(text: str) -> tuple[float, float]:
    sent = lost = 0.0
    for line in text.splitlines():
        if line.startswith("probe_path_sent_total{"):
            sent += float(line.rpartition(" ")[2])
        elif line.startswith("probe_path_lost_total{"):
            lost += float(line.rpartition(" ")[2])
    return sent, lost


def lag_at_scale(workdir: Path, pairs: int, samples: int, interval: float, seconds: float) -> dict[str, Any]:
    """Run `probe run` with path sampling on every pair; return lag, samples, loss and CPU between two scrapes."""
    pki = lab.make_pki(workdir, "localhost", "127.0.0.1")
    targets, ports = lab.start_targets(workdir, pki)
    try:
        cfg = path_config(workdir / "path-scale.json", f"127.0.0.1:{ports['tcp']}", pairs, samples, interval, SPREAD)
        with lab.project(workdir, str(cfg), "path-scale") as (proc, base):
            time.sleep(interval + SPREAD + 2)  # every job has started once and its first path run ended
            body, _ = lab.timed_fetch(base, "/metrics")
            before, sent0 = Scrape(body.decode()), path_totals(body.decode())
            cpu = procstat.CpuMeter({"probe": proc.pid})
            cpu.start()
            t0 = time.monotonic()
            time.sleep(seconds)
            body, scrape_seconds = lab.timed_fetch(base, "/metrics")
            took = time.monotonic() - t0
            cpu_figures = cpu.stop()
            after, sent1 = Scrape(body.decode()), path_totals(body.decode())
        sent, lost = sent1[0] - sent0[0], sent1[1] - sent0[1]
        return {
            "pairs": pairs, "samples_per_run": samples, "interval_s": interval, "spread_s": SPREAD,
            "window_s": round(took, 1), "load_average": procstat.load_average(),
            "lag": lag_between(before, after),
            "samples_sent": sent, "samples_lost": lost, "samples_per_second": sent / took,
            "probes": after.total_runs - before.total_runs,
            "metrics_seconds": round(scrape_seconds, 3), "metrics_samples": after.samples,
            "path_samples_exposed": sum(1 for line in body.decode().splitlines() if line.startswith("probe_path_")),
            "cpu": cpu_figures,
        }
    finally:
        targets.stop()


# --- accuracy, inside the client namespace ---------------------------------------------------


async def _sample_runs(address: str, port: int, pairs: int, samples: int, spread: float, rounds: int,
                       wait: float) -> list[float]:
    from probe import config
    from probe.context import ProbeContext
    from probe.probers import path

    cfg = config.loads(json.dumps({
        "vantage": "bench",
        "defaults": {"interval": "10s", "timeout": "2s",
                     "path": {"samples": samples, "spread": f"{int(spread * 1000)}ms"}},
        "targets": [{"name": f"a{i:03d}", "address": f"{address}:{port}"} for i in range(pairs)],
    }))
    ctx = ProbeContext(cfg)
    rtts: list[float] = []
    try:
        for _ in range(rounds):
            runs = await asyncio.gather(*(path.run(t, cfg.route("direct"), ctx, wait=wait) for t in cfg.targets))
            for r in runs:
                rtts.extend(r.rtts)
    finally:
        await ctx.close()
    return rtts


def inner_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    from probe.loop import run

    delay = args.delay_ms / 1000
    # Samples in flight = sample rate x DELAY; each pair sends samples/spread a second.
    pairs = max(1, round(args.in_flight / delay / (args.samples / args.spread)))
    control = accuracy.Control(Path(args.workdir), "path", accuracy.CONTROL_COUNT)
    rtts = run(_sample_runs(accuracy.SERVER_IP, accuracy.HTTPS_PORT, pairs, args.samples, args.spread, args.rounds,
                            wait=0.9))
    errors = [(r - delay) * 1000 for r in rtts]
    expected = pairs * args.samples * args.rounds
    return {
        "delay_ms": args.delay_ms, "pairs": pairs, "samples_per_second": pairs * args.samples / args.spread,
        "in_flight_planned": pairs * args.samples / args.spread * delay,
        "samples": len(rtts), "lost": expected - len(rtts),
        "error_ms_median": statistics.median(errors) if errors else float("nan"),
        "error_ms_p99": percentile(errors, 0.99), "error_ms_max": max(errors, default=float("nan")),
        "reference": accuracy._errors(control.samples(), delay),
    }


def accuracy_under_load(workdir: Path, delay_ms: float, in_flight: int, samples: int, rounds: int) -> dict[str, Any]:
    """Build the accuracy lab, run the sampler inside its client namespace, tear it down."""
    pki = lab.make_pki(workdir, accuracy.SERVER_IP)
    accuracy.setup_namespaces()
    procs: list[lab.Proc] = []
    try:
        targets, _ = lab.start_targets(workdir, pki, accuracy.SERVER_IP, accuracy.SERVER_NS,
                                       https_port=accuracy.HTTPS_PORT)
        procs.append(targets)
        rt = ["chrt", "-f", "50"] if accuracy._can_use_realtime() else []
        delay = lab.Proc("delay", [*rt, lab.python(), "-m", "tests.lab.tamper", "delay", "--queue",
                                   str(accuracy.QUEUE), "--ms", str(delay_ms), "--max-seconds", "900"],
                         workdir / "path-delay.log", accuracy.SERVER_NS)
        procs.append(delay)
        delay.readline()
        inner = lab.Proc("path-accuracy", [lab.python(), "-m", "bench.path", "inner-accuracy", "--workdir",
                                           str(workdir), "--delay-ms", str(delay_ms), "--in-flight", str(in_flight),
                                           "--samples", str(samples), "--spread", str(SPREAD), "--rounds",
                                           str(rounds)],
                         workdir / "path-accuracy.log", accuracy.CLIENT_NS)
        procs.append(inner)
        out = inner.wait(timeout=rounds * (SPREAD + 2) + 180)
        if inner.popen.returncode != 0:
            raise RuntimeError(f"path accuracy run failed:\n{inner.log.read_text()[-3000:]}")
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        result["load_average"] = procstat.load_average()
        return result
    finally:
        for p in reversed(procs):
            p.stop()
        accuracy.teardown_namespaces()


def main(argv: list[str] | None = None) -> int:
    """Run the path sampling benchmark, or its inner accuracy part."""
    parser = argparse.ArgumentParser(prog="python -m bench.path")
    sub = parser.add_subparsers(dest="cmd")
    p = sub.add_parser("inner-accuracy", help="inside the client namespace (started by the benchmark)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--delay-ms", type=float, required=True)
    p.add_argument("--in-flight", type=int, required=True)
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--spread", type=float, required=True)
    p.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--interval", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--delay-ms", type=float, default=200.0)
    parser.add_argument("--in-flight", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-path"))
    parser.add_argument("--out", type=Path, default=Path("bench-results-path.json"))
    args = parser.parse_args(argv)
    if args.cmd == "inner-accuracy":
        print(json.dumps(inner_accuracy(args)), flush=True)
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if not args.skip_scale:
        results["scale"] = lag_at_scale(args.workdir, args.pairs, args.samples, args.interval, args.seconds)
        print(json.dumps(results["scale"]), file=sys.stderr, flush=True)
    if not args.skip_accuracy:
        results["accuracy"] = accuracy_under_load(args.workdir, args.delay_ms, args.in_flight, 100, args.rounds)
        print(json.dumps(results["accuracy"]), file=sys.stderr, flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
