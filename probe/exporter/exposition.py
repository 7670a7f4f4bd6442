"""Fast text exposition of the per-(target, route) families: the bulk of every /metrics scrape.

metrics.families() builds prometheus_client objects, one per sample: at 10,000 pairs hundreds
of thousands of objects per scrape. This module writes the same samples as bytes directly from
the store's flat per-pair arrays (store.PairState), family by family: a pair's line is its label
text (built once per config and kept) plus the text after it, so most lines cost one bytes
concatenation, and a family's lines are joined by the text that opens the next (see LABELS).
What changes only when a pair records (the text of its float values and run counters) is
written once per result and kept in PairState.memo. metrics.render() uses it; tests check that
both paths expose exactly the same samples.

The series budget (DESIGN "Series budget", README "What it costs your Prometheus"): FAMILIES
lists every per-pair family with the most lines it writes per pair, and `configured` says which
pairs can have it at all; a family no configured pair has is not written, not even its header.
A new per-pair family is one more Family here (and its reference in metrics.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from probe.config import Config, Target
from probe.models import Outcome
from probe.ranking import Ranked
from probe.store import OUTCOMES, PHASE_BUCKETS, PHASES, SLOTS, PairState, ResultStore

CHUNK_LINES = 10_000  # lines per chunk (~1 MB): the server writes (and the loop breathes) between chunks
_PAUSE_PAIRS = 1_000  # pairs whose float values are written as text between two pauses
_RANK_STEP = 300  # targets ranked between two pauses after a start or reload (~10 ms)


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


def as_field(v: float) -> float | _Special:
    """Return `v` for a `%a` field: floats write as repr(), as value() does; non-finite ones as value() spells them."""
    return v if v - v == 0.0 else _SPECIAL[value(v)]


class _Row:
    """One configured pair as /metrics writes it: its label text and what its target has, made once per config."""

    __slots__ = ("download", "histograms", "http", "labels", "locate", "pair", "path")

    def __init__(self, labels: bytes, pair: tuple[str, str], target: Target) -> None:
        self.labels = labels
        self.pair = pair
        self.http = target.http is not None  # HTTP/1.1 and HTTP/3
        self.download = target.http is not None and target.http.download is not None
        self.histograms = target.histograms
        self.path = target.path is not None
        self.locate = target.locate


# The last config rendered, its rows, their pairs, and per family of FAMILIES the indexes of the
# rows that can have it (None: every row).
_rows_of: list[tuple[Config, list[_Row], list[tuple[str, str]], list[list[int] | None]]] = []


def rows(config: Config) -> list[_Row]:
    """Return the pairs of `config` as /metrics writes them (kept until the next config)."""
    return _rows(config)[0]


def _rows(config: Config) -> tuple[list[_Row], list[tuple[str, str]], list[list[int] | None]]:
    for _ in _build_rows(config):
        pass
    return _rows_of[0][1], _rows_of[0][2], _rows_of[0][3]


_ROWS_STEP = 2_000  # targets whose rows are built between two pauses (~5 ms)


def _build_rows(config: Config) -> Iterator[bytes]:
    """Build and keep the rows of `config` unless kept already; yield b"" (a pause) every _ROWS_STEP targets."""
    if _rows_of and _rows_of[0][0] is config:
        return
    vantage = label_value(config.vantage)
    rows: list[_Row] = []
    for i, t in enumerate(config.targets, start=1):
        name = label_value(t.name)
        rows += [_Row(f'vantage="{vantage}",target="{name}",route="{label_value(route)}"'.encode(), (t.name, route), t)
                 for route in t.routes]
        if i % _ROWS_STEP == 0:
            yield b""
    which: list[list[int] | None] = []
    for family in FAMILIES:
        mine = None if (f := family.configured) is None else [i for i, r in enumerate(rows) if f(r)]
        which.append(None if mine is not None and len(mine) == len(rows) else mine)  # None: every row
        if mine is not None:
            yield b""
    pairs = [r.pair for r in rows]
    _rows_of[:] = [(config, rows, pairs, which)]


# How a family's lines are written. A family's text is `name{` + ITEMS joined by `\nname{` + `\n`:
# an item is a pair's lines without the `name{` that opens its first line and without the last
# newline, so the common one-line item is one concatenation, `labels + b"} 1.0"` (5 times cheaper
# than a `%` per line). Items of several lines hold the `\nname{` of their other lines themselves.
LABELS = b"\x01"  # where a multi-line template takes the pair's labels: filled by bytes.replace(), after the values


def _template(first: str, lines: Sequence[tuple[str, str, str]]) -> bytes:
    """Return the item template of the lines `name{LABELS<extra>} <field>`, one per (name, extra, field).

    `(template % values).replace(LABELS, labels)` writes a pair's item: one % for the values,
    then one replace for the labels. `first` is the name of the family's first line (the
    template leaves out its `name{`).
    """
    text = "\n".join(f"{name}{{{LABELS.decode()}{extra}}} {field}" for name, extra, field in lines)
    assert text.startswith(first + "{")
    return text[len(first) + 1:].encode()


_N_PHASES = len(PHASES)
_PHASE_EXTRAS = [f',phase="{p.value}"' for p in PHASES]
_HTTP_PHASES = _template("probe_http_duration_seconds",
                         [("probe_http_duration_seconds", extra, "%b") for extra in _PHASE_EXTRAS])
# probe_outcome (one line: the last outcome) and probe_runs_total (a line per outcome that happened):
# the text after a pair's labels, per outcome code.
OUTCOME_TAIL = tuple(f',outcome="{o.value}"}} 1.0'.encode() for o in OUTCOMES)
_RUNS_TAIL = tuple(f',outcome="{o.value}"}} '.encode() for o in OUTCOMES)
_RUNS_NEXT = b"\nprobe_runs_total{" + LABELS
OUTCOME_CODE = {o: i for i, o in enumerate(OUTCOMES)}
ONE, ZERO = b"} 1.0", b"} 0.0"


def _histogram_template() -> bytes:
    les = [*(repr(float(b)) for b in PHASE_BUCKETS), "+Inf"]
    lines: list[tuple[str, str, str]] = []
    for extra in _PHASE_EXTRAS:
        lines += [("probe_phase_seconds_bucket", f'{extra},le="{le}"', "%d") for le in les]
        lines += [("probe_phase_seconds_count", extra, "%d"), ("probe_phase_seconds_sum", extra, "%b")]
    return _template("probe_phase_seconds_bucket", lines)


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


# What of a pair's lines changes only when it records, written once per result (repr() of a double
# costs ~0.6 us) and kept in PairState.memo until the pair records again: the texts of the duration,
# the end, the score, the certificate expiry and the throughput (b"" for none), the 5 phases of the
# latest result, with histograms the 5 phase sums, joined by |; last the run counters' item tail
# (the text after the labels; LABELS where a second outcome's line takes them). Each family cuts
# its own field out: the early ones with one split, the counters from the last |.
_TEXTS = b"|".join([b"%a"] * 3 + [b"%b"] * 2 + [b"%a"] * _N_PHASES + [b"%b"])
_TEXTS_SUMS = b"|".join([b"%a"] * 3 + [b"%b"] * 2 + [b"%a"] * (2 * _N_PHASES) + [b"%b"])
_END, _SCORE, _EXPIRY, _THROUGHPUT, _PHASES, _SUMS = 1, 2, 3, 4, 5, 5 + _N_PHASES


def _runs_tail(s: PairState) -> bytes:
    runs = s.runs
    return _RUNS_NEXT.join([_RUNS_TAIL[i] + b"%d" % runs[i] for i in s.seen])


def _texts(s: PairState, score: float) -> bytes:
    r = s.latest
    tls = r.tls
    expiry = b"" if tls is None or (e := tls.earliest_cert_expiry) is None else b"%a" % as_field(e)
    rate = r.throughput_bytes_per_second
    values: tuple[float, ...] = (r.duration_seconds, r.started_at + r.duration_seconds, score, *s.phases)
    template = _TEXTS
    if s.sums is not None:
        values += tuple(s.sums)
        template = _TEXTS_SUMS
    if not math.isfinite(sum(values)):
        values = tuple(map(as_field, values))  # type: ignore[arg-type]
    return template % (*values[:3], expiry, b"" if rate is None else b"%a" % as_field(rate), *values[3:],
                       _runs_tail(s))


Texts = Sequence[bytes]  # per pair of a batch its texts (see _texts), b"" for none
Ranks = Sequence[Ranked]  # per pair of a batch its place in its target's ranking
Writer = Callable[[Sequence[_Row], Sequence[PairState | None], Texts, Ranks], list[bytes]]


@dataclass(frozen=True, slots=True)
class Family:
    """One per-pair family: its header, the most lines it writes per pair, which pairs can have it, its writer.

    The writer returns the family's items (see LABELS) for a batch of pairs; `first` names the
    metric of an item's first line (the family's name but for a histogram).
    """

    name: str
    type: str
    help: str
    lines: int
    write: Writer
    configured: Callable[[_Row], bool] | None = None  # which pairs can have it; None: every pair
    first: str = ""

    def opening(self) -> bytes:
        """Return the text that opens the family's first line: `name{`."""
        return f"{self.first or self.name}{{".encode()


def _success(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranks: Ranks) -> list[bytes]:
    ok = Outcome.OK
    return [r.labels + (ONE if s.latest.outcome is ok else ZERO)
            for r, s in zip(rows, states, strict=True) if s is not None]


def _duration(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranks: Ranks) -> list[bytes]:
    return [r.labels + b"} " + t[:t.index(b"|")] for r, t in zip(rows, texts, strict=True) if t]


def _http_phases(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
                 ranks: Ranks) -> list[bytes]:
    return [(_HTTP_PHASES % tuple(t.split(b"|", _PHASES + _N_PHASES)[_PHASES:_PHASES + _N_PHASES]))
            .replace(LABELS, r.labels)
            for r, t in zip(rows, texts, strict=True) if t]


_ints: dict[int, bytes] = {}


def int_tail(n: int) -> bytes:
    """Return `} N.0`: a gauge or counter of a whole number, as prometheus_client writes it (kept up to 4095)."""
    tail = _ints.get(n)
    if tail is None:
        tail = b"} %d.0" % n
        if 0 <= n < 4096:
            _ints[n] = tail
    return tail


def _status(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranks: Ranks) -> list[bytes]:
    return [r.labels + int_tail(s.latest.http_status or 0) for r, s in zip(rows, states, strict=True) if s is not None]


def _expiry(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranks: Ranks) -> list[bytes]:
    return [r.labels + b"} " + e for r, t in zip(rows, texts, strict=True)
            if t and (e := t.split(b"|", _EXPIRY + 1)[_EXPIRY])]


_versions: dict[str, bytes] = {}


def _tls_version(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
                 ranks: Ranks) -> list[bytes]:
    out = []
    for r, s in zip(rows, states, strict=True):
        tls = None if s is None else s.latest.tls
        if tls is not None:
            v = _versions.get(tls.version)
            if v is None:
                v = _versions[tls.version] = b',version="%s"} 1.0' % label_value(tls.version).encode()
            out.append(r.labels + v)
    return out


def _outcome(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranks: Ranks) -> list[bytes]:
    return [r.labels + OUTCOME_TAIL[OUTCOME_CODE[s.latest.outcome]] for r, s in zip(rows, states, strict=True)
            if s is not None]


def _blocked(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranks: Ranks) -> list[bytes]:
    return [r.labels + (ONE if s.latest.outcome.blocked else ZERO)
            for r, s in zip(rows, states, strict=True) if s is not None]


def _throughput(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
                ranks: Ranks) -> list[bytes]:
    return [r.labels + b"} " + rate for r, t in zip(rows, texts, strict=True)
            if t and (rate := t.split(b"|", _THROUGHPUT + 1)[_THROUGHPUT])]


def _runs(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranks: Ranks) -> list[bytes]:
    out = []
    for r, s, t in zip(rows, states, texts, strict=True):
        if s is not None:
            tail = t[t.rindex(b"|") + 1:]
            out.append(r.labels + tail if len(s.seen) == 1 else (LABELS + tail).replace(LABELS, r.labels))
    return out


def _phases(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranks: Ranks) -> list[bytes]:
    out = []
    for r, s, t in zip(rows, states, texts, strict=True):
        if not r.histograms:
            continue
        if s is None or s.counts is None:
            out.append(_NO_HISTOGRAM.replace(LABELS, r.labels))
        else:
            sums = t.split(b"|", _SUMS + _N_PHASES)[_SUMS:_SUMS + _N_PHASES]
            out.append((_HISTOGRAM % _histogram_values(s.counts, sums)).replace(LABELS, r.labels))
    return out


def _rank(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranks: Ranks) -> list[bytes]:
    return [r.labels + int_tail(x.rank) for r, x in zip(rows, ranks, strict=True)]


def _score(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranks: Ranks) -> list[bytes]:
    return [r.labels + b"} " + (t.split(b"|", _SCORE + 1)[_SCORE] if t else b"%a" % as_field(x.score))
            for r, t, x in zip(rows, texts, ranks, strict=True)]


def _last_run(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts, ranks: Ranks) -> list[bytes]:
    return [r.labels + b"} " + t.split(b"|", _END + 1)[_END] for r, t in zip(rows, texts, strict=True) if t]


def _sni_filtered(rows: Sequence[_Row], states: Sequence[PairState | None], texts: Texts,
                  ranks: Ranks) -> list[bytes]:
    return [r.labels + (ONE if s.latest.sni_filtered else ZERO)
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
           lambda row: row.histograms, "probe_phase_seconds_bucket"),
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
    yield from _build_rows(config)  # after a start or a reload
    while config is store.config and store.rank_some(_RANK_STEP):  # the targets not ranked since then
        yield b""
    rows, pairs, which = _rows(config)
    states = store.states(pairs)
    ranks = store.ranks(config)  # in the order of the rows
    yield b""
    keep = config is store.config  # the scores in a memo are those of the store's config
    texts: list[bytes] = []
    written = 0
    for s, x in zip(states, ranks, strict=True):
        if s is None:
            texts.append(b"")
            continue
        memo = s.memo if keep else None
        if memo is None:
            memo = _texts(s, x.score)
            if keep:
                s.memo = memo
            written += 1
            if written % _PAUSE_PAIRS == 0:
                yield b""
        texts.append(memo)
    for family, mine in zip(FAMILIES, which, strict=True):
        if mine is None:
            f_rows, f_states, f_texts, f_ranks = rows, states, texts, ranks
        else:
            f_rows = [rows[i] for i in mine]
            f_states, f_texts, f_ranks = [states[i] for i in mine], [texts[i] for i in mine], [ranks[i] for i in mine]
        step = max(1, CHUNK_LINES // family.lines)
        yield from chunks(family.name, family.type, family.help, family.opening(), (
            family.write(f_rows[i:i + step], f_states[i:i + step], f_texts[i:i + step], f_ranks[i:i + step])
            for i in range(0, len(f_rows), step)))


def header(name: str, type_: str, help_: str) -> bytes:
    """Return the # HELP and # TYPE lines of a family."""
    escaped = help_.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {name} {escaped}\n# TYPE {name} {type_}\n".encode()


def chunks(name: str, type_: str, help_: str, opening: bytes, batches: Iterable[list[bytes]]) -> Iterator[bytes]:
    """Yield a family's text, a chunk per batch of items (see LABELS); nothing, not even its header, without items.

    `opening` opens an item's first line (`name{`); a batch holds at most about CHUNK_LINES lines.
    """
    first: bytes | None = header(name, type_, help_)
    between = b"\n" + opening
    for items in batches:
        if not items:
            continue
        items[0] = opening + items[0] if first is None else first + opening + items[0]
        items[-1] += b"\n"
        first = None
        yield between.join(items)
