"""The status page (`GET /`) in a real headless browser: Debian's chromium driven by Playwright, against `probe demo`.

Playwright launches the system chromium (browser downloads are not reachable, and never
needed): a fresh temporary profile per launch, no sandbox (root in CI), no GPU, and none of
chromium's own background traffic. The browser lives for this module only: Playwright's sync
API keeps an event loop running in the main thread while it is started, which the async
tests of other modules cannot share (so pytest-playwright's session-wide browser is not used).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from playwright.sync_api import Browser, Page, expect, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from probe.exporter.server import STATIC
from probe.models import Outcome
from tests.demo_proc import DemoProcess, request, restartable_port, running_demo
from tests.test_demo import EXPECTED

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "status-page.png"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
WORD = {"ok": "OK", "failing": "FAIL", "blocked": "BLOCKED"}
# A phrase of each outcome's evidence in the demo: the detail shows the evidence an operator pastes into a ticket.
EVIDENCE = {
    "tls_reset": "after ClientHello (sni=sni-reset.demo)",
    "tls_timeout": "stalled: no answer",
    "tls_cert_invalid": "failed verification (sni=intercept.demo)",
    "http_reset": "after the request was sent (Host: host-reset.demo",
    "http_unexpected": "body does not contain 'pong'",
    "http_timeout": "no response head",
    "throttled": "below min_bytes_per_second",
    "tcp_timeout": "no answer to the TCP handshake",
    "tcp_refused": "refused",
    "tcp_reset": "reset",
    "dns_injection": "2 differing replies to one A query for injected.demo",
    "dns_mismatch": "share nothing with the control answers",
    "dns_nxdomain": "NXDOMAIN for gone.demo",
    "dns_servfail": "SERVFAIL for broken.demo",
    "dns_timeout": "Timeout",
}
USER, PASSWORD = "oncall", "border watch 2026"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Launch Debian's chromium for this module's tests; stop it (and Playwright's event loop) afterwards."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/test installs Debian's chromium")
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """Return a page in a fresh browser context (no cookies, cache or credentials of another test)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, locale="en-GB", timezone_id="UTC")
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoProcess]:
    with running_demo(tmp_path_factory.mktemp("demo")) as running:
        seen = running.wait_for(EXPECTED)
        assert {k: seen.get(k) for k in EXPECTED} == EXPECTED
        yield running


def kind(outcome: str) -> str:
    return "ok" if outcome == "ok" else "blocked" if Outcome(outcome).blocked else "failing"


def cell(page: Page, target: str, route: str) -> Any:
    return page.locator(f'td.cell[data-key="{target} {route}"]')


# --- the page itself ------------------------------------------------------------------------------


def test_page_is_plain_files_under_100_kib_with_nothing_from_outside() -> None:
    total = sum(len(body) for body, _ in STATIC.values())
    assert set(STATIC) == {"index.html", "status.css", "status.js"}
    assert total < 100 * 1024, total
    for name, (body, _) in STATIC.items():
        text = body.decode()
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), name  # no CDN, no web font
        assert "@import" not in text and "url(" not in text, name


def test_every_demo_outcome_is_in_the_grid_with_its_evidence(page: Page, demo: DemoProcess, tmp_path: Path) -> None:
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(demo.base + "/")
    expect(page.locator("#vantage")).to_have_text("vantage demo")
    for (target, route), outcome in EXPECTED.items():
        c = cell(page, target, route)
        expect(c).to_contain_text(outcome)
        expect(c.locator(".badge")).to_have_text(WORD[kind(outcome)])  # the class as a word, not by colour alone
        expect(c).to_contain_text(re.compile(r"rank \d of \d.* · for \d+s"))
        expect(c).to_have_class(re.compile(rf"\b{kind(outcome)}\b"))
    expect(page.locator("#counts")).to_contain_text("19 targets, 21 pairs: 5 ok, 5 failing, 11 blocked")
    expect(page.locator("tr", has=page.locator('th:text-is("dns-injected")')).locator("th")).to_contain_text(
        "DNS: border-dns dns_injection (BLOCKED), control ok")
    expect(page.locator("tr", has=page.locator('th:text-is("sni-reset")')).locator("th")).to_contain_text(
        "use route abroad-proxy")
    shot = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOTS") else tmp_path / SCREENSHOT.name
    page.locator(".scroll").evaluate("e => { e.style.maxHeight = 'none'; }")  # the whole grid in one picture
    page.locator("header").evaluate("e => e.scrollIntoView()")
    box = _union(page, "header", ".scroll")
    box["width"] = min(box["width"], max(_union(page, "#grid")["width"] + 40, 960))  # not the empty width beside it
    box["height"] += 8
    page.screenshot(path=str(shot), full_page=True, clip=box)
    assert shot.stat().st_size > 20_000
    for (target, route), outcome in EXPECTED.items():
        cell(page, target, route).click()
        detail = page.locator("#detail")
        expect(detail).to_be_visible()
        expect(page.locator("#detail-title")).to_have_text(f"{target} over {route}: {outcome}")
        expect(detail).to_contain_text(re.compile(r"Last \d+ outcomes, oldest first"))
        if outcome == "ok":
            # HTTP/3 has no connect phase: QUIC's handshake is the tls phase.
            expect(detail.locator(".phases-legend")).to_contain_text("tls" if target == "http3" else "connect")
        else:
            expect(detail.locator("ul.evidence").first).to_contain_text(EVIDENCE[outcome])
        page.click("#close-detail")
        expect(detail).to_be_hidden()
    assert requested and all(url.startswith(demo.base + "/") for url in requested), requested


def _union(page: Page, *selectors: str) -> dict[str, float]:
    boxes = [page.locator(s).bounding_box() for s in selectors]
    assert all(boxes)
    left = min(b["x"] for b in boxes if b)
    top = min(b["y"] for b in boxes if b)
    right = max(b["x"] + b["width"] for b in boxes if b)
    bottom = max(b["y"] + b["height"] for b in boxes if b)
    return {"x": left, "y": top, "width": right - left, "height": bottom - top}


def test_keyboard_reaches_every_cell_and_the_detail(page: Page, demo: DemoProcess) -> None:
    page.goto(demo.base + "/")
    expect(cell(page, "storage", "direct")).to_be_visible()
    for _ in range(20):  # Tab from the top of the page lands on the grid's one tab stop
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.matches('td.cell')"):
            break
    focused = lambda: page.evaluate("document.activeElement.dataset.key")  # noqa: E731
    assert focused() == "storage direct"
    page.keyboard.press("ArrowRight")
    assert focused() == "storage abroad-proxy"
    page.keyboard.press("ArrowDown")
    assert focused() == "sni-reset abroad-proxy"
    page.keyboard.press("ArrowDown")  # sni-stall has no abroad-proxy route: skipped to the next row that has one
    assert focused() == "proxy-reset abroad-proxy"
    page.keyboard.press("Home")
    assert focused() == "proxy-reset abroad-proxy"
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowLeft")
    assert focused() == "sni-reset direct"
    for _ in range(len(EXPECTED)):
        page.keyboard.press("ArrowDown")
    assert focused() == "quic-filtered-tcp direct"  # the last row
    assert page.locator("td.cell[tabindex='0']").count() == 1  # one tab stop: Tab leaves the grid
    page.keyboard.press("Enter")
    expect(page.locator("#detail")).to_be_visible()
    assert page.evaluate("document.activeElement.id") == "detail-title"
    expect(page.locator("#detail-title")).to_have_text("quic-filtered-tcp over direct: ok")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "probe-now"
    page.keyboard.press("Escape")
    expect(page.locator("#detail")).to_be_hidden()
    assert focused() == "quic-filtered-tcp direct"  # back where the operator was


# WCAG 2.1 relative luminance and contrast ratio.
CONTRAST = """
() => {
  const rgb = (s) => s.match(/[\\d.]+/g).map(Number);
  const lum = (c) => { const [r, g, b] = rgb(c).slice(0, 3).map((v) => { v /= 255;
    return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; }); return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  const bg = (e) => { for (; e; e = e.parentElement) { const c = getComputedStyle(e).backgroundColor;
    if (rgb(c)[3] !== 0) return c; } return "rgb(255, 255, 255)"; };
  const out = [];
  const sel = "td.cell .o, td.cell .m, td.cell .badge, th, th .sub, #counts, #status, .help, .legend, footer li, " +
    "#detail dt, #detail dd, #detail li, #detail p, #detail h3, button, a";
  for (const e of document.querySelectorAll(sel)) {
    if (!e.offsetParent || !e.textContent.trim()) continue;
    const a = lum(getComputedStyle(e).color), b = lum(bg(e));
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    out.push([e.className || e.tagName, e.textContent.trim().slice(0, 30), ratio]);
  }
  return out;
}
"""


def test_text_contrast_is_wcag_aa(page: Page, demo: DemoProcess) -> None:
    page.goto(demo.base + "/")
    expect(cell(page, "dns-mute", "direct")).to_contain_text("dns_timeout")
    cell(page, "sni-reset", "direct").click()
    expect(page.locator("#detail")).to_be_visible()
    measured = page.evaluate(CONTRAST)
    kinds = {m[0] for m in measured}
    assert {"o", "m", "badge", "sub"} <= kinds, kinds  # cell texts of every kind, row headers, the detail...
    low = [m for m in measured if m[2] < 4.5]
    assert not low, low
    assert len(measured) > 100


def test_probe_now_updates_the_cell(page: Page, demo: DemoProcess) -> None:
    page.goto(demo.base + "/?refresh=3600")  # no timed refresh: only "probe now" can bring a new result
    expect(cell(page, "sni-reset", "direct")).to_contain_text("tls_reset")
    page.evaluate("window.marker = 'no reload'")
    before = page.evaluate("window.probeStatus.state.results.get('sni-reset direct').started_at")
    cell(page, "sni-reset", "direct").click()
    with page.expect_response(lambda r: "/probe?target=sni-reset" in r.url) as answer:
        page.click("#probe-now")
    metrics = answer.value.text()
    finished = re.search(r'probe_last_run_timestamp_seconds\{[^}]*route="direct"[^}]*\} (\S+)', metrics)
    took = re.search(r'probe_duration_seconds\{[^}]*route="direct"[^}]*\} (\S+)', metrics)
    assert finished and took, metrics
    on_demand = float(finished.group(1)) - float(took.group(1))  # when the on-demand probe started
    expect(page.locator("#probe-status")).to_contain_text("probed at", timeout=10_000)
    expect(page.locator("#probe-status")).to_contain_text("tls_reset")
    after = page.evaluate("window.probeStatus.state.results.get('sni-reset direct').started_at")
    assert before < on_demand <= after + 0.001, (before, on_demand, after)
    expect(page.locator("#detail")).to_contain_text(time.strftime("%H:%M:%S", time.gmtime(after)))
    assert page.evaluate("window.marker") == "no reload"


# --- auth, a change, a restart ----------------------------------------------------------------------


@pytest.fixture
def web_config(tmp_path: Path) -> Path:
    path = tmp_path / "web.yml"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    path.write_text(yaml.safe_dump({"basic_auth_users": {USER: hashed}}))
    return path


def test_with_basic_auth_the_page_and_its_api_calls_need_credentials_and_survive_changes_and_restarts(
    browser: Browser, web_config: Path, tmp_path: Path
) -> None:
    args = ("--web.config.file", str(web_config))
    with running_demo(tmp_path, *args, port=restartable_port(), auth=(USER, PASSWORD)) as demo:
        demo.wait_for({("storage", "direct"): "ok", ("down", "direct"): "tcp_refused"})
        for path in ("/", "/static/status.js", "/static/status.css", "/api/results", "/api/routes",
                     "/probe?target=storage&debug=true"):
            status, _, _ = request(demo.base + path)
            assert status == 401, path
            status, _, _ = request(demo.base + path, (USER, "guess"))
            assert status == 401, path
        anonymous = browser.new_context()
        try:
            with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):  # 401: no page without them
                anonymous.new_page().goto(demo.base + "/")
        finally:
            anonymous.close()
        context = browser.new_context(http_credentials={"username": USER, "password": PASSWORD})
        try:
            page = context.new_page()
            api: list[tuple[str, int]] = []
            page.on("response", lambda r: api.append((r.url, r.status)) if "/api/" in r.url else None)
            page.goto(demo.base + "/?refresh=1")
            expect(cell(page, "storage", "direct")).to_contain_text("ok")
            page.evaluate("window.marker = 'no reload'")
            assert api and all(status == 200 for _, status in api), api

            # A change: the config now sends `storage` to the closed port of `down`, and drops `down`.
            doc = json.loads(demo.config.read_text())
            down = next(t for t in doc["targets"] if t["name"] == "down")
            storage = next(t for t in doc["targets"] if t["name"] == "storage")
            storage["url"] = f"https://ok.demo:{down['address'].rsplit(':', 1)[1]}/api/ping"
            doc["targets"].remove(down)
            demo.config.write_text(json.dumps(doc))
            assert demo.post("/-/reload")[0] == 200
            expect(cell(page, "storage", "direct")).to_contain_text("tcp_refused", timeout=15_000)
            expect(page.locator('th:text-is("down")')).to_have_count(0)
            assert page.evaluate("window.marker") == "no reload"

            # A restart: the page says the monitor is gone, keeps the last results, and picks it up again.
            demo.proc.terminate()
            assert demo.proc.wait(10) == 0
            expect(page.locator("#status")).to_contain_text("monitor unreachable since", timeout=10_000)
            expect(cell(page, "storage", "direct")).to_contain_text("tcp_refused")
            with running_demo(tmp_path, *args, port=demo.port, auth=(USER, PASSWORD)) as again:
                again.wait_for({("storage", "direct"): "ok"})
                expect(page.locator("#status")).to_contain_text("updated", timeout=15_000)
                expect(cell(page, "storage", "direct")).to_contain_text("ok", timeout=15_000)
                expect(page.locator('th:text-is("down")')).to_have_count(1)
            assert page.evaluate("window.marker") == "no reload"
            assert all(status in (200,) for url, status in api), [a for a in api if a[1] != 200]
        finally:
            context.close()


# --- 1,000 pairs ------------------------------------------------------------------------------------


class _Backend:
    """A monitor's state without its prober: the real store, filled with 1,000 results."""

    def __init__(self, config: Any, store: Any) -> None:
        self.config, self.store = config, store

    async def probe_target(self, name: str) -> list[Any]:
        return []

    async def reload(self) -> str | None:
        return "not here"


@pytest.fixture
def thousand_pairs(tmp_path: Path) -> Iterator[str]:
    """Serve the real app on a store of 250 targets x 4 routes with every outcome; yield its base URL."""
    import asyncio

    from aiohttp import web

    from probe import config as config_module
    from probe.exporter.server import create_app
    from probe.models import DnsResult, Localisation, PathMethod, PathResult, Phase, ProbeResult
    from probe.store import ResultStore

    routes = ["direct", "cn2", "hk-socks", "hk-http"]
    cfg = tmp_path / "t.yml"
    cfg.write_text(yaml.safe_dump({
        "vantage": "scale",
        "routes": [{"name": "cn2", "source_address": "192.0.2.2"}, {"name": "hk-socks", "proxy": "socks5://192.0.2.5:1080"},
                   {"name": "hk-http", "proxy": "http://192.0.2.6:3128"}],
        "resolvers": [{"name": "system", "type": "system"}, {"name": "ctl", "type": "udp", "address": "192.0.2.53",
                                                             "control": True}],
        "targets": [{"name": f"bucket-{i:03d}", "url": f"https://b{i}.storage.example/ping", "routes": routes}
                    for i in range(250)],
    }))
    doc = yaml.safe_load(cfg.read_text())
    doc["targets"][0]["path"] = {"samples": 20, "spread": "5s", "method": "tcp"}  # path quality where configured
    doc["targets"][1]["locate"] = True  # and the censor's hop
    for t in doc["targets"][:3]:
        t["group"] = "mirrors"  # three endpoints serving the same content
    cfg.write_text(yaml.safe_dump(doc))
    config = config_module.load(str(cfg))
    store = ResultStore(config)
    outcomes = list(Outcome)
    now = time.time()
    for i, target in enumerate(config.targets):
        for j, route in enumerate(routes):
            outcome = outcomes[(i + j) % len(outcomes)]
            for k in range(20):
                store.record(ProbeResult(
                    target.name, route, outcome if k > 10 else Outcome.OK, now - 600 + k * 30, 0.05 + 0.001 * j,
                    phases={Phase.RESOLVE: 0.002, Phase.CONNECT: 0.02, Phase.TLS: 0.03},
                    address="198.51.100.20", evidence=(f"evidence line of {target.name} over {route}",)))
        store.record_dns(target.name, (DnsResult("system", Outcome.OK, ("198.51.100.20",), 2, True),
                                       DnsResult("ctl", Outcome.OK, ("198.51.100.20",), 2, True)))
    rtts = tuple(0.040 + 0.001 * i for i in range(19))
    assert store.record_path(PathResult("bucket-000", "direct", PathMethod.TCP, now, 20, 1, rtts))
    assert store.record_locate("bucket-001", "direct", Localisation(
        hop=7, hops=("198.51.100.1", None), evidence=("reset at TTL 7, none at TTL 6 (sni=b1.storage.example)",)))
    # In a thread of its own: Playwright's sync API keeps an event loop running in this one.
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(create_app(_Backend(config, store)), access_log=None)
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_a_thousand_pairs_render_without_stalling(page: Page, thousand_pairs: str) -> None:
    page.add_init_script("""
      window.longTasks = [];
      new PerformanceObserver((l) => { for (const e of l.getEntries()) window.longTasks.push(e.duration); })
        .observe({ type: "longtask", buffered: true });
    """)
    page.goto(thousand_pairs + "/?refresh=3600")
    expect(page.locator("td.cell")).to_have_count(1000, timeout=30_000)
    first = page.evaluate("performance.now()")
    # A refresh as the timer runs it (fetch both documents, parse, rebuild the grid), timed inside the page.
    refresh = "async () => { await window.probeStatus.refresh(); return window.probeStatus.state.timings; }"
    timings = [page.evaluate(refresh) for _ in range(3)]
    draw = [t["draw_ms"] for t in timings]
    fetched = ", ".join(f"{t['fetch_ms']:.0f}" for t in timings)
    longest = page.evaluate("Math.max(0, ...window.longTasks)")
    print(f"1,000 pairs: grid complete {first:.0f} ms after navigation; refreshes: fetch {fetched} ms, "
          f"draw {', '.join(f'{d:.0f}' for d in draw)} ms; longest task {longest:.0f} ms")
    assert page.locator("td.cell").count() == 1000
    expect(page.locator("#counts")).to_contain_text("250 targets, 1000 pairs")
    # Generous bounds on a shared 2-core machine: they catch a quadratic redraw, not a slow CI.
    assert longest < 2000 and max(draw) < 2000, (longest, timings)
    cell(page, "bucket-007", "hk-http").click()
    expect(page.locator("#detail-title")).to_contain_text("bucket-007 over hk-http")
    expect(page.locator('th:has-text("bucket-000")')).to_contain_text("direct path: 1/20 lost (5%), p50 49 ms")
    expect(page.locator('th:has-text("bucket-001")')).to_contain_text("direct censor: hop 7")
    group = page.locator("#groups .group")
    expect(group).to_contain_text("mirrors")
    expect(group.locator("li")).to_have_count(12)  # every (target, route) of the group, best first
    expect(group.locator("li").first).to_contain_text("(use this)")
    cell(page, "bucket-001", "direct").click()
    expect(page.locator("#detail")).to_contain_text("hop 7 (reset at TTL 7, none at TTL 6 (sni=b1.storage.example))")
