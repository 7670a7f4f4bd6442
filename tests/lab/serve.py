"""The lab's servers, run inside a namespace: storage endpoints, banners, DNS, DoH.

    ip netns exec NS python -m tests.lab.serve spec.json

`spec.json` lists services; every one binds its own address and port:

    {"services": [
      {"kind": "web", "host": "198.51.100.20", "port": 443, "cert": "leaf.pem", "key": "leaf.key"},
      {"kind": "web", "host": "198.51.100.20", "port": 80},
      {"kind": "banner", "host": "198.51.100.20", "port": 22},
      {"kind": "dns", "host": "198.51.100.53", "port": 53, "zone": {"a.example": ["198.51.100.20"]},
       "servfail": ["broken.example"], "silent": ["mute.example"]},
      {"kind": "doh", "host": "198.51.100.54", "port": 443, "cert": "...", "key": "...", "zone": {...}},
      {"kind": "h3", "host": "198.51.100.30", "port": 443, "cert": "...", "key": "..."}]}

A web service answers /api/ping with `pong`, /probe/1MiB.bin and /probe/256KiB.bin with that
much data, and /slow never. A TLS interceptor is a web service whose certificate is wrong for
the name or signed by an untrusted CA. The process prints `ready` once every service listens,
and stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

import dns.message
from aiohttp import web
from aioquic.asyncio.server import QuicServer

from probe.demo.h3 import start_h3
from tests.dnsserver import Behaviour, DnsServer, Transport, answer, servfail

BANNER = b"SSH-2.0-OpenSSH_9.2p1 lab\r\n"
MIB = 1024 * 1024
CHUNK = 16 * 1024
BLOBS = {"1MiB": MIB, "256KiB": MIB // 4}


def tls_context(service: dict[str, Any]) -> ssl.SSLContext | None:
    """Return a server context from the service's cert and key files, or None for plain TCP."""
    if "cert" not in service:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(service["cert"], service["key"])
    return ctx


def web_app() -> web.Application:
    """Return the storage endpoint: ping, a MiB to download, and a handler that never answers."""

    async def ping(request: web.Request) -> web.Response:
        return web.Response(text="pong")

    async def blob(request: web.Request) -> web.StreamResponse:
        size = BLOBS[request.match_info["name"]]
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        chunk = b"\0" * CHUNK
        for _ in range(size // CHUNK):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/api/ping", ping)
    app.router.add_get("/probe/{name:(1MiB|256KiB)}.bin", blob)
    app.router.add_get("/slow", slow)
    return app


def zone_behaviour(service: dict[str, Any]) -> Behaviour:
    """Answer from the zone; SERVFAIL for `servfail` names; nothing at all for `silent` names."""
    honest = answer(service.get("zone", {}))
    failing = servfail()
    broken = {n.lower().rstrip(".") for n in service.get("servfail", [])}
    mute = {n.lower().rstrip(".") for n in service.get("silent", [])}

    async def behave(query: dns.message.Message, transport: Transport) -> list[bytes]:
        name = query.question[0].name.to_text(omit_final_dot=True).lower()
        if name in mute:
            return []
        if name in broken:
            return await failing(query, transport)
        return await honest(query, transport)

    return behave


def doh_app(behaviour: Behaviour) -> web.Application:
    """Return an RFC 8484 POST endpoint at /dns-query."""

    async def handle(request: web.Request) -> web.Response:
        try:
            query = dns.message.from_wire(await request.read())
        except Exception:  # noqa: BLE001 - any unparseable body is the client's problem
            return web.Response(status=400, text="not a DNS message")
        replies = await behaviour(query, "doh")
        if not replies:
            return web.Response(status=504)
        return web.Response(body=replies[0], content_type="application/dns-message")

    app = web.Application()
    app.router.add_post("/dns-query", handle)
    return app


async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Greet like an SSH server and wait (bounded) for the client to leave."""
    try:
        writer.write(BANNER)
        await writer.drain()
        await asyncio.wait_for(reader.read(), 60)
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.transport.abort()


async def serve(spec: dict[str, Any]) -> None:
    """Start every service, say `ready`, run until SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    web_runner = web.AppRunner(web_app(), handle_signals=False, access_log=None, shutdown_timeout=0.2)
    await web_runner.setup()
    runners = [web_runner]
    servers: list[asyncio.Server] = []
    dns_servers: list[DnsServer] = []
    quic_servers: list[QuicServer] = []
    try:
        for service in spec["services"]:
            host, port, kind = service["host"], int(service["port"]), service["kind"]
            if kind == "web":
                await web.TCPSite(web_runner, host, port, ssl_context=tls_context(service)).start()
            elif kind == "banner":
                servers.append(await asyncio.start_server(banner, host, port))
            elif kind == "dns":
                server = DnsServer(zone_behaviour(service), host=host, port=port)
                dns_servers.append(await server.__aenter__())
            elif kind == "doh":
                runner = web.AppRunner(doh_app(zone_behaviour(service)), handle_signals=False, access_log=None)
                await runner.setup()
                runners.append(runner)
                await web.TCPSite(runner, host, port, ssl_context=tls_context(service)).start()
            elif kind == "h3":  # HTTP/3 over QUIC on UDP, the same /api/ping
                quic_server, _ = await start_h3(host, port, service["cert"], service["key"])
                quic_servers.append(quic_server)
            else:
                raise ValueError(f"unknown service kind {kind!r}")
        print("ready", flush=True)
        await asyncio.wait_for(stop.wait(), spec.get("max_seconds", 900))
    except TimeoutError:
        pass
    finally:
        for s in servers:
            s.close()
        for q in quic_servers:
            q.close()
        for d in dns_servers:
            await d.__aexit__(None, None, None)
        for r in runners:
            await r.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Serve the spec file named on the command line."""
    args = sys.argv[1:] if argv is None else argv
    asyncio.run(serve(json.loads(Path(args[0]).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
