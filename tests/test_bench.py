"""The benchmark's smoke mode still runs end to end and produces sane, measured figures (not speed)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.lab import BLACKBOX, ROOT

pytestmark = pytest.mark.slow


def _has_lab() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and shutil.which("iptables") is not None


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    if shutil.which(BLACKBOX) is None:
        pytest.skip(f"{BLACKBOX} is not installed (scripts/test installs it)")
    out = tmp_path_factory.mktemp("bench") / "figures.json"
    argv = [sys.executable, "-m", "bench", "--smoke", "--out", str(out)]
    if not _has_lab():
        argv.append("--skip-accuracy")
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "CPU s per 1,000 HTTPS probes" in done.stdout
    return dict(json.loads(Path(out).read_text()))


def test_http3_probes_ran_and_their_cpu_was_measured(figures: dict[str, object]) -> None:
    h3 = figures["http3"]
    assert isinstance(h3, dict)
    assert h3["probes"] > 10 and h3["ok"] >= 0.9 * h3["probes"], h3
    assert 0 < h3["cpu_seconds_per_1000"] < 1000


def test_both_tools_ran_every_probe_and_their_cpu_was_measured(figures: dict[str, object]) -> None:
    for kind, c in figures["cpu"].items():  # type: ignore[attr-defined]
        probe, blackbox = c["probe"], c["blackbox"]
        # Loopback probes all succeed, bar a rare timeout on a very busy machine.
        assert probe["probes"] > 10 and probe["ok"] >= 0.9 * probe["probes"], (kind, probe)
        assert blackbox["probes"] > 10 and blackbox["ok"] >= 0.9 * blackbox["probes"], (kind, blackbox)
        for tool in (probe, blackbox):
            assert 0 < tool["cpu_seconds_per_1000"] < 1000
            assert 0 <= tool["targets_cpu_share_of_a_core"] < 2
        assert c["ratio"] == pytest.approx(probe["cpu_seconds_per_1000"] / blackbox["cpu_seconds_per_1000"])
        assert blackbox["driver_cpu_ms_per_probe"] > 0


def test_the_floor_client_ran_the_same_https_requests(figures: dict[str, object]) -> None:
    floor = figures["cpu"]["https"]["floor"]  # type: ignore[index]
    assert floor["requests"] >= 0.9 * floor["rate_wanted"] * floor["seconds"], floor
    assert floor["ok"] == floor["requests"], floor  # every request got its 200
    assert 0 < floor["cpu_ms_per_probe"] < 1000


def test_the_render_figures_price_the_dns_series(figures: dict[str, object]) -> None:
    r = figures["render"]
    assert isinstance(r, dict)
    address, names = r["address"], r["host_name"]
    # Host names add four DNS series per resolver (two) and target to the 16 of each pair.
    assert names["lines"] - address["lines"] >= 8 * r["pairs"], (names, address)
    for f in (address, names):
        assert 0 < f["render_cpu_ms_warm"] < 60_000 and 0 < f["render_cpu_ms_dirty"] < 60_000, f


def test_the_rate_steps_report_the_lag_measured_by_the_scheduler(figures: dict[str, object]) -> None:
    steps = figures["rate"]["steps"]  # type: ignore[index]
    assert steps and all(s["lag"]["starts"] > 0 for s in steps)
    assert all(0 <= s["lag"]["share_within_100ms"] <= 1 for s in steps)


def test_scale_figures_grow_with_the_number_of_pairs(figures: dict[str, object]) -> None:
    small, big = figures["scale"]  # type: ignore[misc]
    assert small["pairs_with_results"] == small["pairs"] and big["pairs_with_results"] == big["pairs"]
    assert big["metrics_samples"] > 4 * small["metrics_samples"]  # ~16 samples per pair
    assert big["metrics_bytes"] > 4 * small["metrics_bytes"]
    assert 10 * 2**20 < small["peak_rss_bytes"] <= big["peak_rss_bytes"] * 1.2
    assert 0 < small["metrics_seconds_median"] < 60 and 0 < small["metrics_gzip_seconds_median"] < 60
    for s in (small, big):
        # The series of the scrape, per pair: the budget's figure (every pair ran, all ok, so all alike).
        assert 10 <= s["series_per_pair"]["min"] <= s["series_per_pair"]["max"] <= 30, s["series_per_pair"]
        assert 0 < s["metrics_gzip_bytes"] < s["metrics_bytes"] / 3
        # A smoke run's scrapes are short: on a quiet machine no run may start while they last, so
        # the window can be empty; whatever started in it was read as a lag, not invented.
        for window in ("lag_during_gzip_scrapes", "lag_during_scrapes"):
            lag = s[window]
            assert lag["starts"] >= 0, window
            if lag["starts"] > 0:
                assert 0 <= lag["p50"] <= lag["p99"] and 0 <= lag["share_within_100ms"] <= 1, (window, lag)


def test_connect_timings_are_measured_against_the_known_delay(figures: dict[str, object]) -> None:
    a = figures["accuracy"]
    if a is None:
        pytest.skip("the namespace lab needs root, ip and iptables")
    assert isinstance(a, dict)
    for case in ("probe_rest", "probe_loaded", "blackbox_rest", "blackbox_loaded"):
        assert a[case]["samples"] > 0, case
        # The delay is real: nobody measured a connect shorter than it (errors are >= ~0).
        assert -0.5 < a[case]["error_ms_median"] < a["delay_ms"], case
        assert math.isfinite(a[case]["error_ms_p99"])
    assert a["probe_loaded"]["in_flight_mean"] > a["probe_rest"]["in_flight_mean"]
