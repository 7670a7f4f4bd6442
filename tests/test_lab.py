"""The interference lab: the border's documented behaviours at the packet level, and what `probe once` says.

One set of namespaces per session (tests/lab/net.py, tests/lab/world.py); each test switches
its interference on at the border and the `env` fixture switches it off again. The probe
runs as a real process inside the vantage namespace and is judged only by its JSON.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.lab.net import VANTAGE_IP, Border
from tests.lab.world import (
    BLACKHOLE,
    CANARY,
    DELAYED,
    DROP,
    GEO_NEAR,
    HTTP_PROXY,
    INTERCEPTED,
    INTERCEPTOR,
    LOSSY,
    MISISSUED,
    MISISSUER,
    QUIC_FILTERED,
    RESET,
    RESIDUAL,
    RESOLVER,
    STORAGE,
    THROTTLED,
    TLS_BLOCKED,
    LabEnv,
    expect,
    host_header,
    http,
    https,
    replies_seen,
    result,
    sni,
)

# The fixtures `lab` and `env` come from tests/conftest.py (tests/lab/world.py).


# ---- one interference, one outcome -------------------------------------------------------


@dataclass(frozen=True)
class Case:
    interference: Callable[[Border], None]
    target: dict[str, Any]
    outcome: str
    blocked: bool
    route: str = "direct"
    timeout: str = "2s"


def _none(border: Border) -> None:
    pass


def _on_path_rst(border: Border) -> None:
    # The ClientHello goes on to the server; the forged RSTs (TTL 41, a fingerprint) beat its answer.
    border.queue("tamper", "inject-rst", "--trigger", "blocked-sni.example", "--ttl", "41",
                 match=sni("blocked-sni.example"))


def _block_page(border: Border) -> None:
    border.queue("tamper", "blockpage", match=host_header("blockpage.example"))


def _random_loss(border: Border) -> None:
    for side in ("-d", "-s"):
        border.rule(side, LOSSY, "-m", "statistic", "--mode", "random", "--probability", "0.03", *DROP)


CASES = {
    "healthy_https_is_ok": Case(_none, https("t", "storage.example"), "ok", False),
    "healthy_plain_tcp_is_ok": Case(_none, {"name": "t", "address": "storage.example:22"}, "ok", False),
    "rst_on_sni_is_tls_reset": Case(
        lambda b: b.rule(*sni("blocked-sni.example"), *RESET), https("t", "blocked-sni.example"), "tls_reset", True),
    "rst_injected_on_path_on_sni_is_tls_reset": Case(
        _on_path_rst, https("t", "blocked-sni.example"), "tls_reset", True),
    "drop_on_sni_is_tls_timeout": Case(
        lambda b: b.rule(*sni("stall-sni.example"), *DROP), https("t", "stall-sni.example"), "tls_timeout", True,
        timeout="1s"),
    "rst_on_http_host_is_http_reset": Case(
        lambda b: b.rule(*host_header("blocked-host.example"), *RESET), http("t", "blocked-host.example"),
        "http_reset", True),
    "ip_blackhole_is_tcp_timeout": Case(
        lambda b: b.rule("-d", BLACKHOLE, *DROP), https("t", "blackhole.example"), "tcp_timeout", True,
        timeout="1s"),
    "server_down_is_tcp_refused_not_blocked": Case(
        _none, {"name": "t", "address": "storage.example:8443"}, "tcp_refused", False),
    "interception_with_untrusted_ca_is_tls_cert_invalid": Case(
        lambda b: b.nat("-p", "tcp", "-d", INTERCEPTED, "--dport", "443", "-j", "DNAT",
                        "--to-destination", f"{INTERCEPTOR}:443"),
        https("t", "intercept.example"), "tls_cert_invalid", True),
    "interception_with_wrong_name_is_tls_cert_invalid": Case(
        lambda b: b.nat("-p", "tcp", "-d", MISISSUED, "--dport", "443", "-j", "DNAT",
                        "--to-destination", f"{MISISSUER}:443"),
        https("t", "misissued.example"), "tls_cert_invalid", True),
    "rst_on_proxy_connect_host_is_tcp_reset": Case(
        lambda b: b.rule("-p", "tcp", "-d", HTTP_PROXY, "--dport", "3128", "-m", "string", "--algo", "bm",
                         "--string", "CONNECT blocked-connect.example", *RESET),
        https("t", "blocked-connect.example", routes=["hk-http"]), "tcp_reset", True, route="hk-http"),
    "no_response_is_http_timeout_not_blocked": Case(
        _none, https("t", "storage.example", "/slow"), "http_timeout", False, timeout="1s"),
    "nxdomain_is_dns_nxdomain_not_blocked": Case(_none, https("t", "missing.example"), "dns_nxdomain", False),
    "servfail_is_dns_servfail_not_blocked": Case(_none, https("t", "broken.example"), "dns_servfail", False),
    "silent_resolver_is_dns_timeout_not_blocked": Case(
        _none, https("t", "mute.example"), "dns_timeout", False, timeout="1s"),
    "tbf_throttle_is_throttled": Case(
        lambda b: b.throttle(THROTTLED, "400kbit"),
        https("t", "throttle.example", download={"url": "https://throttle.example/probe/256KiB.bin",
                                                 "min_bytes_per_second": 200000}),
        "throttled", True),
    "unthrottled_download_is_ok": Case(
        _none,
        https("t", "throttle.example", download={"url": "https://throttle.example/probe/256KiB.bin",
                                                 "min_bytes_per_second": 200000}),
        "ok", False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_scenario(env: LabEnv, case: Case) -> None:
    case.interference(env.border)
    expect(env, env.once(case.target, timeout=case.timeout), "t", case.outcome, case.blocked, case.route)


def test_healthy_path_is_ok_over_every_route(env: LabEnv) -> None:
    doc = env.once(https("t", "storage.example", routes=["direct", "hk-socks", "hk-http"]))
    for route in ("direct", "hk-socks", "hk-http"):
        expect(env, doc, "t", "ok", False, route)


def test_sni_reset_spares_other_names_on_the_same_address(env: LabEnv) -> None:
    env.border.rule(*sni("blocked-sni.example"), *RESET)
    doc = env.once(https("blocked", "blocked-sni.example"), https("other", "storage.example"))
    expect(env, doc, "blocked", "tls_reset", True)
    expect(env, doc, "other", "ok", False)
    assert "after ClientHello (sni=blocked-sni.example)" in " ".join(result(doc, "blocked")["evidence"])


def test_block_page_is_reported_with_its_body(env: LabEnv) -> None:
    _block_page(env.border)
    doc = env.once(http("t", "blockpage.example"))
    expect(env, doc, "t", "http_unexpected", True)
    r = result(doc, "t")
    assert r["http_status"] == 200
    assert "This site cannot be reached" in " ".join(r["evidence"])


def test_few_percent_random_loss_on_a_healthy_path_is_ok(env: LabEnv) -> None:
    _random_loss(env.border)
    download = {"url": "https://lossy.example/probe/1MiB.bin", "min_bytes_per_second": 20000}
    # Random loss early in a connection costs a whole initial RTO (1 s) per lost packet, and
    # CI once saw a SYN-ACK, a handshake packet and the response head lost in one run (6.0 s):
    # a real lossy link can be that slow, so the deadline leaves room for a few RTOs.
    doc = env.once(https("t", "lossy.example", download=download), timeout="15s")
    expect(env, doc, "t", "ok", False)
    assert env.border.dropped() > 0, env.border.report()  # the loss did happen


def test_residual_blocking_of_the_triple_after_a_trigger(env: LabEnv) -> None:
    seconds = 4.0
    env.border.queue("tamper", "residual", "--trigger", "blocked-sni.example", "--seconds", str(seconds),
                     match=["-p", "tcp", "-s", VANTAGE_IP, "-d", RESIDUAL, "--dport", "443"])
    trigger = {"name": "trigger", "address": f"{RESIDUAL}:443", "tls": True, "server_name": "blocked-sni.example"}
    innocent = {"name": "innocent", "address": f"{RESIDUAL}:443", "tls": True, "server_name": "residual.example"}
    other_port = {"name": "other-port", "address": f"{RESIDUAL}:80"}
    doc = env.once(trigger)
    expect(env, doc, "trigger", "tls_reset", True)
    r = result(doc, "trigger")
    window_ends = r["started_at"] + r["duration_seconds"] + seconds  # wall clock, as started_at
    # The same (client, server, port) is now blocked whatever it carries; another port is not.
    doc = env.once(innocent, other_port, timeout="1s")
    assert result(doc, "innocent")["started_at"] + 1.0 < window_ends, "too slow to probe inside the window"
    expect(env, doc, "innocent", "tcp_timeout", True)
    expect(env, doc, "other-port", "ok", False)
    time.sleep(max(0.0, window_ends + 0.3 - time.time()))
    expect(env, env.once(innocent), "innocent", "ok", False)


def test_geodns_answer_with_valid_certificate_is_ok(env: LabEnv) -> None:
    doc = env.once(https("t", "geo.example"))
    expect(env, doc, "t", "ok", False)
    r = result(doc, "t")
    assert r["address"] == GEO_NEAR
    answers = {d["resolver"]: d["answers"] for d in r["dns"]}
    assert answers == {"system": [GEO_NEAR], "control": [STORAGE]}


def test_blocked_direct_route_ranks_below_working_proxy(env: LabEnv) -> None:
    env.border.rule(*sni("blocked-sni.example"), *RESET)
    cfg = env.config(https("t", "blocked-sni.example", routes=["direct", "hk-socks"]))
    doc = env.lab.probe(cfg, command="routes")
    ranked = doc["routes"]["t"]
    assert [(r["route"], r["last_outcome"]) for r in ranked] == [("hk-socks", "ok"), ("direct", "tls_reset")], ranked
    assert ranked[0]["rank"] == 1 and ranked[0]["rank"] < ranked[1]["rank"]


def test_added_delay_is_measured_in_the_connect_phase(env: LabEnv) -> None:
    added = 0.040
    env.border.queue("tamper", "delay", "--ms", str(added * 1000), match=["-d", DELAYED])
    targets = [{"name": f"p{i}-{port}", "address": f"{DELAYED}:{port}"} for i, port in enumerate((22, 80, 443) * 2)]
    doc = env.lab.probe(env.config(*targets), realtime=True)
    connects = {t["name"]: result(doc, t["name"])["phases"].get("connect") for t in targets}
    assert all(c is not None and abs(c - added) <= 0.002 for c in connects.values()), (
        f"added {added * 1000:.0f} ms; measured connect (ms): "
        + ", ".join(f"{n} {c * 1000:.2f}" if c is not None else f"{n} none" for n, c in connects.items())
    )


# ---- DNS injection on the path -----------------------------------------------------------


def injector(*args: str, to: str = RESOLVER) -> Callable[[Border], None]:
    def switch_on(border: Border) -> None:
        border.queue("injector", *args, match=["-p", "udp", "-d", to, "--dport", "53"])

    return switch_on


def test_two_injectors_racing_the_resolver_is_dns_injection(env: LabEnv) -> None:
    injector("--fingerprint", "gfw-a", "--fingerprint", "gfw-b", "--name", "injected.example")(env.border)
    doc = env.once(https("t", "injected.example"))
    expect(env, doc, "t", "dns_injection", True)
    system = next(d for d in result(doc, "t")["dns"] if d["resolver"] == "system")
    assert system["replies"] >= 2, system


def test_canary_that_answers_is_dns_injection(env: LabEnv) -> None:
    # The resolver's path gets only the forgery (as in the dns_mismatch case); the canary, which
    # runs no DNS server yet answers, shows it was forged on the path, not by the resolver.
    injector("--fingerprint", "gfw-b", "--poison", "--name", "injected.example", to=f"{RESOLVER},{CANARY}")(env.border)
    expect(env, env.once(https("t", "injected.example"), canaries=(CANARY,)), "t", "dns_injection", True)


def test_poisoned_answer_failing_tls_is_dns_mismatch(env: LabEnv) -> None:
    # Only the forgery arrives (the query is dropped), pointing at a host without a valid certificate.
    injector("--fingerprint", "poison", "--poison", "--name", "poisoned.example")(env.border)
    expect(env, env.once(https("t", "poisoned.example")), "t", "dns_mismatch", True)


def test_forged_replies_beat_the_real_one_on_the_wire(env: LabEnv) -> None:
    from tests.lab.injector import FINGERPRINTS

    injector("--fingerprint", "gfw-a", "--fingerprint", "gfw-b", "--name", "injected.example")(env.border)
    replies = replies_seen("injected.example", RESOLVER)
    assert all(r["from"] == RESOLVER and r["id_ok"] for r in replies), replies
    answers = [r["ip_answers"] for r in replies]
    assert len(answers) == 3, replies
    assert answers[0][0] in FINGERPRINTS["gfw-a"].pool and answers[1][0] in FINGERPRINTS["gfw-b"].pool
    assert answers[2] == [STORAGE]  # the genuine reply comes last
    # Fingerprints tell the injectors apart: gfw-b's fixed IP TTL, against the genuine reply's
    # 64 less the border's hop.
    assert [r["ttl"] for r in replies[1:]] == [233, 63], replies


def test_canary_without_dns_server_answers_through_the_injector(env: LabEnv) -> None:
    assert replies_seen("injected.example", CANARY) == []  # nothing runs there
    injector("--fingerprint", "gfw-b", "--name", "injected.example", to=CANARY)(env.border)
    replies = replies_seen("injected.example", CANARY)
    assert [(r["from"], len(r["ip_answers"])) for r in replies] == [(CANARY, 1)], replies
    assert replies_seen("storage.example", CANARY) == []  # only blocked names are answered


def test_injector_leaves_other_names_alone(env: LabEnv) -> None:
    injector("--fingerprint", "gfw-a", "--name", "injected.example")(env.border)
    expect(env, env.once(https("t", "storage.example")), "t", "ok", False)


# ---- QUIC filtering, control handshakes, residual blocking ----------------------------------


QUIC_PORT = ["-p", "udp", "-m", "multiport", "--ports", "443"]  # both directions of every UDP 443 flow


def quic_censor(border: Border, seconds: float = 30.0) -> None:
    border.queue("quic_censor", "--trigger", "quic-blocked.example", "--seconds", str(seconds), match=QUIC_PORT)


def h3(name: str, host: str, **extra: Any) -> dict[str, Any]:
    return {**https(name, host), "http_version": 3, **extra}


def test_quic_sni_filter_is_tls_timeout_and_proven_name_based(env: LabEnv) -> None:
    quic_censor(env.border)
    doc = env.once(
        h3("quic", "quic-blocked.example", control_sni="quic-free.example"),
        h3("quic-free", "quic-free.example"),  # a free name on another address
        https("tcp", "quic-blocked.example", control_sni="quic-free.example"),  # the same name over TCP
        timeout="1500ms",
    )
    expect(env, doc, "quic", "tls_timeout", True)
    expect(env, doc, "quic-free", "ok", False)
    expect(env, doc, "tcp", "ok", False)
    quic = result(doc, "quic")
    assert quic["sni_filtered"] is True, quic
    assert any(e.startswith(f"control handshake to {QUIC_FILTERED}:443/udp with sni=quic-free.example, sent first: "
                            "handshake completed") and e.endswith("the name is filtered, not the address")
               for e in quic["evidence"]), quic["evidence"]
    assert result(doc, "quic-free")["phases"].keys() == {"resolve", "tls", "processing", "transfer"}
    assert result(doc, "tcp")["sni_filtered"] is None  # it got past the handshake: nothing to prove
    assert "quic-blocked.example': triple blocked" in env.border.report()


# A bare QUIC client in the vantage: send one Initial naming argv[1] from UDP port argv[3] to
# argv[2]:443; print whether anything came back within 0.7 s.
QUIC_INITIAL = """
import socket, sys, time
from aioquic.h3.connection import H3_ALPN
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
conn = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=sys.argv[1]))
peer = (sys.argv[2], 443)
conn.connect(peer, now=time.monotonic())
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[3])))
for data, _ in conn.datagrams_to_send(now=time.monotonic()):
    s.sendto(data, peer)
s.settimeout(0.7)
try:
    s.recvfrom(65536)
    print("answered")
except TimeoutError:
    print("silent")
"""


def test_quic_censor_inspects_only_datagrams_from_the_higher_port(env: LabEnv) -> None:
    from tests.lab import net

    quic_censor(env.border)

    def initial_from(port: int) -> str:
        return net.sh(sys.executable, "-c", QUIC_INITIAL, "quic-blocked.example", QUIC_FILTERED, str(port),
                      ns=net.VANTAGE).strip()

    assert initial_from(400) == "answered"  # source port below 443: not inspected, as the GFW does
    assert initial_from(40000) == "silent"  # above: decrypted, matched, dropped
    assert initial_from(400) == "silent"  # and now the whole triple is blocked, from any client port


def test_address_level_tls_block_is_not_name_filtered(env: LabEnv) -> None:
    # Every TCP segment with a payload (a ClientHello, whatever its name) to the address is dropped.
    env.border.rule("-p", "tcp", "-d", TLS_BLOCKED, "--dport", "443", "-m", "length", "--length", "200:65535",
                    *DROP)
    doc = env.once(https("t", "addr-blocked.example", control_sni="quic-free.example"), timeout="1500ms")
    expect(env, doc, "t", "tls_timeout", True)
    r = result(doc, "t")
    assert r["sni_filtered"] is False, r
    assert any(e.startswith(f"control handshake to {TLS_BLOCKED}:443/tcp with sni=quic-free.example, sent first: "
                            "no answer after") and "the address is blocked for any name" in e
               for e in r["evidence"]), r["evidence"]


def test_tls_censor_with_residual_blocking_is_beaten_by_the_control_sent_first(env: LabEnv) -> None:
    env.border.queue("tamper", "residual", "--trigger", "blocked-sni.example", "--seconds", "30",
                     match=["-p", "tcp", "-s", VANTAGE_IP, "-d", RESIDUAL, "--dport", "443"])
    trigger = {"name": "t", "address": f"{RESIDUAL}:443", "tls": True, "server_name": "blocked-sni.example",
               "control_sni": "residual.example"}
    doc = env.once(trigger)
    expect(env, doc, "t", "tls_reset", True)
    assert result(doc, "t")["sni_filtered"] is True  # the control went first, before the censor fired


PROBE_RESULTS = """
import json, sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/results", timeout=2) as r:
    print(json.dumps([x for x in json.load(r)["results"] if x["target"] == "quic"]))
"""


def test_probe_run_sends_the_control_after_a_tls_failure_and_names_residual_blocking(env: LabEnv) -> None:
    from tests.lab import net

    residual = 5.0
    quic_censor(env.border, seconds=residual)
    cfg = env.config(h3("quic", "quic-blocked.example", control_sni="quic-free.example", interval="1s"),
                     timeout="800ms")
    path = env.lab.directory / "run.json"
    path.write_text(json.dumps(cfg))
    port = 19516
    run = net.start(net.VANTAGE, "probe-run", [sys.executable, "-m", "probe", "run", "-c", str(path), "--listen",
                                                f"127.0.0.1:{port}"], env.lab.directory, wait_ready=False)
    seen: dict[float, dict[str, Any]] = {}
    try:
        until = time.monotonic() + 25
        while time.monotonic() < until and not any(r["sni_filtered"] for r in seen.values()):
            out = net.sh(sys.executable, "-c", PROBE_RESULTS, str(port), ns=net.VANTAGE, check=False)
            with contextlib.suppress(ValueError):
                seen.update({r["started_at"]: r for r in json.loads(out)})
            time.sleep(0.3)
    finally:
        run.stop()
    runs = [seen[k] for k in sorted(seen)]
    story = [(r["outcome"], r["sni_filtered"], any("residual blocking" in e for e in r["evidence"])) for r in runs]
    # First run: no history, no control. Then the control goes first, but the censor still blocks the
    # triple: inconclusive, and the evidence names residual blocking. Once the block has run out, the
    # control is answered and the target's Initial is dropped again: the name is filtered.
    assert story[0] == ("tls_timeout", None, False), story
    assert ("tls_timeout", None, True) in story, story
    assert story[-1] == ("tls_timeout", True, False), story
    line = next(e for r in runs for e in r["evidence"] if "residual blocking" in e)
    assert line.startswith(f"the previous run on {QUIC_FILTERED}:443/udp failed at the TLS stage"), line


# Outcomes the dedicated tests above assert, beside the CASES table.
DEDICATED = {
    test_residual_blocking_of_the_triple_after_a_trigger: {"tls_reset", "tcp_timeout", "ok"},
    test_two_injectors_racing_the_resolver_is_dns_injection: {"dns_injection"},
    test_poisoned_answer_failing_tls_is_dns_mismatch: {"dns_mismatch"},
    test_block_page_is_reported_with_its_body: {"http_unexpected"},
}


def test_scenarios_cover_every_outcome_but_error() -> None:
    from probe.models import Outcome

    covered = {c.outcome for c in CASES.values()}.union(*DEDICATED.values())
    assert covered == {str(o) for o in Outcome} - {"error"}
