"""The lab's world: addresses, names and servers abroad, the probe's config, and the pytest fixtures.

`tests/test_lab.py` imports the fixtures `lab` (one per session: namespaces, servers, proxies)
and `env` (the lab, with every interference switched off after each test).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.lab import net
from tests.lab.net import ABROAD, VANTAGE, VANTAGE_IP, Border, Lab

STORAGE, GEO_NEAR, INTERCEPTED, MISISSUED = "198.51.100.20", "198.51.100.21", "198.51.100.23", "198.51.100.24"
THROTTLED, RESIDUAL, BLACKHOLE, DELAYED, LOSSY = (f"198.51.100.{i}" for i in range(25, 30))
RESOLVER, DOH, SOCKS, HTTP_PROXY = "198.51.100.53", "198.51.100.54", "198.51.100.80", "198.51.100.81"
INTERCEPTOR, MISISSUER, POISON_TARGET = "203.0.113.44", "203.0.113.45", "203.0.113.66"
QUIC_FILTERED, QUIC_FREE, TLS_BLOCKED = "198.51.100.30", "198.51.100.31", "198.51.100.32"
CANARY = "203.0.113.53"  # nothing abroad has this address: any reply from it was injected
HOSTS = [STORAGE, GEO_NEAR, INTERCEPTED, MISISSUED, THROTTLED, RESIDUAL, BLACKHOLE, DELAYED, LOSSY,
         RESOLVER, DOH, SOCKS, HTTP_PROXY, INTERCEPTOR, MISISSUER, POISON_TARGET,
         QUIC_FILTERED, QUIC_FREE, TLS_BLOCKED]

# What the honest resolver abroad answers; the DoH control agrees except for GeoDNS names.
ZONE = {
    **{name: [STORAGE] for name in (
        "storage.example", "blocked-sni.example", "stall-sni.example", "blocked-host.example",
        "blockpage.example", "blocked-connect.example", "injected.example", "poisoned.example",
    )},
    "geo.example": [GEO_NEAR],  # a CDN node near the vantage, with a valid certificate
    "intercept.example": [INTERCEPTED],
    "misissued.example": [MISISSUED],
    "throttle.example": [THROTTLED],
    "residual.example": [RESIDUAL],
    "blackhole.example": [BLACKHOLE],
    "delay.example": [DELAYED],
    "lossy.example": [LOSSY],
    "quic-blocked.example": [QUIC_FILTERED],  # HTTP/3 and HTTPS; its name is on the QUIC blocklist only
    "quic-free.example": [QUIC_FREE],  # HTTP/3, a name nobody filters
    "addr-blocked.example": [TLS_BLOCKED],  # HTTPS on an address whose every TLS handshake is dropped
}
CONTROL_ZONE = {**ZONE, "geo.example": [STORAGE]}
SERVFAIL, SILENT = ["broken.example"], ["mute.example"]
NAMES = [*ZONE, *SERVFAIL, *SILENT, "missing.example"]
WEB_HTTPS = [STORAGE, GEO_NEAR, THROTTLED, RESIDUAL, DELAYED, LOSSY, QUIC_FILTERED, TLS_BLOCKED]
WEB_H3 = [QUIC_FILTERED, QUIC_FREE]
WEB_HTTP = [STORAGE, RESIDUAL, DELAYED]
BANNERS = [STORAGE, DELAYED]


@dataclass
class LabEnv:
    """The running lab and what scenarios need to configure the probe."""

    lab: Lab
    ca_file: str

    @property
    def border(self) -> Border:
        return self.lab.border

    def config(self, *targets: dict[str, Any], timeout: str = "2s", canaries: tuple[str, ...] = ()) -> dict[str, Any]:
        """Return a targets.yml for the vantage: the system resolver, the DoH control, the proxy routes."""
        return {
            "vantage": "lab-inside",
            # A short reply window: on the lab's wire the forgeries and the genuine reply are ms apart.
            "defaults": {"interval": "30s", "timeout": timeout, "ca_file": self.ca_file, "dns_reply_window": "200ms"},
            "resolvers": [
                {"name": "system", "type": "system"},
                {"name": "control", "type": "doh", "url": f"https://{DOH}/dns-query", "ca_file": self.ca_file,
                 "control": True},
            ],
            "canaries": list(canaries),
            "routes": [
                {"name": "direct"},
                {"name": "hk-socks", "proxy": f"socks5h://{SOCKS}:1080"},
                {"name": "hk-http", "proxy": f"http://{HTTP_PROXY}:3128"},
            ],
            "targets": list(targets),
        }

    def once(self, *targets: dict[str, Any], timeout: str = "2s", canaries: tuple[str, ...] = ()) -> dict[str, Any]:
        """Run `probe once --json` in the vantage over these targets."""
        return self.lab.probe(self.config(*targets, timeout=timeout, canaries=canaries))


def _unavailable(reason: str) -> None:
    # As root in CI the lab must run: a missing piece there is a failure, not a skip.
    if os.environ.get("CI") and os.geteuid() == 0:
        pytest.fail(f"interference lab unavailable in CI: {reason}")
    pytest.skip(reason)


def _write_cert(ca: trustme.CA, directory: Path, stem: str, *names: str) -> dict[str, str]:
    leaf = ca.issue_cert(*names)
    cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    for pem in leaf.cert_chain_pems[1:]:
        pem.write_to_path(str(cert), append=True)
    leaf.private_key_pem.write_to_path(str(key))
    return {"cert": str(cert), "key": str(key)}


def _services(directory: Path) -> list[dict[str, Any]]:
    ca, rogue = trustme.CA(), trustme.CA(organization_name="Rogue Interception CA")
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    good = _write_cert(ca, directory, "leaf", *NAMES, DOH)
    misissued = _write_cert(ca, directory, "other", "other.example")  # trusted CA, wrong name
    untrusted = _write_cert(rogue, directory, "rogue", *NAMES)  # right names, unknown CA
    return [
        *({"kind": "web", "host": h, "port": 443, **good} for h in WEB_HTTPS),
        *({"kind": "web", "host": h, "port": 80} for h in WEB_HTTP),
        *({"kind": "h3", "host": h, "port": 443, **good} for h in WEB_H3),
        *({"kind": "banner", "host": h, "port": 22} for h in BANNERS),
        {"kind": "web", "host": INTERCEPTOR, "port": 443, **untrusted},
        {"kind": "web", "host": POISON_TARGET, "port": 443, **untrusted},
        {"kind": "web", "host": MISISSUER, "port": 443, **misissued},
        {"kind": "dns", "host": RESOLVER, "port": 53, "zone": ZONE, "servfail": SERVFAIL, "silent": SILENT},
        {"kind": "doh", "host": DOH, "port": 443, "zone": CONTROL_ZONE, **good},
    ]


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabEnv]:
    """Build the namespaces and start the servers and proxies abroad, once per session."""
    reason = net.missing_prerequisites()
    if reason is not None:
        _unavailable(reason)
    directory = tmp_path_factory.mktemp("lab")
    spec = directory / "servers.json"
    spec.write_text(json.dumps({"services": _services(directory), "max_seconds": 900}))
    tinyproxy_conf = directory / "tinyproxy.conf"
    tinyproxy_conf.write_text(
        f"Port 3128\nListen {HTTP_PROXY}\nTimeout 30\nMaxClients 50\nAllow {VANTAGE_IP}\nLogLevel Info\n"
        f"LogFile \"{directory / 'tinyproxy.log'}\"\nDisableViaHeader Yes\n"
    )
    try:
        with net.lab_network(directory, HOSTS, {n: a[0] for n, a in ZONE.items()}) as built:
            built.start(ABROAD, "servers", [sys.executable, "-m", "tests.lab.serve", str(spec)])
            built.start(ABROAD, "microsocks", ["microsocks", "-i", SOCKS, "-p", "1080"], wait_ready=False)
            built.start(ABROAD, "tinyproxy", ["tinyproxy", "-d", "-c", str(tinyproxy_conf)], wait_ready=False)
            # From the vantage, through the border: the whole path works before any scenario.
            built.wait_listening(VANTAGE, [(SOCKS, 1080), (HTTP_PROXY, 3128), (STORAGE, 443), (DOH, 443)])
            yield LabEnv(built, str(directory / "ca.pem"))
    except net.LabUnavailable as e:
        _unavailable(str(e))


@pytest.fixture
def env(lab: LabEnv) -> Iterator[LabEnv]:
    """The lab, with every interference switched off after the test (also after a failure)."""
    try:
        yield lab
    finally:
        lab.border.reset()


def result(doc: dict[str, Any], target: str, route: str = "direct") -> dict[str, Any]:
    """Return the result of (target, route) from `probe once --json` output."""
    for r in doc["results"]:
        if r["target"] == target and r["route"] == route:
            return dict(r)
    raise AssertionError(f"no result for ({target}, {route}) in {json.dumps(doc, indent=1)}")


def expect(env: LabEnv, doc: dict[str, Any], target: str, outcome: str, blocked: bool, route: str = "direct") -> None:
    """Assert outcome and blocked of (target, route), showing the result and the border's state if not."""
    r = result(doc, target, route)
    assert (r["outcome"], r["blocked"]) == (outcome, blocked), (
        f"({target}, {route}): {json.dumps(r, indent=1)}\nborder:\n{env.border.report()}"
    )


def https(name: str, host: str, path: str = "/api/ping", **extra: Any) -> dict[str, Any]:
    """Return an https target that expects the storage endpoint's `pong`."""
    body = {"expect": {"body_contains": "pong"}} if path == "/api/ping" else {}
    return {"name": name, "url": f"https://{host}{path}", **body, **extra}


def http(name: str, host: str, **extra: Any) -> dict[str, Any]:
    """Return a plain-HTTP target that expects `pong`."""
    return {"name": name, "url": f"http://{host}/api/ping", "expect": {"body_contains": "pong"}, **extra}


def sni(name: str) -> list[str]:
    """Match TLS traffic to the storage host whose ClientHello carries server name `name`."""
    return ["-p", "tcp", "-d", STORAGE, "--dport", "443", "-m", "string", "--algo", "bm", "--string", name]


def host_header(name: str, port: int = 80, server: str = STORAGE) -> list[str]:
    """Match HTTP requests to `server` carrying `Host: name`."""
    return ["-p", "tcp", "-d", server, "--dport", str(port), "-m", "string", "--algo", "bm",
            "--string", f"Host: {name}"]


RESET = ["-j", "REJECT", "--reject-with", "tcp-reset"]
DROP = ["-j", "DROP"]


# Seen from the vantage with a bare socket: every reply to one query, in arrival order.
ALL_REPLIES = """
import json, socket, sys, time
import dns.message
query = dns.message.make_query(sys.argv[1], "A")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 12, 1)  # IP_RECVTTL (Linux), not in the socket module
s.settimeout(0.3)
s.sendto(query.to_wire(), (sys.argv[2], 53))
replies, end = [], time.monotonic() + 0.6
while time.monotonic() < end:
    try:
        data, ancillary, _, peer = s.recvmsg(4096, 64)
    except TimeoutError:
        continue
    ttl = next((int.from_bytes(d[:4], sys.byteorder) for lvl, kind, d in ancillary if kind == socket.IP_TTL), None)
    r = dns.message.from_wire(data)
    answers = [a.address for rr in r.answer for a in rr]
    replies.append({"from": peer[0], "id_ok": r.id == query.id, "ip_answers": answers, "ttl": ttl})
print(json.dumps(replies))
"""


def replies_seen(name: str, server: str) -> list[dict[str, Any]]:
    """Return every reply the vantage receives to one A query for `name` sent to `server`."""
    out = net.sh(sys.executable, "-c", ALL_REPLIES, name, server, ns=VANTAGE)
    replies: list[dict[str, Any]] = json.loads(out)
    return replies
