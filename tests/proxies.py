"""Real proxies for route tests: Debian's microsocks (SOCKS5) and tinyproxy (HTTP CONNECT).

    with microsocks(user="probe", password="pw") as proxy:      # on a free loopback port
        proxy.url                                               # socks5://probe:pw@127.0.0.1:PORT
    with tinyproxy(tmp_path, bind="127.0.0.4") as proxy:        # outgoing connections from 127.0.0.4
        proxy.url, proxy.log()                                  # http://127.0.0.1:PORT, its log text

Both resolve names with the host's resolver (/etc/hosts first), which is what makes remote
DNS testable: `localhost` resolves at the proxy whatever the probe's own resolver says.
Each proxy is stopped (SIGTERM, then SIGKILL) when its block ends, or earlier by stop().
Also here: servers on `localhost` (127.0.0.1 and, when the host has it, ::1 on one port)
that record who connected, the far end that proxies reach.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

START_TIMEOUT = 5.0


@dataclass
class RunningProxy:
    """A proxy process listening on 127.0.0.1:port."""

    scheme: str
    port: int
    process: subprocess.Popen[bytes]
    user: str | None = None
    password: str | None = None
    log_file: Path | None = None

    @property
    def url(self) -> str:
        """Return the proxy URL as targets.yml takes it, credentials included."""
        auth = f"{quote(self.user, safe='')}:{quote(self.password or '', safe='')}@" if self.user else ""
        return f"{self.scheme}://{auth}127.0.0.1:{self.port}"

    def url_with(self, user: str | None, password: str | None, scheme: str | None = None) -> str:
        """Return the URL with other (or no) credentials, e.g. wrong ones."""
        auth = f"{quote(user, safe='')}:{quote(password or '', safe='')}@" if user else ""
        return f"{scheme or self.scheme}://{auth}127.0.0.1:{self.port}"

    def log(self) -> str:
        """Return what the proxy logged so far (tinyproxy only)."""
        return self.log_file.read_text(errors="replace") if self.log_file and self.log_file.exists() else ""

    def stop(self) -> None:
        """Stop the proxy and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _require(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/bin/{binary}" if Path(f"/usr/bin/{binary}").exists() else None)
    if path is None:
        pytest.skip(f"{binary} is not installed (apt-get install {binary}; scripts/test installs it)")
    return path


@contextmanager
def _running(scheme: str, argv: Sequence[str], port: int, **kwargs: object) -> Iterator[RunningProxy]:
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proxy = RunningProxy(scheme, port, process, **kwargs)  # type: ignore[arg-type]
    try:
        _wait_listening(proxy)
        yield proxy
    finally:
        proxy.stop()
        if process.stderr is not None:
            process.stderr.close()


def _wait_listening(proxy: RunningProxy) -> None:
    until = time.monotonic() + START_TIMEOUT
    while time.monotonic() < until:
        if proxy.process.poll() is not None:
            err = proxy.process.stderr.read().decode(errors="replace") if proxy.process.stderr else ""
            raise RuntimeError(f"{proxy.scheme} proxy exited with {proxy.process.returncode}: {err.strip()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", proxy.port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"{proxy.scheme} proxy did not listen on port {proxy.port} within {START_TIMEOUT} s")


@contextmanager
def microsocks(
    *, user: str | None = None, password: str | None = None, bind: str | None = None
) -> Iterator[RunningProxy]:
    """Run microsocks on a free loopback port; `bind`: the source address of its outgoing connections."""
    port = free_port()
    argv = [_require("microsocks"), "-i", "127.0.0.1", "-p", str(port)]
    if user is not None:
        argv += ["-u", user, "-P", password or ""]
    if bind is not None:
        argv += ["-b", bind]
    with _running("socks5", argv, port, user=user, password=password) as proxy:
        yield proxy


@contextmanager
def tinyproxy(
    directory: Path, *, user: str | None = None, password: str | None = None, bind: str | None = None
) -> Iterator[RunningProxy]:
    """Run tinyproxy (HTTP CONNECT to any port) on a free loopback port, its config and log in `directory`."""
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    conf, log = directory / f"tinyproxy-{port}.conf", directory / f"tinyproxy-{port}.log"
    lines = [
        f"Port {port}", "Listen 127.0.0.1", "Timeout 30", "MaxClients 100",
        "Allow 127.0.0.0/8", "LogLevel Info", f"LogFile \"{log}\"", "DisableViaHeader Yes",
        # No ConnectPort line: CONNECT is allowed to every port.
    ]
    if bind is not None:
        lines.append(f"Bind {bind}")
    if user is not None:
        lines.append(f"BasicAuth {user} {password}")
    conf.write_text("\n".join(lines) + "\n")
    argv = [_require("tinyproxy"), "-d", "-c", str(conf)]
    with _running("http", argv, port, user=user, password=password, log_file=log) as proxy:
        yield proxy


# ---- the far end ------------------------------------------------------------------------

Responder = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class PeerServer:
    """A server on one port of several loopback addresses that records each connection's source."""

    port: int
    peers: list[str] = field(default_factory=list)  # source address of every accepted connection


def bind_same_port(hosts: Sequence[str]) -> list[socket.socket]:
    """Return listening sockets on every host, all on one free port."""
    for _ in range(50):
        socks: list[socket.socket] = []
        try:
            for host in hosts:
                s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, socks[0].getsockname()[1] if len(socks) > 1 else 0))
                s.listen(64)
            return socks
        except OSError:
            for s in socks:
                s.close()
    raise OSError(f"no port free on all of {list(hosts)}")


def localhost_addresses() -> list[str]:
    """Return the loopback addresses `localhost` may resolve to here: 127.0.0.1, and ::1 if usable."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return ["127.0.0.1"]
    return ["127.0.0.1", "::1"]


async def pong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer one HTTP request with 200 and `pong from <source address>`."""
    await reader.readuntil(b"\r\n\r\n")
    peer = writer.get_extra_info("peername")[0]
    body = f"pong from {peer}".encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()


@asynccontextmanager
async def peer_server(
    respond: Responder = pong,
    *,
    tls: ssl.SSLContext | None = None,
    hosts: Sequence[str] | None = None,
    sockets: Sequence[socket.socket] | None = None,
) -> AsyncIterator[PeerServer]:
    """Serve `respond` on `hosts` (default: every localhost address), one port; record every source.

    With `tls`, the source is recorded on accept and the handshake follows, so a bare TCP
    connect is recorded too; a client that hangs up early is not an error.
    """
    listening = list(sockets) if sockets is not None else bind_same_port(hosts or localhost_addresses())
    info = PeerServer(listening[0].getsockname()[1])
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)  # type: ignore[arg-type]
        info.peers.append(writer.get_extra_info("peername")[0])
        try:
            if tls is not None:
                await writer.start_tls(tls)
            await respond(reader, writer)
        except (OSError, ssl.SSLError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the probe hung up (a TCP-only probe never starts TLS), or reset on purpose
        finally:
            writer.transport.abort()
            tasks.discard(task)  # type: ignore[arg-type]

    servers = [await asyncio.start_server(handle, sock=s) for s in listening]
    try:
        yield info
    finally:
        for server in servers:
            server.close()
        for t in list(tasks):
            t.cancel()
        with suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        for server in servers:
            await server.wait_closed()
