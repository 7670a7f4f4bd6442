"""Where an HTTP/3 probe's CPU goes: N probes in this process under cProfile, against bench.targets' HTTP/3.

    python -m bench.quic_profile [--probes 300] [--top 25]

The probes run one after another (no concurrency, so nothing else shares the process) through
the project's own prober (probe.runner.run_probe) with a fresh QUIC connection each, as
`probe run` does. Prints CPU ms per probe (process time, with and without the profiler) and the
functions, then the packages, that took the most of it. The server runs in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench import lab
from bench.figures import write_config
from probe import config as config_module
from probe.context import ProbeContext
from probe.models import Outcome
from probe.runner import run_probe

_PACKAGES = (
    ("aioquic/tls", "aioquic TLS 1.3 (handshake, certificate verification)"),
    ("aioquic/quic/crypto", "aioquic packet protection"),
    ("aioquic/quic/", "aioquic QUIC (packets, frames, recovery)"),
    ("aioquic/h3", "aioquic HTTP/3"),
    ("aioquic", "aioquic (other)"),
    ("cryptography", "cryptography (key exchange, signatures)"),
    ("OpenSSL", "pyOpenSSL (certificate verification)"),
    ("service_identity", "service_identity (host name check)"),
    ("asyncio", "asyncio"),
    ("/probe/", "the project"),
)


async def _probes(cfg: config_module.Config, n: int) -> tuple[float, int]:
    ctx = ProbeContext(cfg)
    ok = 0
    begin = time.process_time()
    try:
        for _ in range(n):
            result = await run_probe(cfg.targets[0], cfg.route("direct"), ctx)
            ok += result.outcome is Outcome.OK
    finally:
        await ctx.close()
    return time.process_time() - begin, ok


def _package(filename: str) -> str:
    for needle, name in _PACKAGES:
        if needle in filename:
            return name
    return "other (the interpreter, builtins, C calls)" if filename.startswith("~") else "other"


def main(argv: list[str] | None = None) -> int:
    """Profile HTTP/3 probes; print the figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.quic_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=300)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pb-quic-") as tmp:
        workdir = Path(tmp)
        pki = lab.make_pki(workdir, "127.0.0.1")
        targets, ports = lab.start_targets(workdir, pki)
        try:
            path = write_config(workdir / "h3.yml", [f"https://127.0.0.1:{ports['h3']}/api/ping"], interval=10,
                                ca_file=pki.ca_file, http_version=3)
            cfg = config_module.load(str(path))
            asyncio.run(_probes(cfg, 20))  # warm up: imports, caches
            plain, ok = asyncio.run(_probes(cfg, args.probes))
            profiler = cProfile.Profile()
            profiler.enable()
            profiled, _ = asyncio.run(_probes(cfg, args.probes))
            profiler.disable()
        finally:
            targets.stop()
    stats = pstats.Stats(profiler)
    by_package: dict[str, float] = defaultdict(float)
    raw = stats.stats  # type: ignore[attr-defined]  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
    total = sum(v[2] for v in raw.values())
    for (filename, _line, _name), v in raw.items():
        by_package[_package(filename)] += v[2]
    out = {
        "probes": args.probes, "ok": ok,
        "cpu_ms_per_probe": 1000 * plain / args.probes,
        "cpu_ms_per_probe_profiled": 1000 * profiled / args.probes,
        "self_time_share_by_package": {k: round(v / total, 3) for k, v in
                                       sorted(by_package.items(), key=lambda kv: -kv[1])},
    }
    print(json.dumps(out, indent=1))
    stats.sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
