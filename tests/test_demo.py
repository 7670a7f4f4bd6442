"""`probe demo` as a newcomer runs it: a real process, its /metrics scraped until every outcome shows."""

from __future__ import annotations

import contextlib
import json
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from probe.cli import build_parser
from probe.demo.border import client_hello_sni
from probe.models import Outcome
from tests.demo_proc import DemoProcess, running_demo

WAIT_SECONDS = 25.0
EXPECTED = {  # (target, route) -> the outcome the simulated border causes
    ("storage", "direct"): "ok",
    ("storage", "abroad-proxy"): "ok",
    ("sni-reset", "direct"): "tls_reset",
    ("sni-reset", "abroad-proxy"): "ok",
    ("sni-stall", "direct"): "tls_timeout",
    ("interception", "direct"): "tls_cert_invalid",
    ("host-reset", "direct"): "http_reset",
    ("block-page", "direct"): "http_unexpected",
    ("no-answer", "direct"): "http_timeout",
    ("throttled", "direct"): "throttled",
    ("blackhole", "direct"): "tcp_timeout",
    ("down", "direct"): "tcp_refused",
    ("proxy-reset", "abroad-proxy"): "tcp_reset",
    ("dns-gone", "direct"): "dns_nxdomain",
    ("dns-broken", "direct"): "dns_servfail",
    ("dns-mute", "direct"): "dns_timeout",
    ("dns-injected", "direct"): "dns_injection",
    ("dns-mismatch", "direct"): "dns_mismatch",
    ("http3", "direct"): "ok",
    ("quic-filtered", "direct"): "tls_timeout",
    ("quic-filtered-tcp", "direct"): "ok",
}


def outcomes(port: int) -> dict[tuple[str, str], str]:
    """Return (target, route) -> the outcome whose probe_outcome gauge is 1, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        if family.name == "probe_outcome":
            for s in family.samples:
                if s.value == 1:
                    found[(s.labels["target"], s.labels["route"])] = s.labels["outcome"]
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoProcess]:
    """Run `probe demo` on a free port with short intervals; stop it afterwards."""
    with running_demo(tmp_path_factory.mktemp("demo")) as demo:
        yield demo


def wait_for(
    port: int, proc: subprocess.Popen[str], wanted: dict[tuple[str, str], str], seconds: float = WAIT_SECONDS
) -> dict[tuple[str, str], str]:
    """Scrape until every wanted outcome is there (or the time is up); return the last scrape."""
    seen: dict[tuple[str, str], str] = {}
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        assert proc.poll() is None, f"probe demo exited with {proc.returncode}"
        try:
            seen = outcomes(port)
        except OSError:
            seen = {}  # not listening yet
        if all(seen.get(k) == v for k, v in wanted.items()):
            break
        time.sleep(0.5)
    return seen


def test_demo_shows_every_outcome_class_in_metrics(demo: DemoProcess) -> None:
    port, proc = demo.port, demo.proc
    assert set(EXPECTED.values()) == {str(o) for o in Outcome} - {"error"}
    seen = wait_for(port, proc, EXPECTED)
    assert {k: seen.get(k) for k in EXPECTED} == EXPECTED


def test_demo_quic_filter_is_proven_name_based_by_the_control(demo: DemoProcess) -> None:
    port, proc = demo.port, demo.proc
    until = time.monotonic() + WAIT_SECONDS
    found: dict[str, float] = {}
    while time.monotonic() < until and "quic-filtered" not in found:
        assert proc.poll() is None
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            for family in text_string_to_metric_families(r.read().decode()):
                if family.name == "probe_sni_filtered":
                    found = {s.labels["target"]: s.value for s in family.samples}
        time.sleep(0.5)
    # The first run fails at the TLS stage without a control (probe run has no history yet); the next
    # sends the control ok.demo first, which the border lets through: the name is filtered.
    assert found == {"quic-filtered": 1.0}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/results", timeout=5) as r:
        results = {(x["target"], x["route"]): x for x in json.load(r)["results"]}
    quic = results[("quic-filtered", "direct")]
    assert quic["outcome"] == "tls_timeout" and quic["sni_filtered"] is True
    assert any("the name is filtered, not the address" in e for e in quic["evidence"])
    assert results[("http3", "direct")]["phases"].keys() == {"resolve", "tls", "processing", "transfer"}


def test_demo_prints_what_it_started_and_where(demo: DemoProcess) -> None:
    port, proc = demo.port, demo.proc
    wait_for(port, proc, {("storage", "direct"): "ok"})
    head = demo.description  # running_demo reads it up to the monitor's line
    assert "border, TLS" in head and "by SNI: reset sni-reset.demo" in head
    assert f"monitor: http://127.0.0.1:{port}/metrics" in head


def client_hello(server_name: str) -> bytes:
    """Return the first TLS record Python's ssl sends for `server_name`."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_sni_is_read_from_a_real_client_hello() -> None:
    assert client_hello_sni(client_hello("sni-reset.demo")) == "sni-reset.demo"


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x05\x01\x00", b""], ids=str)
def test_anything_but_a_client_hello_has_no_sni(data: bytes) -> None:
    assert client_hello_sni(data) is None


def test_demo_stops_cleanly_on_sigterm(demo: DemoProcess) -> None:
    port, proc = demo.port, demo.proc
    wait_for(port, proc, {("storage", "direct"): "ok"})
    proc.terminate()
    assert proc.wait(10) == 0
    log = demo.log.read_text()
    assert "Traceback" not in log and " ERROR " not in log, log


def test_bad_interval_is_a_usage_error() -> None:
    done = subprocess.run([sys.executable, "-m", "probe", "demo", "--interval", "soon"],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert "bad duration 'soon'" in done.stderr


def test_compose_override_runs_the_demo_as_the_cn_vantage() -> None:
    root = Path(__file__).resolve().parent.parent
    override = yaml.safe_load((root / "deploy" / "compose" / "demo.yml").read_text())
    services = yaml.safe_load((root / "docker-compose.yml").read_text())["services"]
    assert set(override["services"]) <= set(services)
    args = build_parser().parse_args(override["services"]["probe-cn"]["command"])
    assert (args.command, args.listen) == ("demo", "0.0.0.0:9516")  # the port its agent scrapes

