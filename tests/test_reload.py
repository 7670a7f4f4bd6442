"""Reloads happen off the event loop and validate `defaults` once (issue 19, item 4)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from probe import config
from probe.config.targets import TargetChecks
from probe.service import Service, load_config
from tests.procs import probe_run
from tests.test_stall import healthy_server

NETWORK_BLAMED = re.compile(r'^probe_runs_total\{[^}]*target="web"[^}]*outcome="(?!ok"|error")([^"]+)"[^}]*\} (\S+)',
                            re.M)


def test_defaults_are_validated_once_for_all_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, int] = {"expect": 0, "references": 0}
    expect, references = TargetChecks.expect, TargetChecks.references

    def counted_expect(self: TargetChecks, raw: Any, path: str) -> Any:
        calls["expect"] += 1
        return expect(self, raw, path)

    def counted_references(self: TargetChecks, raw: Any, path: str, known: set[str], what: str) -> Any:
        calls["references"] += 1
        return references(self, raw, path, known, what)

    monkeypatch.setattr(TargetChecks, "expect", counted_expect)
    monkeypatch.setattr(TargetChecks, "references", counted_references)
    routes = [{"name": f"r{i}", "source_address": "127.0.0.1"} for i in range(50)]
    doc = {
        "defaults": {"expect": {"status": [200], "body_regex": [f"^pong{i}" for i in range(50)]},
                     "routes": [r["name"] for r in routes]},
        "routes": routes,
        "targets": [{"name": f"t{i}", "url": f"http://127.0.0.1:1/{i}"} for i in range(300)]
                   + [{"name": "own", "url": "http://127.0.0.1:1/", "expect": {"status": 204}, "routes": ["r1"]}],
    }
    cfg = config.loads(yaml.safe_dump(doc))
    assert calls == {"expect": 2, "references": 2}  # the defaults once, the target with its own once
    assert cfg.targets[0].http is not None and cfg.targets[0].http.expect is cfg.targets[299].http.expect  # type: ignore[union-attr]
    assert cfg.targets[-1].routes == ("r1",) and len(cfg.targets[0].routes) == 50


def test_a_bad_default_fails_every_target_once(tmp_path: Path) -> None:
    doc = {"defaults": {"timeout": "soon"}, "targets": [{"name": f"t{i}", "address": "a:1"} for i in range(3)]}
    with pytest.raises(config.ConfigError) as info:
        config.loads(yaml.safe_dump(doc))
    assert info.value.problems == ["defaults.timeout: bad duration 'soon' (use e.g. 250ms, 10s, 5m, 1h)"]


async def test_reloading_a_thousand_targets_gives_healthy_probes_no_false_outcome(tmp_path: Path) -> None:
    """A real `probe run` reloads 1,000 targets four times while a healthy target is probed every second."""
    with healthy_server() as port:
        def text(generation: int) -> str:
            doc = {
                "vantage": "lab",
                "targets": [{"name": "web", "url": f"http://127.0.0.1:{port}/", "interval": "1s", "timeout": "500ms"}]
                + [{"name": f"idle{i}-{generation if i % 10 == 0 else 0}", "url": f"http://127.0.0.1:1/{i}",
                    "interval": "1h", "expect": {"status": [200], "body_contains": "pong"}} for i in range(1000)],
            }
            return yaml.safe_dump(doc)

        cfg = tmp_path / "targets.yml"
        cfg.write_text(text(0))
        async with probe_run("-c", str(cfg)) as running, aiohttp.ClientSession() as http:
            for generation in range(1, 5):
                cfg.write_text(text(generation))
                async with http.post(running.base + "/-/reload") as response:
                    assert response.status == 200, await response.text()
            async with http.get(running.base + "/metrics") as response:
                metrics = await response.text()
    assert 'target="idle1-0"' in metrics and 'target="idle0-4"' in metrics  # the last generation is running
    ok = re.search(r'^probe_runs_total\{[^}]*target="web"[^}]*outcome="ok"[^}]*\} (\S+)', metrics, re.M)
    assert ok is not None and float(ok.group(1)) >= 3, metrics[:2000]
    blamed = [(o, v) for o, v in NETWORK_BLAMED.findall(metrics) if float(v)]
    assert not blamed, blamed


async def test_a_job_switch_that_fails_keeps_the_running_config_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "targets.yml"
    cfg.write_text("vantage: lab\ntargets:\n  - {name: old, address: '127.0.0.1:1', interval: 1h}\n")
    service = Service(str(cfg), load_config(str(cfg), None))
    service.start()
    try:
        cfg.write_text("vantage: lab\ntargets:\n  - {name: new, address: '127.0.0.1:1', interval: 1h}\n")
        real_add = service.scheduler._aps.add_job

        def broken_add(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("id") == "probe:new:direct":
                raise RuntimeError("jobstore broke")
            return real_add(*args, **kwargs)  # putting the old job back works

        monkeypatch.setattr(service.scheduler._aps, "add_job", broken_add)
        error = await service.reload()
        monkeypatch.setattr(service.scheduler._aps, "add_job", real_add)
        assert error is not None and "cannot switch the jobs: RuntimeError: jobstore broke" in error
        assert [t.name for t in service.config.targets] == ["old"]
        assert [t.name for t in service.scheduler.config.targets] == ["old"]
        assert service.scheduler.job_ids() == {"probe:old:direct"}
        assert service.store.last_reload_error == error
        assert await service.reload() is None  # the next reload switches as usual
        assert service.scheduler.job_ids() == {"probe:new:direct"}
    finally:
        await service.close()
