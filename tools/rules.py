"""Derive a fast copy of the alert rules for end-to-end tests and demos.

The shipped rules (deploy/prometheus/rules/probe.rules.yml) wait minutes before firing.
`compress` divides every `for:` (and `keep_firing_for:`) by a factor, 60 by default, so
minutes become seconds; expressions, labels and annotations stay as they are. With the
probes' interval and Prometheus' evaluation_interval shortened to match (1s), an alert
fires in seconds for the same reasons it would in minutes:

    python -m tools.rules deploy/prometheus/rules/probe.rules.yml > /tmp/fast.rules.yml
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any

import yaml

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, "y": 31536000.0}
_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_WAITS = ("for", "keep_firing_for")


def parse_duration(text: str) -> float:
    """Parse a Prometheus duration (`5m`, `1h30m`, `250ms`) into seconds."""
    pos, total = 0, 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"bad Prometheus duration {text!r}")
    return total


def format_duration(seconds: float) -> str:
    """Format seconds as a Prometheus duration, in whole milliseconds when not whole seconds."""
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def compress(text: str, factor: float = 60.0) -> str:
    """Return the rules file `text` with every alert's wait divided by `factor`."""
    doc: dict[str, Any] = yaml.safe_load(text)
    for group in doc.get("groups", []):
        if "interval" in group:
            group["interval"] = format_duration(parse_duration(str(group["interval"])) / factor)
        for rule in group.get("rules", []):
            for key in _WAITS:
                if key in rule:
                    rule[key] = format_duration(parse_duration(str(rule[key])) / factor)
    return str(yaml.safe_dump(doc, sort_keys=False, width=1000))


def main(argv: Sequence[str] | None = None) -> int:
    """Print the compressed rules file."""
    parser = argparse.ArgumentParser(prog="python -m tools.rules", description=__doc__.split("\n\n")[0])
    parser.add_argument("rules", help="a Prometheus rules file")
    parser.add_argument("--factor", type=float, default=60.0, help="divide every for: by this (default 60)")
    args = parser.parse_args(argv)
    with open(args.rules, encoding="utf-8") as f:
        sys.stdout.write(compress(f.read(), args.factor))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
