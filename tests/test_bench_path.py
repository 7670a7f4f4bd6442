"""The path sampling benchmark runs (small and short): python -m bench.path --pairs 10 ... --skip-accuracy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_path_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "path.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.path", "--pairs", "10", "--samples", "4", "--interval", "6", "--seconds", "3",
         "--skip-accuracy", "--workdir", str(tmp_path / "work"), "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    scale = json.loads(out.read_text())["scale"]
    assert scale["pairs"] == 10 and scale["samples_sent"] > 0 and scale["lag"]["starts"] > 0
    assert scale["samples_lost"] == 0  # loopback: every handshake is answered
