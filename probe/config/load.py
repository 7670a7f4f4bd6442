"""Read targets.yml: size limit, UTF-8, YAML without duplicate keys, then validation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from probe.config.model import Config, ConfigError
from probe.config.sections import Validator

MAX_CONFIG_BYTES = 4 * 1024 * 1024


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; raise ConfigError naming every problem."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError([f"{p}: file is {size} bytes; the limit is {MAX_CONFIG_BYTES}"])
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{p}: cannot read: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{p}: not UTF-8 text: {e.reason} at byte {e.start}"]) from None
    return loads(text, source=str(p), base_dir=p.parent)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            if key in seen:
                first = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {str(key)[:100]!r} (first at line {first})", key_node.start_mark
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep)


def loads(text: str, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate config text; raise ConfigError naming every problem."""
    if len(text.encode("utf-8", "replace")) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{source}: config is larger than {MAX_CONFIG_BYTES} bytes"])
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise ConfigError([f"{source}: YAML syntax error at {where}: {e.problem}"]) from None
    except yaml.reader.ReaderError as e:  # a character YAML forbids, e.g. NUL; it knows only the offset
        before = text[: e.position]
        where = f"line {before.count(chr(10)) + 1}, column {len(before) - before.rfind(chr(10))}"
        code = e.character if isinstance(e.character, int) else ord(e.character)
        raise ConfigError([f"{source}: YAML syntax error at {where}: character U+{code:04X} is not allowed"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{source}: YAML error: {e}"]) from None
    if raw is None:
        raise ConfigError([f"{source}: the config is empty; it needs at least 'targets'"])
    v = Validator(base_dir or Path.cwd())
    config = v.config(raw, source)
    if v.problems:
        raise ConfigError(list(dict.fromkeys(v.problems)))  # defaults' problems once
    assert config is not None
    return config

