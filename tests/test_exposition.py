"""The direct text exposition of the per-pair families exposes exactly what prometheus_client would."""

from __future__ import annotations

import time

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from probe import exposition, metrics
from probe.config import loads
from probe.models import DnsResult, Outcome, Phase, ProbeResult, TlsInfo
from probe.store import ResultStore

CONFIG = """
vantage: 'test "quoted" vantage'
resolvers:
  - {name: system, type: system}
routes:
  - {name: direct}
  - {name: bound, source_address: 127.0.0.2}
targets:
  - name: web
    url: https://web.example/ping
    routes: [direct, bound]
    download: {url: https://web.example/1MiB.bin, min_bytes_per_second: 1000}
  - name: plain
    url: http://198.51.100.7/
  - name: ssh
    address: 127.0.0.1:22
    routes: [direct, bound]
  - name: s3-tls
    address: 127.0.0.1:443
    tls: true
  - name: never-run
    address: 127.0.0.1:23
"""

TLS = TlsInfo("TLS 1.3", 1_900_000_000.0, "TLS_AES_128_GCM_SHA256")


def _store() -> tuple[ResultStore, object]:
    cfg = loads(CONFIG)
    store = ResultStore(cfg)
    now = time.time()
    phases = {Phase.RESOLVE: 0.002, Phase.CONNECT: 0.031, Phase.TLS: 0.0625, Phase.PROCESSING: 0.2,
              Phase.TRANSFER: 1e-05}
    for i in range(3):
        store.record(ProbeResult("web", "direct", Outcome.OK, now + i, 0.3 + i, phases=phases, tls=TLS,
                                 http_status=200, throughput_bytes_per_second=123456.5, address="198.51.100.1"))
    store.record(ProbeResult("web", "bound", Outcome.THROTTLED, now, 7.5, phases=phases, tls=TLS, http_status=200,
                             throughput_bytes_per_second=10.0))
    store.record(ProbeResult("plain", "direct", Outcome.HTTP_UNEXPECTED, now, 0.01,
                             phases={Phase.CONNECT: 0.004, Phase.PROCESSING: 0.003}, http_status=451))
    store.record(ProbeResult("ssh", "direct", Outcome.TCP_REFUSED, now, 0.001, phases={Phase.RESOLVE: 0.0}))
    store.record(ProbeResult("ssh", "bound", Outcome.TCP_TIMEOUT, now, 10.0, phases={Phase.RESOLVE: 0.5}))
    store.record(ProbeResult("s3-tls", "direct", Outcome.TLS_CERT_INVALID, now, 0.05,
                             phases={Phase.CONNECT: 0.01, Phase.TLS: 0.02}, tls=TlsInfo("TLS 1.2", None)))
    store.record_dns("web", (DnsResult("system", Outcome.OK, ("198.51.100.1",), 1, True, 0.003),))
    store.observe_lag(0.02)
    return store, cfg


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def _types(text: bytes) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text.decode())}


def test_direct_exposition_has_the_same_samples_as_prometheus_client() -> None:
    store, cfg = _store()
    fast = metrics.render(store, cfg)  # type: ignore[arg-type]
    reference = generate_latest(metrics.build_registry(store, cfg))  # type: ignore[arg-type]
    ours, theirs = _samples(fast), _samples(reference)
    volatile = ("process_", "python_gc_")  # the process' own figures move between the two renders
    assert {k for k in ours if not k[0].startswith(volatile)} == {k for k in theirs if not k[0].startswith(volatile)}
    for key, v in theirs.items():
        if not key[0].startswith(volatile):
            assert ours[key] == pytest.approx(v), key
    assert _types(fast) == _types(reference)


def test_every_pair_has_a_histogram_and_all_outcomes_even_before_its_first_run() -> None:
    store, cfg = _store()
    s = _samples(metrics.render(store, cfg))  # type: ignore[arg-type]
    never = {k for k in s if ("target", "never-run") in k[1]}
    assert {k[0] for k in never} == {"probe_outcome", "probe_runs_total", "probe_phase_seconds_bucket",
                                     "probe_phase_seconds_count", "probe_phase_seconds_sum", "probe_route_rank",
                                     "probe_route_score"}
    assert sum(1 for k in never if k[0] == "probe_outcome") == len(Outcome)


@pytest.mark.parametrize(("raw", "written"), [(0.1, "0.1"), (1e-05, "1e-05"), (float("inf"), "+Inf"),
                                              (float("-inf"), "-Inf"), (float("nan"), "NaN"), (3, "3.0")])
def test_values_are_written_as_the_text_format_reads_them(raw: float, written: str) -> None:
    assert exposition.value(raw) == written


def test_label_values_are_escaped() -> None:
    assert exposition.label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
