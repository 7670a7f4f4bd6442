"""Check the `path` key of a target (multi-sample path quality) and the config-wide sample rate."""

from __future__ import annotations

from typing import Any

from probe.config.checks import Checks
from probe.config.model import (
    PATH_MAX_RATE,
    PATH_MAX_SAMPLES,
    PATH_MIN_GAP,
    PATH_SAMPLE_DEADLINE,
    PathCheck,
    Route,
    Target,
)
from probe.models import PathMethod

_PATH_KEYS = {"samples", "spread", "method"}
_METHODS = ", ".join(m.value for m in PathMethod)


class PathChecks(Checks):
    def path_check(
        self, raw: Any, path: str, interval: float | None, timeout: float | None, routes: tuple[Route, ...]
    ) -> PathCheck | None:
        """Return the PathCheck of `raw` (a target's or the defaults' `path`), None when absent or bad."""
        if raw is None:
            return None
        m = self.mapping(raw, path, _PATH_KEYS)
        if m is None:
            return None
        before = len(self.problems)
        samples = spread = None
        if "samples" not in m:
            self.fail(f"{path}.samples", "missing (samples per run, e.g. 20)")
        elif (samples := self.positive_int(m["samples"], f"{path}.samples")) is not None and samples > PATH_MAX_SAMPLES:
            self.fail(f"{path}.samples", f"{samples} is more than {PATH_MAX_SAMPLES} samples per run")
            samples = None
        if "spread" not in m:
            self.fail(f"{path}.spread", "missing (the time the samples are spread over, e.g. 5s)")
        else:
            spread = self.duration(m["spread"], f"{path}.spread")
        method = PathMethod.TCP
        if "method" in m:
            try:
                method = PathMethod(m["method"])
            except ValueError:
                self.fail(f"{path}.method", f"unknown method {m['method']!r} (one of {_METHODS})")
        if method is PathMethod.ICMP:
            proxied = [r.name for r in routes if r.proxy is not None]
            if proxied:
                self.fail(
                    f"{path}.method",
                    f"icmp cannot go through proxy route {proxied[0]!r}: use method tcp (the proxy's CONNECT reply)",
                )
        if samples is not None and spread is not None:
            gap = spread / samples
            if gap < PATH_MIN_GAP - 1e-9:  # 150ms / 3 is 0.04999... in floats
                self.fail(
                    f"{path}.spread",
                    f"{samples} samples over {m['spread']} are {gap * 1000:g} ms apart; "
                    f"the least is {PATH_MIN_GAP * 1000:g} ms (at most {1 / PATH_MIN_GAP:g} a second per pair)",
                )
            elif interval is not None and spread > interval:
                self.fail(f"{path}.spread", f"spread {m['spread']} is longer than the interval ({interval:g}s)")
            elif interval is not None:
                last = spread * (samples - 1) / samples
                wait = min(PATH_SAMPLE_DEADLINE, timeout or PATH_SAMPLE_DEADLINE)
                if last + wait > interval:
                    self.fail(
                        f"{path}.spread",
                        f"the last of {samples} samples goes out {last:g}s into the run and may wait {wait:g}s "
                        f"for its answer: past the interval ({interval:g}s)",
                    )
        if len(self.problems) > before or samples is None or spread is None:
            return None
        return PathCheck(samples=samples, spread=spread, method=method)

    def path_rate(self, targets: tuple[Target, ...]) -> None:
        """Fail when the path samples of every pair add up to more than PATH_MAX_RATE a second."""
        rate = sum(t.path.samples / t.interval * len(t.routes) for t in targets if t.path is not None)
        if rate > PATH_MAX_RATE:
            self.fail(
                "targets",
                f"path sampling would send {rate:,.0f} samples a second on average; the cap is {PATH_MAX_RATE:,.0f} "
                "(fewer samples, longer intervals or fewer routes)",
            )
