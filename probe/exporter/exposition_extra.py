"""The families beside the per-pair ones, written as text the way exposition.py writes those.

DNS (per target and resolver: every target with a host name has one series of each per
resolver), path sampling, localisation and endpoint-group ranks. Through prometheus_client
they cost ~10 us a sample: at 10,000 targets with two resolvers the four DNS families alone
took ~940 ms of a scrape, in one step that held the event loop. metrics.py keeps the
prometheus_client reference of each family (tests/test_exposition.py holds both to the same
samples) and takes the help texts from HELP here.
"""

from __future__ import annotations

from collections.abc import Iterator

from probe.config import Config
from probe.exporter.exposition import (
    CHUNK_LINES,
    LABELS,
    ONE,
    OUTCOME_CODE,
    OUTCOME_TAIL,
    ZERO,
    as_field,
    chunks,
    int_tail,
    label_value,
    rows,
)
from probe.models import PATH_STATS, DnsResult
from probe.ranking import PathHistory
from probe.store import ResultStore

HELP = {
    "probe_dns_lookup_time_seconds": "How long the resolver took to answer.",
    "probe_dns_consistent": "1 when the resolver's answers agree with the controls.",
    "probe_dns_replies": "DNS replies received for the last query.",
    "probe_dns_outcome":
        "The outcome of the resolver's last check, value 1; the series of an earlier outcome goes stale.",
    "probe_path_sent_total": "Path samples sent.",
    "probe_path_lost_total": "Path samples unanswered within their deadline.",
    "probe_path_rtt_seconds": "Round-trip time of the last path sampling run's answered samples.",
    "probe_path_jitter_seconds": "Mean absolute difference of consecutive RTTs of the last path sampling run.",
    "probe_censor_hop":
        "Hop count from the vantage at which the last localisation found the interference (only where it did).",
    "probe_group_rank": "Rank of the (target, route) within the target's endpoint group; 1 is the one to use.",
}

_STEP = CHUNK_LINES  # one-line items per chunk

# Per config (the last one rendered): the DNS rows, as (target, [(resolver, label text)]).
_dns_of: list[tuple[Config, list[tuple[str, list[tuple[str, bytes]]]], list[bytes]]] = []


def _dns_rows(config: Config) -> tuple[list[tuple[str, list[tuple[str, bytes]]]], list[bytes]]:
    if _dns_of and _dns_of[0][0] is config:
        return _dns_of[0][1], _dns_of[0][2]
    vantage = label_value(config.vantage)
    targets = [
        (t.name, [(r, f'vantage="{vantage}",target="{label_value(t.name)}",resolver="{label_value(r)}"'.encode())
                  for r in t.resolvers])
        for t in config.targets if t.needs_dns
    ]
    labels = [text for _, resolvers in targets for _, text in resolvers]
    _dns_of[:] = [(config, targets, labels)]
    return targets, labels


def render(store: ResultStore, config: Config) -> Iterator[bytes]:
    """Yield the text of the DNS, path, localisation and group families of `config` (those with a series)."""
    yield from _dns(store, config)
    yield from _path(store, config)
    yield from _locate(store, config)
    yield from _groups(store, config)


def _dns(store: ResultStore, config: Config) -> Iterator[bytes]:
    targets, labels = _dns_rows(config)
    results: list[DnsResult | None] = []
    for name, resolvers in targets:
        got = store.dns(name)
        if not got:
            results += [None] * len(resolvers)
        elif len(got) == len(resolvers) and all(d.resolver == r for d, (r, _) in zip(got, resolvers, strict=True)):
            results += got
        else:
            by = {d.resolver: d for d in got}
            results += [by.get(r) for r, _ in resolvers]
    yield b""
    n = len(labels)

    def lookup(i: int) -> list[bytes]:
        return [lb + b"} " + b"%a" % as_field(d.duration_seconds)
                for lb, d in zip(labels[i:i + _STEP], results[i:i + _STEP], strict=True)
                if d is not None and d.duration_seconds is not None]

    def consistent(i: int) -> list[bytes]:
        return [lb + (ONE if d.consistent else ZERO)
                for lb, d in zip(labels[i:i + _STEP], results[i:i + _STEP], strict=True)
                if d is not None and d.consistent is not None]

    def replies(i: int) -> list[bytes]:
        return [lb + int_tail(d.replies)
                for lb, d in zip(labels[i:i + _STEP], results[i:i + _STEP], strict=True) if d is not None]

    def outcome(i: int) -> list[bytes]:
        return [lb + OUTCOME_TAIL[OUTCOME_CODE[d.outcome]]
                for lb, d in zip(labels[i:i + _STEP], results[i:i + _STEP], strict=True) if d is not None]

    for name, write in (("probe_dns_lookup_time_seconds", lookup), ("probe_dns_consistent", consistent),
                        ("probe_dns_replies", replies), ("probe_dns_outcome", outcome)):
        yield from chunks(name, "gauge", HELP[name], name.encode() + b"{", (write(i) for i in range(0, n, _STEP)))


_RTT_TAILS = tuple(f',stat="{s}"}} '.encode() for s in PATH_STATS)
_RTT_NEXT = b"\nprobe_path_rtt_seconds{"


def _path_texts(history: PathHistory) -> tuple[bytes, bytes]:
    """Return the item tails of a pair's latest path run: its RTT lines (after the labels) and jitter; b"" for none."""
    latest = history.latest
    if latest is None or not latest.rtts:
        return b"", b""
    rtt = b"".join(  # the stats' lines but the labels of all but the first, which the writer adds
        [(_RTT_NEXT + LABELS if i else b"") + tail + b"%a" % as_field(value)
         for i, (tail, stat) in enumerate(zip(_RTT_TAILS, PATH_STATS, strict=True))
         if (value := latest.rtt(stat)) is not None])
    jitter = latest.jitter
    return rtt, b"" if jitter is None else b"} " + b"%a" % as_field(jitter)


def _path(store: ResultStore, config: Config) -> Iterator[bytes]:
    pair_rows = [r for r in rows(config) if r.path]
    if not pair_rows:
        return
    histories = [store.path(*r.pair) for r in pair_rows]
    texts: list[tuple[bytes, bytes]] = []
    for h in histories:
        if h is None:
            texts.append((b"", b""))
            continue
        if h.memo is None:
            h.memo = _path_texts(h)
        texts.append(h.memo)
    yield b""
    labels = [r.labels for r in pair_rows]
    n = len(labels)

    def sent(i: int) -> list[bytes]:
        return [lb + int_tail(h.sent_total if h else 0)
                for lb, h in zip(labels[i:i + _STEP], histories[i:i + _STEP], strict=True)]

    def lost(i: int) -> list[bytes]:
        return [lb + int_tail(h.lost_total if h else 0)
                for lb, h in zip(labels[i:i + _STEP], histories[i:i + _STEP], strict=True)]

    step = _STEP // len(PATH_STATS)

    def rtt(i: int) -> list[bytes]:
        return [lb + t[0] if LABELS not in t[0] else lb + t[0].replace(LABELS, lb)
                for lb, t in zip(labels[i:i + step], texts[i:i + step], strict=True) if t[0]]

    def jitter(i: int) -> list[bytes]:
        return [lb + t[1] for lb, t in zip(labels[i:i + _STEP], texts[i:i + _STEP], strict=True) if t[1]]

    yield from chunks("probe_path_sent_total", "counter", HELP["probe_path_sent_total"], b"probe_path_sent_total{",
                      (sent(i) for i in range(0, n, _STEP)))
    yield from chunks("probe_path_lost_total", "counter", HELP["probe_path_lost_total"], b"probe_path_lost_total{",
                      (lost(i) for i in range(0, n, _STEP)))
    yield from chunks("probe_path_rtt_seconds", "gauge", HELP["probe_path_rtt_seconds"], b"probe_path_rtt_seconds{",
                      (rtt(i) for i in range(0, n, step)))
    yield from chunks("probe_path_jitter_seconds", "gauge", HELP["probe_path_jitter_seconds"],
                      b"probe_path_jitter_seconds{", (jitter(i) for i in range(0, n, _STEP)))


def _locate(store: ResultStore, config: Config) -> Iterator[bytes]:
    items = [r.labels + int_tail(found.hop) for r in rows(config)
             if r.locate and (found := store.localisation(*r.pair)) is not None and found.hop is not None]
    yield from chunks("probe_censor_hop", "gauge", HELP["probe_censor_hop"], b"probe_censor_hop{",
                      (items[i:i + _STEP] for i in range(0, len(items), _STEP)))


def _groups(store: ResultStore, config: Config) -> Iterator[bytes]:
    labels = {r.pair: r.labels for r in rows(config)}
    items: list[bytes] = []
    for group, ranked in store.group_ranking(config).items():
        tail = b',group="%s"' % label_value(group).encode()
        items += [labels[(x.target, x.route)] + tail + int_tail(x.rank) for x in ranked]
    yield from chunks("probe_group_rank", "gauge", HELP["probe_group_rank"], b"probe_group_rank{",
                      (items[i:i + _STEP] for i in range(0, len(items), _STEP)))
