"""Prometheus exposition: every family is rebuilt from the ResultStore on each scrape.

Label values come only from config names and enum values, never from free text.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from probe import loop
from probe.config import Config, Target
from probe.exporter import exposition_extra
from probe.exporter.exposition import FAMILIES, render_pairs
from probe.models import PATH_STATS, Phase
from probe.store import LAG_BUCKETS, PHASE_BUCKETS, Histogram, ResultStore

PAIR_LABELS = ("vantage", "target", "route")
HELP = {f.name: f.help for f in FAMILIES} | exposition_extra.HELP
DNS_LABELS = ("vantage", "target", "resolver")


class StoreCollector:
    """A prometheus_client collector reading the store's current config and results."""

    def __init__(self, store: ResultStore, config: Config | None = None) -> None:
        self.store = store
        self.config = config  # None: follow store.config across reloads

    def collect(self) -> Iterable[Metric]:
        """Return every family, rebuilt from the store."""
        return families(self.store, self.config or self.store.config)


def build_registry(store: ResultStore, config: Config | None = None) -> CollectorRegistry:
    """Return a registry with the store's families plus process, platform and GC metrics."""
    registry = CollectorRegistry()
    registry.register(StoreCollector(store, config))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def render(store: ResultStore, config: Config) -> bytes:
    """Return the text exposition of every series, the process metrics included."""
    return b"".join(render_chunks(store, config))


def render_chunks(store: ResultStore, config: Config) -> Iterator[bytes]:
    """Yield the text exposition in pieces: the per-pair families written directly, then the rest.

    The per-pair families are the bulk (16-20 samples per pair by default); exposition.py writes them
    as text without building a prometheus_client object per sample, and exposition_extra.py the
    DNS, path, localisation and group families the same way. The rest (a few process-wide
    series) goes through prometheus_client. Same samples as generate_latest(build_registry(...)); tests hold both.
    """
    yield from render_pairs(store, config)
    yield from exposition_extra.render(store, config)
    registry = CollectorRegistry()
    registry.register(_Fixed(_prober_families(store, config.vantage) + [_local_hour_family(config)]))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    yield generate_latest(registry)


def render_target(store: ResultStore, config: Config, target: str) -> bytes:
    """Return the text exposition of one target's series only (for /probe)."""
    registry = CollectorRegistry()
    registry.register(_Fixed(families(store, config, target=target)))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


def families(store: ResultStore, config: Config, target: str | None = None) -> list[Metric]:
    """Build every family; with `target`, only that target's series and no prober_* globals."""
    targets = [t for t in config.targets if target is None or t.name == target]
    return _pair_families(store, config, targets) + _other_families(store, config, targets, target)


def _other_families(
    store: ResultStore, config: Config, targets: Sequence[Target], target: str | None
) -> list[Metric]:
    out = _dns_families(store, config.vantage, targets)
    out += _path_families(store, config.vantage, targets)
    out += _locate_families(store, config.vantage, targets)
    if target is None:
        out += _group_families(store, config)
        out += _prober_families(store, config.vantage)
        out += [_local_hour_family(config)]
    return out


def _gauge(
    name: str, doc: str, extra: tuple[str, ...] = (), labels: tuple[str, ...] = PAIR_LABELS
) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=[*labels, *extra])


# The reference for exposition.py, which writes these same families as text for /metrics: a
# family added here must be added there too (tests/test_exposition.py compares the two). A family
# without a single series is left out, as there.
def _pair_families(store: ResultStore, config: Config, targets: list[Target]) -> list[Metric]:
    def gauge(name: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
        return _gauge(name, HELP[name], extra)

    success = gauge("probe_success")
    duration = gauge("probe_duration_seconds")
    http_phases = gauge("probe_http_duration_seconds", ("phase",))
    status = gauge("probe_http_status_code")
    expiry = gauge("probe_ssl_earliest_cert_expiry")
    tls_version = gauge("probe_tls_version_info", ("version",))
    outcome = gauge("probe_outcome", ("outcome",))
    blocked = gauge("probe_blocked")
    throughput = gauge("probe_throughput_bytes_per_second")
    runs = CounterMetricFamily("probe_runs_total", HELP["probe_runs_total"], labels=[*PAIR_LABELS, "outcome"])
    phases = HistogramMetricFamily(
        "probe_phase_seconds", HELP["probe_phase_seconds"], labels=[*PAIR_LABELS, "phase"]
    )
    rank = gauge("probe_route_rank")
    sni_filtered = gauge("probe_sni_filtered")
    score = gauge("probe_route_score")
    last_run = gauge("probe_last_run_timestamp_seconds")

    ranking = store.ranking(config)
    for target in targets:
        ranked = {r.route: (r.rank, r.score) for r in ranking.get(target.name, [])}
        for route in target.routes:
            labels = [config.vantage, target.name, route]
            result = store.latest(target.name, route)
            for o, n in store.runs(target.name, route).items():
                runs.add_metric([*labels, o.value], n)
            if target.histograms:
                for phase in Phase:
                    _add_histogram(phases, [*labels, phase.value], store.phase_histogram(target.name, route, phase),
                                   PHASE_BUCKETS)
            if route in ranked:
                rank.add_metric(labels, ranked[route][0])
                score.add_metric(labels, ranked[route][1])
            if result is None:
                continue
            outcome.add_metric([*labels, result.outcome.value], 1)
            success.add_metric(labels, float(result.success))
            duration.add_metric(labels, result.duration_seconds)
            blocked.add_metric(labels, float(result.blocked))
            last_run.add_metric(labels, result.started_at + result.duration_seconds)
            if result.sni_filtered is not None:
                sni_filtered.add_metric(labels, float(result.sni_filtered))
            if target.http is not None:  # HTTP/1.1 and HTTP/3
                for phase in Phase:
                    http_phases.add_metric([*labels, phase.value], result.phases.get(phase, 0.0))
                status.add_metric(labels, result.http_status or 0)
            if result.tls is not None:
                tls_version.add_metric([*labels, result.tls.version], 1)
                if result.tls.earliest_cert_expiry is not None:
                    expiry.add_metric(labels, result.tls.earliest_cert_expiry)
            downloads = target.http is not None and target.http.download is not None
            if downloads and result.throughput_bytes_per_second is not None:
                throughput.add_metric(labels, result.throughput_bytes_per_second)
    out: list[Metric] = [
        success, duration, http_phases, status, expiry, tls_version, outcome, blocked, throughput,
        runs, phases, rank, score, last_run, sni_filtered,
    ]
    return [m for m in out if m.samples]


# _dns_families, _path_families, _locate_families and _group_families are the reference for
# exposition_extra.py, which writes them as text for /metrics (tests/test_exposition.py compares).
def _dns_families(store: ResultStore, vantage: str, targets: Sequence[Target]) -> list[Metric]:
    lookup = _gauge("probe_dns_lookup_time_seconds", HELP["probe_dns_lookup_time_seconds"], labels=DNS_LABELS)
    consistent = _gauge("probe_dns_consistent", HELP["probe_dns_consistent"], labels=DNS_LABELS)
    replies = _gauge("probe_dns_replies", HELP["probe_dns_replies"], labels=DNS_LABELS)
    outcome = _gauge("probe_dns_outcome", HELP["probe_dns_outcome"], ("outcome",), labels=DNS_LABELS)
    for target in targets:
        if not target.needs_dns:
            continue
        latest = {d.resolver: d for d in store.dns(target.name)}
        for resolver in target.resolvers:
            labels = [vantage, target.name, resolver]
            result = latest.get(resolver)
            if result is None:
                continue
            outcome.add_metric([*labels, result.outcome.value], 1)
            replies.add_metric(labels, result.replies)
            if result.duration_seconds is not None:
                lookup.add_metric(labels, result.duration_seconds)
            if result.consistent is not None:
                consistent.add_metric(labels, float(result.consistent))
    return [m for m in (lookup, consistent, replies, outcome) if m.samples]


def _path_families(store: ResultStore, vantage: str, targets: Sequence[Target]) -> list[Metric]:
    """Path sampling series, only for pairs whose target has `path` (README "Path quality")."""
    sent = CounterMetricFamily("probe_path_sent_total", HELP["probe_path_sent_total"], labels=list(PAIR_LABELS))
    lost = CounterMetricFamily("probe_path_lost_total", HELP["probe_path_lost_total"], labels=list(PAIR_LABELS))
    rtt = _gauge("probe_path_rtt_seconds", HELP["probe_path_rtt_seconds"], ("stat",))
    jitter = _gauge("probe_path_jitter_seconds", HELP["probe_path_jitter_seconds"])
    for target in targets:
        if target.path is None:
            continue
        for route in target.routes:
            labels = [vantage, target.name, route]
            history = store.path(target.name, route)
            sent.add_metric(labels, history.sent_total if history else 0)
            lost.add_metric(labels, history.lost_total if history else 0)
            latest = history.latest if history else None
            if latest is None:
                continue
            for stat in PATH_STATS:
                if (value := latest.rtt(stat)) is not None:
                    rtt.add_metric([*labels, stat], value)
            if (j := latest.jitter) is not None:
                jitter.add_metric(labels, j)
    return [m for m in (sent, lost, rtt, jitter) if m.samples]


def _locate_families(store: ResultStore, vantage: str, targets: Sequence[Target]) -> list[Metric]:
    hop = _gauge("probe_censor_hop", HELP["probe_censor_hop"])
    for target in targets:
        if not target.locate:
            continue
        for route in target.routes:
            found = store.localisation(target.name, route)
            if found is not None and found.hop is not None:
                hop.add_metric([vantage, target.name, route], found.hop)
    return [hop] if hop.samples else []


def _group_families(store: ResultStore, config: Config) -> list[Metric]:
    rank = _gauge("probe_group_rank", HELP["probe_group_rank"], ("group",))
    for group, ranked in store.group_ranking(config).items():
        for r in ranked:
            rank.add_metric([config.vantage, r.target, r.route, group], r.rank)
    return [rank] if rank.samples else []


def _prober_families(store: ResultStore, vantage: str) -> list[Metric]:
    lag = HistogramMetricFamily(
        "prober_scheduler_lag_seconds",
        "How late scheduled probes started: actual start minus planned time.",
        labels=["vantage"],
    )
    _add_histogram(lag, [vantage], store.lag, LAG_BUCKETS)
    stall = HistogramMetricFamily(
        "prober_loop_stall_seconds",
        f"How late the event loop ran a {loop.TICK * 1000:.0f} ms timer: the monitor's own stalls "
        "(a probe timing out across a long one is reported as error, not blocked).",
        labels=["vantage"],
    )
    stall.add_metric([vantage], [(_le(b), float(n)) for b, n in loop.watch.cumulative()], loop.watch.sum)
    reload_ok = GaugeMetricFamily(
        "prober_config_last_reload_successful", "Whether the last config reload succeeded.", labels=["vantage"]
    )
    reload_ok.add_metric([vantage], float(store.reload_successful))
    reload_at = GaugeMetricFamily(
        "prober_config_last_reload_success_timestamp_seconds",
        "When the config was last loaded successfully, unix seconds.",
        labels=["vantage"],
    )
    reload_at.add_metric([vantage], store.last_reload_success)
    return [lag, stall, reload_ok, reload_at]


def local_hour(timezone: str | None, now: datetime | None = None) -> int:
    """Return the hour of day (0-23) in `timezone` (an IANA name; None: the host's) at `now`, DST included."""
    moment = now or datetime.now(UTC)
    return (moment.astimezone(ZoneInfo(timezone)) if timezone else moment.astimezone()).hour


def _local_hour_family(config: Config) -> Metric:
    # Prometheus knows only UTC. The hour of day at the vantage as a label (24 values, one series
    # at a time) lets one rule file the path series under it: deploy/prometheus/rules/path.rules.yml.
    info = GaugeMetricFamily(
        "probe_vantage_local_hour_info",
        "The hour of day now in the vantage's time zone (config `timezone`, else the host's), as the label `hour`.",
        labels=["vantage", "timezone", "hour"],
    )
    info.add_metric([config.vantage, config.timezone or "host", f"{local_hour(config.timezone):02d}"], 1)
    return info


def _add_histogram(
    family: HistogramMetricFamily, labels: list[str], hist: Histogram | None, bounds: Sequence[float]
) -> None:
    hist = hist or Histogram(bounds)
    buckets = [(_le(bound), float(n)) for bound, n in hist.cumulative()]
    family.add_metric(labels, buckets, hist.sum)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))
