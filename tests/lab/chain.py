"""The localisation lab: a chain of ordinary Linux routers between the vantage and the hosts abroad.

    plcv-RUN 192.0.2.1 -- plc1-RUN -- plc2-RUN -- ... -- plc6-RUN -- plca-RUN 198.51.100.x
    (probe runs here)     hop 1        hop 2               hop 6       (servers abroad)

Every router forwards (ip_forward=1), so each one takes one off a packet's TTL and answers an
expired one with ICMP time-exceeded from the address that faces the vantage: hop k answers from
192.0.2.(4k-2). ICMP rate limits are off in the routers, so the answers do not depend on how
fast the steps come. A censor is an NFQUEUE program in one router's PREROUTING hook: it sees
a packet that reaches that hop, even one whose TTL runs out there, as an on-path tap would.

Names unique per run (tests.lab.net.RUN_ID), documentation addresses only; `Chain.teardown()`
and `cleanup_leftovers()` delete this run's namespaces and those of dead runs.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.lab.net import (
    NETNS_ETC,
    RUN_ID,
    LabError,
    LabUnavailable,
    Process,
    remove_namespaces,
    run_probe,
    sh,
    start,
)

ROUTERS = 6
VANTAGE = f"plcv-{RUN_ID}"
ABROAD = f"plca-{RUN_ID}"
ROUTER_NS = tuple(f"plc{k}-{RUN_ID}" for k in range(1, ROUTERS + 1))
NAMESPACES = (VANTAGE, *ROUTER_NS, ABROAD)
_CHAIN_NAME = re.compile(r"^plc[va0-9]-(\d+)$")
VANTAGE_IP = "192.0.2.1"
STORAGE, TRANSPARENT, DOWN, RESIDUAL = "198.51.100.20", "198.51.100.21", "198.51.100.30", "198.51.100.22"
RESOLVER, CANARY = "198.51.100.53", "203.0.113.53"
ABROAD_HOSTS = (STORAGE, TRANSPARENT, DOWN, RESIDUAL, RESOLVER)


def router_address(hop: int) -> str:
    """Return the address router `hop` answers time-exceeded from (its side facing the vantage)."""
    return f"192.0.2.{4 * (hop - 1) + 2}"


def router_ns(hop: int) -> str:
    """Return the namespace of the router at `hop`."""
    return ROUTER_NS[hop - 1]


def cleanup_leftovers() -> None:
    """Delete this run's chain namespaces and those of runs whose process is gone."""
    remove_namespaces(NAMESPACES, _CHAIN_NAME)


@dataclass
class Chain:
    """The namespaces, the servers abroad, and the censors switched on by the tests."""

    directory: Path
    processes: list[Process] = field(default_factory=list)
    censors: list[tuple[str, Process]] = field(default_factory=list)  # (router namespace, program)
    _next_queue: int = 1

    def build(self) -> None:
        """Create the chain: links, addresses, routes, forwarding, the routers' empty censor chains."""
        cleanup_leftovers()
        for ns in NAMESPACES:
            try:
                sh("ip", "netns", "add", ns)
            except LabError as e:
                raise LabUnavailable(f"cannot create network namespaces: {e}") from None
            sh("ip", "link", "set", "lo", "up", ns=ns)
        nodes = (VANTAGE, *ROUTER_NS, ABROAD)
        for i in range(len(nodes) - 1):  # link i joins node i ("pcdn") and node i + 1 ("pcup")
            sh("ip", "link", "add", "pcdn", "netns", nodes[i], "type", "veth", "peer", "name", "pcup", "netns",
               nodes[i + 1])
            if i < ROUTERS:
                sh("ip", "addr", "add", f"192.0.2.{4 * i + 1}/30", "dev", "pcdn", ns=nodes[i])
                sh("ip", "addr", "add", f"192.0.2.{4 * i + 2}/30", "dev", "pcup", ns=nodes[i + 1])
            else:
                sh("ip", "addr", "add", "198.51.100.1/24", "dev", "pcdn", ns=nodes[i])
                for host in ABROAD_HOSTS:
                    sh("ip", "addr", "add", f"{host}/24", "dev", "pcup", ns=nodes[i + 1])
            for ns, dev in ((nodes[i], "pcdn"), (nodes[i + 1], "pcup")):
                sh("ip", "link", "set", dev, "up", ns=ns)
                # Segmentation offloads would hand NFQUEUE segments larger than the wire's.
                sh("ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off", ns=ns, check=False)
        sh("ip", "route", "add", "default", "via", router_address(1), ns=VANTAGE)
        for hop, ns in enumerate(ROUTER_NS, start=1):
            if hop < ROUTERS:
                sh("ip", "route", "add", "default", "via", router_address(hop + 1), ns=ns)
            else:  # the canary's range goes abroad, where nothing owns it
                sh("ip", "route", "add", "203.0.113.0/24", "via", STORAGE, ns=ns)
            if hop > 1:
                sh("ip", "route", "add", "192.0.2.0/24", "via", f"192.0.2.{4 * (hop - 1) + 1}", ns=ns)
            # Forwarding on; ICMP rate limits off (the default answers one error per second per peer).
            sh("sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward; echo 0 > /proc/sys/net/ipv4/icmp_ratelimit; "
               "echo 100000 > /proc/sys/net/ipv4/icmp_msgs_per_sec; echo 100000 > /proc/sys/net/ipv4/icmp_msgs_burst",
               ns=ns)
            sh("iptables", "-w", "-t", "mangle", "-N", "PLCENSOR", ns=ns)
            sh("iptables", "-w", "-t", "mangle", "-A", "PREROUTING", "-j", "PLCENSOR", ns=ns)
        sh("ip", "route", "add", "default", "via", "198.51.100.1", ns=ABROAD)
        (NETNS_ETC / VANTAGE).mkdir(parents=True, exist_ok=True)
        (NETNS_ETC / VANTAGE / "resolv.conf").write_text(f"nameserver {RESOLVER}\noptions timeout:1 attempts:1\n")

    def censor(self, hop: int, *args: str, match: Sequence[str]) -> Process:
        """Start `python -m tests.lab.censor ARGS` at router `hop`; send it the packets matching `match`."""
        return self.censor_program(hop, "tests.lab.censor", *args, match=match)

    def censor_program(self, hop: int, module: str, *args: str, match: Sequence[str]) -> Process:
        """Start an NFQUEUE program (`python -m MODULE ARGS`) at router `hop` for the packets matching `match`."""
        num = self._next_queue
        self._next_queue += 1
        ns = router_ns(hop)
        argv = [sys.executable, "-m", module, *args[:1], "--queue", str(num), "--max-seconds", "120", *args[1:]]
        proc = start(ns, f"censor-{num}", argv, self.directory)
        self.censors.append((ns, proc))
        sh("iptables", "-w", "-t", "mangle", "-A", "PLCENSOR", *match, "-j", "NFQUEUE", "--queue-num", str(num),
           ns=ns)
        return proc

    def calm(self) -> None:
        """Switch every censor off."""
        for ns in ROUTER_NS:
            sh("iptables", "-w", "-t", "mangle", "-F", "PLCENSOR", ns=ns, check=False)
        for _, proc in self.censors:
            proc.stop()
        self.censors.clear()

    def report(self) -> str:
        """Return what the censors logged (for failure messages)."""
        return "".join(f"--- {p.name} in {ns}:\n{p.output()}" for ns, p in self.censors)

    def start(self, ns: str, name: str, argv: Sequence[str], *, wait_ready: bool = True) -> Process:
        """Start a long-lived program (stopped at teardown)."""
        proc = start(ns, name, argv, self.directory, wait_ready=wait_ready)
        self.processes.append(proc)
        return proc

    def teardown(self) -> None:
        """Stop everything and delete the namespaces."""
        with contextlib.suppress(Exception):
            self.calm()
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        cleanup_leftovers()

    def probe(self, config: dict[str, Any], *args: str) -> dict[str, Any]:
        """Run `probe once --json -c CONFIG ARGS` inside the vantage; return its JSON output."""
        return run_probe(VANTAGE, self.directory, config, *args, timeout=90)


@contextlib.contextmanager
def chain_network(directory: Path) -> Iterator[Chain]:
    """Build the chain; tear it down on the way out, whatever happened."""
    chain = Chain(directory)
    try:
        chain.build()
        yield chain
    finally:
        chain.teardown()
