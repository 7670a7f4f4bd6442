"""Localisation in the chain lab: censors at known hops, found by `probe once --json` in the vantage.

tests/lab/chain.py builds six forwarding routers between the vantage and the hosts abroad; each
test switches a censor on at one hop (tests/lab/censor.py) and reads only the probe's JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

from probe.locate.search import PACKET_CAP
from tests.lab import chain as lab_chain
from tests.lab import net
from tests.lab.chain import (
    ABROAD,
    CANARY,
    DOWN,
    RESIDUAL,
    RESOLVER,
    STORAGE,
    TRANSPARENT,
    Chain,
    router_address,
)
from tests.lab.world import _unavailable

ZONE = {
    **{name: [STORAGE] for name in ("storage.example", "blocked-sni.example", "injected.example", "copy.example",
                                    "flood.example", "blocked-host.example", "slow.example")},
    "transparent.example": [TRANSPARENT],
    "residual.example": [RESIDUAL],
    "down.example": [DOWN],
}
CENSOR_HOP, DNS_HOP = 4, 2


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Chain, str]]:
    """Build the chain and start the servers abroad, once per module."""
    reason = net.missing_prerequisites()
    if reason is not None:
        _unavailable(reason)
    directory = tmp_path_factory.mktemp("chain")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    leaf = ca.issue_cert(*ZONE)
    leaf.cert_chain_pems[0].write_to_path(str(directory / "leaf.pem"))
    leaf.private_key_pem.write_to_path(str(directory / "leaf.key"))
    tls = {"cert": str(directory / "leaf.pem"), "key": str(directory / "leaf.key")}
    services = [
        *({"kind": "web", "host": h, "port": 443, **tls} for h in (STORAGE, TRANSPARENT, RESIDUAL)),
        {"kind": "web", "host": STORAGE, "port": 80},
        {"kind": "dns", "host": RESOLVER, "port": 53, "zone": ZONE},
    ]
    (directory / "servers.json").write_text(json.dumps({"services": services, "max_seconds": 900}))
    try:
        with lab_chain.chain_network(directory) as built:
            built.start(ABROAD, "servers", [sys.executable, "-m", "tests.lab.serve", str(directory / "servers.json")])
            built.start(ABROAD, "microsocks", ["microsocks", "-i", STORAGE, "-p", "1080"], wait_ready=False)
            yield built, str(directory / "ca.pem")
    except net.LabUnavailable as e:
        _unavailable(str(e))


@pytest.fixture
def lab(chain: tuple[Chain, str]) -> Iterator[tuple[Chain, str]]:
    """The chain, with every censor switched off after the test."""
    try:
        yield chain
    finally:
        chain[0].calm()


def once(lab: tuple[Chain, str], *targets: dict[str, Any], canaries: tuple[str, ...] = ()) -> dict[str, Any]:
    built, ca_file = lab
    return built.probe({
        "vantage": "chain",
        "defaults": {"timeout": "2s", "ca_file": ca_file, "locate": True, "dns_reply_window": "200ms"},
        "resolvers": [{"name": "system", "type": "system"}],
        "canaries": list(canaries),
        "routes": [{"name": "direct"}, {"name": "socks", "proxy": f"socks5://{STORAGE}:1080", "resolver": "system"}],
        "targets": list(targets),
    })


def result(doc: dict[str, Any], target: str, route: str = "direct") -> dict[str, Any]:
    found = [r for r in doc["results"] if r["target"] == target and r["route"] == route]
    assert found, json.dumps(doc, indent=1)
    return dict(found[0])


def sni_match(name: str, port: int = 443) -> list[str]:
    return ["-p", "tcp", "--dport", str(port), "-m", "string", "--algo", "bm", "--string", name]


def routers(n: int) -> list[str]:
    return [router_address(k) for k in range(1, n + 1)]


def test_sni_reset_injector_is_found_at_its_hop_with_its_fingerprint(lab: tuple[Chain, str]) -> None:
    lab[0].censor(CENSOR_HOP, "rst", "--trigger", "blocked-sni.example", "--ttl", "58", "--ip-id", "1",
                  "--window", "1981", "--payload", "10", match=sni_match("blocked-sni.example"))
    r = result(once(lab, {"name": "t", "url": "https://blocked-sni.example/api/ping"}), "t")
    assert r["outcome"] == "tls_reset", json.dumps(r, indent=1) + lab[0].report()
    found = r["locate"]
    assert found["hop"] == CENSOR_HOP, json.dumps(found, indent=1) + lab[0].report()
    assert found["hops"] == routers(CENSOR_HOP)
    assert found["hops"][0] == "192.0.2.2"
    assert found["evidence"][0].startswith(f"reset at TTL {CENSOR_HOP}, none at TTL {CENSOR_HOP - 1} "
                                           f"(ClientHello (sni=blocked-sni.example))")
    injector = found["injector"]
    # As it arrived: sent with TTL 58 from hop 4, three routers took one each on the way back.
    assert (injector["kind"], injector["ip_ttl"], injector["ip_id"]) == ("rst", 58 - (CENSOR_HOP - 1), 1)
    assert (injector["tcp_window"], injector["tcp_flags"], injector["payload_bytes"]) == (1981, "RA", 10)
    assert 0 < injector["after_seconds"] < 1
    assert found["duration_seconds"] < 5
    assert 0 < found["packets"] <= PACKET_CAP


# The TTL series alone, run in the vantage: for an injector too slow to block the probe itself.
SERIES = """
import asyncio, json, sys
from probe.locate.search import TcpPlan, locate_tcp
from probe.locate.trigger import client_hello
plan = TcpPlan(sys.argv[1], 443, client_hello(sys.argv[2]), f"ClientHello (sni={sys.argv[2]})",
               client_hello("example.com"), "ClientHello for example.com")
print(json.dumps(asyncio.run(locate_tcp(plan)).to_json()))
"""


def test_slow_injector_is_found_at_its_hop_not_a_later_one(lab: tuple[Chain, str]) -> None:
    # Its resets come 400 ms after the trigger (the GFW's come 11-445 ms after the ClientHello),
    # long after each step's router said time-exceeded: every step stops waiting before its reset
    # arrives, the later steps draw resets too, and the capture finds the first one all the same.
    lab[0].censor(CENSOR_HOP, "rst", "--trigger", "slow.example", "--delay-ms", "400",
                  match=sni_match("slow.example"))
    found = json.loads(net.sh(sys.executable, "-c", SERIES, STORAGE, "slow.example", ns=lab_chain.VANTAGE))
    assert (found["hop"], found["hops"]) == (CENSOR_HOP, routers(CENSOR_HOP)), json.dumps(found, indent=1)
    assert 0.39 < found["injector"]["after_seconds"] < 1, found["injector"]
    assert any("a slow injector, found in the capture" in line for line in found["evidence"]), found["evidence"]
    assert found["duration_seconds"] < 5


def test_plain_http_request_reset_is_found_at_its_hop(lab: tuple[Chain, str]) -> None:
    lab[0].censor(5, "rst", "--trigger", "Host: blocked-host.example", "--ttl", "64", "--ip-id", "7",
                  match=sni_match("Host: blocked-host.example", port=80))
    r = result(once(lab, {"name": "h", "url": "http://blocked-host.example/api/ping"}), "h")
    assert r["outcome"] == "http_reset", json.dumps(r, indent=1)
    assert (r["locate"]["hop"], r["locate"]["hops"]) == (5, routers(5)), json.dumps(r["locate"], indent=1)
    assert r["locate"]["injector"]["ip_id"] == 7


def test_dns_injector_is_found_at_its_hop(lab: tuple[Chain, str]) -> None:
    lab[0].censor(DNS_HOP, "dns", "--name", "injected.example", "--answer", "203.0.113.99", "--ttl", "233",
                  match=["-p", "udp", "--dport", "53"])
    r = result(once(lab, {"name": "d", "url": "https://injected.example/api/ping"}, canaries=(CANARY,)), "d")
    assert r["outcome"] == "dns_injection", json.dumps(r, indent=1) + lab[0].report()
    found = r["locate"]
    assert (found["hop"], found["hops"]) == (DNS_HOP, routers(DNS_HOP)), json.dumps(found, indent=1)
    assert found["evidence"][0].startswith(f"forged DNS answer at TTL {DNS_HOP}, none at TTL {DNS_HOP - 1}")
    assert (found["injector"]["kind"], found["injector"]["ip_ttl"], found["injector"]["ip_id"]) == (
        "dns", 233 - (DNS_HOP - 1), 0)
    assert found["duration_seconds"] < 5


def test_dns_injector_copying_the_probes_ttl_gets_no_hop_but_its_range(lab: tuple[Chain, str]) -> None:
    # At hop 2 it answers with the TTL the query arrived with: the answer to TTL 2 dies on the
    # way back, the one to TTL 3 arrives with TTL 1 (read without privileges, IP_RECVTTL).
    lab[0].censor(2, "dns", "--name", "injected.example", "--answer", "203.0.113.99", "--copy-ttl",
                  match=["-p", "udp", "--dport", "53"])
    r = result(once(lab, {"name": "d", "url": "https://injected.example/api/ping"}, canaries=(CANARY,)), "d")
    assert r["outcome"] == "dns_injection", json.dumps(r, indent=1) + lab[0].report()
    found = r["locate"]
    assert found["hop"] is None and found["injector"]["ip_ttl"] == 1, json.dumps(found, indent=1)
    assert any("between hop 2 and hop 3, no hop stated" in line for line in found["evidence"]), found["evidence"]


def test_block_page_injector_is_found_at_its_hop(lab: tuple[Chain, str]) -> None:
    # The request is dropped at hop 5 and a block page forged back: a forged answer, not a reset.
    lab[0].censor_program(5, "tests.lab.tamper", "blockpage",
                          match=sni_match("Host: blocked-host.example", port=80))
    r = result(once(lab, {"name": "b", "url": "http://blocked-host.example/api/ping",
                          "expect": {"body_contains": "pong"}}), "b")
    assert r["outcome"] == "http_unexpected", json.dumps(r, indent=1)
    found = r["locate"]
    assert (found["hop"], found["hops"]) == (5, routers(5)), json.dumps(found, indent=1)
    assert found["injector"]["kind"] == "data" and found["injector"]["payload_bytes"] > 0
    assert found["evidence"][0].startswith("answer at TTL 5, none at TTL 4 (request (Host: blocked-host.example))")


def test_target_merely_down_gets_no_localisation(lab: tuple[Chain, str]) -> None:
    r = result(once(lab, {"name": "down", "url": "https://down.example/api/ping"}), "down")
    assert (r["outcome"], r["blocked"]) == ("tcp_refused", False)
    assert "locate" not in r


def test_censor_copying_the_probes_ttl_gets_no_hop_but_its_range(lab: tuple[Chain, str]) -> None:
    # At hop 3 it answers with the TTL the probe arrived with: its resets to TTL 3 and 4 die on the
    # way back, the one to TTL 5 arrives with TTL 1. Hop 5 would be wrong; no hop is stated.
    lab[0].censor(3, "rst", "--trigger", "copy.example", "--copy-ttl", match=sni_match("copy.example"))
    r = result(once(lab, {"name": "c", "url": "https://copy.example/api/ping"}), "c")
    assert r["outcome"] == "tls_reset"
    found = r["locate"]
    assert found["hop"] is None, json.dumps(found, indent=1)
    assert found["injector"]["ip_ttl"] == 1
    assert any("between hop 3 and hop 5, no hop stated" in line for line in found["evidence"]), found["evidence"]


def test_box_resetting_every_connection_at_every_ttl_gets_no_hop(lab: tuple[Chain, str]) -> None:
    lab[0].censor(1, "reset-all", match=["-p", "tcp", "-d", TRANSPARENT, "--dport", "443"])
    r = result(once(lab, {"name": "x", "url": "https://transparent.example/api/ping"}), "x")
    assert r["outcome"] == "tls_reset"
    found = r["locate"]
    assert found["hop"] is None, json.dumps(found, indent=1)
    assert any("answers every connection at any TTL" in line for line in found["evidence"]), found["evidence"]
    assert found["duration_seconds"] < 5


def test_icmp_flood_costs_bounded_time_and_is_said(lab: tuple[Chain, str]) -> None:
    lab[0].censor(2, "icmp-flood", "--count", "300", match=["-p", "udp", "--dport", "33434:33500"])
    lab[0].censor(CENSOR_HOP, "rst", "--trigger", "flood.example", match=sni_match("flood.example"))
    r = result(once(lab, {"name": "f", "url": "https://flood.example/api/ping"}), "f")
    found = r["locate"]
    assert found["hop"] == CENSOR_HOP, json.dumps(found, indent=1)
    assert found["duration_seconds"] < 5
    assert any("ICMP errors for one datagram" in line for line in found["evidence"]), found["evidence"]


def test_residual_block_defers_the_localisation_in_probe_once(lab: tuple[Chain, str]) -> None:
    built = lab[0]
    built.censor_program(CENSOR_HOP, "tests.lab.tamper", "residual", "--trigger", "residual.example",
                         "--seconds", "60", match=["-p", "tcp", "-d", RESIDUAL, "--dport", "443"])
    r = result(once(lab, {"name": "res", "url": "https://residual.example/api/ping"}), "res")
    assert r["outcome"] == "tls_reset", json.dumps(r, indent=1)
    assert set(r["locate"]) == {"deferred", "evidence"}
    assert "residual blocking" in r["locate"]["deferred"]


def test_proxy_route_says_localisation_is_not_possible(lab: tuple[Chain, str]) -> None:
    # The ClientHello crosses the censor inside the tunnel to the proxy, and is reset there.
    lab[0].censor(CENSOR_HOP, "rst", "--trigger", "blocked-sni.example",
                  match=sni_match("blocked-sni.example", port=1080))
    target = {"name": "p", "url": "https://blocked-sni.example/api/ping", "routes": ["socks"]}
    r = result(once(lab, target), "p", "socks")
    assert r["outcome"] == "tls_reset", json.dumps(r, indent=1)
    assert r["locate"]["hop"] is None and r["locate"]["packets"] == 0
    assert r["locate"]["evidence"][0].startswith("not possible from the vantage: over route socks")


