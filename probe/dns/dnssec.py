"""Validate a resolver's signed answers (DNSSEC) from the trust anchors down, with dnspython.

The chain is fetched through the same resolver that gave the answers: an injector can forge
DNSKEY and DS replies as well, but cannot make them chain up to the trust anchors.
Denial of existence (NSEC/NSEC3) is not validated: only answers that carry addresses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dns.dnssec
import dns.exception
import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from probe.config import Resolver
from probe.dns.context import DnsContext
from probe.dns.lookup import LookupFailure, ask
from probe.models import Deadline

MAX_CHAIN = 12  # zones between an answer and its trust anchor; deeper is treated as bogus
_DIGESTS = {1: "SHA1", 2: "SHA256", 4: "SHA384"}


class Bogus(Exception):
    """The answer does not validate; the message says which link of the chain broke."""


class Unsigned(Bogus):
    """The answer carries no signature at all."""


class Unverifiable(Bogus):
    """A link of the chain could not be fetched: nothing is known either way."""


@dataclass
class Validator:
    """Validate answers from one resolver; zone keys are fetched once per validator."""

    resolver: Resolver
    deadline: Deadline
    ctx: DnsContext
    _keys: dict[dns.name.Name, dns.rrset.RRset] = field(default_factory=dict)

    async def validate(self, message: dns.message.Message) -> str:
        """Check every record set in the answer section of `message`; return `signed by ZONE (key N)`.

        Raises Unsigned when the address records carry no RRSIG, Bogus when a signature or a link
        of the chain to the trust anchors fails.
        """
        signers: list[str] = []
        data = [r for r in message.answer if r.rdtype != dns.rdatatype.RRSIG]
        if not data:
            raise Unsigned("no records to validate")
        for rrset in data:
            sigs = _rrset(message, rrset.name, dns.rdatatype.RRSIG, rrset.rdtype)
            what = f"{rrset.name.to_text()} {dns.rdatatype.to_text(rrset.rdtype)}"
            if not sigs:
                raise Unsigned(f"{what} carries no RRSIG")
            signer = next(iter(sigs)).signer
            if not rrset.name.is_subdomain(signer):
                raise Bogus(f"{what} is signed by {signer}, which is not its zone or a parent of it")
            keys = await self.zone_keys(signer, 0)
            _check(rrset, sigs, signer, keys, what)
            signers.append(f"{signer.to_text()} (key {', '.join(str(s.key_tag) for s in sigs)})")
        return "signed by " + ", ".join(dict.fromkeys(signers))

    async def zone_keys(self, zone: dns.name.Name, depth: int) -> dns.rrset.RRset:
        """Return the DNSKEY set of `zone`, authenticated from a trust anchor or its parent's DS."""
        if zone in self._keys:
            return self._keys[zone]
        if depth > MAX_CHAIN:
            raise Bogus(f"chain longer than {MAX_CHAIN} zones at {zone}")
        reply = await self._ask(zone, dns.rdatatype.DNSKEY)
        keys = _rrset(reply, zone, dns.rdatatype.DNSKEY)
        sigs = _rrset(reply, zone, dns.rdatatype.RRSIG, dns.rdatatype.DNSKEY)
        if keys is None:
            raise Bogus(f"no DNSKEY for {zone}")
        anchors = [a for a in self.ctx.trust_anchors if a.name == zone]
        if anchors:
            ds_sets = [a for a in anchors if a.rdtype == dns.rdatatype.DS]
            anchored = {k for a in anchors if a.rdtype == dns.rdatatype.DNSKEY for k in a}
            source = "trust anchor"
        elif zone == dns.name.root:
            raise Bogus("no trust anchor for the root zone")
        else:
            ds_sets, anchored, source = [await self._ds(zone, depth)], set(), f"DS in {zone.parent()}"
        entry = [k for k in keys if k in anchored or any(_matches(zone, k, ds) for s in ds_sets for ds in s)]
        if not entry:
            raise Bogus(f"no DNSKEY of {zone} matches its {source}")
        if sigs is None:
            raise Bogus(f"the DNSKEY set of {zone} carries no RRSIG")
        _check(keys, sigs, zone, dns.rrset.from_rdata_list(zone, keys.ttl, entry), f"{zone} DNSKEY")
        self._keys[zone] = keys
        return keys

    async def _ds(self, zone: dns.name.Name, depth: int) -> dns.rrset.RRset:
        reply = await self._ask(zone, dns.rdatatype.DS)
        ds = _rrset(reply, zone, dns.rdatatype.DS)
        sigs = _rrset(reply, zone, dns.rdatatype.RRSIG, dns.rdatatype.DS)
        if ds is None:
            raise Bogus(f"no DS for {zone} in its parent (an unsigned delegation)")
        if sigs is None:
            raise Bogus(f"the DS set of {zone} carries no RRSIG")
        parent = next(iter(sigs)).signer
        if not zone.is_subdomain(parent) or zone == parent:
            raise Bogus(f"the DS set of {zone} is signed by {parent}, not by a parent zone")
        _check(ds, sigs, parent, await self.zone_keys(parent, depth + 1), f"{zone} DS")
        return ds

    async def _ask(self, name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        try:
            return await ask(self.resolver, name.to_text(), rdtype, self.deadline, self.ctx, dnssec=True)
        except LookupFailure as f:
            raise Unverifiable(f"cannot fetch {name} {dns.rdatatype.to_text(rdtype)}: {f}") from f


def _rrset(
    message: dns.message.Message,
    name: dns.name.Name,
    rdtype: dns.rdatatype.RdataType,
    covers: dns.rdatatype.RdataType = dns.rdatatype.NONE,
) -> dns.rrset.RRset | None:
    return message.get_rrset(message.answer, name, dns.rdataclass.IN, rdtype, covers)


def _matches(zone: dns.name.Name, key: object, ds: object) -> bool:
    digest = _DIGESTS.get(getattr(ds, "digest_type", 0))
    if digest is None or not isinstance(key, dns.rdata.Rdata):
        return False
    try:
        return bool(dns.dnssec.make_ds(zone, key, digest) == ds)
    except dns.exception.DNSException:
        return False


def _check(
    rrset: dns.rrset.RRset, sigs: dns.rrset.RRset, signer: dns.name.Name, keys: dns.rrset.RRset, what: str
) -> None:
    try:
        dns.dnssec.validate(rrset, sigs, {signer: keys})
    except dns.exception.DNSException as e:  # ValidationFailure, or an unsupported algorithm
        tags = ", ".join(str(s.key_tag) for s in sigs)
        raise Bogus(f"bad signature on {what} by {signer} (key {tags}): {e}") from e
