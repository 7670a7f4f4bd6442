"""CPU seconds and memory of a process, from /proc (Linux)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """Return user + system CPU seconds the process has used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # After the command name: state is field 3; utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def memory(pid: int) -> dict[str, int]:
    """Return VmRSS and VmHWM (peak RSS) of the process, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


@dataclass
class CpuMeter:
    """CPU seconds used by a set of processes between start() and stop()."""

    pids: dict[str, int]

    def start(self) -> None:
        self.started = time.monotonic()
        self._t0 = os.times().elapsed
        self._c0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        """Return CPU seconds per process name, plus `wall` seconds."""
        used = {name: cpu_seconds(pid) - self._c0[name] for name, pid in self.pids.items()}
        used["wall"] = os.times().elapsed - self._t0
        return used


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages as `uptime` shows them."""
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])
