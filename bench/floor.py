"""The floor: what a bare HTTPS client costs on this stack, with none of the project around it.

    python -m bench.floor --url https://127.0.0.1:PORT/ --ca-file ca.pem --rate 300 --seconds 10

Each request is what one of the project's HTTPS probes does on the wire (a fresh TCP connection,
a verified TLS handshake, `GET /`, the response read to its end, an abort), through the project's
own connection code (`probe.net.dial`) on uvloop, started on the same 50 ms grid as `probe run`'s
scheduler, but with no scheduler, HTTP parser, classification, store or metrics. Its CPU per
request is the least any Python probe on this interpreter and OpenSSL can spend; docs/benchmarks.md
sets it beside the project's and blackbox_exporter's. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import ssl
import sys
from pathlib import Path
from urllib.parse import urlsplit

from probe.config import Route
from probe.loop import run
from probe.net import dial
from probe.scheduler import START_GRID_SECONDS
from probe.trace import Trace

WARM_UP_SECONDS = 2.0


async def fetch(host: str, port: int, server_name: str, context: ssl.SSLContext, request: bytes) -> bool:
    conn = await dial.connect(host, port, Route(name="direct"), Trace())
    try:
        await conn.start_tls(context, server_name)
        conn.write(request)
        head = b""
        while data := await conn.read(65536):
            head = head or data
        return head.startswith(b"HTTP/1.1 200")
    finally:
        conn.abort()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(args: argparse.Namespace) -> dict[str, object]:
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 443
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=args.ca_file)
    request = f"GET / HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[bool]] = set()
    counts = {"ok": 0, "failed": 0}

    def done(task: asyncio.Task[bool]) -> None:
        tasks.discard(task)
        ok = not task.cancelled() and task.exception() is None and task.result()
        counts["ok" if ok else "failed"] += 1

    def start(n: int) -> None:
        for _ in range(n):
            task = loop.create_task(fetch(host, port, args.server_name or host, context, request))
            tasks.add(task)
            task.add_done_callback(done)

    per_slot = args.rate * START_GRID_SECONDS
    begin = loop.time() + 0.05
    slots = int((WARM_UP_SECONDS + args.seconds) / START_GRID_SECONDS)
    for k in range(slots):  # the same number of starts in every slot, spread by carrying the fraction
        n = int((k + 1) * per_slot) - int(k * per_slot)
        loop.call_at(begin + k * START_GRID_SECONDS, start, n)
    await asyncio.sleep(begin + WARM_UP_SECONDS - loop.time())
    before_cpu, before = cpu_seconds(), dict(counts)
    await asyncio.sleep(args.seconds)
    while tasks:  # the window's last requests finish inside it
        await asyncio.sleep(0.01)
    cpu = cpu_seconds() - before_cpu
    probes = counts["ok"] + counts["failed"] - before["ok"] - before["failed"]
    return {
        "rate_wanted": args.rate, "seconds": args.seconds, "requests": probes, "ok": counts["ok"] - before["ok"],
        "cpu_seconds": cpu, "cpu_ms_per_probe": 1000 * cpu / max(probes, 1),
    }


def run_beside(workdir: Path, url: str, ca_file: str, rate: float, seconds: float) -> dict[str, object]:
    """Run the floor in its own process (as the benchmark runs `probe run`); return its figures."""
    from bench import lab

    argv = [lab.python(), "-m", "bench.floor", "--url", url, "--ca-file", ca_file, "--rate", str(rate),
            "--seconds", str(seconds)]
    proc = lab.Proc("floor", argv, workdir / f"floor-{rate:.0f}.log")
    figures: dict[str, object] = json.loads(proc.wait(timeout=seconds + WARM_UP_SECONDS + 60))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--server-name")
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    print(json.dumps(run(measure(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
