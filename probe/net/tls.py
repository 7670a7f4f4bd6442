"""TLS for probes: client contexts per CA file, the timed handshake, and the facts of a verified chain."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from probe import debuglog
from probe.classify import Stage
from probe.models import Phase, TlsInfo
from probe.trace import Trace

if TYPE_CHECKING:
    from probe.net.dial import Connection

_UNVERIFIED = "\0unverified"  # a key no CA file path can be
_TLS_VERSIONS = {"TLSv1": "TLS 1.0", "TLSv1.1": "TLS 1.1", "TLSv1.2": "TLS 1.2", "TLSv1.3": "TLS 1.3"}


class TlsContexts:
    """Client SSL contexts, built once per (CA file, ALPN): the system store plus the extra CA bundle."""

    def __init__(self) -> None:
        self._made: dict[tuple[str | None, str], ssl.SSLContext] = {}

    def verifying(self, ca_file: str | None) -> ssl.SSLContext:
        """Return a context that verifies against the system store plus `ca_file`, offering HTTP/1.1."""
        return self._context(ca_file, "http/1.1")

    def unverified(self) -> ssl.SSLContext:
        """Return a context that accepts any certificate: the control handshake only asks whether a server answers."""
        ctx = self._made.get((_UNVERIFIED, "http/1.1"))
        if ctx is None:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            ctx.set_alpn_protocols(["http/1.1"])
            self._made[(_UNVERIFIED, "http/1.1")] = ctx
        return ctx

    def dns_tls(self, ca_file: str | None) -> ssl.SSLContext:
        """Return a context for DNS over TLS: like `verifying`, but offering ALPN "dot" (RFC 7858)."""
        return self._context(ca_file, "dot")

    def _context(self, ca_file: str | None, alpn: str) -> ssl.SSLContext:
        ctx = self._made.get((ca_file, alpn))
        if ctx is None:
            ctx = ssl.create_default_context()
            if ca_file:
                ctx.load_verify_locations(cafile=ca_file)
            ctx.set_alpn_protocols([alpn])
            self._made[(ca_file, alpn)] = ctx
        return ctx


async def start_tls(conn: Connection, context: ssl.SSLContext, server_name: str, trace: Trace) -> TlsInfo:
    """Run the TLS handshake with SNI `server_name`, timing the `tls` phase."""
    trace.sni = server_name
    if (log := debuglog.current()) is not None:
        log.add(f"TLS handshake: ClientHello with SNI {server_name}")
    with trace.phase(Phase.TLS, Stage.TLS):
        await conn.start_tls(context, server_name)
    info = tls_info(conn.ssl_object)
    trace.tls = info
    if log is not None:
        log_handshake(log, conn.ssl_object, info)
    return info


def log_handshake(log: debuglog.DebugLog, ssl_object: Any, info: TlsInfo) -> None:
    """Record what a completed handshake agreed on and the facts of the verified chain."""
    log.add(f"TLS handshake done: {info.version}, cipher {info.cipher}, ALPN {ssl_object.selected_alpn_protocol()}")
    for depth, cert in enumerate(_verified_chain(ssl_object)):
        facts = cert.get_info() if hasattr(cert, "get_info") else {}
        names = ", ".join(v for k, v in facts.get("subjectAltName", ()) if k in ("DNS", "IP Address"))
        log.add(f"  certificate {depth}: subject {_dn(facts.get('subject'))}, issuer {_dn(facts.get('issuer'))}, "
                f"valid {facts.get('notBefore')} to {facts.get('notAfter')}" + (f", names {names}" if names else ""))


def _dn(name: Any) -> str:
    """Return `CN=x, O=y` from the tuple form ssl gives for a certificate's subject or issuer."""
    if not name:
        return "?"
    return ", ".join(f"{k}={v}" for rdn in name for k, v in rdn)


def tls_info(ssl_object: Any) -> TlsInfo:
    """Return version, cipher and the earliest expiry over the verified chain."""
    version = ssl_object.version() or ""
    cipher = ssl_object.cipher()
    chain = _verified_chain(ssl_object)
    # Decoding certificates to dicts and parsing their dates costs more than the rest of the
    # probe's Python: the facts of a chain are a function of its bytes, so they are kept per chain.
    ders = tuple(c.public_bytes(_DER) for c in chain) if chain else (ssl_object.getpeercert(binary_form=True),)
    key = (version, cipher[0] if cipher else None, ders)
    info = _TLS_FACTS.get(key)
    if info is None:
        if len(_TLS_FACTS) >= _TLS_FACTS_MAX:
            _TLS_FACTS.clear()
        info = TlsInfo(
            version=_TLS_VERSIONS.get(version, version),
            earliest_cert_expiry=_earliest_expiry(ssl_object, chain),
            cipher=cipher[0] if cipher else None,
        )
        _TLS_FACTS[key] = info
    return info


_DER = ssl._ssl.ENCODING_DER  # type: ignore[attr-defined]  # what Certificate.public_bytes takes
_TLS_FACTS: dict[tuple[object, ...], TlsInfo] = {}
_TLS_FACTS_MAX = 4096


def _verified_chain(ssl_object: Any) -> list[Any]:
    # get_verified_chain is public from Python 3.13; 3.11 and 3.12 have it on the private object.
    chain_getter = getattr(ssl_object, "get_verified_chain", None) or getattr(
        getattr(ssl_object, "_sslobj", None), "get_verified_chain", None
    )
    return list(chain_getter() or ()) if chain_getter is not None else []


def _earliest_expiry(ssl_object: Any, chain: list[Any]) -> float | None:
    expiries: list[float] = []
    for cert in chain:
        info = cert.get_info() if hasattr(cert, "get_info") else None
        if info and info.get("notAfter"):
            expiries.append(float(ssl.cert_time_to_seconds(info["notAfter"])))
    if not expiries:
        peer = ssl_object.getpeercert()
        if peer and peer.get("notAfter"):
            expiries.append(float(ssl.cert_time_to_seconds(peer["notAfter"])))
    return min(expiries) if expiries else None
