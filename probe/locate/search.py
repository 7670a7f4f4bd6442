"""The TTL series: repeat the trigger with IP TTL 1, 2, 3, ... and name the first hop that interferes.

A hop is stated only when the evidence proves it: the answer came at TTL n and not at n - 1,
the trigger at TTL n died before the destination (a router answered time-exceeded there, or
nothing said it arrived), the same packet without the trigger is not answered alike at TTL 1,
and the forged packet did not arrive with IP TTL 1 (an injector that sets its reply's TTL
from the probe's lets its answers to nearer TTLs die on the way back, so the first answer
shows up at about twice the censor's hop). Otherwise `hop` stays null and the evidence says why.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass

from probe.locate import fingerprint, ttl
from probe.locate.trigger import dns_reply_matches
from probe.models import Injector, Localisation

MAX_HOPS = 30
PACKET_CAP = 160  # packets one localisation may send, all steps and companions included
TIME_BUDGET = 15.0  # seconds one TTL series may take, whatever the path does
MIN_WINDOW, MAX_WINDOW = 0.25, 1.0  # how long a step waits for an answer
MIN_GRACE, MAX_GRACE = 0.15, 0.3  # how long it waits for a reset after its router's time-exceeded
_KINDS = {"reset": "rst", "closed": "fin", "answer": "data"}
_ANSWERED = {"rst": "reset", "fin": "close (FIN)", "data": "answer", "dns": "forged DNS answer"}
TRACE_PORT = 33434  # the companion datagrams go to 33434 + TTL, as traceroute's do


@dataclass(frozen=True, slots=True)
class TcpPlan:
    """A TCP trigger: connect to address:port, then send `payload` TTL-limited."""

    address: str
    port: int
    payload: bytes
    what: str  # "ClientHello (sni=x)" / "request (Host: x)": for the evidence
    control: bytes  # the same kind of packet without the trigger (another name)
    control_what: str
    source: str | None = None
    control_sni: str | None = None  # the target's control name: the residual check also sends its ClientHello


@dataclass(frozen=True, slots=True)
class DnsPlan:
    """A DNS trigger: the query, sent over UDP to `server`."""

    server: str
    port: int
    query: bytes
    query_id: int
    name: str
    canary: bool  # the server runs no DNS: every reply is forged
    source: str | None = None


def _window(rtt: float | None) -> float:
    return MAX_WINDOW if rtt is None else min(MAX_WINDOW, max(MIN_WINDOW, 4 * rtt + 0.05))


def _grace(rtt: float | None) -> float:
    return MIN_GRACE if rtt is None else min(MAX_GRACE, max(MIN_GRACE, 2 * rtt + 0.02))


class _Series:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.hops: list[str | None] = []
        self.packets = 0
        self.evidence: list[str] = []

    def over_budget(self, next_cost: int) -> str | None:
        if self.packets + next_cost > PACKET_CAP:
            return f"stopped at the packet cap ({self.packets} of {PACKET_CAP} packets sent)"
        if time.monotonic() - self.started > TIME_BUDGET:
            return f"stopped at the time budget ({TIME_BUDGET:g} s)"
        return None

    def result(self, hop: int | None, injector: Injector | None) -> Localisation:
        routers = sum(1 for h in self.hops if h is not None)
        self.evidence.append(f"{routers} of {len(self.hops)} hops answered time-exceeded; {self.packets} packets sent")
        return Localisation(
            hop=hop, hops=tuple(self.hops), injector=injector, evidence=tuple(self.evidence), packets=self.packets,
            duration_seconds=time.monotonic() - self.started, finished_at=time.time(),
        )


def _ttl_copy_line(n: int, arrived_ttl: int, kind: str) -> str:
    return (
        f"the forged {kind} at TTL {n} arrived with IP TTL {arrived_ttl}: the injector sets its reply's TTL from "
        f"the probe's, so its answers to lower TTLs died on the way back; the censor is between hop "
        f"{(n + 1) // 2} and hop {n}, no hop stated"
    )


async def locate_tcp(plan: TcpPlan) -> Localisation:
    """Run the TTL series for a TCP trigger."""
    series = _Series()
    capture, why_not = fingerprint.Capture.open(plan.address, plan.port, socket.IPPROTO_TCP)
    if why_not:
        series.evidence.append(why_not)
    rtt: float | None = None
    earlier: list[ttl.TcpStep] = []  # the steps that drew nothing: a slow injector may answer them late

    async def late_or_none(line: str) -> Localisation:
        # Before saying nothing acted: a slow injector's answer to an earlier step may have come since.
        if capture is not None and (late := await _late(capture, earlier, MAX_GRACE)) is not None:
            n, found = late
            series.hops = series.hops[:n]
            series.evidence.append(_late_line(n, found))
            return await _judge_tcp(series, plan, n, _ANSWERED[found.kind], found)
        series.evidence.append(line)
        return series.result(None, None)

    try:
        for n in range(1, MAX_HOPS + 1):
            if (stop := series.over_budget(8)) is not None:
                return await late_or_none(stop)
            step, companion = await asyncio.gather(
                ttl.tcp_step(plan.address, plan.port, n, plan.payload, _window(rtt), source=plan.source,
                             grace=_grace(rtt)),
                ttl.udp_step(plan.address, TRACE_PORT + n, n, b"", _window(rtt), source=plan.source),
            )
            series.packets += step.packets + companion.packets
            series.hops.append(companion.router)
            if companion.errors > 1:
                series.evidence.append(
                    f"TTL {n}: {companion.errors} ICMP errors for one datagram from {len(companion.sources)} "
                    f"addresses (a flood?); the first time-exceeded names the hop")
            if step.connect_seconds is not None:
                rtt = step.connect_seconds if rtt is None else min(rtt, step.connect_seconds)
            if step.event is ttl.TcpEvent.CONNECT_FAILED:
                series.evidence.append(
                    f"TTL {n}: a fresh connection to {plan.address}:{plan.port} failed ({step.error}): the address "
                    f"is blocked (residual blocking?); no hop stated")
                return series.result(None, None)
            if step.event is ttl.TcpEvent.SOCKET_ERROR:
                series.evidence.append(f"TTL {n}: the socket reported {step.error} after the trigger; no hop stated")
                return series.result(None, None)
            if step.event in (ttl.TcpEvent.EXPIRED, ttl.TcpEvent.SILENT):
                if companion.reached:
                    return await late_or_none(
                        f"TTL {n} reached {plan.address} (it answered the datagram) and drew no reset or forged "
                        f"answer ({plan.what}): nothing on the path acted on this trigger now")
                earlier.append(step)
                continue
            answered = {"reset": "reset", "closed": "close (FIN)", "answer": "answer"}[str(step.event)]
            if companion.reached or companion.router == plan.address:
                return await late_or_none(
                    f"TTL {n} reached {plan.address} itself and drew a {answered}: that may be the server's own; "
                    f"no interference before it, no hop stated ({plan.what})")
            if step.event is ttl.TcpEvent.ANSWER and companion.router is None:
                return await late_or_none(
                    f"TTL {n}: an answer came back and nothing says the trigger died on the way: it probably "
                    f"reached the server ({plan.what}); no hop stated")
            kind = _KINDS[str(step.event)]
            seen = capture.first(step.local_port, kind=kind) if capture else None
            found = fingerprint.injector(kind, step.after or 0.0, seen)
            if capture is not None and (late := await _late(capture, earlier, _grace(rtt))) is not None:
                n, found = late
                answered = _ANSWERED[found.kind]
                series.hops = series.hops[:n]
                series.evidence.append(_late_line(n, found))
            return await _judge_tcp(series, plan, n, answered, found)
        return await late_or_none(f"no reset or forged answer up to TTL {MAX_HOPS} ({plan.what})")
    finally:
        if capture:
            capture.close()


def _late_line(n: int, found: Injector) -> str:
    return (f"the {_ANSWERED[found.kind]} to TTL {n} arrived {found.after_seconds * 1000:.0f} ms after its trigger, "
            f"after that step had stopped waiting: a slow injector, found in the capture")


async def _late(
    capture: fingerprint.Capture, earlier: list[ttl.TcpStep] | list[ttl.UdpStep], settle: float
) -> tuple[int, Injector] | None:
    """Return (TTL, fingerprint) of the lowest earlier step that drew an answer after it stopped waiting."""
    await asyncio.sleep(settle)  # an injector that answered the later step late may still be answering this one
    for step in earlier:
        seen = capture.first(step.local_port)
        if seen is not None:
            kind = "dns" if seen.window is None else ("rst" if "R" in seen.flag_text else
                                                     "fin" if "F" in seen.flag_text else "data")
            return step.ttl, fingerprint.injector(kind, seen.at - step.sent_at, seen)
    return None


async def _judge_tcp(series: _Series, plan: TcpPlan, n: int, answered: str, found: Injector) -> Localisation:
    if found.ip_ttl == 1:
        series.evidence.append(_ttl_copy_line(n, 1, answered))
        return series.result(None, found)
    if n == 1:
        # TTL 1 reaches only the first router: a box there may answer every connection alike.
        control = await ttl.tcp_step(plan.address, plan.port, 1, plan.control, MAX_WINDOW, source=plan.source)
        series.packets += control.packets
        if control.event in (ttl.TcpEvent.RESET, ttl.TcpEvent.CLOSED, ttl.TcpEvent.ANSWER):
            series.evidence.append(
                f"{answered} at TTL 1 for the {plan.what} and also for a {plan.control_what}: a box at the first hop "
                f"answers every connection at any TTL (a transparent proxy or a local firewall); the censor's hop "
                f"cannot be told from here")
            return series.result(None, found)
    series.evidence.insert(0, f"{answered} at TTL {n}" + (f", none at TTL {n - 1}" if n > 1 else "") +
                           f" ({plan.what}), {found.after_seconds * 1000:.0f} ms after the trigger")
    return series.result(n, found)


async def locate_dns(plan: DnsPlan) -> Localisation:
    """Run the TTL series for a DNS query over UDP."""
    series = _Series()
    capture, why_not = fingerprint.Capture.open(plan.server, plan.port, socket.IPPROTO_UDP)
    if why_not:
        series.evidence.append(why_not.replace("no fingerprint", "no IP ID in the fingerprint"))
    earlier: list[ttl.UdpStep] = []
    try:
        for n in range(1, MAX_HOPS + 1):
            if (stop := series.over_budget(1)) is not None:
                series.evidence.append(stop)
                return series.result(None, None)
            step = await ttl.udp_step(plan.server, plan.port, n, plan.query, MAX_WINDOW, source=plan.source,
                                      want_reply=True, grace=MIN_GRACE)
            series.packets += step.packets
            series.hops.append(step.router)
            forged = [step.reply] if step.reply is not None and dns_reply_matches(step.reply, plan.query_id) else []
            if not forged:
                if step.reached:
                    series.evidence.append(f"TTL {n} reached {plan.server} without a forged answer for {plan.name}")
                    return series.result(None, None)
                earlier.append(step)
                continue
            if not plan.canary and step.router is None:
                series.evidence.append(
                    f"TTL {n}: {plan.server} answered for {plan.name} and no router said the query died on the way: "
                    f"the resolver's own answer; no forged answer before it, no hop stated")
                return series.result(None, None)
            seen = capture.first(step.local_port) if capture is not None else None
            found = Injector(
                kind="dns", after_seconds=step.reply_after or 0.0,
                ip_ttl=step.reply_ttl if step.reply_ttl is not None else (seen.ip_ttl if seen else None),
                ip_id=seen.ip_id if seen else None, payload_bytes=len(step.reply or b""),
            )
            if capture is not None and (late := await _late(capture, earlier, MIN_GRACE)) is not None:
                n, found = late
                series.hops = series.hops[:n]
                series.evidence.append(_late_line(n, found))
            if found.ip_ttl == 1:
                series.evidence.append(_ttl_copy_line(n, 1, "DNS answer"))
                return series.result(None, found)
            where = "a canary that runs no DNS server" if plan.canary else f"{plan.server}, never reached"
            series.evidence.insert(
                0, f"forged DNS answer at TTL {n}" + (f", none at TTL {n - 1}" if n > 1 else "")
                + f" (query for {plan.name} to {where})")
            if step.replies > 1:
                series.evidence.append(f"TTL {n}: {step.replies} replies to one query")
            return series.result(n, found)
        series.evidence.append(f"no forged answer up to TTL {MAX_HOPS} (query for {plan.name})")
        return series.result(None, None)
    finally:
        if capture:
            capture.close()
