"""Property-based tests (hypothesis): the config loader and DNS reply handling never crash.

"No crash" means only proper outcomes: the loader returns a Config or raises ConfigError;
`probe.dns.lookup` returns a Lookup or raises a DnsFailure with a dns_* (or error)
outcome, by its deadline, for any reply bytes a loopback DNS server sends.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import dns.message
import dns.rrset
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from probe import config
from probe.classify import DnsFailure
from probe.context import ProbeContext
from probe.dns import lookup as probe_dns
from probe.models import Deadline, Outcome
from tests.dnsserver import DnsServer, Transport

KEYS = sorted(
    {"vantage", "listen", "defaults", "resolvers", "canaries", "bogons", "routes", "targets", "name", "url",
     "address", "tls", "server_name", "expect", "method", "headers", "max_body_bytes", "follow_redirects",
     "allow_insecure_redirects",
     "download", "interval", "timeout", "ca_file", "type", "control", "proxy", "source_address", "resolver",
     "status", "body_contains", "body_regex", "min_bytes_per_second", "max_bytes", "group"}
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True),
    st.sampled_from(["10s", "0s", "-1s", "250ms", "1h30m", "https://example.com/", "http://[::1", "a:1",
                     "127.0.0.1:53", "socks5h://u:p@h:1", "udp", "doh", "direct", "x" * 300, "[a-", "é", ""]),
    st.text(max_size=30),
)
DOCS = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8),
                                                                inner, max_size=6),
    max_leaves=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=DOCS)
def test_config_loader_returns_a_config_or_a_config_error_for_any_document(doc: Any) -> None:
    text = yaml.safe_dump(doc) if not isinstance(doc, str) else doc
    try:
        loaded = config.loads(text)
    except config.ConfigError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)
    else:
        assert loaded.targets


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_config_loader_survives_arbitrary_text(text: str) -> None:
    try:
        config.loads(text)
    except config.ConfigError as e:
        assert e.problems


# --- DNS replies ----------------------------------------------------------------------

NAME = "storage.example"
DNS_DEADLINE = 0.3
PROPER = {Outcome.DNS_TIMEOUT, Outcome.DNS_SERVFAIL, Outcome.DNS_NXDOMAIN, Outcome.ERROR}


def genuine(query: dns.message.Message) -> bytes:
    response = dns.message.make_response(query)
    q = query.question[0]
    rdtype = "A" if q.rdtype == 1 else "AAAA"
    response.answer.append(dns.rrset.from_text(q.name, 60, "IN", "CNAME", "edge.storage.example."))
    response.answer.append(dns.rrset.from_text("edge.storage.example.", 60, "IN", rdtype,
                                               "198.51.100.9" if rdtype == "A" else "2001:db8::9"))
    return response.to_wire()


MUTATIONS = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8)
REPLIES = st.one_of(
    st.tuples(st.just("random"), st.binary(max_size=600), st.just([]), st.just(1.0), st.booleans()),
    st.tuples(st.just("mutated"), st.just(b""), MUTATIONS, st.floats(0, 1), st.booleans()),
)


def behaviour_for(plan: tuple[str, bytes, list[tuple[float, int]], float, bool]) -> Any:
    kind, data, mutations, keep, keep_id = plan

    async def behave(query: dns.message.Message, transport: Transport) -> list[bytes]:
        wire = bytearray(data if kind == "random" else genuine(query))
        for where, byte in mutations:
            wire[int(where * len(wire))] = byte
        wire = wire[: max(2, int(len(wire) * keep))] if kind == "mutated" else wire
        if keep_id and len(wire) >= 2:
            wire[:2] = query.id.to_bytes(2, "big")
        return [bytes(wire)]

    return behave


async def lookup_with(plan: Any, transport: str) -> tuple[object, float]:
    cfg = config.loads("vantage: f\ntargets: [{name: t, address: '127.0.0.1:1'}]\n")
    async with DnsServer(behaviour_for(plan)) as server:
        resolver = server.resolver("fuzz", config.ResolverType(transport))
        ctx = ProbeContext(cfg)
        started = time.monotonic()
        try:
            found: object = await probe_dns.lookup(resolver, NAME, Deadline.after(DNS_DEADLINE), ctx)
        except DnsFailure as e:
            found = e
        finally:
            await ctx.close()
        return found, time.monotonic() - started


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=REPLIES, transport=st.sampled_from(["udp", "tcp"]))
def test_dns_lookup_gives_a_proper_outcome_for_any_reply_bytes(plan: Any, transport: str) -> None:
    found, spent = asyncio.run(lookup_with(plan, transport))
    assert spent <= DNS_DEADLINE + 0.5
    if isinstance(found, DnsFailure):
        assert found.outcome in PROPER, found
    else:
        assert isinstance(found, probe_dns.Lookup), found
        assert all(isinstance(a, str) for a in found.answers)


# --- mutation fuzz of the loader (issue 19) -------------------------------------------

SEEDS = [
    (Path(__file__).resolve().parent / "testdata" / "valid-contract-example.yml").read_text(),
    (Path(__file__).resolve().parents[1] / "targets.yml").read_text(),
]
# Pieces a mutation inserts: YAML syntax, tags whose constructors can fail, anchors and merges,
# deep nesting, URL and address typos, control characters.
TOKENS = [
    "!!int ", "!!float ", "!!timestamp ", "!!binary ", "!!bool ", "!!set ", "!!omap ", "!!pairs ", "!!null ",
    "!!str ", "!!python/object ", "!foo ", "&a ", "*a", "<<: *a\n", "[", "]", "{", "}", ": ", "- ", "\n", "\n  ",
    "\t", "'", '"', "#", "?", "|", ">", "%YAML 1.1\n", "---\n", "...\n", "http://[", "https://[::1/", "[2001:db8::1",
    ":99999", ":0", "socks5://u:p\n@", "\x00", "\x85", "\ufeff", "é", "1e999", "-0", "0x", "0o7", "2001-13-45",
    "[" * 80, "{a: " * 70, "10s", "0s", "-1s", "1h30m", "targets", "defaults", "routes", "resolvers", "url",
    "address", "expect", "headers", "download", "interval", "timeout", "allow_insecure_redirects", "ca_file",
]
MUTATION = st.one_of(
    st.tuples(st.just("insert"), st.floats(0, 1), st.sampled_from(TOKENS) | st.text(max_size=6)),
    st.tuples(st.just("delete"), st.floats(0, 1), st.integers(1, 40).map(str)),
    st.tuples(st.just("duplicate"), st.floats(0, 1), st.integers(1, 200).map(str)),
)
FUZZ_EXAMPLES = int(os.environ.get("PROBE_FUZZ_EXAMPLES", "150"))


def mutate(seed: str, mutations: list[tuple[str, float, str]]) -> str:
    text = seed
    for kind, where, arg in mutations:
        at = int(where * len(text))
        if kind == "insert":
            text = text[:at] + arg + text[at:]
        elif kind == "delete":
            text = text[:at] + text[at + int(arg):]
        else:
            text = text[:at] + text[at:at + int(arg)] + text[at:]
    return text


@pytest.mark.slow
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(seed=st.sampled_from(SEEDS), mutations=st.lists(MUTATION, min_size=1, max_size=6))
def test_mutated_configs_load_or_raise_a_config_error(seed: str, mutations: list[tuple[str, float, str]]) -> None:
    """PROBE_FUZZ_EXAMPLES=15000 scripts/test -k mutated: the long run of the README (several minutes)."""
    text = mutate(seed, mutations)
    try:
        config.loads(text)
    except config.ConfigError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)
