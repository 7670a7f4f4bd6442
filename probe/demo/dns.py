"""The DNS of `probe demo`'s border: a UDP resolver path that answers, forges, fails or stays silent per name."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

import dns.exception
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

HOST = "127.0.0.1"

Answer = Callable[[dns.message.Message], Awaitable[list[bytes]]]


class DnsAnswer(StrEnum):
    """How the border's resolver path answers one name."""

    HONEST = "honest"
    INJECTED = "injected"  # a forged reply first, then the real one (an on-path injector)
    FORGED_ONLY = "forged only"  # the forged reply and nothing else
    NXDOMAIN = "NXDOMAIN"
    SERVFAIL = "SERVFAIL"
    SILENT = "silent"


def reply(query: dns.message.Message, address: str | None, code: int = dns.rcode.NOERROR) -> bytes:
    """Return the wire reply to `query`: `address` for an A question, nothing for other types."""
    response = dns.message.make_response(query)
    response.set_rcode(dns.rcode.Rcode(code))
    q = query.question[0]
    if address is not None and q.rdtype == dns.rdatatype.A:
        response.answer.append(dns.rrset.from_text_list(q.name, 60, dns.rdataclass.IN, "A", [address]))
    return response.to_wire()


def resolver(zone: Mapping[str, str], special: Mapping[str, DnsAnswer], forged: str) -> Answer:
    """Answer from `zone`; names in `special` as listed, forgeries pointing at `forged`."""
    async def answer(query: dns.message.Message) -> list[bytes]:
        name = query.question[0].name.to_text(omit_final_dot=True).lower()
        how = special.get(name, DnsAnswer.HONEST)
        if how is DnsAnswer.SILENT:
            return []
        if how is DnsAnswer.NXDOMAIN or (how is DnsAnswer.HONEST and name not in zone):
            return [reply(query, None, dns.rcode.NXDOMAIN)]
        if how is DnsAnswer.SERVFAIL:
            return [reply(query, None, dns.rcode.SERVFAIL)]
        if how is DnsAnswer.FORGED_ONLY:
            return [reply(query, forged)]
        honest = reply(query, zone.get(name))
        return [reply(query, forged), honest] if how is DnsAnswer.INJECTED else [honest]

    return answer


class _DnsProtocol(asyncio.DatagramProtocol):
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.transport: asyncio.BaseTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return
        if not query.question:
            return
        task = asyncio.create_task(self._send(query, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, query: dns.message.Message, addr: tuple[str, int]) -> None:
        for i, wire in enumerate(await self.answer(query)):
            if i:
                await asyncio.sleep(0.005)  # the genuine reply trails the injected one, as on the wire
            if self.transport is not None:
                self.transport.sendto(wire, addr)  # type: ignore[attr-defined]  # a datagram transport


@dataclass
class DnsServer:
    """A UDP DNS server on a free loopback port."""

    answer: Answer
    port: int = 0
    _transport: asyncio.DatagramTransport | None = None
    _protocol: _DnsProtocol | None = None

    async def start(self) -> None:
        """Bind and serve."""
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(lambda: _DnsProtocol(self.answer),
                                                                  local_addr=(HOST, 0))
        self._transport, self._protocol = transport, protocol
        self.port = transport.get_extra_info("sockname")[1]

    async def close(self) -> None:
        """Stop serving."""
        if self._transport is not None:
            self._transport.close()
        if self._protocol is not None:
            for task in list(self._protocol.tasks):
                task.cancel()
            await asyncio.gather(*self._protocol.tasks, return_exceptions=True)
