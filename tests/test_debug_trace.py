"""`/probe?target=NAME&debug=true`: the step-by-step trace of one probe, on `probe demo` and through a real proxy."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from probe import debuglog
from tests.demo_proc import DemoProcess, running_demo
from tests.procs import probe_run
from tests.proxies import microsocks
from tests.servers import aiohttp_server

PROXY_PASSWORD = "hunter2-in-the-proxy-url"
TOKEN = "Bearer tok-never-in-a-trace"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoProcess]:
    with running_demo(tmp_path_factory.mktemp("demo")) as running:
        yield running


def test_dns_injection_trace_shows_both_replies_and_which_was_forged(demo: DemoProcess) -> None:
    demo.wait_for({("dns-injected", "direct"): "dns_injection"})
    status, content_type, text = demo.get("/probe?target=dns-injected&debug=true")
    assert status == 200 and content_type.startswith("text/plain"), text
    assert text.startswith("probe debug trace: target dns-injected, vantage demo")
    # The DNS check's listening socket got both replies to the A query, each with TTL and arrival time...
    check = text.split("== DNS check of injected.demo", 1)[1].split("\n== ", 1)[0]
    replies = re.findall(r"border-dns \(.*?\): reply #(\d) from 127\.0\.0\.1 after [\d.]+ ms: A \[([\d.]+)\], TTL 60",
                         check)
    assert replies == [("1", "127.0.0.2"), ("2", "127.0.0.1")], check
    # ...and the verdict says which one was forged (the first, the one a stub resolver takes) and which was genuine.
    forged = re.search(r"A reply \[127\.0\.0\.2\] \(TTL 60\) from 127\.0\.0\.1 after \d+ ms: FORGED: counted as "
                       r"dns_injection", check)
    genuine = re.search(r"A reply \[127\.0\.0\.1\] \(TTL 60\) from 127\.0\.0\.1 after \d+ ms: genuine", check)
    assert forged and genuine, check
    assert "control answers: 127.0.0.1" in check
    # Every step has its time, and the probe's own steps and outcome are there too.
    steps = check.strip().splitlines()[1:]
    assert steps and all(re.match(r"\s+[\d.]+ ms  ", line) for line in steps), steps
    assert "== dns-injected over route direct (resolver border-dns)" in text
    assert "resolved injected.demo through border-dns: 127.0.0.2" in text
    results = text.split("== results", 1)[1]
    assert "direct: dns_injection (blocked)" in results
    assert "dns border-dns: dns_injection" in results and "dns control: ok" in results


def test_tls_trace_has_sni_version_chain_and_heads(demo: DemoProcess) -> None:
    demo.wait_for({("storage", "abroad-proxy"): "ok"})
    status, _, text = demo.get("/probe?target=storage&debug=true")
    assert status == 200, text
    proxied = text.split("== storage over route abroad-proxy (proxy http://127.0.0.1:", 1)[1].split("\n== ", 1)[0]
    assert "not resolved here: the proxy" in proxied
    assert "TLS handshake: ClientHello with SNI ok.demo" in proxied
    assert re.search(r"TLS handshake done: TLS 1\.[23], cipher \S+", proxied), proxied
    assert "certificate 0: subject organizationName=probe demo, commonName=probe demo server" in proxied
    assert "issuer organizationName=probe demo, commonName=probe demo CA" in proxied
    assert "request head: GET /api/ping HTTP/1.1" in proxied and "response head: HTTP/1.1 200 OK" in proxied
    assert "classified ok: every stage passed" in proxied


def test_blocked_handshake_trace_says_where_and_why(demo: DemoProcess) -> None:
    demo.wait_for({("sni-reset", "direct"): "tls_reset"})
    status, _, text = demo.get("/probe?target=sni-reset&debug=true")
    assert status == 200
    direct = text.split("== sni-reset over route direct", 1)[1].split("\n== ", 1)[0]
    assert "TLS handshake: ClientHello with SNI sni-reset.demo" in direct
    assert "stopped in stage tls by ConnectionResetError" in direct
    assert "classified tls_reset (blocked): tls stage, ConnectionResetError" in direct


def test_debug_refuses_targets_not_in_the_config(demo: DemoProcess) -> None:
    status, _, text = demo.get("/probe?target=example.com&debug=true")
    assert status == 404 and "not in the config" in text


async def test_trace_through_a_proxy_with_a_password_never_shows_it(tmp_path: Path) -> None:
    async def ping(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == TOKEN  # the header went out; only the trace hides it
        return web.Response(text="pong")

    app = web.Application()
    app.router.add_get("/ping", ping)
    with microsocks(user="probe", password=PROXY_PASSWORD) as proxy:
        async with aiohttp_server(app) as port:
            cfg = tmp_path / "t.yml"
            cfg.write_text(yaml.safe_dump({
                "vantage": "lab",
                "routes": [{"name": "hk", "proxy": proxy.url}],
                "targets": [{"name": "web", "url": f"http://127.0.0.1:{port}/ping", "routes": ["direct", "hk"],
                             "headers": {"Authorization": TOKEN}, "interval": "1h", "timeout": "3s"}],
            }))
            async with probe_run("-c", str(cfg)) as running, aiohttp.ClientSession() as http:
                async with http.get(running.base + "/probe", params={"target": "web", "debug": "true"}) as resp:
                    assert resp.status == 200
                    text = await resp.text()
    assert PROXY_PASSWORD not in text and "tok-never-in-a-trace" not in text and PROXY_PASSWORD not in running.log
    hk = text.split("== web over route hk (proxy socks5://***@127.0.0.1:", 1)[1].split("\n== ", 1)[0]
    assert f"TCP connect to 127.0.0.1:{port} via socks5://***@127.0.0.1:{proxy.port}" in hk
    assert "authorization: ***" in hk and "response head: HTTP/1.1 200 OK" in hk
    assert "classified ok" in hk
    assert "hk: ok" in text.split("== results", 1)[1]


def test_log_is_bounded_and_scrubs_every_secret() -> None:
    log = debuglog.DebugLog(secrets=["s3cret", "s3cret-longer"])
    with debuglog.recording(log):
        current = debuglog.current()
        assert current is log
        for i in range(debuglog.MAX_STEPS + 10):
            current.add(f"step {i} s3cret-longer s3cret " + "x" * (3 * debuglog.MAX_LINE if i == 0 else 0))
    assert debuglog.current() is None  # off again outside the block: normal probes record nothing
    assert len(log.steps) == debuglog.MAX_STEPS and log.dropped == 10
    assert len(log.steps[0].text) < debuglog.MAX_LINE + 100
    text = log.render(["head"], ["tail"])
    assert "s3cret" not in text and "step 1 *** ***" in text
    assert "10 further steps not recorded" in text
    assert debuglog.header_lines([("Authorization", "Basic eA=="), ("Accept", "*/*")]) == [
        "Authorization: ***", "Accept: */*"]
