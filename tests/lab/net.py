"""The lab network: a vantage inside the border, a border router that interferes, hosts abroad.

    plv-RUN 192.0.2.10 --plv0/plbv-- plb-RUN --plba/pla0-- pla-RUN 198.51.100.x, 203.0.113.x  (RUN: the run's pid)
      (probe runs here)               (iptables, NFQUEUE,        (storage endpoints, resolver,
                                        tc: the interference)      DoH control, proxies)

Only documentation ranges, only namespaces named `pl…` (this lab's prefix); the root namespace's
addresses, routes and firewall are never touched. Every interference lives in the border's
own chains (PLLAB in filter FORWARD, PLNAT in nat PREROUTING) and in one tc class (reached
through mangle PLCLASS), so a test switches it on with a rule and `Border.reset()` switches
everything off again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# Names unique per run (the pid of the process that first imported this module; its children
# inherit it through the environment), so two runs on one machine never share a namespace.
RUN_ID = os.environ.setdefault("PROBE_LAB_RUN", str(os.getpid()))
VANTAGE, BORDER, ABROAD = f"plv-{RUN_ID}", f"plb-{RUN_ID}", f"pla-{RUN_ID}"
NAMESPACES = (VANTAGE, BORDER, ABROAD)
_LAB_NAME = re.compile(r"^pl[vba]-(\d+)$")
VANTAGE_IP, BORDER_INSIDE, BORDER_OUTSIDE = "192.0.2.10", "192.0.2.1", ("198.51.100.1", "203.0.113.1")
ROOT = Path(__file__).resolve().parents[2]
NETNS_ETC = Path("/etc/netns")  # `ip netns exec NS` bind-mounts /etc/netns/NS/* over /etc/*
START_TIMEOUT = 10.0
PROGRAMS = ("ip", "iptables", "tc", "ethtool", "chrt", "microsocks", "tinyproxy")


class LabError(RuntimeError):
    """A lab command failed; the message names the command and what it printed."""


class LabUnavailable(LabError):
    """The kernel lacks something the lab needs; the message says exactly what."""


# Every kernel feature the scenarios use, and an iptables/tc command that needs it.
KERNEL_FEATURES = {
    "NFQUEUE target (xt_NFQUEUE)": ["iptables", "-A", "PLPROBE", "-j", "NFQUEUE", "--queue-num", "9"],
    "string match (xt_string)": ["iptables", "-A", "PLPROBE", "-p", "tcp", "-m", "string", "--algo", "bm",
                                 "--string", "x", "-j", "DROP"],
    "statistic match (xt_statistic)": ["iptables", "-A", "PLPROBE", "-m", "statistic", "--mode", "random",
                                       "--probability", "0.5", "-j", "DROP"],
    "REJECT with tcp-reset (ipt_REJECT)": ["iptables", "-A", "PLPROBE", "-p", "tcp", "-j", "REJECT",
                                           "--reject-with", "tcp-reset"],
    "DNAT (nf_nat)": ["iptables", "-t", "nat", "-A", "PLPROBE", "-p", "tcp", "-j", "DNAT", "--to-destination",
                      "203.0.113.1:1"],
    "CLASSIFY target (xt_CLASSIFY)": ["iptables", "-t", "mangle", "-A", "PLPROBE", "-j", "CLASSIFY",
                                      "--set-class", "1:3"],
}


def sh(*argv: str, ns: str | None = None, check: bool = True, timeout: float = 20.0) -> str:
    """Run a command (inside namespace `ns`); return its stdout; raise LabError when it fails."""
    full = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    done = subprocess.run(full, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise LabError(f"`{' '.join(full)}` exited {done.returncode}: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def missing_prerequisites() -> str | None:
    """Return why the lab cannot run here (not root, a program or module missing), or None."""
    if os.geteuid() != 0:
        return "the interference lab needs root (network namespaces, iptables, tc); run scripts/test as root"
    missing = [p for p in PROGRAMS if shutil.which(p) is None]
    if missing:
        return f"the interference lab needs these programs: {', '.join(missing)} (scripts/test installs them)"
    try:
        import netfilterqueue  # noqa: F401
    except ImportError as e:
        return f"the interference lab needs the netfilterqueue module ({e}); scripts/test installs it"
    return None


def cleanup_leftovers() -> None:
    """Remove this run's namespaces, and those of earlier runs whose process is gone (and /etc/netns entries)."""
    remove_namespaces(NAMESPACES, _LAB_NAME)


def remove_namespaces(own: Sequence[str], stale_name: re.Pattern[str]) -> None:
    """Remove the namespaces `own`, and those matching `stale_name` (group 1: a run's pid) whose run is gone.

    Only a lab's own names, not everything with the prefix: other labs on this machine
    may use names that happen to start the same way, and a run that is still alive keeps
    its own. The processes inside are killed and the /etc/netns entries removed; the veth
    pairs are created inside the namespaces, so they go with them.
    """
    existing = {line.split()[0] for line in sh("ip", "netns", "list", check=False).splitlines() if line.split()}
    stale = {n for n in existing if (m := stale_name.match(n)) and not _alive(int(m.group(1)))}
    for name in (*own, *sorted(stale)):
        if name in existing:
            for pid in sh("ip", "netns", "pids", name, check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "delete", name, check=False)
        shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Process:
    """A lab program running inside a namespace, its stderr kept in a file for failure reports."""

    name: str
    popen: subprocess.Popen[str]
    log: Path

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL) and wait."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(3)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(3)
        if self.popen.stdout is not None:
            self.popen.stdout.close()

    def output(self) -> str:
        """Return what it wrote to stderr so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start(ns: str, name: str, argv: Sequence[str], logs: Path, *, wait_ready: bool = True) -> Process:
    """Start `argv` in `ns`; with `wait_ready`, wait until it prints `ready` on stdout."""
    log = logs / f"{name}.log"
    err: IO[str] = log.open("w")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    popen = subprocess.Popen(
        ["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
        text=True, cwd=ROOT, env=env,
    )
    err.close()
    proc = Process(name, popen, log)
    if wait_ready:
        assert popen.stdout is not None
        line = _readline(popen.stdout, START_TIMEOUT)
        if line.strip() != "ready":
            proc.stop()
            raise LabError(f"{name} did not start (exit {popen.returncode}): {proc.output().strip()[-2000:]}")
    return proc


def _readline(stream: IO[str], timeout: float) -> str:
    import select

    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else ""


@dataclass
class Border:
    """The interference switches of the border router; reset() turns every one of them off."""

    logs: Path
    programs: list[Process] = field(default_factory=list)
    _next_queue: int = 1

    def rule(self, *spec: str) -> None:
        """Append an iptables rule to the border's FORWARD hook (chain PLLAB)."""
        sh("iptables", "-w", "-A", "PLLAB", *spec, ns=BORDER)

    def nat(self, *spec: str) -> None:
        """Append an iptables rule to the border's nat PREROUTING hook (chain PLNAT)."""
        sh("iptables", "-w", "-t", "nat", "-A", "PLNAT", *spec, ns=BORDER)

    def queue(self, module: str, *args: str, match: Sequence[str]) -> Process:
        """Start an NFQUEUE program (tests.lab.MODULE ARGS) and send packets matching `match` to it."""
        num = self._next_queue
        self._next_queue += 1
        proc = start(BORDER, f"{module}-{num}", [sys.executable, "-m", f"tests.lab.{module}", *args,
                                                  "--queue", str(num), "--max-seconds", "120"], self.logs)
        self.programs.append(proc)
        self.rule(*match, "-j", "NFQUEUE", "--queue-num", str(num))
        return proc

    def throttle(self, host: str, rate: str) -> None:
        """Shape traffic from `host` toward the vantage to `rate` (a tc tbf under the border's htb class 1:3)."""
        sh("tc", "qdisc", "replace", "dev", "plbv", "parent", "1:3", "handle", "30:", "tbf", "rate", rate,
           "burst", "4kb", "latency", "400ms", ns=BORDER)
        # This kernel has no tc classifiers; iptables CLASSIFY sets the class htb reads.
        sh("iptables", "-w", "-t", "mangle", "-A", "PLCLASS", "-s", host, "-j", "CLASSIFY", "--set-class", "1:3",
           ns=BORDER)

    def dropped(self) -> int:
        """Return how many packets the DROP rules of PLLAB have dropped so far."""
        listing = sh("iptables", "-w", "-L", "PLLAB", "-v", "-n", "-x", ns=BORDER)
        rows = [line.split() for line in listing.splitlines()[2:]]  # pkts bytes target ...
        return sum(int(row[0]) for row in rows if len(row) > 2 and row[2] == "DROP")

    def reset(self) -> None:
        """Switch every interference off: flush the chains, the tc filters, stop the programs."""
        sh("iptables", "-w", "-F", "PLLAB", ns=BORDER, check=False)
        sh("iptables", "-w", "-t", "nat", "-F", "PLNAT", ns=BORDER, check=False)
        sh("iptables", "-w", "-t", "mangle", "-F", "PLCLASS", ns=BORDER, check=False)
        for proc in self.programs:
            proc.stop()
        self.programs.clear()

    def report(self) -> str:
        """Return the rules in force and what the programs logged (for failure messages)."""
        rules = sh("iptables", "-w", "-S", "PLLAB", ns=BORDER, check=False)
        return rules + "".join(f"--- {p.name}:\n{p.output()}" for p in self.programs)


@dataclass
class Lab:
    """The three namespaces and the servers abroad, built once per test session."""

    directory: Path
    border: Border = field(init=False)
    processes: list[Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.border = Border(self.directory)

    # ---- topology --------------------------------------------------------------------

    def build(self, abroad_hosts: Sequence[str], abroad_names: dict[str, str]) -> None:
        """Create the namespaces, links, addresses and routes, and the border's empty chains."""
        cleanup_leftovers()
        for ns in NAMESPACES:
            try:
                sh("ip", "netns", "add", ns)
            except LabError as e:
                raise LabUnavailable(f"cannot create network namespaces: {e}") from None
            sh("ip", "link", "set", "lo", "up", ns=ns)
        try:
            sh("ip", "link", "add", "plv0", "netns", VANTAGE, "type", "veth", "peer", "name", "plbv", "netns", BORDER)
        except LabError as e:
            raise LabUnavailable(f"cannot create veth pairs: {e}") from None
        sh("ip", "link", "add", "plba", "netns", BORDER, "type", "veth", "peer", "name", "pla0", "netns", ABROAD)
        sh("ip", "addr", "add", f"{VANTAGE_IP}/24", "dev", "plv0", ns=VANTAGE)
        sh("ip", "addr", "add", f"{BORDER_INSIDE}/24", "dev", "plbv", ns=BORDER)
        for address in BORDER_OUTSIDE:
            sh("ip", "addr", "add", f"{address}/24", "dev", "plba", ns=BORDER)
        for host in abroad_hosts:
            sh("ip", "addr", "add", f"{host}/24", "dev", "pla0", ns=ABROAD)
        for ns, dev in ((VANTAGE, "plv0"), (BORDER, "plbv"), (BORDER, "plba"), (ABROAD, "pla0")):
            sh("ip", "link", "set", dev, "up", ns=ns)
            # Segmentation offloads would hand NFQUEUE and tc segments larger than the wire's.
            sh("ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off", ns=ns, check=False)
        sh("ip", "route", "add", "default", "via", BORDER_INSIDE, ns=VANTAGE)
        sh("ip", "route", "add", "default", "via", BORDER_OUTSIDE[0], ns=ABROAD)
        # /proc/sys/net is the namespace's own (sysctl itself may be missing: procps).
        sh("sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward", ns=BORDER)
        self._check_kernel()
        sh("iptables", "-w", "-N", "PLLAB", ns=BORDER)
        sh("iptables", "-w", "-A", "FORWARD", "-j", "PLLAB", ns=BORDER)
        sh("iptables", "-w", "-t", "nat", "-N", "PLNAT", ns=BORDER)
        sh("iptables", "-w", "-t", "nat", "-A", "PREROUTING", "-j", "PLNAT", ns=BORDER)
        # htb without a default class: unclassified packets pass untouched; class 1:3 is where
        # `throttle` hangs its tbf, reached only by packets that iptables CLASSIFY sends there.
        sh("tc", "qdisc", "add", "dev", "plbv", "root", "handle", "1:", "htb", ns=BORDER)
        sh("tc", "class", "add", "dev", "plbv", "parent", "1:", "classid", "1:3", "htb", "rate", "10gbit",
           "quantum", "60000", ns=BORDER)
        sh("iptables", "-w", "-t", "mangle", "-N", "PLCLASS", ns=BORDER)
        sh("iptables", "-w", "-t", "mangle", "-A", "POSTROUTING", "-o", "plbv", "-j", "PLCLASS", ns=BORDER)
        # The system resolver of the vantage is the honest resolver abroad; names abroad resolve locally.
        for ns, files in (
            (VANTAGE, {"resolv.conf": "nameserver 198.51.100.53\noptions timeout:1 attempts:1\n"}),
            (ABROAD, {"hosts": "".join(f"{a} {n}\n" for n, a in abroad_names.items())
                      + "127.0.0.1 localhost\n"}),
        ):
            (NETNS_ETC / ns).mkdir(parents=True, exist_ok=True)
            for fname, text in files.items():
                (NETNS_ETC / ns / fname).write_text(text)

    def _check_kernel(self) -> None:
        """Raise LabUnavailable naming every kernel feature the scenarios need and this kernel lacks."""
        for table in ("filter", "nat", "mangle"):
            sh("iptables", "-w", "-t", table, "-N", "PLPROBE", ns=BORDER)
        missing = []
        for feature, argv in KERNEL_FEATURES.items():
            try:
                sh(*argv[:1], "-w", *argv[1:], ns=BORDER)
            except LabError as e:
                missing.append(f"{feature}: {e}")
        for table in ("filter", "nat", "mangle"):
            sh("iptables", "-w", "-t", table, "-F", "PLPROBE", ns=BORDER)
            sh("iptables", "-w", "-t", table, "-X", "PLPROBE", ns=BORDER)
        for qdisc in (["htb"], ["tbf", "rate", "1mbit", "burst", "4kb", "latency", "50ms"]):
            try:
                sh("tc", "qdisc", "add", "dev", "plbv", "root", *qdisc, ns=BORDER)
                sh("tc", "qdisc", "del", "dev", "plbv", "root", ns=BORDER)
            except LabError as e:
                missing.append(f"tc qdisc {qdisc[0]}: {e}")
        if missing:
            raise LabUnavailable("the kernel lacks what the lab needs:\n  " + "\n  ".join(missing))

    def teardown(self) -> None:
        """Stop everything the lab started and delete its namespaces."""
        with contextlib.suppress(Exception):
            self.border.reset()
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()
        cleanup_leftovers()

    # ---- processes -------------------------------------------------------------------

    def start(self, ns: str, name: str, argv: Sequence[str], *, wait_ready: bool = True) -> Process:
        """Start a long-lived program of the lab (stopped at teardown)."""
        proc = start(ns, name, argv, self.directory, wait_ready=wait_ready)
        self.processes.append(proc)
        return proc

    def wait_listening(self, ns: str, endpoints: Sequence[tuple[str, int]]) -> None:
        """Wait until every (host, port) accepts TCP connections inside `ns`."""
        code = (
            "import socket, sys, time\n"
            f"todo = {list(endpoints)!r}\n"
            f"end = time.monotonic() + {START_TIMEOUT}\n"
            "while todo and time.monotonic() < end:\n"
            "    with socket.socket() as s:\n"
            "        s.settimeout(0.5)\n"
            "        if s.connect_ex(tuple(todo[0])) == 0:\n"
            "            todo.pop(0)\n"
            "            continue\n"
            "    time.sleep(0.02)\n"
            "sys.exit(f'not listening: {todo}' if todo else 0)\n"
        )
        try:
            sh(sys.executable, "-c", code, ns=ns, timeout=START_TIMEOUT + 5)
        except LabError as e:
            logs = "".join(f"--- {p.name}:\n{p.output()[-1000:]}" for p in self.processes)
            raise LabError(f"{e}\n{logs}") from None

    # ---- the probe -------------------------------------------------------------------

    def probe(
        self, config: dict[str, Any], *args: str, command: str = "once", realtime: bool = False
    ) -> dict[str, Any]:
        """Run `probe COMMAND --json -c CONFIG ARGS` inside the vantage; return its JSON output.

        `realtime` runs it at real-time priority, so that timing tests measure the probe's own
        clock work rather than how busy the machine is.
        """
        return run_probe(VANTAGE, self.directory, config, *args, command=command, realtime=realtime)


def run_probe(
    ns: str, directory: Path, config: dict[str, Any], *args: str, command: str = "once", realtime: bool = False,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Run `probe COMMAND --json -c CONFIG ARGS` inside `ns` (CONFIG written to `directory`); return its JSON output."""
    path = directory / "targets.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(config, indent=1))
    priority = ["chrt", "-f", "10"] if realtime and realtime_allowed() else []
    argv = ["ip", "netns", "exec", ns, *priority, sys.executable, "-m", "probe", command, "--json",
            "-c", str(path), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, stdin=subprocess.DEVNULL)
    if done.returncode not in (0, 1):
        raise LabError(f"probe {command} exited {done.returncode}: {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@functools.cache
def realtime_allowed() -> bool:
    """Return whether this machine lets us run a process at real-time priority (containers may not)."""
    return subprocess.run(["chrt", "-f", "10", "true"], capture_output=True).returncode == 0


@contextlib.contextmanager
def lab_network(directory: Path, abroad_hosts: Sequence[str], abroad_names: dict[str, str]) -> Iterator[Lab]:
    """Build the lab; tear it down on the way out, whatever happened."""
    lab = Lab(directory)
    try:
        lab.build(abroad_hosts, abroad_names)
        yield lab
    finally:
        lab.teardown()

