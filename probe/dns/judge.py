"""Judge a target's DNS answers through every resolver against the `control: true` resolvers.

Six methods, each leaving evidence an operator can paste into a report:
reply counting (two differing replies to one UDP query), canaries (a reply from a host that
runs no DNS server), known-forged answers (bogons, the documented GFW set) where the control
differs, the control comparison with a TLS check of the answered address, failure classes
against the control (and resolvers that rewrite NXDOMAIN), and DNSSEC validation.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import dns.rdatatype

from probe import debuglog
from probe.config import Resolver, ResolverType, Target
from probe.dns import checks as dns_checks
from probe.dns import lookup as probe_dns
from probe.dns.checks import Canary, described, listed
from probe.dns.context import DnsContext
from probe.dns.dnssec import Bogus, Unsigned, Unverifiable, Validator
from probe.dns.lookup import Lookup, LookupFailure
from probe.dns.transport import Reply
from probe.dns.verdicts import trusted_answers
from probe.models import Deadline, DnsResult, Outcome

# Resolvers whose queries travel in clear text: what an on-path injector can answer.
PLAIN = frozenset({ResolverType.UDP, ResolverType.TCP, ResolverType.SYSTEM})
# The worse verdict wins: forged answers, then unusable ones, then failures.
_RANK = (Outcome.DNS_INJECTION, Outcome.DNS_MISMATCH, Outcome.DNS_NXDOMAIN, Outcome.DNS_SERVFAIL,
         Outcome.DNS_TIMEOUT, Outcome.ERROR, Outcome.OK)


async def check_target(target: Target, deadline: Deadline, ctx: DnsContext) -> tuple[DnsResult, ...]:
    """Judge `target`'s answers through every resolver of the target; one DnsResult per resolver, in config order."""
    if not target.needs_dns:
        return ()
    if debuglog.current() is None:
        return await _check_target(target, deadline, ctx)
    with debuglog.section(f"DNS check of {target.host}"):
        return await _check_target(target, deadline, ctx)


async def _check_target(target: Target, deadline: Deadline, ctx: DnsContext) -> tuple[DnsResult, ...]:
    config = ctx.config
    resolvers = [r for r in config.resolvers if r.name in target.resolvers]
    if "system" in target.resolvers and all(r.name != "system" for r in resolvers):
        resolvers.insert(0, config.resolver("system"))
    # The TLS checks and the DNSSEC chain come after the answers: keep time for them.
    later = any(r.control for r in resolvers) or target.dnssec
    ask_by = Deadline(deadline.at - (min(ctx.tls_check_timeout, deadline.remaining() / 3) if later else 0.0))
    plain = [r for r in resolvers if r.type in PLAIN and not r.control]
    seen, canaries, rewrites = await asyncio.gather(
        asyncio.gather(*(_look(r, target, ask_by, ctx) for r in resolvers)),
        dns_checks.ask_canaries(target, ask_by, ctx) if config.canaries and plain else dns_checks.no_canaries(),
        asyncio.gather(*(dns_checks.nx_rewrite(r, ask_by, ctx) for r in resolvers)),
    )
    judge = _Judge(target, ctx, deadline, list(seen), canaries)
    pairs = list(zip(seen, rewrites, strict=True))
    try:
        # Controls first: their DNSSEC-validated answers are what an unsigned answer is held against.
        first = await asyncio.gather(*(judge.verdict(s, rw) for s, rw in pairs if s.resolver.control))
        rest = await asyncio.gather(*(judge.verdict(s, rw) for s, rw in pairs if not s.resolver.control))
    finally:
        judge.close()
    by_name = {d.resolver: d for d in (*first, *rest)}
    results = tuple(by_name[r.name] for r in resolvers)
    if (log := debuglog.current()) is not None:
        _log_verdicts(log, judge, list(seen), results)
    ctx.verdicts.remember(target.host, results, 2 * target.interval + target.timeout, trusted_answers(results, config))
    return results


def _log_verdicts(log: debuglog.DebugLog, judge: _Judge, seen: list[_Seen], results: tuple[DnsResult, ...]) -> None:
    """Record each resolver's verdict and, reply by reply, which answers the controls back and which are forged."""
    trusted = judge.trusted
    log.add(f"control answers: {listed(sorted(trusted)) if trusted else 'none'}")
    for s, result in zip(seen, results, strict=True):
        log.add(f"{s.label}: verdict {result.outcome}, consistent={result.consistent}, {result.replies} replies")
        for reply in s.received:
            log.add(f"  {reply.qtype} reply {described(reply)}: {_judged(reply, trusted, result)}")
        for line in result.evidence:
            log.add(f"  evidence: {line}")
    for canary in judge.canaries:
        for reply in canary.replies:
            log.add(f"canary {canary.address}: {reply.qtype} reply {described(reply)}: "
                    "INJECTED (no DNS server runs there)")


def _judged(reply: Reply, trusted: frozenset[str], result: DnsResult) -> str:
    if reply.misfits:
        return "FORGED (carries records of the other type)"
    if not reply.answers:
        return "no addresses"
    if not trusted:
        return "no control answer to compare it with"
    if set(reply.answers) & trusted:
        return "genuine (shares the control's answers)"
    if result.outcome in (Outcome.DNS_INJECTION, Outcome.DNS_MISMATCH):
        return f"FORGED: counted as {result.outcome} (not the control's answers)"
    return "not the control's answers (cleared: see the evidence)"


# ---- gathering ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Seen:
    resolver: Resolver
    label: str  # `name (address:port/type)`
    found: Lookup | None = None
    failure: LookupFailure | None = None
    failed_after: float | None = None  # seconds until the failure was known

    @property
    def received(self) -> tuple[Reply, ...]:
        return self.found.received if self.found else self.failure.received if self.failure else ()


async def _look(resolver: Resolver, target: Target, deadline: Deadline, ctx: DnsContext) -> _Seen:
    label = probe_dns.server_label(resolver, ctx)
    started = asyncio.get_running_loop().time()
    try:
        found = await probe_dns.lookup(
            resolver, target.host, deadline, ctx, reply_window=target.dns_reply_window, dnssec=target.dnssec
        )
    except LookupFailure as f:
        return _Seen(resolver, label, failure=f, failed_after=asyncio.get_running_loop().time() - started)
    return _Seen(resolver, found.server or label, found=found)


# ---- judging -----------------------------------------------------------------------------


@dataclass
class _Verdict:
    outcome: Outcome = Outcome.OK
    consistent: bool | None = None
    evidence: list[str] = field(default_factory=list)

    def flag(self, outcome: Outcome, line: str) -> None:
        self.evidence.append(line)
        if _RANK.index(outcome) < _RANK.index(self.outcome):
            self.outcome = outcome

    def note(self, line: str) -> None:
        self.evidence.append(line)


class _Judge:
    def __init__(self, target: Target, ctx: DnsContext, deadline: Deadline, seen: list[_Seen],
                 canaries: tuple[Canary, ...]) -> None:
        self.target, self.ctx, self.deadline = target, ctx, deadline
        self.controls = [s for s in seen if s.resolver.control]
        self.answered = [s for s in self.controls if s.found is not None]
        self.trusted = frozenset(a for s in self.answered if s.found for a in s.found.answers)
        self.control_nxdomain = [s for s in self.controls if s.failure and s.failure.outcome is Outcome.DNS_NXDOMAIN]
        self.canaries = canaries
        self._tls: dict[str, asyncio.Task[dns_checks.TlsCheck]] = {}
        self._validated: dict[str, frozenset[str]] = {}  # control name -> its DNSSEC-validated answers

    def said(self) -> str:
        """Return what the controls answered: `198.51.100.20, 198.51.100.21 (cf-doh)`."""
        return "; ".join(f"{listed(s.found.answers)} ({s.resolver.name})" for s in self.answered if s.found)

    async def verdict(self, s: _Seen, rewrites: str | None) -> DnsResult:
        v = _Verdict()
        if s.found is not None:
            v.evidence.extend(s.found.evidence)
        else:
            assert s.failure is not None
            v.flag(s.failure.outcome, str(s.failure))
        self._count_replies(s, v)
        if s.found is not None:
            authentic = await self._dnssec(s, s.found, v) if self.target.dnssec else False
            await self._judge_answers(s, s.found, v, rewrites, authentic)
        else:
            self._judge_failure(s, v)
        if rewrites is not None:
            v.note(rewrites)
        found, failure = s.found, s.failure
        return DnsResult(
            resolver=s.resolver.name,
            outcome=v.outcome,
            answers=found.answers if found else (),
            replies=found.replies if found else failure.replies if failure else 0,
            consistent=v.consistent,
            duration_seconds=found.duration_seconds if found else s.failed_after,
            evidence=tuple(dict.fromkeys(v.evidence)),
            error=failure.error if failure else None,
        )

    # 1. reply counting
    def _count_replies(self, s: _Seen, v: _Verdict) -> None:
        by_query: dict[tuple[str, str, str], list[Reply]] = {}
        for reply in s.received:
            if not reply.truncated:  # a TC reply says nothing yet; the TCP retry completes it
                by_query.setdefault(reply.query, []).append(reply)
        for reply in s.received:
            if reply.misfits:
                other = "AAAA" if reply.qtype == "A" else "A"
                v.consistent = False
                v.flag(Outcome.DNS_INJECTION,
                       f"{s.label}: the {reply.qtype} reply for {self.target.host} carries {other} records "
                       f"{listed(reply.misfits)} (from {reply.source} after {reply.after * 1000:.0f} ms): no DNS "
                       f"server answers that way, a known injector's mistake")
        for (_, qtype, _), replies in by_query.items():
            if len({r.says for r in replies}) > 1:
                window = self.target.dns_reply_window * 1000
                v.consistent = False
                v.flag(Outcome.DNS_INJECTION,
                       f"{s.label}: {len(replies)} differing replies to one {qtype} query for {self.target.host} "
                       f"within {window:.0f} ms (the first is what a stub resolver uses): "
                       + "; ".join(described(r) for r in replies))

    async def _judge_answers(
        self, s: _Seen, found: Lookup, v: _Verdict, rewrites: str | None, authentic: bool
    ) -> None:
        host = self.target.host
        if s.resolver.control:
            v.consistent = v.consistent if v.outcome is not Outcome.OK else True
            return
        shared = bool(set(found.answers) & self.trusted)
        if s.resolver.type is ResolverType.SYSTEM and not found.received:
            v.consistent = shared if self.answered else None  # pinned in the hosts file: local config, no DNS
            return
        # 3. known-forged answers, only where the control answer differs
        for address in found.answers:
            why = self.ctx.known_forged.why(address)
            if why is None or address in self.trusted:
                continue
            if self.answered or self.control_nxdomain:
                control = self.said() or f"NXDOMAIN ({', '.join(c.resolver.name for c in self.control_nxdomain)})"
                v.consistent = False
                v.flag(Outcome.DNS_INJECTION,
                       f"{s.label}: answer {address} for {host} is {why}, while the control answered {control}")
            else:
                v.note(f"{s.label}: answer {address} for {host} is {why}; no control answer to compare it with")
        # 2. canaries: the path answers queries for this name that no server should answer
        if s.resolver.type in PLAIN:
            for canary in self.canaries:
                if canary.problem:
                    v.note(canary.problem)
                elif canary.control:
                    v.note(self._misconfigured(canary))
                elif canary.replies:
                    line = self._canary_line(canary)
                    if shared:
                        v.note(f"{line}; the answers of {s.resolver.name} agree with the control all the same")
                    else:
                        v.consistent = False
                        unchecked = "" if self.answered else " (no control answer to clear them)"
                        v.flag(Outcome.DNS_INJECTION, f"{line}; the answers of {s.resolver.name} "
                               f"({listed(found.answers)}) are not the control's{unchecked}")
        if v.outcome is not Outcome.OK:
            return
        # 4. control comparison, with a TLS check of an answer the controls do not give
        if self.answered:
            if shared:
                v.consistent = True
                return
            v.note(f"{s.label}: answers {listed(found.answers)} for {host} share nothing with the control answers "
                   f"{self.said()}")
            if authentic:  # signed by the zone: a GeoDNS answer, whatever the controls got
                v.consistent = True
                return
        elif self.control_nxdomain:
            names = ", ".join(c.resolver.name for c in self.control_nxdomain)
            if rewrites is not None:
                v.consistent = False
                v.flag(Outcome.DNS_NXDOMAIN, f"{s.label}: answered {listed(found.answers)} for {host}, which does "
                       f"not exist (the control {names} says NXDOMAIN): this resolver rewrites NXDOMAIN")
                return
            v.note(f"{s.label}: answered {listed(found.answers)} for {host}, while the control {names} says NXDOMAIN")
        else:
            return  # no control answer: consistency unknown
        check = await self._tls_check(found.answers[0])
        if check.own:  # our loop stalled: the check proves nothing either way, and never blames the path
            v.flag(Outcome.ERROR, f"{s.label}: TLS check of {check.evidence}")
        elif check.valid:
            v.consistent = True
            v.note(f"{s.label}: TLS check of {check.evidence}: a CDN or GeoDNS answer, not a forged one")
        elif check.reached or self.target.uses_tls:
            v.consistent = False
            v.flag(Outcome.DNS_MISMATCH, f"{s.label}: TLS check of {check.evidence}")
        else:  # a target without TLS need not serve TLS on 443 at its genuine addresses either
            v.note(f"{s.label}: TLS check of {check.evidence}: inconclusive for a target without TLS")

    # 5. failure classes against the control
    def _judge_failure(self, s: _Seen, v: _Verdict) -> None:
        assert s.failure is not None
        if s.resolver.control:
            return
        if s.resolver.type in PLAIN:  # no answer to taint, but the path's behaviour is worth knowing
            for canary in self.canaries:
                if canary.control or canary.replies:
                    v.note(self._misconfigured(canary) if canary.control else self._canary_line(canary))
        if s.failure.outcome is Outcome.ERROR:
            return  # the monitor's own failure (a local fault, its loop's stall) says nothing of the path
        if self.answered:
            v.consistent = False
            v.note(f"{s.label}: {s.failure.outcome} for {self.target.host}, while the control answered {self.said()}")
        elif self.controls and all(c.failure and c.failure.outcome is s.failure.outcome for c in self.controls):
            v.consistent = True
            v.note(f"the controls fail the same way: {'; '.join(str(c.failure) for c in self.controls)}")

    # 6. DNSSEC
    async def _dnssec(self, s: _Seen, found: Lookup, v: _Verdict) -> bool:
        """Validate each address answer; return whether every one validated."""
        validator = Validator(s.resolver, self.deadline, self.ctx)
        authentic = False
        for message in found.messages:
            if not any(r.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) for r in message.answer):
                continue  # NODATA: denial of existence is not validated
            qtype = dns.rdatatype.to_text(message.question[0].rdtype)
            what = f"{s.label}: DNSSEC: the {qtype} answer for {self.target.host}"
            try:
                signed = await validator.validate(message)
            except Unverifiable as e:
                v.note(f"{what} could not be validated: {e}")
                return False
            except Unsigned as e:
                validated = set().union(*self._validated.values()) if self._validated else set()
                if validated and set(found.answers) <= validated:
                    v.note(f"{what} is unsigned ({e}): the resolver strips DNSSEC records, but its answers "
                           f"are the control's validated ones")
                else:
                    v.consistent = False
                    v.flag(Outcome.DNS_INJECTION, f"{what} is unsigned ({e}), in a zone that is signed")
                return False
            except Bogus as e:
                v.consistent = False
                v.flag(Outcome.DNS_INJECTION, f"{what} does not validate: {e}")
                return False
            else:
                v.note(f"{what} validates: {signed}, chained to the trust anchors")
                authentic = True
        if authentic and s.resolver.control:
            self._validated[s.resolver.name] = frozenset(found.answers)
        return authentic

    # ---- helpers ----

    def _canary_line(self, canary: Canary) -> str:
        port = self.ctx.canary_port
        return (f"canary {canary.address}:{port} runs no DNS server, yet the A query for {self.target.host} sent "
                f"there was answered: " + "; ".join(described(r) for r in canary.replies) + ": injected on the path")

    def _misconfigured(self, canary: Canary) -> str:
        return (f"canary {canary.address}:{self.ctx.canary_port} answered the control name {self.ctx.control_name} "
                f"too ({'; '.join(described(r) for r in canary.control)}): it is misconfigured (something there "
                f"answers DNS), so its replies are not counted as injection")

    async def _tls_check(self, address: str) -> dns_checks.TlsCheck:
        """Check each address once, however many resolvers gave it."""
        if address not in self._tls:
            check = dns_checks.tls_check(address, self.target, self.deadline, self.ctx)
            self._tls[address] = asyncio.ensure_future(check)
        return await asyncio.shield(self._tls[address])

    def close(self) -> None:
        """Cancel TLS checks still running (the check itself was cancelled)."""
        for task in self._tls.values():
            task.cancel()
