"""`probe demo` as a process for tests that need the whole monitor: started, its config found, waited on, stopped."""

from __future__ import annotations

import base64
import json
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class DemoProcess:
    port: int
    proc: subprocess.Popen[str]
    config: Path  # the targets.yml (JSON) the demo wrote and the monitor reloads
    log: Path  # its stderr
    auth: tuple[str, str] | None = None
    description: str = ""  # what it printed on start, up to the monitor's line

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, str, str]:
        """Return status, content type and text of GET `path` (with the demo's credentials, if any)."""
        return request(self.base + path, self.auth, timeout=timeout)

    def post(self, path: str) -> tuple[int, str, str]:
        """Return status, content type and text of POST `path`."""
        return request(self.base + path, self.auth, method="POST")

    def results(self) -> dict[tuple[str, str], dict[str, object]]:
        """Return (target, route) -> result from /api/results."""
        status, _, text = self.get("/api/results")
        assert status == 200, text
        return {(r["target"], r["route"]): r for r in json.loads(text)["results"]}

    def wait_for(self, wanted: dict[tuple[str, str], str], seconds: float = 25.0) -> dict[tuple[str, str], str]:
        """Poll /api/results until every wanted outcome is there (or the time is up); return the last outcomes."""
        seen: dict[tuple[str, str], str] = {}
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            assert self.proc.poll() is None, f"probe demo exited with {self.proc.returncode}: {self.log.read_text()}"
            try:
                seen = {k: str(r["outcome"]) for k, r in self.results().items()}
            except (OSError, AssertionError):
                seen = {}  # not listening yet
            if all(seen.get(k) == v for k, v in wanted.items()):
                break
            time.sleep(0.3)
        return seen


def restartable_port() -> int:
    """Return a free loopback port below the ephemeral range, which a restarted demo can bind again.

    A port from the ephemeral range, free once the first demo stopped, may be handed by the
    kernel to one of the second demo's own servers (they bind port 0) before its monitor binds it.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def request(
    url: str, auth: tuple[str, str] | None = None, *, method: str = "GET", timeout: float = 10.0
) -> tuple[int, str, str]:
    """Return status, content type and body text of one request; HTTP errors are returned, not raised."""
    headers = {"Authorization": "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()} if auth else {}
    req = urllib.request.Request(url, headers=headers, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers.get("Content-Type", ""), e.read().decode()


@contextmanager
def running_demo(
    directory: Path, *args: str, port: int | None = None, auth: tuple[str, str] | None = None,
    interval: str = "2s", timeout: str = "1500ms",
) -> Iterator[DemoProcess]:
    """Run `probe demo ARGS` on `port` (default: a free one below the ephemeral range); stop it with SIGTERM."""
    port = port or restartable_port()
    log = directory / f"demo-{port}-{time.monotonic_ns()}.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "probe", "demo", "--listen", f"127.0.0.1:{port}", "--interval", interval,
             "--timeout", timeout, *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True,
        )
    try:
        assert proc.stdout is not None
        config, lines = None, []
        for _ in range(100):  # the description ends with the monitor's address and the config it runs
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("monitor:"):
                config = Path(line.split("(config ", 1)[1].split(";", 1)[0])
                break
        assert config is not None, log.read_text()
        yield DemoProcess(port, proc, config, log, auth, "".join(lines))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
