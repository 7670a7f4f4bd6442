"""The direct text exposition of the per-pair families exposes exactly what prometheus_client would."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from probe import ranking as ranking_module
from probe.config import Config, loads
from probe.exporter import exposition, exposition_extra, metrics
from probe.models import DnsResult, Localisation, Outcome, PathMethod, PathResult, Phase, ProbeResult, TlsInfo
from probe.ranking import Candidate, Ranked
from probe.store import PHASE_BUCKETS, Histogram, ResultStore

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
    histograms: true
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
  - name: never-run-histograms
    address: 127.0.0.1:24
    histograms: true
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


def _assert_same_as_prometheus_client(store: ResultStore, cfg: Config) -> None:
    fast = metrics.render(store, cfg)
    reference = generate_latest(metrics.build_registry(store, cfg))
    ours, theirs = _samples(fast), _samples(reference)
    volatile = ("process_", "python_gc_")  # the process' own figures move between the two renders
    assert {k for k in ours if not k[0].startswith(volatile)} == {k for k in theirs if not k[0].startswith(volatile)}
    for key, v in theirs.items():
        if not key[0].startswith(volatile):
            assert ours[key] == v or (math.isnan(v) and math.isnan(ours[key])), key  # exact: the same float
    assert _types(fast) == _types(reference)


def test_direct_exposition_has_the_same_samples_as_prometheus_client() -> None:
    store, cfg = _store()
    _assert_same_as_prometheus_client(store, cfg)  # type: ignore[arg-type]


MANY = r"""
vantage: 'm"a\ny'
resolvers:
  - {name: system, type: system}
  - {name: quad, type: udp, address: 192.0.2.53}
  - {name: third, type: tcp, address: 192.0.2.54}
routes:
  - {name: direct}
  - {name: bound, source_address: 127.0.0.2}
targets:
"""


def _many(n: int, histograms: Callable[[int], bool] = lambda i: i % 5 < 2) -> str:
    text = MANY
    for i in range(n):
        kind = ("url: https://198.51.100.1/\n    download: {url: https://198.51.100.1/x, min_bytes_per_second: 10}"
                if i % 3 == 0 else "url: http://198.51.100.2/" if i % 3 == 1 else "address: 198.51.100.3:22")
        if i % 7 == 3:
            kind = f"url: https://h{i}.example/"  # a host name: DNS series per resolver
        text += f"  - name: t{i}\n    {kind}\n    routes: [direct, bound]\n"
        text += "    group: g1\n" if i % 4 == 0 else "    group: g2\n" if i % 4 == 1 else ""
        text += "    histograms: true\n" if histograms(i) else ""
        text += "    path: {samples: 5, spread: 1s}\n" if i % 3 == 2 else ""
        text += "    locate: true\n" if i % 5 == 4 and i % 3 != 2 else ""
    return text


def _random_store(rng: random.Random, n: int = 24, rounds: int = 25) -> tuple[ResultStore, Config]:
    cfg = loads(_many(n))
    store = ResultStore(cfg)
    specials = [math.inf, -math.inf, math.nan, 0.0, -0.0, 1e-300, 1e300, 12345678901.5]
    for _ in range(rounds):
        for t in cfg.targets:
            for route in t.routes:
                if rng.random() < 0.1:
                    continue  # some pairs never run, or miss rounds
                outcome = rng.choice(list(Outcome))
                odd = rng.random() < 0.05
                phases = {p: rng.choice([rng.uniform(0, 12), rng.expovariate(100), 0.0, 0.001, 10.0,
                                         *(specials if odd else ())])
                          for p in Phase if rng.random() < 0.8}
                store.record(ProbeResult(
                    t.name, route, outcome, 1.8e9 + rng.random(), rng.choice(specials) if odd else rng.random() * 5,
                    phases=phases, http_status=rng.choice([None, 200, 451]),
                    throughput_bytes_per_second=rng.choice([None, rng.random() * 1e6, *specials]),
                    tls=rng.choice([None, TLS, TlsInfo('TLS "odd"\\', rng.choice([None, math.inf, 1.9e9]))]),
                    sni_filtered=rng.choice([None, True, False])))
                if t.path is not None and rng.random() < 0.8:
                    rtts = tuple(rng.choice([rng.random() / 10, 0.0, *(specials if odd else ())])
                                 for _ in range(rng.choice([0, 1, 2, 5])))
                    store.record_path(PathResult(t.name, route, PathMethod.TCP, 1.8e9, len(rtts) + 1, 1, rtts))
                if t.locate and rng.random() < 0.3:
                    store.record_locate(t.name, route, Localisation(hop=rng.choice([None, 3, 17])))
            if t.needs_dns and rng.random() < 0.9:  # some resolvers missing, in any order
                resolvers = rng.sample(t.resolvers, rng.randint(0, len(t.resolvers)))
                store.record_dns(t.name, tuple(
                    DnsResult(r, rng.choice(list(Outcome)), ("198.51.100.1",), rng.choice([0, 1, 2]),
                              rng.choice([None, True, False]), rng.choice([None, 0.003, rng.random(), *specials]))
                    for r in resolvers))
    return store, cfg


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_direct_exposition_matches_prometheus_client_on_random_stores(seed: int) -> None:
    store, cfg = _random_store(random.Random(seed))
    _assert_same_as_prometheus_client(store, cfg)
    written = _types(metrics.render(store, cfg))  # the stores have every family exposition_extra writes
    assert {name.removesuffix("_total") for name in exposition_extra.HELP} <= set(written)


def test_chunking_does_not_change_the_text(monkeypatch: pytest.MonkeyPatch) -> None:
    store, cfg = _random_store(random.Random(4))
    whole = b"".join(exposition.render_pairs(store, cfg))
    monkeypatch.setattr(exposition, "CHUNK_LINES", 7)
    chunks = list(exposition.render_pairs(store, cfg))
    assert len(chunks) > 100 and b"".join(chunks) == whole
    assert whole.count(b"# TYPE ") == len(exposition.FAMILIES)  # this store has every family


def test_a_family_no_pair_has_is_left_out_header_included() -> None:
    cfg = loads(MANY + "  - name: ssh\n    address: 198.51.100.3:22\n")
    store = ResultStore(cfg)
    before = b"".join(exposition.render_pairs(store, cfg))
    assert {line.split(b" ")[2] for line in before.splitlines() if line.startswith(b"# TYPE")} == {
        b"probe_route_rank", b"probe_route_score"}  # nothing ran: only the rankings
    store.record(ProbeResult("ssh", "direct", Outcome.TCP_TIMEOUT, 1.8e9, 10.0))
    text = b"".join(exposition.render_pairs(store, cfg))
    for name in ("probe_http_duration_seconds", "probe_http_status_code", "probe_throughput_bytes_per_second",
                 "probe_phase_seconds", "probe_ssl_earliest_cert_expiry", "probe_tls_version_info"):
        assert name.encode() not in text
    _assert_same_as_prometheus_client(store, cfg)


def test_kept_rankings_are_those_of_the_whole_recent_results_and_are_dropped_on_reload() -> None:
    rng = random.Random(5)
    store, cfg = _random_store(rng, n=12, rounds=0)
    recorded: dict[tuple[str, str], list[ProbeResult]] = {}
    leaders: dict[str, tuple[str, str] | None] = {}
    for _ in range(60):
        t = rng.choice(cfg.targets)
        route = rng.choice(t.routes)
        ok = rng.random() < 0.7
        r = ProbeResult(t.name, route, Outcome.OK if ok else rng.choice(list(Outcome)), 1.8e9, rng.random(),
                        phases={Phase.CONNECT: rng.random() / 10, Phase.TLS: rng.random() / 10},
                        throughput_bytes_per_second=rng.choice([None, rng.random() * 1e6]))
        store.record(r)
        recorded.setdefault((t.name, route), []).append(r)
        # The ranking afresh from the whole results kept by the test, with the leader it had.
        whole = ranking_module.rank(
            [Candidate(t.name, x, recorded.get((t.name, x), [])[-ranking_module.WINDOW:], t.timeout) for x in t.routes],
            leaders.get(t.name))
        leaders[t.name] = ranking_module.leader_of(whole)
        assert store.ranking()[t.name] == whole
    # Every target's kept ranking is what ranking afresh gives (another config object is never cached).
    assert store.ranking() == store.ranking(loads(_many(12)))
    assert store.group_ranking() == store.group_ranking(loads(_many(12)))
    smaller = loads(MANY + "  - name: t1\n    url: http://198.51.100.2/\n    routes: [direct]\n    timeout: 2s\n")
    store.reload_succeeded(smaller)
    assert list(store.ranking()) == ["t1"] and [r.route for r in store.ranking()["t1"]] == ["direct"]
    assert store.ranking() == store.ranking(loads(MANY + "  - name: t1\n    url: http://198.51.100.2/\n"
                                                         "    routes: [direct]\n    timeout: 2s\n"))


def test_phase_histograms_are_those_of_the_observations() -> None:
    rng = random.Random(6)
    store, cfg = _random_store(rng, n=3, rounds=0)
    assert cfg.target("t0").histograms and not cfg.target("t2").histograms
    expected = {p: Histogram(PHASE_BUCKETS) for p in Phase}
    for _ in range(200):
        phases = {p: rng.choice([rng.expovariate(5), 0.001, 0.01, 0.025, 3.0, 11.0])
                  for p in Phase if rng.random() < 0.7}
        store.record(ProbeResult("t0", "direct", Outcome.OK, 1.8e9, 0.1, phases=phases))
        store.record(ProbeResult("t2", "direct", Outcome.OK, 1.8e9, 0.1, phases=phases))
        for p, v in phases.items():
            expected[p].observe(v)
    for p in Phase:
        got = store.phase_histogram("t0", "direct", p)
        assert got is not None and (got.counts, got.sum) == (expected[p].counts, expected[p].sum)
    assert store.phase_histogram("t1", "direct", Phase.CONNECT) is None
    state = store.state("t2", "direct")  # histograms off: not even allocated
    assert state is not None and state.counts is None and state.sums is None
    assert store.phase_histogram("t2", "direct", Phase.CONNECT) is None


def test_histograms_follow_the_config_across_reloads() -> None:
    store, cfg = _random_store(random.Random(7), n=3, rounds=0)
    phases = {Phase.CONNECT: 0.07}
    store.record(ProbeResult("t0", "direct", Outcome.OK, 1.8e9, 0.1, phases=phases))
    store.record(ProbeResult("t2", "direct", Outcome.OK, 1.8e9, 0.1, phases=phases))
    swapped = loads(_many(3, histograms=lambda i: i != 0))
    store.reload_succeeded(swapped)
    assert store.phase_histogram("t0", "direct", Phase.CONNECT) is None  # off: dropped
    assert store.phase_histogram("t2", "direct", Phase.CONNECT) is None  # on: counts from now
    store.record(ProbeResult("t2", "direct", Outcome.OK, 1.8e9, 0.1, phases=phases))
    got = store.phase_histogram("t2", "direct", Phase.CONNECT)
    assert got is not None and got.count == 1 and got.sum == 0.07
    _assert_same_as_prometheus_client(store, swapped)


def test_before_its_first_run_a_pair_has_its_ranking_and_its_opt_in_histogram_only() -> None:
    store, cfg = _store()
    s = _samples(metrics.render(store, cfg))  # type: ignore[arg-type]
    never = {k[0] for k in s if ("target", "never-run") in k[1]}
    assert never == {"probe_route_rank", "probe_route_score"}
    never = {k[0] for k in s if ("target", "never-run-histograms") in k[1]}
    assert never == {"probe_phase_seconds_bucket", "probe_phase_seconds_count", "probe_phase_seconds_sum",
                     "probe_route_rank", "probe_route_score"}


def test_one_outcome_series_per_pair_and_run_counters_only_for_outcomes_that_happened() -> None:
    store, cfg = _random_store(random.Random(8), n=9, rounds=0)
    for outcome in (Outcome.OK, Outcome.TLS_RESET, Outcome.TLS_RESET, Outcome.TCP_TIMEOUT):
        store.record(ProbeResult("t1", "direct", outcome, 1.8e9, 0.1))
    s = _samples(metrics.render(store, cfg))
    pair = (("route", "direct"), ("target", "t1"))

    def of(name: str) -> dict[str, float]:
        return {dict(k[1])["outcome"]: v for k, v in s.items() if k[0] == name and set(pair) <= set(k[1])}

    assert of("probe_outcome") == {"tcp_timeout": 1.0}
    assert of("probe_runs_total") == {"ok": 1.0, "tls_reset": 2.0, "tcp_timeout": 1.0}
    _assert_same_as_prometheus_client(store, cfg)


@pytest.mark.parametrize(("raw", "written"), [(0.1, "0.1"), (1e-05, "1e-05"), (float("inf"), "+Inf"),
                                              (float("-inf"), "-Inf"), (float("nan"), "NaN"), (3, "3.0")])
def test_values_are_written_as_the_text_format_reads_them(raw: float, written: str) -> None:
    assert exposition.value(raw) == written


def test_label_values_are_escaped() -> None:
    assert exposition.label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_values_written_again_after_a_result_is_recorded_and_on_reload() -> None:
    store, cfg = _store()
    assert isinstance(cfg, Config)
    _assert_same_as_prometheus_client(store, cfg)  # keeps each pair's float values as text
    first = metrics.render(store, cfg)
    assert metrics.render(store, cfg).split(b"# HELP process_")[0] == first.split(b"# HELP process_")[0]
    now = time.time()
    # A new result of ssh/direct; web/bound, faster and now ok, moves web/direct's rank without a run of its own.
    store.record(ProbeResult("ssh", "direct", Outcome.OK, now, 0.002, phases={Phase.CONNECT: 0.001}))
    for _ in range(20):
        store.record(ProbeResult("web", "bound", Outcome.OK, now, 0.01, phases={Phase.CONNECT: 0.001},
                                 tls=TLS, http_status=200, throughput_bytes_per_second=1e9))
    assert store.ranking()["web"][0].route == "bound"
    _assert_same_as_prometheus_client(store, cfg)
    # A reload: another vantage, a target gone, a timeout changed (the score of a timed-out route uses it).
    new_text = CONFIG.replace('test "quoted" vantage', "vantage-2").replace(
        "  - name: plain\n    url: http://198.51.100.7/\n", "").replace(
        "address: 127.0.0.1:22\n", "address: 127.0.0.1:22\n    timeout: 2s\n")
    new = loads(new_text)
    store.reload_succeeded(new)
    assert store.ranking() == store.ranking(loads(new_text))
    bound = next(r for r in store.ranking()["ssh"] if r.route == "bound")
    assert bound.score == pytest.approx(3000 + 2.0 * (1 + 4 * 1.0))  # blocked tier (timed out), the new 2 s timeout
    _assert_same_as_prometheus_client(store, new)
    text = metrics.render(store, new).decode()
    assert 'target="plain"' not in text and 'vantage="vantage-2"' in text and "quoted" not in text
    assert 'probe_route_score{vantage="vantage-2",target="ssh",route="bound"} 3010.0\n' in text


def test_after_a_reload_the_rankings_are_rebuilt_in_steps_with_pauses_between(monkeypatch: pytest.MonkeyPatch) -> None:
    store, cfg = _random_store(random.Random(11), n=10, rounds=3)
    new = loads(_many(10).replace("t0\n", "t0\n    timeout: 3s\n"))
    store.reload_succeeded(new)
    assert store.rank_some(4) and store.rank_some(4)  # 10 targets, 4 at a time: two steps leave some
    assert not store.rank_some(4) and not store.rank_some(4)
    def order(ranking: dict[str, list[Ranked]]) -> list[tuple[str, str, int]]:
        return [(x.target, x.route, x.rank) for ranked in ranking.values() for x in ranked]  # scores may be NaN

    assert order(store.ranking()) == order(store.ranking(loads(_many(10).replace("t0\n", "t0\n    timeout: 3s\n"))))
    store.reload_succeeded(loads(_many(10)))
    monkeypatch.setattr(exposition, "_RANK_STEP", 1)
    monkeypatch.setattr(exposition, "_ROWS_STEP", 1)
    pieces = list(exposition.render_pairs(store, store.config))
    first_text = next(i for i, p in enumerate(pieces) if p)
    assert first_text >= 10 + 10  # a pause per target's rows and per target ranked before the first line
    _assert_same_as_prometheus_client(store, store.config)
