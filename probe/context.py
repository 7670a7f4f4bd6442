"""What a prober runs with besides (target, route, deadline): one per running config."""

from __future__ import annotations

from dataclasses import dataclass, field

from probe.controls import ControlState
from probe.dns.context import DnsContext


@dataclass
class ProbeContext(DnsContext):
    """The DNS context (lookups, verdicts, TLS contexts) the probers resolve and handshake with.

    Probers take this type, DNS code takes DnsContext: the DNS layer never sees what is
    only the probers' business, and tests build either with their own files and servers.
    """

    # When to send control handshakes, and recent TLS-stage failures; `probe run` passes one
    # with history that outlives reloads, one-shot commands the default (no history).
    controls: ControlState = field(default_factory=ControlState)
