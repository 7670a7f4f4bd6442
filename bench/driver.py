"""Load driver for blackbox_exporter: call /probe at a fixed rate, as Prometheus would scrape it.

    python -m bench.driver --exporter 127.0.0.1:9115 --module https --target URL --rate 300 --seconds 20

Request i is sent at start + i/rate (open loop: a slow exporter does not slow the driver down),
over a keep-alive connection pool, like Prometheus' scraper. Prints one JSON line: requests
sent, probes that succeeded, the driver's own lateness against its schedule (to show it kept
the rate), and with --phases the `connect` phase of every successful probe.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time

import aiohttp

MAX_IN_FLIGHT = 2048


def parse_probe(text: str) -> tuple[bool, float | None]:
    """Return (probe_success, connect phase seconds or None) from a /probe response."""
    success, connect = False, None
    for line in text.splitlines():
        if line.startswith("probe_success "):
            success = float(line.split()[1]) == 1.0
        elif line.startswith('probe_http_duration_seconds{phase="connect"}'):
            connect = float(line.split()[1])
    return success, connect


async def drive(args: argparse.Namespace) -> dict[str, object]:
    total = int(args.rate * args.seconds)
    url = f"http://{args.exporter}/probe"
    ok = failed = 0
    connects: list[float] = []
    lateness: list[float] = []
    limit = asyncio.Semaphore(MAX_IN_FLIGHT)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(target: str) -> None:
            nonlocal ok, failed
            try:
                params = {"module": args.module, "target": target}
                async with session.get(url, params=params) as resp:
                    text = await resp.text()
                success, connect = parse_probe(text)
            except (aiohttp.ClientError, TimeoutError):
                success, connect = False, None
            finally:
                limit.release()
            if success:
                ok += 1
                if connect is not None and args.phases:
                    connects.append(connect)
            else:
                failed += 1

        tasks = set()
        start = time.monotonic()
        for i in range(total):
            due = start + i / args.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            lateness.append(max(0.0, time.monotonic() - due))
            await limit.acquire()
            task = asyncio.create_task(one(args.targets[i % len(args.targets)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    lateness.sort()
    return {
        "sent": total,
        "ok": ok,
        "failed": failed,
        "seconds": time.monotonic() - start,
        "lateness_p99": lateness[int(0.99 * (len(lateness) - 1))] if lateness else 0.0,
        "connect": connects,
        "cpu_seconds": _cpu(),  # its own: the process is gone when the benchmark could read /proc
    }


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.driver")
    parser.add_argument("--exporter", required=True, help="host:port of blackbox_exporter")
    parser.add_argument("--module", required=True)
    parser.add_argument("--target", dest="targets", action="append", required=True)
    parser.add_argument("--rate", type=float, required=True, help="probes per second")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--phases", action="store_true", help="report the connect phase of every probe")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(drive(args))
    else:
        result = uvloop.run(drive(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
