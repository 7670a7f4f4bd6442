"""Start and stop the benchmark's processes: targets, the project, blackbox_exporter, the driver."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trustme

ROOT = Path(__file__).resolve().parent.parent
BLACKBOX = "prometheus-blackbox-exporter"


@dataclass(frozen=True)
class Pki:
    ca_file: str
    cert: str
    key: str


def make_pki(directory: Path, *names: str) -> Pki:
    """Write a throwaway CA and an ECDSA leaf for `names` (what both clients verify against)."""
    ca = trustme.CA()
    leaf = ca.issue_cert(*names)
    paths = Pki(str(directory / "ca.pem"), str(directory / "leaf.pem"), str(directory / "leaf.key"))
    ca.cert_pem.write_to_path(paths.ca_file)
    leaf.cert_chain_pems[0].write_to_path(paths.cert)
    for pem in leaf.cert_chain_pems[1:]:
        pem.write_to_path(paths.cert, append=True)
    leaf.private_key_pem.write_to_path(paths.key)
    return paths


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago, below the kernel's ephemeral range.

    A port from the ephemeral range (what bind(0) gives) stays free only until some outgoing
    connection on the machine takes it as its source port: while `probe run` starts (a second or
    two under load) the suites of other work on the machine did, and its listen failed.
    """
    for _ in range(200):
        port = random.randrange(20000, 32000)  # Linux's ephemeral range starts at 32768
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def netns_prefix(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


class Proc:
    """A child process we started, stopped by its own pid only."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, netns: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [*netns_prefix(netns), *argv], stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
            cwd=ROOT, env={**os.environ, **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def readline(self, timeout: float = 20.0) -> str:
        """Return the next stdout line (its readiness line), failing with the log if it exits first."""
        assert self.popen.stdout is not None
        os.set_blocking(self.popen.stdout.fileno(), True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.popen.stdout.readline()
            if line:
                return line.decode()
            if self.popen.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{self.log.read_text()[-2000:]}")

    def wait(self, timeout: float) -> str:
        """Wait for the process to exit; return its stdout."""
        out, _ = self.popen.communicate(timeout=timeout)
        self._log.close()
        return out.decode()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()


def python() -> str:
    return sys.executable


def start_targets(workdir: Path, pki: Pki, host: str = "127.0.0.1", netns: str | None = None,
                  https_port: int = 0) -> tuple[Proc, dict[str, int]]:
    """Start bench.targets; return it and its ports (https, tcp, stats)."""
    proc = Proc(
        "targets", [python(), "-m", "bench.targets", "--host", host, "--cert", pki.cert, "--key", pki.key,
                    "--https-port", str(https_port)],
        workdir / f"targets-{netns or 'lo'}.log", netns,
    )
    return proc, json.loads(proc.readline())


def target_stats(host: str, port: int) -> dict[str, int]:
    with socket.create_connection((host, port), timeout=5) as s:
        stats: dict[str, int] = json.loads(s.makefile().readline())
        return stats


def http_get(url: str, timeout: float = 30.0) -> tuple[bytes, float]:
    """GET `url`; return the body and the seconds until it was complete."""
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
        body = resp.read()
    return body, time.perf_counter() - t0


def timed_fetch(base: str, path: str, timeout: float = 60.0, gzip: bool = False) -> tuple[bytes, float]:
    """GET base+path over a raw HTTP/1.0 socket; return the body (as sent) and the seconds to its last byte.

    For /metrics timings: urllib's chunked decoding costs more CPU than the server's work at
    100 MB, and the benchmark's own client must not be what is measured. With `gzip`, asks for
    it as Prometheus does and fails unless the body came gzipped.
    """
    host, _, port = base.removeprefix("http://").rpartition(":")
    accept = "Accept-Encoding: gzip\r\n" if gzip else ""
    t0 = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n{accept}\r\n".encode())
        chunks, buf = [], bytearray(1 << 20)
        while n := s.recv_into(buf):
            chunks.append(bytes(buf[:n]))
    took = time.perf_counter() - t0
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"GET {path}: {head[:200]!r}")
    if gzip and b"\r\ncontent-encoding: gzip" not in head.lower():
        raise RuntimeError(f"GET {path}: asked for gzip, got {head[:300]!r}")
    return body, took


def wait_healthy(proc: Proc, url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            break
        try:
            http_get(url, timeout=2)
            return
        except OSError:
            time.sleep(0.1)
    proc.stop()
    raise RuntimeError(f"{proc.name} did not become healthy at {url}:\n{proc.log.read_text()[-2000:]}")


@contextmanager
def project(workdir: Path, config: str, tag: str, netns: str | None = None,
            listen_host: str = "127.0.0.1") -> Iterator[tuple[Proc, str]]:
    """Run `probe run` on `config`; yield it and its base URL."""
    port = free_port() if netns is None else 9516
    proc = Proc(
        "probe", [python(), "-m", "probe", "run", "-c", config, "--listen", f"{listen_host}:{port}"],
        workdir / f"probe-{tag}.log", netns,
    )
    base = f"http://{listen_host}:{port}"
    try:
        wait_healthy(proc, base + "/-/healthy")
        yield proc, base
    finally:
        proc.stop()


BLACKBOX_CONFIG = """\
modules:
  https:
    prober: http
    timeout: {timeout}s
    http:
      preferred_ip_protocol: ip4
      tls_config:
        ca_file: {ca_file}
  tcp:
    prober: tcp
    timeout: {timeout}s
    tcp:
      preferred_ip_protocol: ip4
"""


@contextmanager
def blackbox(workdir: Path, pki: Pki, tag: str, netns: str | None = None,
             timeout: float = 5.0) -> Iterator[tuple[Proc, str]]:
    """Run blackbox_exporter with an `https` and a `tcp` module; yield it and its host:port."""
    exe = shutil.which(BLACKBOX) or shutil.which("blackbox_exporter")
    if exe is None:
        raise RuntimeError(f"{BLACKBOX} is not installed (apt-get install {BLACKBOX})")
    cfg = workdir / "blackbox.yml"
    cfg.write_text(BLACKBOX_CONFIG.format(ca_file=pki.ca_file, timeout=timeout))
    port = free_port() if netns is None else 9115
    proc = Proc(
        "blackbox", [exe, f"--config.file={cfg}", f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        workdir / f"blackbox-{tag}.log", netns,
    )
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}/-/healthy")
        yield proc, f"127.0.0.1:{port}"
    finally:
        proc.stop()


def start_driver(workdir: Path, exporter: str, module: str, targets: Sequence[str], rate: float, seconds: float,
                 tag: str, netns: str | None = None, phases: bool = False) -> Proc:
    argv = [python(), "-m", "bench.driver", "--exporter", exporter, "--module", module,
            "--rate", str(rate), "--seconds", str(seconds)]
    for t in targets:
        argv += ["--target", t]
    if phases:
        argv.append("--phases")
    return Proc("driver", argv, workdir / f"driver-{tag}.log", netns)
