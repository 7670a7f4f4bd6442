"""ResultStore bookkeeping and the collector's exposition, parsed back with prometheus_client."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from probe.config import Config, loads
from probe.exporter import metrics
from probe.models import DnsResult, Outcome, Phase, ProbeResult, TlsInfo
from probe.store import PHASE_BUCKETS, ResultStore

CONFIG = """
vantage: test-vantage
resolvers:
  - {name: system, type: system}
  - {name: ali, type: udp, address: 127.0.0.1}
routes:
  - {name: direct}
  - {name: hk-socks, proxy: "socks5://user:secret@127.0.0.1:1080"}
targets:
  - name: web
    url: https://web.example/ping
    routes: [direct, hk-socks]
    download: {url: https://web.example/1MiB.bin, min_bytes_per_second: 1000}
  - name: ssh
    address: 127.0.0.1:22
"""

ALL_PHASES = {p.value for p in Phase}


@pytest.fixture(autouse=True)
def _no_vantage_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROBE_VANTAGE", raising=False)


def config(text: str = CONFIG) -> Config:
    return loads(text)


def result(
    target: str, route: str, outcome: Outcome = Outcome.OK, duration: float = 0.1, **kwargs: object
) -> ProbeResult:
    if outcome is Outcome.OK:  # a successful run completed its phases; the ranking reads their sum
        kwargs.setdefault("phases", {Phase.CONNECT: duration})
    return ProbeResult(target, route, outcome, time.time(), duration, **kwargs)  # type: ignore[arg-type]


def samples(text: bytes) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = defaultdict(list)
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[s.name].append(s)
    return out


def by_pair(items: list[Sample], key: str) -> dict[tuple[str, str], dict[str, float]]:
    out: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for s in items:
        second = s.labels.get("route") or s.labels["resolver"]
        out[(s.labels["target"], second)][s.labels[key]] = s.value
    return out


def test_one_outcome_series_per_pair_the_last_outcome() -> None:
    cfg = config()
    store = ResultStore(cfg)
    store.record(result("web", "direct", Outcome.OK))
    store.record(result("web", "direct", Outcome.TLS_RESET, phases={Phase.RESOLVE: 0.004, Phase.CONNECT: 0.06}))
    s = samples(metrics.render(store, cfg))
    outcomes = by_pair(s["probe_outcome"], "outcome")
    assert outcomes == {("web", "direct"): {"tls_reset": 1.0}}  # not probed yet: no series
    assert all(x.labels["vantage"] == "test-vantage" for x in s["probe_outcome"])


def test_runs_total_has_a_series_only_for_outcomes_that_happened() -> None:
    cfg = config()
    store = ResultStore(cfg)
    store.record(result("ssh", "direct", Outcome.TCP_REFUSED))
    store.record(result("ssh", "direct", Outcome.TCP_REFUSED))
    store.record(result("ssh", "direct"))
    runs = by_pair(samples(metrics.render(store, cfg))["probe_runs_total"], "outcome")
    assert runs == {("ssh", "direct"): {"tcp_refused": 2.0, "ok": 1.0}}


def test_phase_histogram_only_where_configured_with_every_phase_and_ten_buckets() -> None:
    routes = "    routes: [direct, hk-socks]\n"
    cfg = config(CONFIG.replace(routes, routes + "    histograms: true\n"))
    store = ResultStore(cfg)
    store.record(result("web", "direct", phases={Phase.RESOLVE: 0.004, Phase.CONNECT: 0.03}))
    store.record(result("ssh", "direct", phases={Phase.CONNECT: 0.03}))
    s = samples(metrics.render(store, cfg))
    buckets = s["probe_phase_seconds_bucket"]
    assert {x.labels["target"] for x in buckets} == {"web"}  # ssh: histograms off by default
    assert {x.labels["phase"] for x in buckets} == ALL_PHASES
    direct_resolve = {
        x.labels["le"]: x.value
        for x in buckets
        if x.labels["route"] == "direct" and x.labels["phase"] == "resolve"
    }
    assert len(direct_resolve) == len(PHASE_BUCKETS) + 1 == 10  # DESIGN: at most 10 buckets
    assert direct_resolve["0.01"] == 1.0 and direct_resolve["+Inf"] == 1.0
    direct_connect = {x.labels["le"]: x.value for x in buckets
                      if x.labels["route"] == "direct" and x.labels["phase"] == "connect"}
    assert direct_connect["0.025"] == 0.0 and direct_connect["0.05"] == 1.0
    counts = {(x.labels["route"], x.labels["phase"]): x.value for x in s["probe_phase_seconds_count"]}
    assert counts[("direct", "connect")] == 1.0 and counts[("direct", "tls")] == 0.0
    assert counts[("hk-socks", "resolve")] == 0.0  # configured, not run yet: zeros, so rate() sees the first run


def test_http_target_exports_all_five_http_phases_and_status() -> None:
    cfg = config()
    store = ResultStore(cfg)
    tls = TlsInfo("TLS 1.3", earliest_cert_expiry=1_900_000_000.0)
    store.record(result("web", "direct", phases={Phase.RESOLVE: 0.01, Phase.CONNECT: 0.02}, http_status=200,
                        tls=tls, throughput_bytes_per_second=123456.0))
    store.record(result("ssh", "direct", phases={Phase.CONNECT: 0.02}))
    s = samples(metrics.render(store, cfg))
    http = by_pair(s["probe_http_duration_seconds"], "phase")
    assert set(http) == {("web", "direct")}  # only HTTP targets, only once they have a result
    assert http[("web", "direct")] == {"resolve": 0.01, "connect": 0.02, "tls": 0.0, "processing": 0.0,
                                       "transfer": 0.0}
    assert [(x.labels["target"], x.value) for x in s["probe_http_status_code"]] == [("web", 200.0)]
    assert [x.labels["version"] for x in s["probe_tls_version_info"]] == ["TLS 1.3"]
    assert s["probe_ssl_earliest_cert_expiry"][0].value == 1_900_000_000.0
    assert s["probe_throughput_bytes_per_second"][0].value == 123456.0
    assert {(x.labels["target"], x.value) for x in s["probe_success"]} == {("web", 1.0), ("ssh", 1.0)}


def test_blocked_and_success_follow_the_last_outcome() -> None:
    cfg = config()
    store = ResultStore(cfg)
    store.record(result("ssh", "direct"))
    store.record(result("ssh", "direct", Outcome.TCP_TIMEOUT, duration=10.0))
    s = samples(metrics.render(store, cfg))
    assert s["probe_success"][0].value == 0.0
    assert s["probe_blocked"][0].value == 1.0
    assert s["probe_duration_seconds"][0].value == 10.0
    assert s["probe_last_run_timestamp_seconds"][0].value == pytest.approx(time.time() + 10.0, abs=5)


def test_dns_series_are_per_resolver_with_the_last_outcome() -> None:
    cfg = config()
    store = ResultStore(cfg)
    store.record_dns("web", (
        DnsResult("system", Outcome.OK, ("198.51.100.20",), replies=1, consistent=True, duration_seconds=0.004),
        DnsResult("ali", Outcome.DNS_INJECTION, ("10.0.0.1",), replies=2, consistent=False,
                  duration_seconds=0.02),
    ))
    s = samples(metrics.render(store, cfg))
    outcomes = by_pair(s["probe_dns_outcome"], "outcome")
    assert set(outcomes) == {("web", "system"), ("web", "ali")}  # ssh is an IP literal: no DNS series
    assert outcomes == {("web", "system"): {"ok": 1.0}, ("web", "ali"): {"dns_injection": 1.0}}
    for name in ("probe_dns_outcome", "probe_dns_replies", "probe_dns_consistent",
                 "probe_dns_lookup_time_seconds"):
        assert all("route" not in x.labels and x.labels["vantage"] == "test-vantage" for x in s[name]), name
    assert {x.labels["resolver"]: x.value for x in s["probe_dns_replies"]} == {"system": 1.0, "ali": 2.0}
    assert {x.labels["resolver"]: x.value for x in s["probe_dns_consistent"]} == {"system": 1.0, "ali": 0.0}
    assert {x.labels["resolver"]: x.value for x in s["probe_dns_lookup_time_seconds"]} == {
        "system": 0.004, "ali": 0.02}


def test_route_rank_and_score_put_working_routes_first() -> None:
    cfg = config()
    store = ResultStore(cfg)
    store.record(result("web", "direct", Outcome.TLS_RESET, duration=0.01))
    store.record(result("web", "hk-socks", duration=0.5))
    s = samples(metrics.render(store, cfg))
    rank = {(x.labels["target"], x.labels["route"]): x.value for x in s["probe_route_rank"]}
    assert rank == {("web", "hk-socks"): 1.0, ("web", "direct"): 2.0, ("ssh", "direct"): 1.0}
    score = {(x.labels["target"], x.labels["route"]): x.value for x in s["probe_route_score"]}
    assert score[("web", "hk-socks")] < score[("web", "direct")]


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        pytest.param({"a": (Outcome.OK, 0.3), "b": (Outcome.OK, 0.1)}, ["b", "a", "c"], id="faster-working-first"),
        pytest.param({"a": (Outcome.TCP_REFUSED, 0.01), "b": (Outcome.OK, 5.0)}, ["b", "c", "a"],
                     id="failing-after-working-and-unprobed"),
        pytest.param({"a": (Outcome.TLS_RESET, 0.01), "c": (Outcome.HTTP_TIMEOUT, 9.0)}, ["b", "c", "a"],
                     id="blocked-after-failing"),
        pytest.param({}, ["a", "b", "c"], id="unprobed-keep-config-order"),
    ],
)
def test_ranking_orders_routes(outcomes: dict[str, tuple[Outcome, float]], expected: list[str]) -> None:
    cfg = loads("""
vantage: v
routes: [{name: a, source_address: 127.0.0.1}, {name: b, source_address: 127.0.0.2},
         {name: c, source_address: 127.0.0.3}]
targets: [{name: t, address: "127.0.0.1:1", routes: [a, b, c]}]
""")
    store = ResultStore(cfg)
    for route, (outcome, duration) in outcomes.items():
        store.record(result("t", route, outcome, duration))
    assert [r.route for r in store.ranking(cfg)["t"]] == expected


def test_retain_drops_every_series_of_removed_targets_routes_and_resolvers() -> None:
    cfg = config()
    store = ResultStore(cfg)
    for route in ("direct", "hk-socks"):
        store.record(result("web", route, phases={Phase.CONNECT: 0.01}))
    store.record(result("ssh", "direct"))
    store.record_dns("web", (DnsResult("system", Outcome.OK), DnsResult("ali", Outcome.OK)))
    smaller = config(CONFIG.replace("routes: [direct, hk-socks]", "routes: [direct]\n    resolvers: [system]")
                     .replace("  - name: ssh\n    address: 127.0.0.1:22\n", ""))
    store.retain(smaller)
    text = metrics.render(store, smaller).decode()
    assert 'target="ssh"' not in text
    assert 'route="hk-socks"' not in text
    assert 'resolver="ali"' not in text
    assert store.latest("web", "direct") is not None  # unchanged pairs keep their results
    assert store.runs("web", "direct") == {Outcome.OK: 1}
    assert store.runs("web", "hk-socks") == {} and store.phase_histogram("web", "hk-socks", Phase.CONNECT) is None
    assert [d.resolver for d in store.dns("web")] == ["system"]
    store.retain(cfg)  # re-adding starts from zero, not from the old counters
    assert store.latest("ssh", "direct") is None


def test_record_ignores_results_of_pairs_not_configured() -> None:
    cfg = config()
    store = ResultStore(cfg)
    assert not store.record(result("gone", "direct"))
    assert not store.record(result("ssh", "hk-socks"))
    assert not store.record_dns("gone", ())
    assert store.results() == []


def test_results_are_in_config_order_with_dns_of_the_latest_check() -> None:
    cfg = config()
    store = ResultStore(cfg)
    store.record(result("ssh", "direct"))
    store.record(result("web", "hk-socks"))
    store.record(result("web", "direct"))
    check = (DnsResult("system", Outcome.OK, ("198.51.100.20",)),)
    store.record_dns("web", check)
    assert [(r.target, r.route) for r in store.results()] == [("web", "direct"), ("web", "hk-socks"),
                                                              ("ssh", "direct")]
    assert [r.dns for r in store.results()] == [check, check, ()]


def test_reload_bookkeeping_is_exported() -> None:
    clock = iter([100.0, 200.0])
    cfg = config()
    store = ResultStore(cfg, clock=lambda: next(clock))
    s = samples(metrics.render(store, cfg))
    assert s["prober_config_last_reload_successful"][0].value == 1.0
    assert s["prober_config_last_reload_success_timestamp_seconds"][0].value == 100.0
    store.reload_failed("targets[0].routes[0]: unknown route 'hk'")
    s = samples(metrics.render(store, cfg))
    assert s["prober_config_last_reload_successful"][0].value == 0.0
    assert s["prober_config_last_reload_success_timestamp_seconds"][0].value == 100.0
    store.reload_succeeded(cfg)
    s = samples(metrics.render(store, cfg))
    assert s["prober_config_last_reload_successful"][0].value == 1.0
    assert s["prober_config_last_reload_success_timestamp_seconds"][0].value == 200.0
    assert s["prober_config_last_reload_successful"][0].labels == {"vantage": "test-vantage"}


def test_scheduler_lag_histogram_is_global() -> None:
    cfg = config()
    store = ResultStore(cfg)
    store.observe_lag(0.003)
    store.observe_lag(-0.001)  # clock skew never makes a negative lag
    s = samples(metrics.render(store, cfg))
    assert s["prober_scheduler_lag_seconds_count"][0].value == 2.0
    assert s["prober_scheduler_lag_seconds_count"][0].labels == {"vantage": "test-vantage"}
    assert s["prober_scheduler_lag_seconds_sum"][0].value == pytest.approx(0.003)


def test_render_includes_process_metrics() -> None:
    cfg = config()
    s = samples(metrics.render(ResultStore(cfg), cfg))
    assert "python_info" in s
    assert "process_cpu_seconds_total" in s


def test_render_target_holds_only_that_target_and_no_globals() -> None:
    cfg = config()
    store = ResultStore(cfg)
    store.record(result("web", "direct"))
    store.record(result("ssh", "direct"))
    s = samples(metrics.render_target(store, cfg, "web"))
    assert {x.labels["target"] for xs in s.values() for x in xs} == {"web"}
    assert not any(name.startswith(("prober_", "process_", "python_")) for name in s)
    assert "probe_success" in s


def test_labels_never_carry_free_text() -> None:
    cfg = config()
    store = ResultStore(cfg)
    store.record(result("web", "direct", Outcome.ERROR, error="boom: secret detail", evidence=("x y z",)))
    text = metrics.render(store, cfg).decode()
    assert "boom" not in text and "x y z" not in text and "secret" not in text


def test_api_results_carry_the_last_20_outcomes_and_since_when_the_outcome_holds() -> None:
    from probe.exporter.api import results_json

    store = ResultStore(config())
    sequence = [Outcome.OK] * 15 + [Outcome.TLS_RESET] * 8 + [Outcome.OK, Outcome.OK]
    started = [1_800_000_000.0 + 30 * i for i in range(len(sequence))]
    for outcome, at in zip(sequence, started, strict=True):
        store.record(ProbeResult("web", "direct", outcome, at, 0.1))
    store.record(ProbeResult("ssh", "direct", Outcome.TCP_REFUSED, started[0], 0.1))
    doc = results_json(store, store.config)
    items = {(r["target"], r["route"]): r for r in doc["results"]}  # type: ignore[index, attr-defined]
    web = items[("web", "direct")]
    assert web["recent_outcomes"] == [str(o) for o in sequence[-20:]]  # oldest first, 20 at most
    assert web["outcome_since"] == started[-2]  # the first of the last two ok runs
    assert items[("ssh", "direct")]["outcome_since"] == started[0]
    assert ("web", "hk-socks") not in items  # no result yet: nothing to show
    assert store.streak("web", "hk-socks") == ([], None)
