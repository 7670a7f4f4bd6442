"""The questions the DNS check asks besides the lookups: canaries, the NXDOMAIN-rewrite probe, the TLS check."""

from __future__ import annotations

import asyncio
import os
import secrets
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

import dns.rdatatype

from probe import loop
from probe.classify import classify, describe
from probe.config import DIRECT_ROUTE, Resolver, Target
from probe.dns import lookup as probe_dns
from probe.dns.context import DnsContext
from probe.dns.lookup import LookupFailure
from probe.dns.transport import QueryFailed, Reply, count_replies
from probe.models import Deadline, Outcome
from probe.net import dial
from probe.net.tls import start_tls
from probe.trace import Trace

NX_REWRITE_RECHECK = 600.0  # seconds: whether a resolver rewrites NXDOMAIN is a property of the resolver


@dataclass(frozen=True, slots=True)
class Canary:
    address: str
    replies: tuple[Reply, ...]  # to the target name
    control: tuple[Reply, ...]  # to the control name: must be empty
    problem: str | None = None  # the canary could not be asked at all (no route to it, a local fault)


async def ask_canaries(target: Target, deadline: Deadline, ctx: DnsContext) -> tuple[Canary, ...]:
    """Send the target name and the control name to every canary; return what each got back."""
    wait = deadline.earlier(ctx.canary_wait)

    async def one(address: str) -> Canary:
        try:
            asked, control = await asyncio.gather(
                count_replies(address, target.host, dns.rdatatype.A, wait, port=ctx.canary_port,
                              window=target.dns_reply_window),
                count_replies(address, ctx.control_name, dns.rdatatype.A, wait, port=ctx.canary_port,
                              window=target.dns_reply_window),
            )
        except OSError as e:  # e.g. an IPv6 canary from a host without IPv6
            return Canary(address, (), (), f"canary {address}:{ctx.canary_port} could not be asked ({describe(e)})")
        except QueryFailed as e:  # not a name DNS can carry
            return Canary(address, (), (), f"canary {address}:{ctx.canary_port} could not be asked ({e.what})")
        return Canary(address, asked, control)

    return tuple(await asyncio.gather(*(one(a) for a in ctx.config.canaries)))


async def no_canaries() -> tuple[Canary, ...]:
    """Return no canary results (a target without plain-text resolvers asks none)."""
    return ()


async def nx_rewrite(resolver: Resolver, deadline: Deadline, ctx: DnsContext) -> str | None:
    """Return evidence that `resolver` answers a random name that cannot exist, or None (cached per resolver)."""
    if resolver.control:
        return None
    now = asyncio.get_running_loop().time()
    cached = ctx.nx_rewrites.get(resolver.name)
    if cached is not None and cached[0] > now:
        return cached[1]
    name = f"probe-nx-{secrets.token_hex(6)}.{ctx.nxdomain_zone.rstrip('.')}"
    try:  # absolute: the system resolver's search list must not add suffixes to it
        found = await probe_dns.lookup(resolver, name + ".", deadline, ctx)
    except LookupFailure as f:
        if f.outcome in (Outcome.DNS_TIMEOUT, Outcome.ERROR):
            return None  # nothing learnt: ask again next time
        evidence = None
    else:
        evidence = (f"{found.server}: rewrites NXDOMAIN: the random name {name} answered {listed(found.answers)}; "
                    f"its answers for names that do not exist are its own, not the target's")
    ctx.nx_rewrites[resolver.name] = (now + NX_REWRITE_RECHECK, evidence)
    return evidence


@dataclass(frozen=True, slots=True)
class TlsCheck:
    """What the TLS check of one answered address found."""

    valid: bool  # the handshake completed with a certificate valid for the target's name
    reached: bool  # a TLS server answered at all (a certificate was presented, valid or not)
    evidence: str  # `127.0.0.4:443 with SNI x: certificate rejected (...)`
    own: bool = False  # it timed out while the monitor's loop stalled: the monitor's failure, not the address's


async def tls_check(address: str, target: Target, deadline: Deadline, ctx: DnsContext) -> TlsCheck:
    """Connect to `address` with the target's SNI (port 443 for targets without TLS) and verify the certificate.

    The connection and handshake are the probes' own (probe.net), and what stops them is read
    by the one classification table.
    """
    port = target.port if target.uses_tls else 443
    trace = Trace()
    peer = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    what = f"{peer} with SNI {target.sni}"
    timeout = min(ctx.tls_check_timeout, deadline.remaining())
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            conn = await dial.connect(address, port, DIRECT_ROUTE, trace)
            try:
                await start_tls(conn, ctx.tls.verifying(target.ca_file), target.sni, trace)
            finally:
                dial.close(conn)
    except (OSError, EOFError, ssl.SSLError) as e:
        if isinstance(e, TimeoutError) and (why := loop.watch.blame(started, time.perf_counter(), timeout,
                                                                    "this TLS check")) is not None:
            return TlsCheck(False, False, f"{what}: no completed TLS handshake: {why}", own=True)
        return _failed(what, classify(trace.stage, e), e, timeout)
    return TlsCheck(True, True, f"{what}: certificate valid for {target.sni}")


def _failed(what: str, outcome: Outcome, e: BaseException, timeout: float) -> TlsCheck:
    if outcome is Outcome.TLS_CERT_INVALID:
        reason = getattr(e, "verify_message", None) or e
        return TlsCheck(False, True, f"{what}: certificate rejected ({reason})")
    if isinstance(e, TimeoutError):
        return TlsCheck(False, False, f"{what}: no completed TLS handshake within {timeout:.1f} s")
    if outcome in (Outcome.TLS_RESET, Outcome.TLS_TIMEOUT):
        reason = getattr(e, "reason", None) or describe(e)
        return TlsCheck(False, False, f"{what}: TLS handshake failed ({reason})")
    code = e.errno if isinstance(e, OSError) else None
    return TlsCheck(False, False, f"{what}: unreachable ({os.strerror(code) if code else describe(e)})")


def listed(addresses: Sequence[str]) -> str:
    """Return `a, b` (or `nothing`) for evidence."""
    return ", ".join(addresses) if addresses else "nothing"


def described(r: Reply) -> str:
    """Return `203.0.113.66 (TTL 60) from 127.0.0.1 after 1 ms`."""
    ttl = f" (TTL {r.ttl})" if r.ttl is not None else ""
    return f"{r.shows()}{ttl} from {r.source} after {r.after * 1000:.0f} ms"
