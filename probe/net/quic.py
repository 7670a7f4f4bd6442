"""A probe's QUIC connection: aioquic's sans-I/O state machine over one connected UDP socket.

aioquic does QUIC, TLS 1.3 and HTTP/3; this module only carries its datagrams, runs its
timer, and turns what ends a connection into exceptions that `probe.classify` reads. Memory
is bounded by the flow-control windows we advertise (the peer may not send more), by reading
the request stream's events as they come, and by the probe's deadline.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import os
import shutil
import socket
import ssl
import tempfile
import warnings
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionState
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, QuicEvent, StreamReset
from aioquic.quic.packet import QuicErrorCode
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning
from OpenSSL import crypto

from probe.classify import QuicClosed, QuicStreamReset
from probe.models import TlsInfo

# aioquic logs every connection's version, ALPN and close at INFO, and a hostile peer's protocol
# errors at WARNING: a probe's result already says what happened, once, with its outcome.
_AIOQUIC_LOG = logging.getLogger("quic")
if _AIOQUIC_LOG.level == logging.NOTSET:
    _AIOQUIC_LOG.setLevel(logging.ERROR)

FLOW_WINDOW = 1024 * 1024  # bytes the peer may have in flight to us, per stream and in all
_CRYPTO_ERRORS = range(QuicErrorCode.CRYPTO_ERROR, QuicErrorCode.CRYPTO_ERROR + 0x100)
_TLS_13 = "TLS 1.3"  # QUIC carries TLS 1.3 only (RFC 9001)


@functools.lru_cache(maxsize=64)
def trust(ca_file: str | None) -> tuple[str | None, str | None, bytes | None]:
    """Return (cafile, capath, cadata) for aioquic: the system store plus `ca_file`, as TCP TLS trusts.

    aioquic trusts certifi's bundle unless told otherwise, and builds its trust store afresh for
    every handshake: loading a bundle file (SSL_CERT_FILE, ca_file) then costs 7-16 ms of CPU per
    probe, more than the rest of it (docs/benchmarks.md). So the bundles are split once into an
    OpenSSL hashed directory, where a handshake looks up only the issuers it needs (~0.05 ms);
    it is put before the system's hashed directory (SSL_CERT_DIR) in the lookup path.
    """
    paths = ssl.get_default_verify_paths()
    capath = os.environ.get(paths.openssl_capath_env) or paths.capath
    dirs = [capath] if capath and os.path.isdir(capath) else []
    system_file = os.environ.get(paths.openssl_cafile_env) or (None if dirs else paths.cafile)
    files = tuple(f for f in (system_file, ca_file) if f)
    if not files and not dirs:
        return None, None, None  # no system store at all: aioquic's certifi bundle
    if files:
        try:
            dirs.insert(0, _hashed_directory(files))
        except (OSError, ValueError):  # no writable temporary directory: load the files on every handshake
            cadata = b"".join(open(f, "rb").read() for f in files[1:]) or None
            return files[0], ":".join(dirs) or None, cadata
    return None, ":".join(dirs), None


def _hashed_directory(files: tuple[str, ...]) -> str:
    """Write the certificates of PEM `files` as <subject hash>.<n> into a new directory; return it."""
    directory = tempfile.mkdtemp(prefix="probe-quic-trust-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    seen: dict[int, int] = {}
    for name in files:
        with open(name, "rb") as f, warnings.catch_warnings():
            # System bundles hold a few legacy roots (a serial number that is not positive) that
            # cryptography warns about; they are trusted as the system trusts them.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            certificates = x509.load_pem_x509_certificates(f.read())
        for cert in certificates:
            subject_hash = crypto.X509.from_cryptography(cert).subject_name_hash()
            n = seen.get(subject_hash, 0)
            seen[subject_hash] = n + 1
            with open(os.path.join(directory, f"{subject_hash:08x}.{n}"), "wb") as out:
                out.write(cert.public_bytes(serialization.Encoding.PEM))
    return directory


def configuration(server_name: str, ca_file: str | None, *, verify: bool, idle_timeout: float) -> QuicConfiguration:
    """Return a client configuration for HTTP/3 with SNI `server_name` (verify=False: any certificate)."""
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=list(H3_ALPN),
        server_name=server_name,
        idle_timeout=idle_timeout,
        max_data=FLOW_WINDOW,
        max_stream_data=FLOW_WINDOW,
        verify_mode=ssl.CERT_REQUIRED if verify else ssl.CERT_NONE,
    )
    if verify:
        config.cafile, config.capath, config.cadata = trust(ca_file)
    return config


class QuicSession(asyncio.DatagramProtocol):
    """One client QUIC connection with HTTP/3 on top, driven by the datagrams of its own socket."""

    def __init__(self, quic: QuicConnection, peer: tuple[str, int]) -> None:
        self._quic = quic
        self._peer = peer
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.DatagramTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._h3: H3Connection | None = None
        self._events: deque[H3Event] = deque()
        self._stream_id: int | None = None
        self.handshake_done = False
        self.terminated: QuicClosed | TimeoutError | None = None
        self.socket_error: OSError | None = None
        self.stream_reset: int | None = None  # RESET_STREAM's error code for the request stream
        self.datagrams_received = 0

    # --- asyncio.DatagramProtocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.datagrams_received += 1
        # The socket is connected: every datagram comes from the peer, whatever form its address takes.
        self._quic.receive_datagram(data, self._peer, now=self._loop.time())
        self._process()

    def error_received(self, exc: Exception) -> None:
        # ICMP errors reach a connected UDP socket (port or host unreachable after an Initial).
        if isinstance(exc, OSError) and self.socket_error is None:
            self.socket_error = exc
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._wake()

    # --- the connection ----------------------------------------------------------------

    def start(self) -> None:
        """Send the first Initial."""
        self._quic.connect(self._peer, now=self._loop.time())
        self._transmit()

    async def handshake(self) -> None:
        """Wait until the handshake completes; raise what ended it otherwise."""
        while not self.handshake_done:
            self._raise_if_ended()
            await self._wait()

    def tls_info(self) -> TlsInfo:
        """Return the version, cipher and the earliest expiry of the certificates the server sent."""
        tls = self._quic.tls
        # aioquic keeps the peer's certificates on its TLS context without a public accessor.
        certs = [c for c in (getattr(tls, "_peer_certificate", None), *getattr(tls, "_peer_certificate_chain", ()))
                 if c is not None]
        expiry = min((c.not_valid_after_utc.timestamp() for c in certs), default=None)
        schedule = getattr(tls, "key_schedule", None)
        suite = getattr(schedule, "cipher_suite", None)
        return TlsInfo(version=_TLS_13, earliest_cert_expiry=expiry, cipher=suite.name if suite is not None else None)

    def request(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """Send one request (headers only) on a new stream."""
        if self._h3 is None:
            self._h3 = H3Connection(self._quic)
        self._stream_id = self._quic.get_next_available_stream_id()
        self._h3.send_headers(self._stream_id, list(headers), end_stream=True)
        self._transmit()

    async def next_event(self) -> HeadersReceived | DataReceived:
        """Return the next event of the request stream; raise what ended the stream or the connection."""
        while True:
            while self._events:
                event = self._events.popleft()
                if isinstance(event, HeadersReceived | DataReceived):
                    return event
            self._raise_if_ended()
            await self._wait()

    def close(self) -> None:
        """Close the connection (one CONNECTION_CLOSE, no waiting) and the socket."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._transport is not None and not self._transport.is_closing():
            self._quic.close()
            self._transmit()
            self._transport.close()

    # --- internals ---------------------------------------------------------------------

    def _process(self) -> None:
        event: QuicEvent | None = self._quic.next_event()
        while event is not None:
            if isinstance(event, HandshakeCompleted):
                self.handshake_done = True
            elif isinstance(event, ConnectionTerminated):
                self._terminated(event)
            elif isinstance(event, StreamReset) and event.stream_id == self._stream_id:
                self.stream_reset = event.error_code
            if self._h3 is not None and not isinstance(event, ConnectionTerminated):
                for h3_event in self._h3.handle_event(event):
                    if getattr(h3_event, "stream_id", None) == self._stream_id:
                        self._events.append(h3_event)
            event = self._quic.next_event()
        self._transmit()
        self._wake()

    def _terminated(self, event: ConnectionTerminated) -> None:
        if self.terminated is not None:
            return
        # DRAINING: the peer's CONNECTION_CLOSE arrived; CLOSING (or closed): we closed it.
        by_peer = self._quic._state is QuicConnectionState.DRAINING
        if not by_peer and event.reason_phrase == "Idle timeout":
            self.terminated = TimeoutError("no answer from the peer (QUIC idle timeout)")
            return
        alert = None
        if event.frame_type is not None and event.error_code in _CRYPTO_ERRORS:
            alert = event.error_code - QuicErrorCode.CRYPTO_ERROR
        self.terminated = QuicClosed(event.error_code, event.reason_phrase, by_peer=by_peer, alert=alert)

    def _raise_if_ended(self) -> None:
        if self.stream_reset is not None:
            raise QuicStreamReset(self.stream_reset)
        if self.terminated is not None:
            raise self.terminated
        if self.socket_error is not None:
            raise self.socket_error
        if self._transport is None or self._transport.is_closing():
            raise ConnectionAbortedError("the QUIC socket was closed")

    def _transmit(self) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        now = self._loop.time()
        for data, _addr in self._quic.datagrams_to_send(now=now):
            self._transport.sendto(data)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        at = self._quic.get_timer()
        if at is not None:
            self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._quic.handle_timer(now=self._loop.time())
        self._process()

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


async def open_session(
    address: str, port: int, config: QuicConfiguration, source_address: str | None = None
) -> QuicSession:
    """Open a connected UDP socket to (address, port), from `source_address` if set; `start()` sends the Initial."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    local = (source_address, 0) if source_address is not None else None
    session = QuicSession(QuicConnection(configuration=config), (address, port))
    await loop.create_datagram_endpoint(lambda: session, remote_addr=(address, port), local_addr=local, family=family)
    return session
