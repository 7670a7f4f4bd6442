"""The connect phase on direct routes is the kernel's handshake time (TCP_INFO), not the loop's clock."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest

from probe.net import dial
from probe.trace import Trace

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO layout is Linux's")


async def test_kernel_handshake_time_of_a_loopback_connect_is_small_and_positive() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        sock = await dial._direct_connect("127.0.0.1", port, None, Trace())
        try:
            rtt = dial.kernel_handshake_seconds(sock)
        finally:
            sock.close()
    finally:
        server.close()
        await server.wait_closed()
    assert rtt is not None and 0 < rtt < 0.05


def test_a_socket_that_never_connected_has_no_handshake_time() -> None:
    with socket.socket() as sock:
        assert dial.kernel_handshake_seconds(sock) is None


async def test_refused_connect_raises_connection_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: the SYN is answered with a RST
        with pytest.raises(ConnectionRefusedError):
            await dial._direct_connect("127.0.0.1", port, None, Trace())
