"""The short soak in CI: the real scheduler against flapping loopback servers, with reloads, stays flat.

The long run (30 minutes, 2,000 pairs) is `python -m bench.soak`; see docs/soak.md.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest


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
