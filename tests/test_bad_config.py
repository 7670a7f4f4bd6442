"""Broken configs: `probe check` rejects each naming the field or line, and a running `probe run` keeps its config.

The table is every `tests/testdata/invalid-*.yml` fixture (their exact messages are in
test_config.py) plus files made here: 10 MB, a directory, not UTF-8, NUL bytes, an
alias bomb. Each is fed to one real `probe run` by SIGHUP and by POST /-/reload.
"""

from __future__ import annotations

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


def made_configs() -> dict[str, bytes | None]:
    """Broken files the fixtures folder cannot hold; None: a directory instead of a file."""
    return {
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
        if data is None:
            path.mkdir()
        else:
            path.write_bytes(data)
        cases.append((name, path))
    return cases


def test_probe_check_rejects_every_broken_config_naming_the_field_or_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = all_broken(tmp_path)
    assert len(cases) >= 55
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
            if cfg.is_dir():
                cfg.rmdir()
            else:
                cfg.unlink()
            if path.is_dir():
                cfg.mkdir()
            else:
                cfg.write_bytes(path.read_bytes())
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
        if cfg.is_dir():
            cfg.rmdir()
        cfg.write_text(GOOD.replace("keep", "fixed"))
        running.proc.send_signal(signal.SIGHUP)

        async def fixed() -> bool:
            return 'target="fixed"' in await metrics()

        await wait_until(fixed)
        assert await reload_gauge() == "1.0"
    assert "Traceback" not in running.log
