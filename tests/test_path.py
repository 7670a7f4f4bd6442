"""Path sampling against real loopback peers: TCP handshakes, ICMP echo, real microsocks and tinyproxy.

Loss and jitter under real packet loss and delay are measured in the interference lab
(tests/test_lab_path.py); here every path answers, refuses, or is a local fault.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from probe import config
from probe.context import ProbeContext
from probe.models import PathMethod, PathResult
from probe.net import sample
from probe.probers import path
from tests.proxies import RunningProxy, bind_same_port, microsocks, peer_server, tinyproxy
from tests.servers import closed_port


def make_config(port: int, *, routes: list[dict[str, Any]] | None = None, host: str = "127.0.0.1",
                **path_check: Any) -> config.Config:
    path_check = {"samples": 10, "spread": "500ms", **path_check}
    doc = {
        "vantage": "test",
        "routes": routes or [],
        "targets": [{
            "name": "t", "address": f"{host}:{port}", "timeout": "2s",
            "routes": ["direct", *(r["name"] for r in routes or [])], "path": path_check,
        }],
    }
    return config.loads(yaml.safe_dump(doc))


async def sample_run(cfg: config.Config, route: str = "direct", **kwargs: Any) -> PathResult:
    ctx = ProbeContext(cfg)
    try:
        return await path.run(cfg.targets[0], cfg.route(route), ctx, **kwargs)
    finally:
        await ctx.close()


@pytest.fixture
async def listening() -> AsyncIterator[int]:
    """A TCP port on 127.0.0.1, 127.0.0.2 and 127.0.0.3 whose server accepts and hangs up."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        return None

    async with peer_server(hang_up, sockets=bind_same_port(["127.0.0.1", "127.0.0.2", "127.0.0.3"])) as server:
        yield server.port


# --- tcp -------------------------------------------------------------------------------


async def test_tcp_samples_on_loopback_are_all_answered(listening: int) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    result = await sample_run(make_config(listening))
    took = loop.time() - t0
    assert (result.method, result.sent, result.lost, result.error) == (PathMethod.TCP, 10, 0, None)
    assert len(result.rtts) == 10
    assert all(0 < rtt < 0.05 for rtt in result.rtts)  # loopback: the kernel's handshake time, microseconds
    assert result.rtt("min") <= result.rtt("p50") <= result.rtt("p90") <= result.rtt("max")  # type: ignore[operator]
    assert result.jitter is not None and result.jitter >= 0
    # Spread evenly over 500 ms: the last sample leaves 450 ms after the first.
    assert 0.45 <= took < 1.0


async def test_a_refused_connection_is_an_answer_not_a_loss() -> None:
    result = await sample_run(make_config(closed_port(), samples=5, spread="250ms"))
    assert (result.sent, result.lost, result.error) == (5, 0, None)
    assert len(result.rtts) == 5


async def test_tcp_samples_leave_from_the_source_address(listening: int) -> None:
    routes = [{"name": "lo2", "source_address": "127.0.0.2"}]
    seen: list[str] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(writer.get_extra_info("peername")[0])

    async with peer_server(record, hosts=["127.0.0.3"]) as server:
        result = await sample_run(make_config(server.port, routes=routes, host="127.0.0.3", samples=4,
                                              spread="200ms"), "lo2")
        for _ in range(100):
            if len(seen) == 4:
                break
            await asyncio.sleep(0.01)
    assert (result.sent, result.lost, result.error) == (4, 0, None)
    assert seen == ["127.0.0.2"] * 4


async def test_a_source_address_that_is_not_ours_is_an_error_never_a_loss(listening: int) -> None:
    routes = [{"name": "foreign", "source_address": "192.0.2.77"}]
    result = await sample_run(make_config(listening, routes=routes, samples=3, spread="150ms"), "foreign")
    assert (result.sent, result.lost, result.rtts) == (0, 0, ())
    assert result.error == "cannot send from 192.0.2.77: Cannot assign requested address"
    assert result.evidence == ("3 of 3 samples not sent: cannot send from 192.0.2.77: Cannot assign requested address",)


async def test_an_unresolvable_name_sends_nothing(tmp_path: Path) -> None:
    cfg = make_config(443, host="name.invalid", samples=2, spread="100ms")
    result = await sample_run(cfg)
    assert (result.sent, result.lost) == (0, 0)
    assert result.error is not None and "name.invalid" in result.error


# --- through real proxies --------------------------------------------------------------


@pytest.fixture(scope="module")
def socks() -> Any:
    with microsocks() as proxy:
        yield proxy


@pytest.fixture(scope="module")
def http_proxy(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with tinyproxy(tmp_path_factory.mktemp("tinyproxy")) as proxy:
        yield proxy


@pytest.mark.parametrize("which", ["socks", "http_proxy"])
async def test_tcp_through_a_proxy_times_its_connect_reply(which: str, listening: int,
                                                           request: pytest.FixtureRequest) -> None:
    proxy: RunningProxy = request.getfixturevalue(which)
    routes = [{"name": "via", "proxy": proxy.url}]
    result = await sample_run(make_config(listening, routes=routes, samples=6, spread="300ms"), "via")
    assert (result.sent, result.lost, result.error) == (6, 0, None)
    assert all(0 < rtt < 0.2 for rtt in result.rtts)


@pytest.mark.parametrize("which", ["socks", "http_proxy"])
async def test_a_proxy_refusing_the_target_is_an_answer(which: str, request: pytest.FixtureRequest) -> None:
    proxy: RunningProxy = request.getfixturevalue(which)
    routes = [{"name": "via", "proxy": proxy.url}]
    result = await sample_run(make_config(closed_port(), routes=routes, samples=3, spread="150ms"), "via")
    assert (result.sent, result.lost, result.error) == (3, 0, None)


async def test_an_unreachable_proxy_is_an_error_not_a_loss(listening: int) -> None:
    routes = [{"name": "via", "proxy": f"socks5://127.0.0.1:{closed_port()}"}]
    result = await sample_run(make_config(listening, routes=routes, samples=2, spread="100ms"), "via")
    assert (result.sent, result.lost) == (0, 0)
    assert result.error is not None and result.error.startswith("proxy socks5://127.0.0.1:")


async def test_a_silent_proxy_loses_the_sample_at_its_deadline() -> None:
    """A proxy that accepts and never answers: each sample is lost after its wait, not the probe's timeout."""
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1000)
        await asyncio.sleep(5)

    async with peer_server(mute, hosts=["127.0.0.1"]) as silent_proxy:
        routes = [{"name": "via", "proxy": f"http://127.0.0.1:{silent_proxy.port}"}]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        result = await sample_run(make_config(443, routes=routes, samples=2, spread="100ms"), "via", wait=0.3)
        took = loop.time() - t0
    assert (result.sent, result.lost) == (2, 2)
    assert took < 1.0


# --- icmp ------------------------------------------------------------------------------


def icmp_allowed() -> bool:
    return sample.icmp_privileged() is not None


needs_icmp = pytest.mark.skipif(not icmp_allowed(), reason="ICMP needs root or net.ipv4.ping_group_range")


@needs_icmp
async def test_icmp_echo_on_loopback() -> None:
    result = await sample_run(make_config(1, method="icmp", samples=5, spread="250ms"))
    assert (result.method, result.sent, result.lost, result.error) == (PathMethod.ICMP, 5, 0, None)
    assert all(0 < rtt < 0.05 for rtt in result.rtts)


@needs_icmp
async def test_icmp_echo_from_a_source_address() -> None:
    routes = [{"name": "lo2", "source_address": "127.0.0.2"}]
    result = await sample_run(make_config(1, routes=routes, host="127.0.0.3", method="icmp", samples=3,
                                          spread="150ms"), "lo2")
    assert (result.sent, result.lost, result.error) == (3, 0, None)


async def test_icmp_without_permission_is_an_error() -> None:
    with pytest.raises(sample.SampleError, match="ICMP needs root or a group in net.ipv4.ping_group_range"):
        await sample.icmp("127.0.0.1", config.DIRECT_ROUTE, 0.5, None)


def test_icmp_mode_follows_the_host() -> None:
    import os

    mode = sample.icmp_privileged()
    if os.geteuid() == 0:
        assert mode is True
    else:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ping_group_range").read_text().split())
        assert (mode is False) == any(low <= g <= high for g in {os.getegid(), *os.getgroups()})


def test_socket_module_has_tcp_info() -> None:
    assert hasattr(socket, "TCP_INFO")  # the kernel's handshake time is what a tcp sample reports
