"""The short soak in CI: the real scheduler against flapping loopback servers, with reloads, stays flat.

The long run (30 minutes, 2,000 pairs) is `python -m bench.soak`; see docs/soak.md.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from bench.soak import Sample, judge


@pytest.mark.slow
async def test_short_soak_with_reloads_ends_flat_in_rss_fds_and_tasks(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.soak", "--minutes", "0.75", "--pairs", "160", "--interval", "1",
        "--timeout", "0.5", "--reload", "3", "--sample", "1.5", "--warmup", "25", "--out", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 120)
    doc = json.loads(out.read_text())
    verdict, samples = doc["verdict"], doc["samples"]
    assert proc.returncode == 0, stdout.decode() + stderr.decode()
    assert verdict["flat"] and verdict["rss_growth_percent"] < 5.0
    assert samples[-1]["reloads"] >= 10, "config reloads happened all along"
    assert samples[-1]["probes"] > 160 * 20, "every pair was probed many times"
    assert b"Traceback" not in stderr, stderr.decode()


def _samples(tasks: list[int], lasting: list[int]) -> list[Sample]:
    return [Sample(t=float(i), rss_mib=60.0, fds=12, tasks=n, probes=100 * i, reloads=i, lag_p99_ms=5.0,
                   inflight=4, lasting=old) for i, (n, old) in enumerate(zip(tasks, lasting, strict=True))]


def test_the_verdict_forgives_queued_tasks_on_a_busy_loop_but_not_tasks_that_live_on() -> None:
    # What CI saw on a loaded machine: tasks without in-flight probes 3 -> 12, none of them lasting.
    busy = judge(_samples([7, 7, 8, 7, 7, 7, 17, 25, 21], [3] * 9), warmup=0.0)
    assert busy.flat and (busy.tasks_idle_first, busy.tasks_idle_last) == (3, 17)
    assert (busy.tasks_lasting_first, busy.tasks_lasting_last) == (3, 3)
    # A leak: the same task counts, but each extra task is still there intervals later.
    leak = judge(_samples([7, 7, 8, 7, 7, 7, 17, 25, 21], [3, 3, 3, 5, 6, 7, 9, 11, 13]), warmup=0.0)
    assert not leak.flat and leak.tasks_lasting_last == 11
