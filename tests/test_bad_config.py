"""Broken configs: `probe check` rejects each naming the field or line, and a running `probe run` keeps its config.

The table is every `tests/testdata/invalid-*.yml` fixture (their exact messages are in
test_config.py) plus files made here: 10 MB, a directory, not UTF-8, NUL bytes, an
alias bomb, a FIFO, a symlink to /dev/zero. Each is fed to one real `probe run` by SIGHUP
and by POST /-/reload.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import aiohttp
import pytest

from probe import cli
from tests.procs import probe_run, wait_until

TESTDATA = Path(__file__).resolve().parent / "testdata"
GOOD = "vantage: lab\ntargets:\n  - {name: keep, address: '127.0.0.1:1', interval: 1h}\n"
ALIAS_BOMB = "".join(
    f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join([f'*{chr(96 + i)}'] * 9) if i else ', '.join(['x'] * 9)}]\n"
    for i in range(8)
) + "targets: [*h, *h]\ncanaries: *h\n"
# A problem names a field path (`targets[2].routes[1]: ...`) or, for the whole file, the file and often a line.
FIELD = re.compile(r"^[a-z_]+(\[\d+\])?(\.[A-Za-z0-9_-]+(\[\d+\])?)*: \S")


FIFO, DEV_ZERO = "fifo", "dev-zero"  # made at the path itself: a FIFO, a symlink to /dev/zero


def made_configs() -> dict[str, bytes | str | None]:
    """Broken files the fixtures folder cannot hold; None: a directory instead of a file."""
    return {
        "a-fifo": FIFO,  # would hang a reader that opened it blocking
        "symlink-to-dev-zero": DEV_ZERO,  # size 0, and never ends
        "nested-500-levels": b"targets: " + b"[" * 500 + b"]" * 500 + b"\n",
        "ipv6-url-typo": b"targets: [{name: a, url: 'http://[2001:db8::1/'}]\n",
        "int-tag": b"targets: [{name: a, address: 'a:1', timeout: !!int x}]\n",
        "float-tag": b"targets: [{name: a, address: 'a:1', timeout: !!float x}]\n",
        "timestamp-tag": b"targets: [{name: a, address: 'a:1', timeout: !!timestamp x}]\n",
        "ten-megabytes": b"targets: []\n" + b"# padding\n" * 1_000_000,
        "a-directory": None,
        "not-utf8": b"vantage: z\xfcrich\ntargets: []\n",
        "nul-bytes": b"targets:\x00\n  - {name: a}\n",
        "alias-bomb": ALIAS_BOMB.encode(),
        "only-comments": b"# nothing here\n",
    }


def all_broken(tmp_path: Path) -> list[tuple[str, Path]]:
    cases = [(p.stem.removeprefix("invalid-"), p) for p in sorted(TESTDATA.glob("invalid-*.yml"))]
    for name, data in made_configs().items():
        path = tmp_path / f"{name}.yml"
        put(path, data)
        cases.append((name, path))
    return cases


def put(path: Path, data: bytes | str | None) -> None:
    """Make `path` a file of `data`, a directory (None), a FIFO or a symlink to /dev/zero."""
    if data is None:
        path.mkdir()
    elif data == FIFO:
        os.mkfifo(path)
    elif data == DEV_ZERO:
        path.symlink_to("/dev/zero")
    else:
        assert isinstance(data, bytes)
        path.write_bytes(data)


def kind(path: Path) -> bytes | str | None:
    """Return what `put` needs to make a copy of `path`."""
    if path.is_symlink():
        return DEV_ZERO
    if path.is_fifo():
        return FIFO
    return None if path.is_dir() else path.read_bytes()


def test_probe_check_rejects_every_broken_config_naming_the_field_or_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = all_broken(tmp_path)
    assert len(cases) >= 65
    for name, path in cases:
        code = cli.main(["check", "-c", str(path)])
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        header, *problems = err.splitlines()
        assert header.startswith(f"{path}: invalid config"), (name, err)
        assert problems, (name, err)
        for line in problems:
            text = line.strip()
            assert FIELD.match(text) or text.startswith(str(path)), (name, text)
            if "YAML" in text:
                assert re.search(r"line \d+, column \d+", text), (name, text)


async def test_running_service_keeps_its_config_through_every_broken_reload(tmp_path: Path) -> None:
    cfg = tmp_path / "running" / "targets.yml"
    cfg.parent.mkdir()
    cfg.write_text(GOOD)
    cases = all_broken(tmp_path)
    async with probe_run("-c", str(cfg)) as running, aiohttp.ClientSession() as http:
        async def metrics() -> str:
            async with http.get(running.base + "/metrics") as response:
                return await response.text()

        async def reload_gauge() -> str:
            return re.findall(r"^prober_config_last_reload_successful\S* (\S+)", await metrics(), re.M)[0]

        for name, path in cases:
            if cfg.is_dir() and not cfg.is_symlink():
                cfg.rmdir()
            else:
                cfg.unlink()
            put(cfg, kind(path))
            # SIGHUP: the log says why, the old config stays.
            seen = len(running.lines)
            running.proc.send_signal(signal.SIGHUP)
            await running.wait_for_log("keeping the running config", after=seen)
            # POST /-/reload: 400 with the problems, the old config stays.
            async with http.post(running.base + "/-/reload") as response:
                body = await response.text()
                assert response.status == 400, (name, body)
                assert "the running config stays" in body, (name, body)
            text = await metrics()
            assert 'target="keep"' in text, name
            assert await reload_gauge() == "0.0", name
            assert running.proc.returncode is None, name
        if cfg.is_dir() and not cfg.is_symlink():
            cfg.rmdir()
        else:
            cfg.unlink()
        cfg.write_text(GOOD.replace("keep", "fixed"))
        running.proc.send_signal(signal.SIGHUP)

        async def fixed() -> bool:
            return 'target="fixed"' in await metrics()

        await wait_until(fixed)
        assert await reload_gauge() == "1.0"
    assert "Traceback" not in running.log
