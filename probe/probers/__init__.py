"""One prober per protocol, all with one signature, collected in one registry."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from probe.config import Route, Target, TargetKind
from probe.context import ProbeContext
from probe.models import Deadline, ProbeResult
from probe.probers import http, http3, tcp, tls

Prober = Callable[[Target, Route, Deadline, ProbeContext], Awaitable[ProbeResult]]

PROBERS: dict[TargetKind, Prober] = {
    TargetKind.TCP: tcp.probe,
    TargetKind.TLS: tls.probe,
    TargetKind.HTTP: http.probe,
    TargetKind.HTTP3: http3.probe,
}
