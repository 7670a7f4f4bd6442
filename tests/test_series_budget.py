"""The series budget (DESIGN "Series budget"), counted in a real /metrics scrape of a real `probe run`.

A real HTTPS server with a throwaway CA, a relay that resets after the ClientHello (an SNI filter),
a DNS server for the name; `probe run` probes them over two routes and is scraped as Prometheus
scrapes it (Accept-Encoding: gzip). The test counts the series of every (target, route) pair.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from probe.models import Phase
from probe.store import PHASE_BUCKETS
from tests.dnsserver import DnsServer, answer
from tests.servers import Pki, aiohttp_server, raw_server, reset_after_client_hello

BUDGET = 30  # DESIGN: at most 30 series per pair for an HTTPS target with default settings
ROUTES = ["direct", "bound"]


def ping_app() -> web.Application:
    async def ping(request: web.Request) -> web.Response:
        return web.Response(text="pong")

    app = web.Application()
    app.router.add_get("/ping", ping)
    return app


def config(https_port: int, relay_port: int, dns_port: int, ca_file: Path) -> dict[str, Any]:
    def target(name: str, port: int, **extra: object) -> dict[str, Any]:
        return {"name": name, "url": f"https://localhost:{port}/ping", "routes": ROUTES, **extra}

    return {
        "vantage": "budget-test",
        "defaults": {"interval": "500ms", "timeout": "400ms", "ca_file": str(ca_file)},
        "resolvers": [{"name": "lab", "type": "udp", "address": f"127.0.0.1:{dns_port}", "control": True}],
        "bogons": [],  # the loopback answers stand in for public addresses
        "routes": [{"name": "direct"}, {"name": "bound", "source_address": "127.0.0.1"}],
        "targets": [
            target("storage", https_port),  # default settings: the budget's case
            target("filtered", relay_port),  # every run tls_reset
            target("storage-histograms", https_port, histograms=True),  # the opt-in
        ],
    }


def series_per_pair(text: str) -> tuple[Counter[tuple[str, str]], Counter[tuple[str, str]], set[str]]:
    """Return the series count per (target, route), per (target, resolver), and the names of the other series."""
    pairs: Counter[tuple[str, str]] = Counter()
    resolvers: Counter[tuple[str, str]] = Counter()
    others = set()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "route" in s.labels:
                pairs[(s.labels["target"], s.labels["route"])] += 1
            elif "resolver" in s.labels:
                resolvers[(s.labels["target"], s.labels["resolver"])] += 1
            else:
                others.add(s.name)
    return pairs, resolvers, others


async def test_a_real_scrape_of_probe_run_stays_within_30_series_per_pair(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    pki = Pki(tmp_path)
    async with (
        aiohttp_server(ping_app(), pki.server_context()) as https_port,
        raw_server(reset_after_client_hello) as relay_port,
        DnsServer(answer({"localhost": ["127.0.0.1"]})) as dns,
    ):
        path = tmp_path / "targets.yml"
        path.write_text(json.dumps(config(https_port, relay_port, dns.port, pki.ca_file)))
        env = {k: v for k, v in os.environ.items() if k != "PROBE_VANTAGE"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "probe", "run", "-c", str(path), "--listen", "127.0.0.1:0",
            stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL, env=env,
        )
        try:
            assert proc.stderr is not None
            line = ""
            while "listening on" not in line:
                line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
                assert line, "probe run exited"
            match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            assert match
            url = match.group(1) + "/metrics"
            async with aiohttp.ClientSession(auto_decompress=False) as session:
                # Until every pair ran at least twice (a second outcome could add a run counter).
                for _ in range(100):
                    async with session.get(url, headers={"Accept-Encoding": "identity"}) as r:
                        text = await r.text()
                    runs: Counter[tuple[str, str]] = Counter()
                    for family in text_string_to_metric_families(text):
                        for s in family.samples:
                            if s.name == "probe_runs_total":
                                runs[(s.labels["target"], s.labels["route"])] += int(s.value)
                    if len(runs) == 6 and min(runs.values()) >= 2:
                        break
                    await asyncio.sleep(0.2)
                else:
                    raise AssertionError(f"not every pair ran twice: {runs}")
                # As Prometheus scrapes: it always accepts gzip.
                async with session.get(url, headers={"Accept-Encoding": "gzip"}) as r:
                    assert r.headers["Content-Encoding"] == "gzip" and r.headers["Vary"] == "Accept-Encoding"
                    body = await r.read()
        finally:
            proc.terminate()
            await proc.wait()

    assert body[:2] == b"\x1f\x8b"  # a gzip member
    text = gzip.decompress(body).decode()
    pairs, resolvers, _ = series_per_pair(text)
    record_property("series_per_pair", json.dumps({f"{t}/{r}": n for (t, r), n in sorted(pairs.items())}))
    record_property("gzip_bytes", len(body))
    print(f"\n[series budget] per pair: {dict(pairs)}; per (target, resolver): {dict(resolvers)}; "
          f"{len(body)} bytes gzip, {len(text.encode())} identity")

    assert set(pairs) == {(t, r) for t in ("storage", "filtered", "storage-histograms") for r in ROUTES}
    for route in ROUTES:
        assert pairs[("storage", route)] <= BUDGET, text
        assert pairs[("filtered", route)] <= BUDGET, text
        # The opt-in adds the histogram: per phase its buckets (+Inf included), _count and _sum.
        assert pairs[("storage-histograms", route)] == pairs[("storage", route)] + len(Phase) * (
            len(PHASE_BUCKETS) + 1 + 2)
    # DNS series are per (target, resolver), counted apart (as DESIGN does): lookup time, replies,
    # consistent (when there is something to compare), outcome.
    assert set(resolvers) == {(t, "lab") for t in ("storage", "filtered", "storage-histograms")}
    assert max(resolvers.values()) <= 4
    outcomes = {(s.labels["target"], s.labels["route"]): s.labels["outcome"]
                for f in text_string_to_metric_families(text) if f.name == "probe_outcome" for s in f.samples}
    assert len(outcomes) == sum(1 for line in text.splitlines() if line.startswith("probe_outcome{"))  # one per pair
    assert outcomes[("filtered", "direct")] == "tls_reset" and outcomes[("storage", "direct")] == "ok"
