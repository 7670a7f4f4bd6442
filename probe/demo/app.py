"""`probe demo`: a simulated border on loopback, and the real monitor (`probe run`) probing it.

No root, no internet: the servers "abroad", the middlebox that interferes by SNI, Host and
CONNECT name, a resolver path with an injector, a black-holed port and a closed one all run
in this process on 127.0.0.1; the monitor's scheduler and HTTP server run beside them, so
/metrics shows every outcome class as it would on a vantage point inside the border.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from aioquic.asyncio.server import QuicServer

from probe import config as config_module
from probe.demo.border import (
    DATA_DIR,
    HOST,
    Action,
    Blackhole,
    ConnectProxy,
    Inspect,
    Middlebox,
    closed_port,
    server_tls,
    storage_app,
)
from probe.demo.dns import DnsAnswer, DnsServer, resolver
from probe.demo.h3 import start_h3
from probe.demo.quic_border import QuicMiddlebox
from probe.service import serve

FORGED = "127.0.0.2"  # where forged answers point: nothing of the demo listens there
THROTTLE_BYTES_PER_SECOND = 64 * 1024
ZONE = {f"{n}.demo": HOST for n in (
    "ok", "sni-reset", "sni-stall", "host-reset", "blockpage", "throttle", "intercept", "connect-reset",
    "injected", "mismatch", "blackhole", "down", "h3", "quic-filtered",
)}
DNS_SPECIAL = {
    "injected.demo": DnsAnswer.INJECTED,
    "mismatch.demo": DnsAnswer.FORGED_ONLY,
    "gone.demo": DnsAnswer.NXDOMAIN,
    "broken.demo": DnsAnswer.SERVFAIL,
    "mute.demo": DnsAnswer.SILENT,
}
SNI_RULES = {"sni-reset.demo": Action.RESET, "sni-stall.demo": Action.STALL, "throttle.demo": Action.THROTTLE}
HOST_RULES = {"host-reset.demo": Action.RESET, "blockpage.demo": Action.BLOCK_PAGE}
CONNECT_RULES = {"connect-reset.demo": Action.RESET}
QUIC_BLOCKED = {"quic-filtered.demo"}  # dropped over QUIC only: over TCP the same name passes
QUIC_RESIDUAL_SECONDS = 1.0  # the GFW's is 180 s; shorter here, so that the next run's control answers again


@dataclass(frozen=True, slots=True)
class DemoTarget:
    """One target of the demo config and the outcome the border is built to cause."""

    name: str
    spec: dict[str, Any]
    outcome: str
    why: str


class Border:
    """Everything the demo runs besides the monitor; start() binds, close() releases."""

    def __init__(self) -> None:
        self.runners: list[Any] = []
        self.dns = DnsServer(resolver(ZONE, DNS_SPECIAL, FORGED))
        self.control = DnsServer(resolver({**ZONE, "mismatch.demo": HOST}, {}, FORGED))
        self.blackhole = Blackhole()
        self.down = closed_port()
        self.https_port = self.http_port = self.interceptor_port = 0
        self.boxes: list[Middlebox] = []
        self.proxy: ConnectProxy | None = None
        self.h3_server: QuicServer | None = None
        self.quic_boxes: list[QuicMiddlebox] = []

    async def start(self) -> None:
        """Start the servers abroad, the middleboxes in front of them, the resolvers and the proxy."""
        from aiohttp import web

        runner = web.AppRunner(storage_app(), handle_signals=False, access_log=None, shutdown_timeout=0.2)
        await runner.setup()
        self.runners.append(runner)
        ports = []
        for ctx in (server_tls("server"), None, server_tls("interceptor")):
            sock = socket.socket()
            sock.bind((HOST, 0))
            ports.append(sock.getsockname()[1])
            await web.SockSite(runner, sock, ssl_context=ctx).start()
        self.https_port, self.http_port, self.interceptor_port = ports
        self.tls_box = Middlebox(Inspect.SNI, self.https_port, SNI_RULES, THROTTLE_BYTES_PER_SECOND)
        self.http_box = Middlebox(Inspect.HOST, self.http_port, HOST_RULES)
        for box in (self.tls_box, self.http_box):
            await box.start()
        self.proxy = ConnectProxy(ZONE, {self.tls_box.port: self.https_port, self.http_box.port: self.http_port})
        await self.proxy.start()
        self.proxy_box = Middlebox(Inspect.CONNECT, self.proxy.port, CONNECT_RULES)
        self.boxes = [self.tls_box, self.http_box, self.proxy_box]
        await self.proxy_box.start()
        await self.dns.start()
        await self.control.start()
        self.h3_server, self.h3_port = await start_h3()
        # Two ports: the residual block after a trigger covers the whole (client, server, port) triple.
        self.quic_boxes = [QuicMiddlebox(self.h3_port, QUIC_BLOCKED, QUIC_RESIDUAL_SECONDS) for _ in range(2)]
        for quic_box in self.quic_boxes:
            await quic_box.start()

    async def close(self) -> None:
        """Stop everything."""
        for quic_box in self.quic_boxes:
            quic_box.close()
        if self.h3_server is not None:
            self.h3_server.close()
        for box in self.boxes:
            await box.close()
        if self.proxy is not None:
            await self.proxy.close()
        await self.dns.close()
        await self.control.close()
        for runner in self.runners:
            await runner.cleanup()
        self.blackhole.close()

    def targets(self) -> list[DemoTarget]:
        """Return the demo's targets: one (at least) per outcome class."""
        tls, http = self.tls_box.port, self.http_box.port

        def https(host: str, path: str = "/api/ping", **extra: Any) -> dict[str, Any]:
            expect = {"expect": {"body_contains": "pong"}} if path == "/api/ping" else {}
            return {"url": f"https://{host}:{tls}{path}", **expect, **extra}

        download = {"url": f"https://throttle.demo:{tls}/probe/1MiB.bin", "min_bytes_per_second": 500_000}
        return [
            DemoTarget("storage", https("ok.demo", routes=["direct", "abroad-proxy"]), "ok", "nothing in the way"),
            DemoTarget("sni-reset", https("sni-reset.demo", routes=["direct", "abroad-proxy"]), "tls_reset",
                       "RST after the ClientHello naming it (the proxy route stays ok)"),
            DemoTarget("sni-stall", https("sni-stall.demo"), "tls_timeout", "its ClientHello is swallowed"),
            DemoTarget("interception", {"url": f"https://intercept.demo:{self.interceptor_port}/api/ping"},
                       "tls_cert_invalid", "a certificate no one trusts"),
            DemoTarget("host-reset", {"url": f"http://host-reset.demo:{http}/api/ping"}, "http_reset",
                       "RST after the request with its Host"),
            DemoTarget("block-page", {"url": f"http://blockpage.demo:{http}/api/ping",
                                      "expect": {"body_contains": "pong"}},
                       "http_unexpected", "a block page instead of the answer"),
            DemoTarget("no-answer", https("ok.demo", "/slow"), "http_timeout", "the server never answers"),
            DemoTarget("throttled", https("throttle.demo", download=download), "throttled",
                       f"its bytes at {THROTTLE_BYTES_PER_SECOND // 1024} KiB/s"),
            DemoTarget("blackhole", {"address": f"blackhole.demo:{self.blackhole.port}"}, "tcp_timeout",
                       "SYNs dropped"),
            DemoTarget("down", {"address": f"down.demo:{self.down}"}, "tcp_refused", "nothing listens"),
            DemoTarget("proxy-reset", https("connect-reset.demo", routes=["abroad-proxy"]), "tcp_reset",
                       "RST on the proxy CONNECT naming it"),
            DemoTarget("dns-injected", https("injected.demo"), "dns_injection",
                       "a forged reply races the real one"),
            DemoTarget("dns-mismatch", https("mismatch.demo"), "dns_mismatch",
                       f"only a forged answer ({FORGED}), which fails the TLS check"),
            DemoTarget("dns-gone", https("gone.demo"), "dns_nxdomain", "NXDOMAIN"),
            DemoTarget("dns-broken", https("broken.demo"), "dns_servfail", "SERVFAIL"),
            DemoTarget("dns-mute", https("mute.demo"), "dns_timeout", "the resolver never answers"),
            DemoTarget("http3", {"url": f"https://h3.demo:{self.quic_boxes[0].port}/api/ping", "http_version": 3,
                                 "expect": {"body_contains": "pong"}}, "ok", "HTTP/3 over QUIC, nothing in the way"),
            DemoTarget("quic-filtered", {"url": f"https://quic-filtered.demo:{self.quic_boxes[1].port}/api/ping",
                                         "http_version": 3, "control_sni": "ok.demo"}, "tls_timeout",
                       "QUIC Initial decrypted, dropped by SNI (then sni_filtered 1: the control ok.demo answers)"),
            DemoTarget("quic-filtered-tcp", https("quic-filtered.demo"), "ok", "the same name over TCP passes"),
        ]

    def config(self, interval: str, timeout: str) -> dict[str, Any]:
        """Return the targets.yml the monitor runs with."""
        return {
            "vantage": "demo",
            "defaults": {"interval": interval, "timeout": timeout, "ca_file": str(DATA_DIR / "ca.pem"),
                         "resolvers": ["border-dns", "control"]},
            "resolvers": [
                {"name": "border-dns", "type": "udp", "address": f"{HOST}:{self.dns.port}"},
                {"name": "control", "type": "udp", "address": f"{HOST}:{self.control.port}", "control": True},
            ],
            "bogons": [],  # every demo answer is a loopback address
            "routes": [
                {"name": "direct", "resolver": "border-dns"},
                {"name": "abroad-proxy", "proxy": f"http://{HOST}:{self.proxy_box.port}"},
            ],
            "targets": [{"name": t.name, **t.spec} for t in self.targets()],
        }

    def describe(self, out: TextIO) -> None:
        """Print what runs where."""
        lines = [
            "probe demo: a simulated border on loopback",
            f"  servers abroad    https {HOST}:{self.https_port}, http {HOST}:{self.http_port}, "
            f"untrusted-certificate https {HOST}:{self.interceptor_port}",
            f"  border, TLS       {HOST}:{self.tls_box.port} -> :{self.https_port}  by SNI: {_rules(SNI_RULES)}",
            f"  border, HTTP      {HOST}:{self.http_box.port} -> :{self.http_port}  by Host: {_rules(HOST_RULES)}",
            f"  proxy abroad      http://{HOST}:{self.proxy_box.port} (CONNECT; border by name: "
            f"{_rules(CONNECT_RULES)})",
            f"  border DNS        udp {HOST}:{self.dns.port}  "
            + ", ".join(f"{n} {a}" for n, a in DNS_SPECIAL.items()),
            f"  control DNS       udp {HOST}:{self.control.port}  honest",
            f"  black hole        {HOST}:{self.blackhole.port}    closed port {HOST}:{self.down}",
            f"  HTTP/3 abroad     udp {HOST}:{self.h3_port}; border, QUIC  udp "
            + ", ".join(f"{HOST}:{b.port}" for b in self.quic_boxes)
            + f" -> :{self.h3_port}  by the SNI of decrypted Initials: drop {', '.join(sorted(QUIC_BLOCKED))}, "
            f"then the client address for {QUIC_RESIDUAL_SECONDS:g} s",
            "targets and the outcome each should show:",
            *(f"  {t.name:<14} {t.outcome:<17} {t.why}" for t in self.targets()),
        ]
        out.write("\n".join(lines) + "\n")
        out.flush()


def _rules(rules: dict[str, Action]) -> str:
    return ", ".join(f"{action} {name}" for name, action in rules.items())


async def run(listen: str, interval: str, timeout: str, out: TextIO, web_config_file: str | None = None) -> int:
    """Start the border, write the config, run the monitor on it until SIGTERM or SIGINT."""
    border = Border()
    await border.start()
    try:
        with tempfile.TemporaryDirectory(prefix="probe-demo-") as directory:
            path = Path(directory) / "targets.yml"
            path.write_text(json.dumps(border.config(interval, timeout), indent=1))  # JSON is YAML
            config_module.load(str(path))  # fail here, clearly, before anything listens
            border.describe(out)
            out.write(f"monitor: http://{listen}/metrics  (config {path}; first results within {interval}; "
                      "Ctrl-C stops)\n")
            out.write(f"status page: http://{listen}/\n")
            out.flush()
            return await serve(str(path), listen, web_config_file=web_config_file)
    finally:
        await border.close()


def main(args: argparse.Namespace) -> int:
    """Run the demo until interrupted; return the exit status."""
    try:
        return asyncio.run(run(args.listen, args.interval, args.timeout, sys.stdout, args.web_config_file))
    except config_module.ConfigError as e:  # a bad --interval or --timeout
        print(f"probe demo: {'; '.join(e.problems)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
