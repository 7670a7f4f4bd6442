"""Sharding one vantage over several `probe run --shard i/n` replicas."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from probe import config as config_module
from probe.service import load_config

ROOT = Path(__file__).resolve().parent.parent
NAMES = [f"t{i}" for i in range(12)]
CONFIG = "vantage: shard-test\ntargets:\n" + "".join(
    f"  - {{name: {n}, address: '127.0.0.1:9', interval: 1h}}\n" for n in NAMES
)


def test_shards_of_the_shipped_config_split_the_targets_without_overlap() -> None:
    everything = [t.name for t in config_module.load(str(ROOT / "targets.yml")).targets]
    shards = [[t.name for t in load_config(str(ROOT / "targets.yml"), (i, 3)).targets] for i in range(3)]
    assert sorted(n for s in shards for n in s) == sorted(everything)
    assert all(shards), shards


def test_a_target_stays_in_its_shard_whatever_else_the_config_holds(tmp_path: Path) -> None:
    path = tmp_path / "targets.yml"
    path.write_text(CONFIG)
    before = {t.name: i for i in range(4) for t in load_config(str(path), (i, 4)).targets}
    path.write_text(CONFIG.replace("  - {name: t0,", "  - {name: added, address: '127.0.0.1:9'}\n  - {name: t0,"))
    after = {t.name: i for i in range(4) for t in load_config(str(path), (i, 4)).targets}
    assert {n: after[n] for n in before} == before


@pytest.mark.parametrize("text", ["0/3", "4/3", "a/b", "3", "1/0"], ids=["zero", "over", "letters", "no-slash", "no-n"])
def test_bad_shard_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="bad shard"):
        config_module.parse_shard(text)


async def test_replicas_export_disjoint_halves_of_the_targets(tmp_path: Path) -> None:
    path = tmp_path / "targets.yml"
    path.write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if k != "PROBE_VANTAGE"}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-m", "probe", "run", "-c", str(path), "--listen", "127.0.0.1:0", "--shard", f"{i}/2",
            stderr=asyncio.subprocess.PIPE, env=env,
        )
        for i in (1, 2)
    ]
    try:
        exported = []
        async with aiohttp.ClientSession() as session:
            for proc in procs:
                assert proc.stderr is not None
                line = ""
                while "listening on" not in line:
                    line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
                    assert line, "probe run exited"
                match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
                assert match
                async with session.get(match.group(1) + "/metrics") as r:
                    text = await r.text()
                targets = {s.labels["target"] for f in text_string_to_metric_families(text)
                           if f.name == "probe_route_rank" for s in f.samples}  # there before a first run
                exported.append(targets)
        assert exported[0] and exported[1] and not exported[0] & exported[1]
        assert exported[0] | exported[1] == set(NAMES)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
