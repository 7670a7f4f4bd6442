"""CPU of one /metrics render, in-process, on a store filled as `probe run` fills it.

The scale part times whole scrapes of `probe run` while it probes, but its targets are IP
addresses (no DNS check) on loopback. This part prices the text itself for the shapes a
deployment has: HTTPS targets by address, and HTTPS targets by host name checked against
two resolvers (four DNS series per resolver and target). Each figure is the median of
`repeats` renders' process CPU (time.process_time), warm (a few pairs recorded since the
last render, as between back-to-back scrapes) and after `dirty` of the pairs recorded
(a scrape every 15 s while 400 probes a second record).
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Any

from probe.config import Config, loads
from probe.exporter import metrics
from probe.models import DnsResult, Outcome, Phase, ProbeResult, TlsInfo
from probe.store import ResultStore

_TLS = TlsInfo("TLS 1.3", 1_900_000_000.0, "TLS_AES_128_GCM_SHA256")


def _config(pairs: int, host_names: bool, ca_file: Path) -> str:
    lines = ["vantage: bench", "resolvers:", "  - {name: system, type: system}",
             "  - {name: ali, type: udp, address: 192.0.2.53}", "targets:"]
    for i in range(pairs):
        url = f"https://t{i}.storage.example/" if host_names else "https://127.0.0.1:8443/"
        lines.append(f"  - {{name: t{i:05d}, url: '{url}', ca_file: '{ca_file}'}}")
    return "\n".join(lines) + "\n"


def _record(store: ResultStore, name: str, rng: random.Random, dns: bool) -> None:
    phases = {Phase.RESOLVE: rng.random() * 1e-3, Phase.CONNECT: rng.random() * 0.05, Phase.TLS: rng.random() * 0.1,
              Phase.PROCESSING: rng.random() * 0.05, Phase.TRANSFER: rng.random() * 1e-3}
    store.record(ProbeResult(name, "direct", Outcome.OK, time.time(), sum(phases.values()), phases=phases, tls=_TLS,
                             http_status=200, address="198.51.100.7"))
    if dns:
        store.record_dns(name, (DnsResult("system", Outcome.OK, ("198.51.100.7",), 1, True, rng.random() * 0.01),
                                DnsResult("ali", Outcome.OK, ("198.51.100.7",), 1, True, rng.random() * 0.05)))


def _timed(store: ResultStore, cfg: Config, rng: random.Random, dirty: int, dns: bool) -> float:
    """Record `dirty` random pairs, then return the CPU ms of one render."""
    for t in rng.sample(cfg.targets, dirty):
        _record(store, t.name, rng, dns)
    t0 = time.process_time()
    metrics.render(store, cfg)
    return (time.process_time() - t0) * 1000


def measure(pairs: int, ca_file: Path, repeats: int = 5, dirty_share: float = 0.6) -> dict[str, Any]:
    """Return the render CPU (ms) and size of both shapes at `pairs` pairs."""
    out: dict[str, Any] = {"pairs": pairs, "repeats": repeats, "dirty_share": dirty_share}
    rng = random.Random(7)
    for shape, host_names in (("address", False), ("host_name", True)):
        cfg = loads(_config(pairs, host_names, ca_file))
        store = ResultStore(cfg)
        for _ in range(3):
            for t in cfg.targets:
                _record(store, t.name, rng, host_names)
        text = metrics.render(store, cfg)  # the first render builds the label texts: not timed
        warm, dirty = max(1, pairs // 200), int(pairs * dirty_share)
        out[shape] = {
            "render_cpu_ms_warm": statistics.median(_timed(store, cfg, rng, warm, host_names) for _ in range(repeats)),
            "render_cpu_ms_dirty": statistics.median(_timed(store, cfg, rng, dirty, host_names)
                                                     for _ in range(repeats)),
            "bytes": len(text),
            "lines": text.count(b"\n"),
        }
    return out
