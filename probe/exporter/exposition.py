"""Fast text exposition of the per-(target, route) families: the bulk of every /metrics scrape.

metrics.families() builds prometheus_client objects, one per sample: about 130 samples per
pair, so at 10,000 pairs over a million objects per scrape, seconds of CPU and a peak of
hundreds of MB. This module writes the same samples as bytes directly from the store's flat
per-pair arrays (store.PairState): per family one precompiled template for a pair's lines,
ONE bytes `%` of the pair's values and ONE replace() that puts the pair's label text (built
once per config and kept) into every line; the text of a pair's float values is kept until
it records (PairState.memo). metrics.render() uses it; tests check that both paths expose
exactly the same samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

from probe.config import Config
from probe.models import Outcome
from probe.ranking import Ranked
from probe.store import LATENCY_BUCKETS, OUTCOMES, PHASES, SLOTS, PairState, ResultStore

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
    ("probe_sni_filtered", "gauge",
     "1: the last run proved name-based filtering (the control handshake answered, the target's did not); "
     "0: neither answered. Absent when not tested."),
)

CHUNK_LINES = 10_000  # lines per chunk (~1 MB): the server writes (and the loop breathes) between chunks


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


class _Special:
    """A non-finite value: `%a` writes its repr, as value() spells it."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


_SPECIAL = {"+Inf": _Special("+Inf"), "-Inf": _Special("-Inf"), "NaN": _Special("NaN")}


def _f(v: float) -> float | _Special:
    """Return `v` for a `%a` field: floats write as repr(), as value() does; non-finite ones as value() spells them."""
    return v if v - v == 0.0 else _SPECIAL[value(v)]


class _Row:
    """One configured pair as /metrics writes it: its label text, made once per config."""

    __slots__ = ("download", "http", "labels", "pair")

    def __init__(self, labels: bytes, pair: tuple[str, str], http: bool, download: bool) -> None:
        self.labels = labels
        self.pair = pair
        self.http = http
        self.download = download


_rows_of: list[tuple[Config, list[_Row]]] = []  # the last config rendered and its rows


def _rows(config: Config) -> list[_Row]:
    if _rows_of and _rows_of[0][0] is config:
        return _rows_of[0][1]
    vantage = label_value(config.vantage)
    rows = [
        _Row(f'vantage="{vantage}",target="{label_value(t.name)}",route="{label_value(route)}"'.encode(),
             (t.name, route), t.http is not None, t.http is not None and t.http.download is not None)
        for t in config.targets
        for route in t.routes
    ]
    _rows_of[:] = [(config, rows)]
    return rows


LABELS = b"\x01"  # where a multi-line template takes the pair's labels: filled by bytes.replace(), after the values


def _template(lines: Sequence[tuple[str, str, str]]) -> bytes:
    """Return the template of lines `name{LABELS<extra>} <field>`, one per (name, extra, field).

    `(template % values).replace(LABELS, labels)` writes a pair's lines: one % for the values,
    then one replace for the labels, which is ~20% faster than interleaving the labels with
    the values in one % (the labels hold no %, and the values never hold LABELS).
    """
    return "".join(f"{name}{{{LABELS.decode()}{extra}}} {field}\n" for name, extra, field in lines).encode()


def _lines(name: str, extras: Sequence[str], field: str) -> bytes:
    return _template([(name, extra, field) for extra in extras])


_N_OUTCOMES = len(OUTCOMES)
_N_PHASES = len(PHASES)
_OUTCOME_EXTRAS = [f',outcome="{o.value}"' for o in OUTCOMES]
_PHASE_EXTRAS = [f',phase="{p.value}"' for p in PHASES]

# probe_outcome: per outcome code (and for none) the whole one-hot block, only the labels to fill in.
_ONE_HOT = tuple(
    _template([("probe_outcome", extra, "1.0" if i == code else "0.0") for i, extra in enumerate(_OUTCOME_EXTRAS)])
    for code in range(_N_OUTCOMES)
)
_NONE_HOT = _template([("probe_outcome", extra, "0.0") for extra in _OUTCOME_EXTRAS])
_RUNS = _lines("probe_runs_total", _OUTCOME_EXTRAS, "%d")
_HTTP_PHASES = _lines("probe_http_duration_seconds", _PHASE_EXTRAS, "%s")


def _histogram_template() -> bytes:
    les = [*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf"]
    lines: list[tuple[str, str, str]] = []
    for extra in _PHASE_EXTRAS:
        lines += [("probe_phase_seconds_bucket", f'{extra},le="{le}"', "%d") for le in les]
        lines += [("probe_phase_seconds_count", extra, "%d"), ("probe_phase_seconds_sum", extra, "%s")]
    return _template(lines)


assert SLOTS == len(LATENCY_BUCKETS) + 1
_HISTOGRAM = _histogram_template()
_HISTOGRAM_LINES = _N_PHASES * (SLOTS + 2)
_NO_RUNS = _RUNS % ((0,) * _N_OUTCOMES)
_NO_HISTOGRAM = _HISTOGRAM % (((0,) * (SLOTS + 1) + (b"0.0",)) * _N_PHASES)


def _histogram_values(s: PairState, t: Sequence[bytes]) -> tuple[int | bytes, ...]:
    """Return the fields of one pair's histogram lines: per phase its cumulative buckets, count, sum."""
    c = s.counts
    return (*c[0:14], c[13], t[6], *c[14:28], c[27], t[7], *c[28:42], c[41], t[8],
            *c[42:56], c[55], t[9], *c[56:70], c[69], t[10])


assert _N_PHASES == 5 and SLOTS == 14  # _histogram_values() and _TEXTS spell the layouts out

# The float values of a pair, written once per result: repr() of a double costs ~0.6 us (shortest
# round trip), and a pair has 13 of them. Joined by | into PairState.memo until the pair records.
_TEXTS = b"|".join([b"%a"] * 13)  # duration, the 5 phases of the latest result, the 5 phase sums, end, score


def _texts(s: PairState, score: float) -> bytes:
    r = s.latest
    values = (r.duration_seconds, *s.phases, *s.sums, r.started_at + r.duration_seconds, score)
    return _TEXTS % (values if math.isfinite(sum(values)) else tuple(map(_f, values)))


Texts = Sequence[bytes]  # per pair of a batch its float values as text (see _texts), b"" for none
Writer = Callable[[Sequence[_Row], Sequence[PairState | None], Texts, dict[tuple[str, str], Ranked]], list[bytes]]


def _writers() -> list[tuple[int, Writer]]:
    """Return, per family of FAMILIES, (lines per pair at most, the function writing a batch of pairs)."""

    def success(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
            ranked: object) -> list[bytes]:
        return [b"probe_success{%s} %s\n" % (r.labels, b"1.0" if s.latest.outcome is Outcome.OK else b"0.0")
                for r, s in zip(rows, states, strict=True) if s is not None]

    def duration(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
            ranked: object) -> list[bytes]:
        return [b"probe_duration_seconds{%s} %s\n" % (r.labels, t.split(b"|", 1)[0])
                for r, t in zip(rows, texts, strict=True) if t]

    def http_phases(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
            ranked: object) -> list[bytes]:
        return [(_HTTP_PHASES % tuple(t.split(b"|", 6)[1:6])).replace(LABELS, r.labels)
                for r, t in zip(rows, texts, strict=True) if t and r.http]

    def status(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
            ranked: object) -> list[bytes]:
        return [b"probe_http_status_code{%s} %d.0\n" % (r.labels, s.latest.http_status or 0)
                for r, s in zip(rows, states, strict=True) if s is not None and r.http]

    def expiry(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
            ranked: object) -> list[bytes]:
        out = []
        for r, s in zip(rows, states, strict=True):
            tls = None if s is None else s.latest.tls
            if tls is not None and tls.earliest_cert_expiry is not None:
                out.append(b"probe_ssl_earliest_cert_expiry{%s} %a\n" % (r.labels, _f(tls.earliest_cert_expiry)))
        return out

    versions: dict[str, bytes] = {}

    def tls_version(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
            ranked: object) -> list[bytes]:
        out = []
        for r, s in zip(rows, states, strict=True):
            tls = None if s is None else s.latest.tls
            if tls is not None:
                v = versions.get(tls.version)
                if v is None:
                    v = versions[tls.version] = label_value(tls.version).encode()
                out.append(b'probe_tls_version_info{%s,version="%s"} 1.0\n' % (r.labels, v))
        return out

    one_hot = {o: _ONE_HOT[i] for i, o in enumerate(OUTCOMES)}

    def outcome(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
            ranked: object) -> list[bytes]:
        return [(_NONE_HOT if s is None else one_hot[s.latest.outcome]).replace(LABELS, r.labels)
                for r, s in zip(rows, states, strict=True)]

    def blocked(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
            ranked: object) -> list[bytes]:
        return [b"probe_blocked{%s} %s\n" % (r.labels, b"1.0" if s.latest.outcome.blocked else b"0.0")
                for r, s in zip(rows, states, strict=True) if s is not None]

    def throughput(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
            ranked: object) -> list[bytes]:
        out = []
        for r, s in zip(rows, states, strict=True):
            if s is not None and r.download and (rate := s.latest.throughput_bytes_per_second) is not None:
                out.append(b"probe_throughput_bytes_per_second{%s} %a\n" % (r.labels, _f(rate)))
        return out

    def runs(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
            ranked: object) -> list[bytes]:
        return [(_NO_RUNS if s is None else _RUNS % tuple(s.runs)).replace(LABELS, r.labels)
                for r, s in zip(rows, states, strict=True)]

    def phases(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
            ranked: object) -> list[bytes]:
        return [(_NO_HISTOGRAM if s is None else _HISTOGRAM % _histogram_values(s, t.split(b"|", 11))).replace(
                    LABELS, r.labels)
                for r, s, t in zip(rows, states, texts, strict=True)]

    def rank(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
             ranked: dict[tuple[str, str], Ranked]) -> list[bytes]:
        return [b"probe_route_rank{%s} %d.0\n" % (r.labels, x.rank)
                for r in rows if (x := ranked.get(r.pair)) is not None]

    def score(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
              ranked: dict[tuple[str, str], Ranked]) -> list[bytes]:
        return [b"probe_route_score{%s} %s\n" % (r.labels, t.rsplit(b"|", 1)[1] if t else b"%a" % _f(x.score))
                for r, t in zip(rows, texts, strict=True) if (x := ranked.get(r.pair)) is not None]

    def last_run(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
            ranked: object) -> list[bytes]:
        return [b"probe_last_run_timestamp_seconds{%s} %s\n" % (r.labels, t.rsplit(b"|", 2)[1])
                for r, t in zip(rows, texts, strict=True) if t]

    def sni_filtered(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
            ranked: object) -> list[bytes]:
        return [b"probe_sni_filtered{%s} %s\n" % (r.labels, b"1.0" if s.latest.sni_filtered else b"0.0")
                for r, s in zip(rows, states, strict=True) if s is not None and s.latest.sni_filtered is not None]

    return [
        (1, success), (1, duration), (_N_PHASES, http_phases), (1, status), (1, expiry), (1, tls_version),
        (_N_OUTCOMES, outcome), (1, blocked), (1, throughput), (_N_OUTCOMES, runs),
        (_HISTOGRAM_LINES, phases), (1, rank), (1, score), (1, last_run), (1, sni_filtered),
    ]


_WRITERS = _writers()


def render_pairs(store: ResultStore, config: Config) -> Iterator[bytes]:
    """Yield the text of every per-pair family of `config`: family by family, in chunks of about CHUNK_LINES lines."""
    rows = _rows(config)
    states = [store.state(*r.pair) for r in rows]
    ranked = {(x.target, x.route): x for ranking in store.ranking(config).values() for x in ranking}
    keep = config is store.config  # the scores in a memo are those of the store's config
    texts: list[bytes] = []
    for r, s in zip(rows, states, strict=True):
        if s is None:
            texts.append(b"")
            continue
        memo = s.memo if keep else None
        if memo is None:
            memo = _texts(s, ranked[r.pair].score)
            if keep:
                s.memo = memo
        texts.append(memo)
    for (name, kind_name, help_text), (lines_per_pair, write) in zip(FAMILIES, _WRITERS, strict=True):
        escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        parts = [f"# HELP {name} {escaped}\n# TYPE {name} {kind_name}\n".encode()]
        step = max(1, CHUNK_LINES // lines_per_pair)
        for i in range(0, len(rows), step):
            parts += write(rows[i:i + step], states[i:i + step], texts[i:i + step], ranked)
            yield b"".join(parts)
            parts = []
        if parts:
            yield parts[0]  # a family of no pairs: its header only
