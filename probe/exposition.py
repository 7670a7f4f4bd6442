"""Fast text exposition of the per-(target, route) families: the bulk of every /metrics scrape.

metrics.families() builds prometheus_client objects, one per sample: about 130 samples per
pair, so at 10,000 pairs over a million objects per scrape, seconds of CPU and a peak of
hundreds of MB. This module writes the same samples as text directly: per family, one
str.format() of a template made once per bucket layout, fed from the store's plain data.
metrics.render() uses it; tests check that both paths expose exactly the same samples.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

from probe.config import Config, TargetKind
from probe.models import Outcome, Phase, ProbeResult
from probe.store import Histogram, ResultStore

_OUTCOMES = tuple(Outcome)
_PHASES = tuple(Phase)
_EMPTY = Histogram()

# (name, type, help) in the order metrics.families() emits them; the help texts are the same.
FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("probe_success", "gauge", "Whether the last probe of the target over the route succeeded."),
    ("probe_duration_seconds", "gauge", "How long the last probe took, in seconds."),
    ("probe_http_duration_seconds", "gauge",
     "Duration of each phase of the last HTTP probe (0 when the phase did not complete)."),
    ("probe_http_status_code", "gauge", "HTTP status of the last response (0: none)."),
    ("probe_ssl_earliest_cert_expiry", "gauge", "Earliest expiry of the verified chain, unix seconds."),
    ("probe_tls_version_info", "gauge", "TLS version of the last handshake."),
    ("probe_outcome", "gauge", "1 for the outcome of the last probe, 0 for every other outcome."),
    ("probe_blocked", "gauge", "1 when the last outcome is an interference class."),
    ("probe_throughput_bytes_per_second", "gauge", "Download throughput of the last probe."),
    ("probe_runs_total", "counter", "Probes run, by outcome."),
    ("probe_phase_seconds", "histogram", "Duration of each completed probe phase."),
    ("probe_route_rank", "gauge", "Rank of the route for the target; 1 is the one to use."),
    ("probe_route_score", "gauge",
     "Route score from the recent runs: p90 latency x (1 + failure share) + tier offset; lower is better."),
    ("probe_last_run_timestamp_seconds", "gauge", "When the last probe finished, unix seconds."),
)


def value(v: float) -> str:
    """Return a sample value as the text format writes it."""
    if math.isfinite(v):
        return repr(float(v))
    if v != v:
        return "NaN"
    return "+Inf" if v > 0 else "-Inf"


def label_value(text: str) -> str:
    """Escape a label value (backslash, double quote, newline)."""
    if "\\" in text or '"' in text or "\n" in text:
        text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return text


class _Lines:
    """One pair's lines of a family: fixed text around the pair's labels and each value.

    A line is `head[i] + labels + tail[i] + value + "\\n"`; writing a pair is two slice
    assignments and one join, all in C, instead of parsing a format string per pair.
    """

    __slots__ = ("n", "pieces")

    def __init__(self, heads: list[str], tails: list[str]) -> None:
        self.n = len(heads)
        self.pieces: list[str] = []
        for head, tail in zip(heads, tails, strict=True):
            self.pieces += [head, "", tail, "", "\n"]

    def write(self, labels: str, values: Iterable[str]) -> str:
        buf = self.pieces.copy()
        buf[1::5] = itertools.repeat(labels, self.n)
        buf[3::5] = values
        return "".join(buf)


def _per_value(name: str, label: str, values: Iterable[str]) -> _Lines:
    vs = list(values)
    return _Lines([f"{name}{{"] * len(vs), [f',{label}="{v}"}} ' for v in vs])


@lru_cache(maxsize=8)
def _histogram_lines(bounds: tuple[float, ...]) -> _Lines:
    """Return the lines of all phases of one pair: per phase its buckets, then count and sum."""
    les = [*("+Inf" if math.isinf(b) else repr(float(b)) for b in bounds), "+Inf"]
    heads: list[str] = []
    tails: list[str] = []
    for phase in _PHASES:
        heads += ["probe_phase_seconds_bucket{"] * len(les)
        tails += [f',phase="{phase}",le="{le}"}} ' for le in les]
        heads += ["probe_phase_seconds_count{", "probe_phase_seconds_sum{"]
        tails += [f',phase="{phase}"}} '] * 2
    return _Lines(heads, tails)


_OUTCOME_LINES = _per_value("probe_outcome", "outcome", (o.value for o in _OUTCOMES))
_RUNS_LINES = _per_value("probe_runs_total", "outcome", (o.value for o in _OUTCOMES))
_HTTP_PHASE_LINES = _per_value("probe_http_duration_seconds", "phase", (p.value for p in _PHASES))
_ONE_HOT = {o: ["1.0" if x is o else "0.0" for x in _OUTCOMES] for o in _OUTCOMES}
_NONE_HOT = ["0.0"] * len(_OUTCOMES)


BATCH = 100  # pairs per chunk (under 1 MB): the server writes (and the loop breathes) between chunks


@dataclass(frozen=True, slots=True)
class _Pair:
    labels: str
    target: str
    route: str
    kind: TargetKind
    download: bool
    result: ProbeResult | None


def render_pairs(store: ResultStore, config: Config) -> Iterator[str]:
    """Yield the text of every per-pair family of `config`: family by family, in chunks of BATCH pairs."""
    vantage = label_value(config.vantage)
    pairs = [
        _Pair(f'vantage="{vantage}",target="{label_value(t.name)}",route="{label_value(route)}"',
              t.name, route, t.kind, t.download is not None, store.latest(t.name, route))
        for t in config.targets
        for route in t.routes
    ]
    ranked = {
        (r.target, r.route): (r.rank, r.score) for rows in store.ranking(config).values() for r in rows
    }
    lines = _family_lines(store, ranked)
    for name, kind_name, help_text in FAMILIES:
        escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        yield f"# HELP {name} {escaped}\n# TYPE {name} {kind_name}\n"
        line = lines[name]
        for i in range(0, len(pairs), BATCH):
            yield "".join([text for p in pairs[i:i + BATCH] if (text := line(p))])


def _family_lines(
    store: ResultStore, ranked: dict[tuple[str, str], tuple[int, float]]
) -> dict[str, Callable[[_Pair], str]]:
    """Return, per family, the function that writes one pair's lines ("" for none)."""

    def success(p: _Pair) -> str:
        r = p.result
        return "" if r is None else f"probe_success{{{p.labels}}} {'1.0' if r.success else '0.0'}\n"

    def duration(p: _Pair) -> str:
        r = p.result
        return "" if r is None else f"probe_duration_seconds{{{p.labels}}} {value(r.duration_seconds)}\n"

    def http_phases(p: _Pair) -> str:
        r = p.result
        if r is None or p.kind is not TargetKind.HTTP:
            return ""
        got = r.phases
        return _HTTP_PHASE_LINES.write(p.labels, [value(got.get(ph, 0.0)) for ph in _PHASES])

    def status(p: _Pair) -> str:
        r = p.result
        if r is None or p.kind is not TargetKind.HTTP:
            return ""
        return f"probe_http_status_code{{{p.labels}}} {value(r.http_status or 0)}\n"

    def expiry(p: _Pair) -> str:
        r = p.result
        if r is None or r.tls is None or r.tls.earliest_cert_expiry is None:
            return ""
        return f"probe_ssl_earliest_cert_expiry{{{p.labels}}} {value(r.tls.earliest_cert_expiry)}\n"

    def tls_version(p: _Pair) -> str:
        r = p.result
        if r is None or r.tls is None:
            return ""
        return f'probe_tls_version_info{{{p.labels},version="{label_value(r.tls.version)}"}} 1.0\n'

    def outcome(p: _Pair) -> str:
        r = p.result
        return _OUTCOME_LINES.write(p.labels, _NONE_HOT if r is None else _ONE_HOT[r.outcome])

    def blocked(p: _Pair) -> str:
        r = p.result
        return "" if r is None else f"probe_blocked{{{p.labels}}} {'1.0' if r.blocked else '0.0'}\n"

    def throughput(p: _Pair) -> str:
        r = p.result
        if r is None or not p.download or r.throughput_bytes_per_second is None:
            return ""
        return f"probe_throughput_bytes_per_second{{{p.labels}}} {value(r.throughput_bytes_per_second)}\n"

    def runs(p: _Pair) -> str:
        counts = store.runs(p.target, p.route)
        return _RUNS_LINES.write(p.labels, [str(counts.get(o, 0)) for o in _OUTCOMES])

    def phases(p: _Pair) -> str:
        return _phase_block(store, p.target, p.route, p.labels)

    def rank(p: _Pair) -> str:
        got = ranked.get((p.target, p.route))
        return "" if got is None else f"probe_route_rank{{{p.labels}}} {value(got[0])}\n"

    def score(p: _Pair) -> str:
        got = ranked.get((p.target, p.route))
        return "" if got is None else f"probe_route_score{{{p.labels}}} {value(got[1])}\n"

    def last_run(p: _Pair) -> str:
        r = p.result
        if r is None:
            return ""
        return f"probe_last_run_timestamp_seconds{{{p.labels}}} {value(r.started_at + r.duration_seconds)}\n"

    return {
        "probe_success": success, "probe_duration_seconds": duration, "probe_http_duration_seconds": http_phases,
        "probe_http_status_code": status, "probe_ssl_earliest_cert_expiry": expiry,
        "probe_tls_version_info": tls_version, "probe_outcome": outcome, "probe_blocked": blocked,
        "probe_throughput_bytes_per_second": throughput, "probe_runs_total": runs, "probe_phase_seconds": phases,
        "probe_route_rank": rank, "probe_route_score": score, "probe_last_run_timestamp_seconds": last_run,
    }


def _phase_block(store: ResultStore, target: str, route: str, labels: str) -> str:
    values: list[str] = []
    bounds = _EMPTY.bounds
    for phase in _PHASES:
        h = store.phase_histogram(target, route, phase) or _EMPTY
        bounds = h.bounds
        cumulative = list(map(str, itertools.accumulate(h.counts)))
        values += cumulative
        values.append(cumulative[-1])
        values.append(value(h.sum))
    return _histogram_lines(bounds).write(labels, values)
