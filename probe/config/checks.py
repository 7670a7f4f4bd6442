"""The validator's primitives: types, names, durations, numbers, lists, addresses, files.

Every check appends `path: message` to `problems` and returns None for a bad value, so that
one pass reports every problem of a config at once.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, TypeVar

from probe.config.model import NAME_RE
from probe.config.values import parse_duration

T = TypeVar("T")


class Checks:
    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[str] = []
        self._ca_checked: dict[str, str | None] = {}
        self._defaults: dict[str, tuple[Any, bool]] = {}  # "defaults.KEY" -> (checked value, failed?)
        self.defaults_failed = False

    def once(self, path: str, check: Callable[[], T]) -> T:
        """Run `check` of a value at `path` once if it is a default: every target shares the answer."""
        if not path.startswith("defaults."):
            return check()
        if path not in self._defaults:
            before = len(self.problems)
            self._defaults[path] = (check(), len(self.problems) > before)
        value, failed = self._defaults[path]
        self.defaults_failed |= failed
        return value  # type: ignore[no-any-return]

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def mapping(self, value: Any, path: str, allowed: set[str]) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping, not {kind_of(value)}")
            return None
        for key in value:
            if not isinstance(key, str) or key not in allowed:
                self.fail(f"{path}.{key}" if path else str(key), "unknown key")
        return value

    def typed(self, value: Any, path: str, kind: type[T], what: str) -> T | None:
        if isinstance(value, bool) and kind is not bool:
            self.fail(path, f"must be {what}, not a boolean")
            return None
        if kind is float and isinstance(value, int):
            return float(value)  # type: ignore[return-value]
        if not isinstance(value, kind):
            self.fail(path, f"must be {what}, not {kind_of(value)}")
            return None
        return value

    def name(self, value: Any, path: str) -> str | None:
        text = self.typed(value, path, str, "a string")
        if text is not None and not NAME_RE.match(text):
            self.fail(path, f"name {text!r} must match [a-z0-9_.-]+")
            return None
        return text

    def duration(self, value: Any, path: str) -> float | None:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            self.fail(path, f"must be a duration like 10s, not {kind_of(value)}")
            return None
        if isinstance(value, int | float) and value <= 0:
            self.fail(path, f"must be longer than zero, not {value}")
            return None
        if isinstance(value, int | float):
            self.fail(path, f"needs a unit: write {value}s or {value}ms")
            return None
        try:
            seconds = parse_duration(value.strip())
        except ValueError as e:
            self.fail(path, str(e))
            return None
        if seconds <= 0:
            self.fail(path, f"must be longer than zero, not {value!r}")
            return None
        return seconds

    def positive_number(self, value: Any, path: str) -> float | None:
        number = self.typed(value, path, float, "a number")
        if number is not None and number <= 0:
            self.fail(path, f"must be greater than zero, not {value}")
            return None
        return number

    def positive_int(self, value: Any, path: str) -> int | None:
        number = self.typed(value, path, int, "a whole number")
        if number is not None and number <= 0:
            self.fail(path, f"must be greater than zero, not {value}")
            return None
        return number

    def string_list(self, value: Any, path: str) -> tuple[str, ...] | None:
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list):
            self.fail(path, f"must be a string or a list of strings, not {kind_of(value)}")
            return None
        out = []
        for i, item in enumerate(value):
            text = self.typed(item, f"{path}[{i}]", str, "a string")
            if text is not None:
                out.append(text)
        return tuple(out)

    def ip(self, value: Any, path: str) -> str | None:
        text = self.typed(value, path, str, "an IP address")
        if text is None:
            return None
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            self.fail(path, f"{text!r} is not an IP address")
            return None

    def ca_file(self, value: Any, path: str) -> str | None:
        if value is None:
            return None
        text = self.typed(value, path, str, "a file path")
        if text is None:
            return None
        resolved = str((self.base_dir / text) if not os.path.isabs(text) else Path(text))
        if resolved not in self._ca_checked:
            self._ca_checked[resolved] = _check_ca_file(resolved)
        problem = self._ca_checked[resolved]
        if problem:
            self.fail(path, problem)
            return None
        return resolved

    def named_list(self, raw: Any, path: str, parse: Callable[[Any, str], T | None]) -> list[T]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.fail(path, f"must be a list, not {kind_of(raw)}")
            return []
        out: list[T] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(raw):
            item_path = f"{path}[{i}]"
            name = item.get("name") if isinstance(item, dict) else None
            if isinstance(name, str) and name in seen:
                self.fail(f"{item_path}.name", f"duplicate name {name!r} (first at {path}[{seen[name]}])")
                continue
            if isinstance(name, str):
                seen[name] = i
            parsed = parse(item, item_path)
            if parsed is not None:
                out.append(parsed)
        return out

    def references(self, raw: Any, path: str, known: AbstractSet[str], what: str) -> tuple[str, ...]:
        if not isinstance(raw, list) or not raw:
            got = "an empty list" if raw == [] else kind_of(raw)
            self.fail(path, f"must be a non-empty list of {what} names, not {got}")
            return ()
        out: dict[str, None] = {}  # a dict keeps the order and finds a repeat in O(1)
        for i, item in enumerate(raw):
            text = self.typed(item, f"{path}[{i}]", str, f"a {what} name")
            if text is None:
                continue
            if text not in known:
                self.fail(f"{path}[{i}]", f"unknown {what} {text!r}")
            elif text in out:
                self.fail(f"{path}[{i}]", f"{what} {text!r} listed twice")
            else:
                out[text] = None
        return tuple(out)

    def regex(self, text: str, path: str) -> re.Pattern[str] | None:
        try:
            return re.compile(text)
        except re.error as e:
            self.fail(path, f"bad regex {text!r}: {e}")
            return None


def _check_ca_file(path: str) -> str | None:
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"
    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except ssl.SSLError as e:
        return f"{path} holds no usable PEM certificate ({e.reason or e})"
    return None


def kind_of(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean", int: "a number", float: "a number", str: "a string",
        list: "a list", dict: "a mapping",
    }.get(type(value), type(value).__name__)
