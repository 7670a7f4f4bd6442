"""Read targets.yml: a regular file, size limit, UTF-8, YAML without duplicate keys, then validation."""

from __future__ import annotations

import errno
import inspect
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from probe.config.model import Config, ConfigError
from probe.config.sections import Validator

MAX_CONFIG_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 64  # nesting levels of YAML collections; a config needs about 6


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; raise ConfigError naming every problem."""
    p = Path(path)
    try:
        data = read_bounded(p)
    except OSError as e:
        raise ConfigError([f"{p}: cannot read: {e.strerror or e}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{p}: not UTF-8 text: {e.reason} at byte {e.start}"]) from None
    return loads(text, source=str(p), base_dir=p.parent)


def read_bounded(p: Path) -> bytes:
    """Return the bytes of a regular file of at most MAX_CONFIG_BYTES; raise ConfigError for anything else.

    The file is opened without blocking and checked on the open descriptor: a FIFO would hang
    the reader, and a device (a symlink to /dev/zero has size 0) would be read without end.
    """
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError([f"{p}: not a regular file ({_file_kind(info.st_mode)}); only regular files are read"])
        if info.st_size > MAX_CONFIG_BYTES:
            raise ConfigError([f"{p}: file is {info.st_size} bytes; the limit is {MAX_CONFIG_BYTES}"])
        chunks, size = [], 0
        while chunk := os.read(fd, min(1 << 20, MAX_CONFIG_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_CONFIG_BYTES:  # it grew while being read
                raise ConfigError([f"{p}: file is larger than {MAX_CONFIG_BYTES} bytes, the limit"])
        return b"".join(chunks)
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a file"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node)
            try:
                hash(key)
            except TypeError:  # a tagged scalar such as `!!set a: 1` builds an unhashable key
                raise yaml.constructor.ConstructorError(
                    None, None, f"unhashable key ({type(key).__name__})", key_node.start_mark
                ) from None
            if key in seen:
                first = seen[key].start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {str(key)[:100]!r} (first at line {first})", key_node.start_mark
                )
            seen[key] = key_node
        return super().construct_mapping(node, deep)

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        # Composing recurses once a level: bound it before Python's own limit turns into a traceback.
        depth = getattr(self, "_depth", 0) + 1
        if depth > MAX_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark,  # type: ignore[no-untyped-call]
            )
        self._depth = depth
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth - 1


def _guarded(construct: Callable[[yaml.SafeLoader, yaml.Node], Any]) -> Callable[[yaml.SafeLoader, yaml.Node], Any]:
    """Turn a scalar constructor's own errors (`!!int x`, `!!timestamp x`) into a YAML error at the node."""

    def checked(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        try:
            return construct(loader, node)
        except (ValueError, TypeError, AttributeError, ArithmeticError, LookupError):  # e.g. `!!bool 0x`
            tag = str(node.tag).rsplit(":", 1)[-1]
            value = str(node.value)[:60] if isinstance(node, yaml.ScalarNode) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"bad !!{tag} value {value!r}", node.start_mark
            ) from None

    return checked


for _tag, _construct in list(yaml.SafeLoader.yaml_constructors.items()):
    if _tag is not None and not inspect.isgeneratorfunction(_construct):  # collections build lazily
        _StrictLoader.add_constructor(_tag, _guarded(_construct))


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
    except RecursionError:  # MAX_DEPTH should make this unreachable; a traceback would be worse
        raise ConfigError([f"{source}: YAML error: nested too deeply"]) from None
    if raw is None:
        raise ConfigError([f"{source}: the config is empty; it needs at least 'targets'"])
    v = Validator(base_dir or Path.cwd())
    config = v.config(raw, source)
    if v.problems:
        raise ConfigError(list(dict.fromkeys(v.problems)))  # defaults' problems once
    assert config is not None
    return config

