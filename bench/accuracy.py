"""Timing accuracy: the measured `connect` phase against a known delay, at rest and with ~200 probes in flight.

Two namespaces joined by a veth pair: `pbbc` (the clients: the project, blackbox_exporter and its
driver) and `pbbs` (the targets). In `pbbs` every SYN-ACK the HTTPS server sends goes through
NFQUEUE to the lab's delay program (tests/lab/tamper.py), which holds it DELAY ms: a TCP
connect from `pbbc` then takes DELAY ms plus the veth round trip (tens of microseconds). The
error of a tool is its measured connect phase minus DELAY. A plain blocking connect() from
a separate process, timed with perf_counter, shows what the lab really adds.

For the loaded case each probe asks for `/slow?ms=...`, so it stays open ~1.8 s after its
connect; enough targets at a 2 s interval keep ~200 probes in flight. The server counts its
open connections, and the benchmark samples that count (`in_flight`).

    python -m bench.accuracy inner ...   # runs inside pbbc; started by run()
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import lab
from bench.figures import percentile, write_config

CLIENT_NS, SERVER_NS = "pbbc", "pbbs"
CLIENT_IF, SERVER_IF = "pbbc0", "pbbs0"
CLIENT_IP, SERVER_IP = "198.51.100.1", "198.51.100.2"
HTTPS_PORT = 8443
QUEUE = 77
SLOW_MS = 1750
CONTROL_COUNT = 40  # plain connects, one per 50 ms, beside each loaded run
INTERVAL = 2.0


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def setup_namespaces() -> None:
    """Create the namespace pair and the NFQUEUE rule for the server's SYN-ACKs."""
    teardown_namespaces()
    _ip("netns", "add", CLIENT_NS)
    _ip("netns", "add", SERVER_NS)
    _ip("link", "add", CLIENT_IF, "netns", CLIENT_NS, "type", "veth", "peer", "name", SERVER_IF,
        "netns", SERVER_NS)
    for ns, iface, addr in ((CLIENT_NS, CLIENT_IF, CLIENT_IP), (SERVER_NS, SERVER_IF, SERVER_IP)):
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", iface)
        _ip("-n", ns, "link", "set", iface, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
    subprocess.run(
        ["ip", "netns", "exec", SERVER_NS, "iptables", "-A", "OUTPUT", "-p", "tcp", "--sport", str(HTTPS_PORT),
         "--tcp-flags", "SYN,ACK", "SYN,ACK", "-j", "NFQUEUE", "--queue-num", str(QUEUE)],
        check=True, capture_output=True,
    )


def _can_use_realtime() -> bool:
    if shutil.which("chrt") is None:
        return False
    return subprocess.run(["chrt", "-f", "50", "true"], capture_output=True).returncode == 0


def teardown_namespaces() -> None:
    for ns in (CLIENT_NS, SERVER_NS):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def run(workdir: Path, pki: lab.Pki, delay_ms: float, seconds: float, in_flight: int) -> dict[str, Any]:
    """Build the lab, run the inner measurement inside the client namespace, tear everything down."""
    setup_namespaces()
    procs: list[lab.Proc] = []
    try:
        targets, ports = lab.start_targets(workdir, pki, SERVER_IP, SERVER_NS, https_port=HTTPS_PORT)
        procs.append(targets)
        # The delay program plays the network: real-time priority, so that the CPU load of the
        # tools under test (and of anything else on the machine) does not add to its delay.
        rt = ["chrt", "-f", "50"] if _can_use_realtime() else []
        delay = lab.Proc(
            "delay", [*rt, lab.python(), "-m", "tests.lab.tamper", "delay", "--queue", str(QUEUE), "--ms",
                      str(delay_ms), "--max-seconds", "900"],
            workdir / "delay.log", SERVER_NS,
        )
        procs.append(delay)
        delay.readline()
        inner = lab.Proc(
            "accuracy", [lab.python(), "-m", "bench.accuracy", "inner", "--workdir", str(workdir),
                         "--ca-file", pki.ca_file, "--cert", pki.cert, "--key", pki.key,
                         "--delay-ms", str(delay_ms), "--seconds", str(seconds), "--in-flight", str(in_flight),
                         "--stats-port", str(ports["stats"])],
            workdir / "accuracy.log", CLIENT_NS,
        )
        procs.append(inner)
        out = inner.wait(timeout=seconds * 6 + 180)
        if inner.popen.returncode != 0:
            raise RuntimeError(f"accuracy run failed:\n{inner.log.read_text()[-3000:]}")
        return dict(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in reversed(procs):
            p.stop()
        teardown_namespaces()


# --- inside the client namespace ---------------------------------------------------------


def _errors(samples: list[float], delay: float) -> dict[str, float]:
    errors = [(s - delay) * 1000 for s in samples]
    return {
        "samples": len(samples),
        "error_ms_median": statistics.median(errors) if errors else float("nan"),
        "error_ms_p99": percentile(errors, 0.99),
        "error_ms_max": max(errors) if errors else float("nan"),
    }


class InFlight:
    """Samples the server's count of open HTTPS connections."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.samples: list[int] = []

    def sample(self) -> None:
        self.samples.append(lab.target_stats(SERVER_IP, self.port)["open"])

    def summary(self) -> dict[str, float]:
        return {"in_flight_mean": statistics.mean(self.samples) if self.samples else 0.0,
                "in_flight_min": min(self.samples, default=0)}


def reference(count: int, start_after: float = 0.0) -> list[float]:
    """Time plain blocking connects: what the lab's path really takes."""
    time.sleep(start_after)
    out = []
    for _ in range(count):
        with socket.socket() as s:
            t0 = time.perf_counter()
            s.connect((SERVER_IP, HTTPS_PORT))
            out.append(time.perf_counter() - t0)
        time.sleep(0.05)
    return out


class Control:
    """Plain blocking connects from a separate process while a tool runs: the lab's own delay at that moment."""

    def __init__(self, workdir: Path, tag: str, count: int) -> None:
        self.proc = lab.Proc("control", [lab.python(), "-m", "bench.accuracy", "reference", "--count", str(count)],
                             workdir / f"control-{tag}.log")

    def samples(self) -> list[float]:
        return list(json.loads(self.proc.wait(timeout=120)))


def project_samples(args: argparse.Namespace, n: int, path: str, interval: float, seconds: float,
                    meter: InFlight) -> list[float]:
    workdir = Path(args.workdir)
    cfg = write_config(workdir / f"accuracy-{n}.yml", [f"https://{SERVER_IP}:{HTTPS_PORT}{path}"] * n,
                       interval=interval, ca_file=args.ca_file)
    seen: dict[tuple[str, float], float] = {}
    with lab.project(workdir, str(cfg), f"accuracy-{n}", netns=None) as (_, base):
        time.sleep(interval + 1)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            body, _ = lab.http_get(base + "/api/results")
            for r in json.loads(body)["results"]:
                if r["outcome"] == "ok" and "connect" in r["phases"]:
                    seen[(r["target"], r["started_at"])] = r["phases"]["connect"]
            meter.sample()
            time.sleep(min(interval, 1.0) / 2)
    return list(seen.values())


def blackbox_samples(args: argparse.Namespace, rate: float, path: str, seconds: float,
                     meter: InFlight) -> list[float]:
    workdir = Path(args.workdir)
    pki = lab.Pki(args.ca_file, args.cert, args.key)
    with lab.blackbox(workdir, pki, f"accuracy-{rate}") as (_, exporter):
        driver = lab.start_driver(workdir, exporter, "https", [f"https://{SERVER_IP}:{HTTPS_PORT}{path}"], rate,
                                  seconds + INTERVAL, f"accuracy-{rate}", phases=True)
        time.sleep(INTERVAL)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            meter.sample()
            time.sleep(0.5)
        result = json.loads(driver.wait(timeout=seconds + 60))
    return list(result["connect"])


def inner(args: argparse.Namespace) -> dict[str, Any]:
    delay = args.delay_ms / 1000
    # A little over in_flight x interval / time-open: the spread over the interval is not perfectly even.
    n_loaded = max(1, round(1.04 * args.in_flight * INTERVAL / (SLOW_MS / 1000 + delay)))
    slow = f"/slow?ms={SLOW_MS}"
    out: dict[str, Any] = {"delay_ms": args.delay_ms, "reference": _errors(reference(20), delay)}
    rest = InFlight(args.stats_port)
    out["probe_rest"] = _errors(project_samples(args, 1, "/", 0.25, args.seconds, rest), delay)
    out["probe_rest"].update(rest.summary())
    loaded = InFlight(args.stats_port)
    control = Control(Path(args.workdir), "probe", CONTROL_COUNT)
    out["probe_loaded"] = _errors(project_samples(args, n_loaded, slow, INTERVAL, args.seconds, loaded), delay)
    out["probe_loaded"].update(loaded.summary(), targets=n_loaded)
    out["reference_probe_loaded"] = _errors(control.samples(), delay)
    rest = InFlight(args.stats_port)
    out["blackbox_rest"] = _errors(blackbox_samples(args, 4, "/", args.seconds, rest), delay)
    out["blackbox_rest"].update(rest.summary())
    loaded = InFlight(args.stats_port)
    rate = n_loaded / INTERVAL
    control = Control(Path(args.workdir), "blackbox", CONTROL_COUNT)
    out["blackbox_loaded"] = _errors(blackbox_samples(args, rate, slow, args.seconds, loaded), delay)
    out["blackbox_loaded"].update(loaded.summary(), rate=rate)
    out["reference_blackbox_loaded"] = _errors(control.samples(), delay)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inner", help="measure inside the client namespace (started by the benchmark)")
    for name in ("--workdir", "--ca-file", "--cert", "--key"):
        p.add_argument(name, required=True)
    p.add_argument("--delay-ms", type=float, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--in-flight", type=int, required=True)
    p.add_argument("--stats-port", type=int, required=True)
    p = sub.add_parser("reference", help="time plain connects (a control run beside a tool)")
    p.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "reference":
        print(json.dumps(reference(args.count, start_after=INTERVAL + 1)), flush=True)
    else:
        print(json.dumps(inner(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
