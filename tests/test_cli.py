"""The `probe` command as a user runs it: a subprocess, its output and its exit code."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from tests.servers import Pki, aiohttp_server, closed_port


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "probe", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def write_config(path: Path, doc: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def app() -> web.Application:
    async def ping(request: web.Request) -> web.Response:
        return web.Response(text="pong")

    application = web.Application()
    application.router.add_get("/api/ping", ping)
    return application


async def test_once_json_on_trusted_loopback_https_is_ok_with_all_phases(pki: Pki, tmp_path: Path) -> None:
    async with aiohttp_server(app(), pki.server_context()) as port:
        cfg = write_config(tmp_path / "t.yml", {
            "vantage": "lab-cn",
            "targets": [{
                "name": "storage", "url": f"https://127.0.0.1:{port}/api/ping", "server_name": "localhost",
                "ca_file": str(pki.ca_file), "expect": {"status": [200], "body_contains": "pong"},
            }],
        })
        code, out, err = await run_cli("once", "-c", cfg, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["vantage"] == "lab-cn"
    [result] = doc["results"]
    assert result["outcome"] == "ok" and result["success"] is True and result["blocked"] is False
    assert list(result["phases"]) == ["resolve", "connect", "tls", "processing", "transfer"]
    assert result["http_status"] == 200 and result["address"] == "127.0.0.1"
    assert doc["routes"] == {"storage": ["direct"]}


async def test_once_exits_1_when_any_probe_fails_and_prints_a_table(pki: Pki, tmp_path: Path) -> None:
    async with aiohttp_server(app()) as port:
        cfg = write_config(tmp_path / "t.yml", {"targets": [
            {"name": "up", "url": f"http://127.0.0.1:{port}/api/ping"},
            {"name": "down", "address": f"127.0.0.1:{closed_port()}"},
        ]})
        code, out, _ = await run_cli("once", "-c", cfg)
    assert code == 1
    lines = out.splitlines()
    assert lines[0].split() == ["TARGET", "ROUTE", "OUTCOME", "TIME", "ADDRESS", "DETAIL"]
    assert any(line.startswith("up ") and " ok " in line for line in lines)
    assert any(line.startswith("down ") and "tcp_refused" in line for line in lines)
    assert "\033[" not in out  # piped: plain text
    assert "2 probes: 1 ok, 1 tcp_refused" in out


async def test_once_target_filter_and_unknown_names_are_usage_errors(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "t.yml", {"targets": [{"name": "a", "address": f"127.0.0.1:{closed_port()}"}]})
    code, _, err = await run_cli("once", "-c", cfg, "--target", "nope")
    assert code == 2
    assert "unknown target 'nope' (configured: a)" in err
    code, _, err = await run_cli("once", "-c", cfg, "--route", "hk")
    assert code == 2 and "unknown route 'hk'" in err


async def test_check_reports_every_problem_with_its_path_and_exits_2(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "bad.yml", {
        "routes": [{"name": "hk-socks", "proxy": "socks5://10.0.0.5:1080"}],
        "targets": [
            {"name": "a", "address": "a.example:22"},
            {"name": "b", "address": "b.example:22"},
            {"name": "c", "url": "https://c.example/", "routes": ["direct", "hk"], "interval": "soon"},
        ],
    })
    code, out, err = await run_cli("check", "-c", cfg)
    assert code == 2
    assert "targets[2].routes[1]: unknown route 'hk'" in err
    assert "targets[2].interval: bad duration 'soon'" in err


async def test_check_accepts_a_valid_config_and_reads_probe_config_from_the_environment(tmp_path: Path) -> None:
    import os

    cfg = write_config(tmp_path / "ok.yml", {"targets": [{"name": "a", "address": "a.example:22"}]})
    env = dict(os.environ, PROBE_CONFIG=cfg, PROBE_VANTAGE="hk-1")
    code, out, _ = await run_cli("check", env=env)
    assert code == 0
    assert "OK: 1 targets" in out and "'hk-1'" in out


async def test_missing_config_file_is_a_clear_error(tmp_path: Path) -> None:
    code, _, err = await run_cli("check", "-c", str(tmp_path / "absent.yml"))
    assert code == 2
    assert "absent.yml: cannot read: No such file or directory" in err
