"""Fast text exposition of the per-(target, route) families: the bulk of every /metrics scrape.

metrics.families() builds prometheus_client objects, one per sample: at 10,000 pairs hundreds
of thousands of objects per scrape. This module writes the same samples as bytes directly from
the store's flat per-pair arrays (store.PairState): per family one precompiled template for a
pair's lines, ONE bytes `%` of the pair's values and at most ONE replace() that puts the pair's
label text (built once per config and kept) into every line; the text of a pair's float values
is kept until it records (PairState.memo). metrics.render() uses it; tests check that both paths
expose exactly the same samples.

The series budget (DESIGN "Series budget", README "What it costs your Prometheus"): FAMILIES
lists every per-pair family with the most lines it writes per pair, and `configured` says which
pairs can have it at all; a family no configured pair has is not written, not even its header.
A new per-pair family is one more Family here (and its reference in metrics.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from probe.config import Config, Target
from probe.models import Outcome
from probe.ranking import Ranked
from probe.store import OUTCOMES, PHASE_BUCKETS, PHASES, SLOTS, PairState, ResultStore

CHUNK_LINES = 10_000  # lines per chunk (~1 MB): the server writes (and the loop breathes) between chunks
_PAUSE_PAIRS = 1_000  # pairs whose float values are written as text between two pauses


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
    """One configured pair as /metrics writes it: its label text and what its target has, made once per config."""

    __slots__ = ("download", "histograms", "http", "labels", "pair")

    def __init__(self, labels: bytes, pair: tuple[str, str], target: Target) -> None:
        self.labels = labels
        self.pair = pair
        self.http = target.http is not None  # HTTP/1.1 and HTTP/3
        self.download = target.http is not None and target.http.download is not None
        self.histograms = target.histograms


# The last config rendered, its rows, and per family of FAMILIES the indexes of the rows that can
# have it (None: every row).
_rows_of: list[tuple[Config, list[_Row], list[list[int] | None]]] = []


def _rows(config: Config) -> tuple[list[_Row], list[list[int] | None]]:
    if _rows_of and _rows_of[0][0] is config:
        return _rows_of[0][1], _rows_of[0][2]
    vantage = label_value(config.vantage)
    rows = [
        _Row(f'vantage="{vantage}",target="{label_value(t.name)}",route="{label_value(route)}"'.encode(),
             (t.name, route), t)
        for t in config.targets
        for route in t.routes
    ]
    which = [None if (f := family.configured) is None else [i for i, r in enumerate(rows) if f(r)]
             for family in FAMILIES]
    _rows_of[:] = [(config, rows, which)]
    return rows, which


LABELS = b"\x01"  # where a multi-line template takes the pair's labels: filled by bytes.replace(), after the values


def _template(lines: Sequence[tuple[str, str, str]]) -> bytes:
    """Return the template of lines `name{LABELS<extra>} <field>`, one per (name, extra, field).

    `(template % values).replace(LABELS, labels)` writes a pair's lines: one % for the values,
    then one replace for the labels, which is ~20% faster than interleaving the labels with
    the values in one % (the labels hold no %, and the values never hold LABELS).
    """
    return "".join(f"{name}{{{LABELS.decode()}{extra}}} {field}\n" for name, extra, field in lines).encode()


_N_PHASES = len(PHASES)
_PHASE_EXTRAS = [f',phase="{p.value}"' for p in PHASES]
_HTTP_PHASES = _template([("probe_http_duration_seconds", extra, "%s") for extra in _PHASE_EXTRAS])
# probe_outcome (one line: the last outcome) and probe_runs_total (a line per outcome that happened):
# the text after a pair's labels, per outcome code.
_OUTCOME_TAIL = tuple(f',outcome="{o.value}"}} 1.0\n'.encode() for o in OUTCOMES)
_RUNS_TAIL = tuple(f',outcome="{o.value}"}} %d\n'.encode() for o in OUTCOMES)
_CODE = {o: i for i, o in enumerate(OUTCOMES)}


def _histogram_template() -> bytes:
    les = [*(repr(float(b)) for b in PHASE_BUCKETS), "+Inf"]
    lines: list[tuple[str, str, str]] = []
    for extra in _PHASE_EXTRAS:
        lines += [("probe_phase_seconds_bucket", f'{extra},le="{le}"', "%d") for le in les]
        lines += [("probe_phase_seconds_count", extra, "%d"), ("probe_phase_seconds_sum", extra, "%s")]
    return _template(lines)


assert SLOTS == len(PHASE_BUCKETS) + 1
_HISTOGRAM = _histogram_template()
_HISTOGRAM_LINES = _N_PHASES * (SLOTS + 2)
_NO_HISTOGRAM = _HISTOGRAM % (((0,) * (SLOTS + 1) + (b"0.0",)) * _N_PHASES)


def _histogram_values(counts: Sequence[int], sums: Sequence[bytes]) -> tuple[int | bytes, ...]:
    """Return the fields of one pair's histogram lines: per phase its cumulative buckets, count, sum."""
    out: list[int | bytes] = []
    for i in range(_N_PHASES):
        phase = counts[i * SLOTS:(i + 1) * SLOTS]
        out += phase
        out += (phase[-1], sums[i])
    return tuple(out)


# The float values of a pair, written once per result: repr() of a double costs ~0.6 us (shortest
# round trip). Joined by | into PairState.memo until the pair records: the duration, the 5 phases
# of the latest result, its end, the score; then, with histograms, the 5 phase sums.
_TEXTS = b"|".join([b"%a"] * 8)
_TEXTS_SUMS = b"|".join([b"%a"] * 13)
_DURATION, _END, _SCORE, _SUMS = 0, 6, 7, 8


def _texts(s: PairState, score: float) -> bytes:
    r = s.latest
    values: tuple[float, ...] = (r.duration_seconds, *s.phases, r.started_at + r.duration_seconds, score)
    template = _TEXTS
    if s.sums is not None:
        values += tuple(s.sums)
        template = _TEXTS_SUMS
    return template % (values if math.isfinite(sum(values)) else tuple(map(_f, values)))


Texts = Sequence[bytes]  # per pair of a batch its float values as text (see _texts), b"" for none
Writer = Callable[[Sequence[_Row], Sequence[PairState | None], Texts, dict[tuple[str, str], Ranked]], list[bytes]]


@dataclass(frozen=True, slots=True)
class Family:
    """One per-pair family: its header, the most lines it writes per pair, which pairs can have it, its writer."""

    name: str
    type: str
    help: str
    lines: int
    write: Writer
    configured: Callable[[_Row], bool] | None = None  # which pairs can have it; None: every pair


def _success(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranked: object) -> list[bytes]:
    return [b"probe_success{%s} %s\n" % (r.labels, b"1.0" if s.latest.outcome is Outcome.OK else b"0.0")
            for r, s in zip(rows, states, strict=True) if s is not None]


def _duration(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranked: object) -> list[bytes]:
    return [b"probe_duration_seconds{%s} %s\n" % (r.labels, t.split(b"|", 1)[_DURATION])
            for r, t in zip(rows, texts, strict=True) if t]


def _http_phases(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
                 ranked: object) -> list[bytes]:
    return [(_HTTP_PHASES % tuple(t.split(b"|", 6)[1:6])).replace(LABELS, r.labels)
            for r, t in zip(rows, texts, strict=True) if t and r.http]


def _status(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranked: object) -> list[bytes]:
    return [b"probe_http_status_code{%s} %d.0\n" % (r.labels, s.latest.http_status or 0)
            for r, s in zip(rows, states, strict=True) if s is not None and r.http]


def _expiry(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranked: object) -> list[bytes]:
    out = []
    for r, s in zip(rows, states, strict=True):
        tls = None if s is None else s.latest.tls
        if tls is not None and tls.earliest_cert_expiry is not None:
            out.append(b"probe_ssl_earliest_cert_expiry{%s} %a\n" % (r.labels, _f(tls.earliest_cert_expiry)))
    return out


_versions: dict[str, bytes] = {}


def _tls_version(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
                 ranked: object) -> list[bytes]:
    out = []
    for r, s in zip(rows, states, strict=True):
        tls = None if s is None else s.latest.tls
        if tls is not None:
            v = _versions.get(tls.version)
            if v is None:
                v = _versions[tls.version] = label_value(tls.version).encode()
            out.append(b'probe_tls_version_info{%s,version="%s"} 1.0\n' % (r.labels, v))
    return out


def _outcome(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranked: object) -> list[bytes]:
    return [b"probe_outcome{%s%s" % (r.labels, _OUTCOME_TAIL[_CODE[s.latest.outcome]])
            for r, s in zip(rows, states, strict=True) if s is not None]


def _blocked(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranked: object) -> list[bytes]:
    return [b"probe_blocked{%s} %s\n" % (r.labels, b"1.0" if s.latest.outcome.blocked else b"0.0")
            for r, s in zip(rows, states, strict=True) if s is not None]


def _throughput(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
                ranked: object) -> list[bytes]:
    out = []
    for r, s in zip(rows, states, strict=True):
        if s is not None and r.download and (rate := s.latest.throughput_bytes_per_second) is not None:
            out.append(b"probe_throughput_bytes_per_second{%s} %a\n" % (r.labels, _f(rate)))
    return out


_runs_templates: dict[bytes, bytes] = {}  # per set of outcomes that happened (PairState.seen), its lines


def _runs(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranked: object) -> list[bytes]:
    out = []
    for r, s in zip(rows, states, strict=True):
        if s is not None:
            template = _runs_templates.get(s.seen)
            if template is None:
                template = _runs_templates[s.seen] = b"".join(b"probe_runs_total{" + LABELS + _RUNS_TAIL[i]
                                                             for i in s.seen)
            runs = s.runs
            out.append((template % tuple([runs[i] for i in s.seen])).replace(LABELS, r.labels))
    return out


def _phases(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranked: object) -> list[bytes]:
    out = []
    for r, s, t in zip(rows, states, texts, strict=True):
        if not r.histograms:
            continue
        if s is None or s.counts is None:
            out.append(_NO_HISTOGRAM.replace(LABELS, r.labels))
        else:
            out.append((_HISTOGRAM % _histogram_values(s.counts, t.split(b"|")[_SUMS:])).replace(LABELS, r.labels))
    return out


def _rank(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
          ranked: dict[tuple[str, str], Ranked]) -> list[bytes]:
    return [b"probe_route_rank{%s} %d.0\n" % (r.labels, x.rank) for r in rows if (x := ranked.get(r.pair)) is not None]


def _score(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
           ranked: dict[tuple[str, str], Ranked]) -> list[bytes]:
    return [b"probe_route_score{%s} %s\n" % (r.labels, t.split(b"|", 8)[_SCORE] if t else b"%a" % _f(x.score))
            for r, t in zip(rows, texts, strict=True) if (x := ranked.get(r.pair)) is not None]


def _last_run(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranked: object) -> list[bytes]:
    return [b"probe_last_run_timestamp_seconds{%s} %s\n" % (r.labels, t.split(b"|", 7)[_END])
            for r, t in zip(rows, texts, strict=True) if t]


def _sni_filtered(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
                  ranked: object) -> list[bytes]:
    return [b"probe_sni_filtered{%s} %s\n" % (r.labels, b"1.0" if s.latest.sni_filtered else b"0.0")
            for r, s in zip(rows, states, strict=True) if s is not None and s.latest.sni_filtered is not None]


# In the order metrics.families() emits them; metrics.py takes the help texts from here.
FAMILIES: tuple[Family, ...] = (
    Family("probe_success", "gauge", "Whether the last probe of the target over the route succeeded.", 1, _success),
    Family("probe_duration_seconds", "gauge", "How long the last probe took, in seconds.", 1, _duration),
    Family("probe_http_duration_seconds", "gauge",
           "Duration of each phase of the last HTTP probe (0 when the phase did not complete).", _N_PHASES,
           _http_phases, lambda row: row.http),
    Family("probe_http_status_code", "gauge", "HTTP status of the last response (0: none).", 1, _status,
           lambda row: row.http),
    Family("probe_ssl_earliest_cert_expiry", "gauge", "Earliest expiry of the verified chain, unix seconds.", 1,
           _expiry),
    Family("probe_tls_version_info", "gauge", "TLS version of the last handshake.", 1, _tls_version),
    Family("probe_outcome", "gauge",
           "The outcome of the last probe, value 1; the series of an earlier outcome goes stale.", 1, _outcome),
    Family("probe_blocked", "gauge", "1 when the last outcome is an interference class.", 1, _blocked),
    Family("probe_throughput_bytes_per_second", "gauge", "Download throughput of the last probe.", 1, _throughput,
           lambda row: row.download),
    Family("probe_runs_total", "counter", "Probes run, by outcome (only outcomes that happened).", len(OUTCOMES),
           _runs),
    Family("probe_phase_seconds", "histogram",
           "Duration of each completed probe phase (targets with histograms: true).", _HISTOGRAM_LINES, _phases,
           lambda row: row.histograms),
    Family("probe_route_rank", "gauge", "Rank of the route for the target; 1 is the one to use.", 1, _rank),
    Family("probe_route_score", "gauge",
           "Route score from the last 20 runs: p90 x (1 + 4 x failure share) + s/MiB + tier offset; lower is better.",
           1, _score),
    Family("probe_last_run_timestamp_seconds", "gauge", "When the last probe finished, unix seconds.", 1, _last_run),
    Family("probe_sni_filtered", "gauge",
           "1: the last run proved name-based filtering (the control handshake answered, the target's did not); "
           "0: neither answered. Absent when not tested.", 1, _sni_filtered),
)


def render_pairs(store: ResultStore, config: Config) -> Iterator[bytes]:
    """Yield the text of every per-pair family of `config`: family by family, in chunks of about CHUNK_LINES lines.

    A family without a single series is left out, header included (as metrics.families() leaves it out).
    An empty chunk is a pause in the work before the first line (the rankings, the text of every
    pair's float values after it recorded: ~90 ms at 10,000 pairs on a busy machine): the server
    lets the loop run there, as it does after every chunk.
    """
    rows, which = _rows(config)
    states = [store.state(*r.pair) for r in rows]
    yield b""
    ranked = {(x.target, x.route): x for ranking in store.ranking(config).values() for x in ranking}
    yield b""
    keep = config is store.config  # the scores in a memo are those of the store's config
    texts: list[bytes] = []
    for i, (r, s) in enumerate(zip(rows, states, strict=True)):
        if s is None:
            texts.append(b"")
            continue
        memo = s.memo if keep else None
        if memo is None:
            memo = _texts(s, ranked[r.pair].score)
            if keep:
                s.memo = memo
        texts.append(memo)
        if i % _PAUSE_PAIRS == _PAUSE_PAIRS - 1:
            yield b""
    for family, mine in zip(FAMILIES, which, strict=True):
        if mine is None:
            f_rows, f_states, f_texts = rows, states, texts
        else:
            f_rows, f_states, f_texts = [rows[i] for i in mine], [states[i] for i in mine], [texts[i] for i in mine]
        escaped = family.help.replace("\\", "\\\\").replace("\n", "\\n")
        header: bytes | None = f"# HELP {family.name} {escaped}\n# TYPE {family.name} {family.type}\n".encode()
        step = max(1, CHUNK_LINES // family.lines)
        for i in range(0, len(f_rows), step):
            parts = family.write(f_rows[i:i + step], f_states[i:i + step], f_texts[i:i + step], ranked)
            if not parts:
                continue
            if header is not None:
                parts.insert(0, header)
                header = None
            yield b"".join(parts)
