"""Access control: the exporter-toolkit web config (TLS, bcrypt basic auth) on a real `probe run`, and secrets.

Secrets (proxy passwords, basic-auth hashes) must never show in /api/*, /metrics, logs or
error messages: the tests put recognisable ones in and grep every output for them.
"""

from __future__ import annotations

import base64
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import pytest
import trustme
import yaml

from probe.config import ConfigError
from probe.exporter import webconfig
from tests.procs import probe_run, wait_until

PASSWORD = "correct horse battery"
PROXY_SECRET = "hunter2-proxy-secret"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
OTHER_HASH = bcrypt.hashpw(b"other", bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$", 1)
PROTECTED = [("GET", "/metrics"), ("GET", "/api/results"), ("GET", "/api/routes"), ("GET", "/probe?target=web"),
             ("POST", "/-/reload"), ("GET", "/")]


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path, Path]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file, ca_file = tmp_path / "server.crt", tmp_path / "server.key", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    return cert_file, key_file, ca_file


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def write(path: Path, doc: Any) -> str:
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return str(path)


def monitor_config(path: Path) -> str:
    return write(path, {
        "vantage": "lab",
        "routes": [{"name": "hk", "proxy": f"socks5h://probe:{PROXY_SECRET}@127.0.0.1:1"}],
        "targets": [{"name": "web", "url": "http://storage.example:1/", "routes": ["direct", "hk"],
                     "interval": "1s", "timeout": "500ms"}],
    })


# --- loading the web config -----------------------------------------------------------

BAD_WEB_CONFIGS = [
    ("unknown-key", {"basic_auth_user": {}}, "basic_auth_user: unknown key"),
    ("tls-unknown-key", {"tls_server_config": {"cert": "a"}}, "tls_server_config.cert: unknown key"),
    ("tls-without-key-file", {"tls_server_config": {"cert_file": "server.crt"}},
     "tls_server_config.key_file: required"),
    ("tls-unreadable-cert", {"tls_server_config": {"cert_file": "missing.crt", "key_file": "server.key"}},
     "tls_server_config.cert_file: cannot read"),
    ("tls-bad-client-auth", {"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key",
                                                   "client_auth_type": "Maybe"}},
     "tls_server_config.client_auth_type: must be one of"),
    ("tls-bad-min-version", {"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key",
                                                   "min_version": "SSL3"}}, "tls_server_config.min_version"),
    ("tls-key-of-another-cert", {"tls_server_config": {"cert_file": "server.crt", "key_file": "other.key"}},
     "tls_server_config: cannot use cert_file and key_file"),
    ("users-not-a-mapping", {"basic_auth_users": ["alice"]}, "basic_auth_users: must be a mapping"),
    ("plain-password-instead-of-hash", {"basic_auth_users": {"alice": "s3cret-plain"}},
     "basic_auth_users.alice: not a bcrypt hash"),
    ("broken-hash", {"basic_auth_users": {"alice": HASH[:-3] + "!!!"}}, "basic_auth_users.alice: not a bcrypt hash"),
    ("yaml-syntax", "basic_auth_users:\n  alice: [\n", "YAML syntax error at line 3"),
]


@pytest.mark.parametrize(("doc", "message"), [c[1:] for c in BAD_WEB_CONFIGS], ids=[c[0] for c in BAD_WEB_CONFIGS])
def test_bad_web_config_is_rejected_naming_the_field(
    doc: Any, message: str, tls_files: tuple[Path, Path, Path], tmp_path: Path, ca: trustme.CA
) -> None:
    ca.issue_cert("other.test").private_key_pem.write_to_path(str(tmp_path / "other.key"))
    path = write(tmp_path / "web.yml", doc)
    with pytest.raises(ConfigError) as caught:
        webconfig.load(path)
    text = str(caught.value) + "\n".join(caught.value.problems)
    assert message in text
    for secret in ("s3cret-plain", HASH[7:-3]):
        assert secret not in text, "a hash or password was echoed"


def test_good_web_config_loads_users_and_tls(tls_files: tuple[Path, Path, Path], tmp_path: Path) -> None:
    path = write(tmp_path / "web.yml", {
        "tls_server_config": {"cert_file": "server.crt", "key_file": "server.key", "min_version": "TLS13"},
        "basic_auth_users": {"prometheus": HASH, "grafana": OTHER_HASH},
    })
    loaded = webconfig.load(path)
    assert loaded.tls is not None and loaded.tls.min_version is ssl.TLSVersion.TLSv1_3
    assert sorted(loaded.users) == ["grafana", "prometheus"]
    assert HASH not in repr(loaded)


def test_empty_web_config_means_no_access_control(tmp_path: Path) -> None:
    assert webconfig.load(write(tmp_path / "web.yml", "")) == webconfig.WebConfig()


async def test_basic_auth_accepts_only_the_right_password() -> None:
    auth = webconfig.BasicAuth({"prometheus": HASH.encode(), "grafana": OTHER_HASH.encode()})

    def header(user: str, password: str) -> str:
        return basic(user, password)["Authorization"]

    assert await auth.check(header("prometheus", PASSWORD)) == "prometheus"
    assert await auth.check(header("prometheus", PASSWORD)) == "prometheus"  # cached
    assert await auth.check(header("grafana", "other")) == "grafana"  # $2y$ hashes (htpasswd) work
    assert await auth.check(header("prometheus", "wrong")) is None
    assert await auth.check(header("grafana", PASSWORD)) is None
    assert await auth.check(header("mallory", PASSWORD)) is None
    for bad in (None, "Bearer x", "Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode()):
        assert await auth.check(bad) is None


# --- a real `probe run` behind TLS and basic auth -------------------------------------


async def test_probe_run_with_web_config_demands_tls_and_credentials_everywhere(
    tls_files: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    cert_file, key_file, ca_file = tls_files
    web = write(tmp_path / "web.yml", {
        "tls_server_config": {"cert_file": str(cert_file), "key_file": str(key_file)},
        "basic_auth_users": {"prometheus": HASH},
    })
    client_tls = ssl.create_default_context(cafile=str(ca_file))
    good, bad = basic("prometheus", PASSWORD), basic("prometheus", "guess")
    async with probe_run("-c", monitor_config(tmp_path / "t.yml"), "--web.config.file", web) as running:
        assert running.base.startswith("https://")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_tls)) as http:
            for method, path in PROTECTED:
                for auth in ({}, bad):
                    async with http.request(method, running.base + path, headers=auth) as response:
                        assert response.status == 401, (method, path, auth)
                        assert response.headers["WWW-Authenticate"].startswith("Basic")
                async with http.request(method, running.base + path, headers=good) as response:
                    assert response.status == 200, (method, path, await response.text())
            async with http.get(running.base + "/-/healthy") as response:
                assert response.status == 200  # liveness stays open, and says nothing
            async with http.get(running.base + "/-/reload", headers=good) as response:
                assert response.status == 405
            for name in ("http://169.254.169.254/latest/meta-data", "127.0.0.1:22", "storage.example"):
                async with http.get(running.base + "/probe", params={"target": name}, headers=good) as response:
                    assert response.status == 404  # no open proxy, no request forgery
            outputs = []
            for path in ("/api/results", "/api/routes", "/metrics", "/"):
                async with http.get(running.base + path, headers=good) as response:
                    outputs.append(await response.text())
        async with aiohttp.ClientSession() as plain:
            with pytest.raises(aiohttp.ClientError):
                async with plain.get(running.base.replace("https://", "http://") + "/metrics") as response:
                    await response.read()
    for text in [*outputs, running.log]:
        assert PROXY_SECRET not in text and HASH not in text and PASSWORD not in text
    assert "hk" in outputs[0], "the proxy route's results are there, with its password redacted"


async def test_secrets_never_reach_api_metrics_logs_or_errors(tmp_path: Path) -> None:
    """A proxy with a password that fails every probe: errors, evidence, logs and reload errors stay clean."""
    cfg = tmp_path / "t.yml"
    monitor_config(cfg)
    async with probe_run("-c", str(cfg), log_level="debug") as running:
        async with aiohttp.ClientSession() as http:
            async def proxied_result() -> bool:
                async with http.get(running.base + "/api/results") as response:
                    doc = await response.json()
                return any(r["route"] == "hk" for r in doc["results"])

            await wait_until(proxied_result)
            # A broken reload whose error message quotes the route: the password must not ride along.
            text = cfg.read_text()
            cfg.write_text(text.replace("socks5h://", "socks9://"))
            async with http.post(running.base + "/-/reload") as response:
                reload_error = await response.text()
                assert response.status == 400
            assert "routes[0].proxy" in reload_error
            outputs = [reload_error]
            for path in ("/api/results", "/api/routes", "/metrics", "/", "/probe?target=web"):
                async with http.get(running.base + path) as response:
                    outputs.append(await response.text())
    results = outputs[1]
    assert "socks5h://probe:***@127.0.0.1:1" in results or "127.0.0.1:1" in results
    for text in [*outputs, running.log]:
        assert PROXY_SECRET not in text


async def test_probe_run_with_a_bad_web_config_exits_2_naming_the_file_and_field(tmp_path: Path) -> None:
    from tests.test_cli import run_cli

    web = write(tmp_path / "web.yml", {"basic_auth_users": {"alice": "s3cret-plain", "bob": HASH[:-1]}})
    code, out, err = await run_cli("run", "-c", monitor_config(tmp_path / "t.yml"), "--listen", "127.0.0.1:0",
                                   "--web.config.file", web)
    assert code == 2
    assert f"{web}: invalid config (2 problems)" in err
    assert "basic_auth_users.alice: not a bcrypt hash" in err and "basic_auth_users.bob: not a bcrypt hash" in err
    assert "s3cret-plain" not in err and HASH[:-1] not in err


async def test_concurrent_probe_requests_for_a_target_share_one_probe(tmp_path: Path) -> None:
    """Hammering /probe cannot turn the monitor into a traffic amplifier against a target."""
    import asyncio
    import time

    from aiohttp.test_utils import TestClient, TestServer

    from probe import config as config_module
    from probe.exporter.limits import ListenerLimits
    from probe.exporter.server import create_app
    from probe.models import Outcome, ProbeResult
    from probe.service import Service

    calls: list[str] = []

    async def slow_probe(target: Any, route: Any, ctx: Any) -> ProbeResult:
        calls.append(route.name)
        await asyncio.sleep(0.3)
        return ProbeResult(target.name, route.name, Outcome.OK, time.time(), 0.3)

    path = monitor_config(tmp_path / "t.yml")
    service = Service(path, config_module.load(path), probe_fn=slow_probe)
    try:
        app = create_app(service, limits=ListenerLimits(probe_reuse=0.5))
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            responses = await asyncio.gather(*(client.get("/probe", params={"target": "web"}) for _ in range(20)))
            assert [r.status for r in responses] == [200] * 20
            assert sorted(calls) == ["direct", "hk"], "one probe per route for 20 requests"
            for _ in range(10):  # one after another, within the reuse age: the same results again
                assert (await client.get("/probe", params={"target": "web"})).status == 200
            assert len(calls) == 2, "requests that follow each other reuse a result younger than probe_reuse"
            await asyncio.sleep(0.6)
            assert (await client.get("/probe", params={"target": "web"})).status == 200
            assert len(calls) == 4, "a request after the reuse age probes afresh"
    finally:
        await service.close()
