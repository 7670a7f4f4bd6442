"""The layer contract in pyproject.toml holds, and it is a check that can fail."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="lint-imports is not installed (scripts/test installs it)")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_tree_keeps_every_layer_contract() -> None:
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "broken" not in done.stdout.split("Contracts:")[-1].replace("0 broken", "")


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("probe/net/dial.py", "import probe.exporter.metrics  # noqa"),  # net reaching up to the exporter
        ("probe/exporter/metrics.py", "import probe.net.dial  # noqa"),  # the exporter opening connections
        ("probe/dns/transport.py", "import probe.probers  # noqa"),  # dns reaching up to the probers
    ],
    ids=["net-imports-exporter", "exporter-imports-net", "dns-imports-probers"],
)
def test_an_upward_import_breaks_the_contract(tmp_path: Path, module: str, line: str) -> None:
    shutil.copytree(ROOT / "probe", tmp_path / "probe", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / module).open("a") as f:
        f.write(f"\n{line}\n")
    done = lint(tmp_path)
    assert done.returncode != 0, done.stdout
    assert "BROKEN" in done.stdout
