"""Load and validate targets.yml into frozen values; every problem names its path."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import ssl
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import yaml

MAX_CONFIG_BYTES = 4 * 1024 * 1024
NAME_RE = re.compile(r"^[a-z0-9_.-]+$")
DEFAULT_LISTEN = "0.0.0.0:9516"
DEFAULT_INTERVAL = 30.0
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_DOWNLOAD_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_DNS_REPLY_WINDOW = 0.5
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class ConfigError(Exception):
    """The config is invalid; `problems` holds one `path: message` line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class ResolverType(StrEnum):
    SYSTEM = "system"
    UDP = "udp"
    TCP = "tcp"
    DOT = "dot"
    DOH = "doh"


class TargetKind(StrEnum):
    HTTP = "http"
    TCP = "tcp"
    TLS = "tls"


@dataclass(frozen=True, slots=True)
class Resolver:
    name: str
    type: ResolverType
    host: str | None = None  # an IP address for udp/tcp/dot
    port: int | None = None
    url: str | None = None  # doh
    server_name: str | None = None  # dot: the name its certificate must carry
    control: bool = False
    ca_file: str | None = None


SYSTEM_RESOLVER = Resolver(name="system", type=ResolverType.SYSTEM)


@dataclass(frozen=True, slots=True)
class Proxy:
    scheme: str  # socks5 | socks5h | http
    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    def redacted(self) -> str:
        """Return the proxy URL without credentials, safe for logs and JSON."""
        auth = "***@" if self.username is not None else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{auth}{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    source_address: str | None = None
    proxy: Proxy | None = None
    resolver: str | None = None  # name of the resolver used for the connection stages


DIRECT_ROUTE = Route(name="direct")


@dataclass(frozen=True, slots=True)
class Expect:
    status: tuple[int, ...] = ()  # empty: any 2xx
    body_contains: tuple[str, ...] = ()
    body_regex: tuple[re.Pattern[str], ...] = ()
    headers: tuple[tuple[str, re.Pattern[str]], ...] = ()  # (lower-case name, pattern)

    def status_ok(self, status: int) -> bool:
        """Return whether `status` is expected."""
        return status in self.status if self.status else 200 <= status <= 299


@dataclass(frozen=True, slots=True)
class Download:
    url: str
    min_bytes_per_second: float
    max_bytes: int = DEFAULT_DOWNLOAD_MAX_BYTES


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    kind: TargetKind
    host: str  # name or IP literal (no brackets)
    port: int
    url: str | None = None
    server_name: str | None = None  # SNI and certificate name; default: host
    expect: Expect = field(default_factory=Expect)
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    follow_redirects: bool = True
    download: Download | None = None
    routes: tuple[str, ...] = ("direct",)
    resolvers: tuple[str, ...] = ()
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    ca_file: str | None = None
    dnssec: bool = False  # validate the answer chain (DNSSEC) for this name
    dns_reply_window: float = DEFAULT_DNS_REPLY_WINDOW  # UDP: keep listening this long after the first reply
    group: str | None = None  # endpoints serving the same content (mirrors, regions) share a group

    @property
    def uses_tls(self) -> bool:
        """Return whether the probe does a TLS handshake."""
        return self.kind is TargetKind.TLS or (self.url or "").startswith("https:")

    @property
    def sni(self) -> str:
        """Return the name sent as SNI and checked in the certificate."""
        return self.server_name or self.host

    @property
    def needs_dns(self) -> bool:
        """Return whether the host is a name rather than an IP literal."""
        return not is_ip(self.host)


@dataclass(frozen=True, slots=True)
class Config:
    vantage: str
    listen: str
    resolvers: tuple[Resolver, ...]
    routes: tuple[Route, ...]
    targets: tuple[Target, ...]
    canaries: tuple[str, ...] = ()
    bogons: tuple[str, ...] | None = None
    path: str | None = None
    _targets_by_name: dict[str, Target] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # target() runs for every recorded result: a dict, not a scan of thousands of targets.
        object.__setattr__(self, "_targets_by_name", {t.name: t for t in self.targets})

    def route(self, name: str) -> Route:
        """Return the route called `name`."""
        return next(r for r in self.routes if r.name == name)

    def resolver(self, name: str) -> Resolver:
        """Return the resolver called `name` (`system` always exists)."""
        for r in self.resolvers:
            if r.name == name:
                return r
        if name == SYSTEM_RESOLVER.name:
            return SYSTEM_RESOLVER
        raise KeyError(name)

    def target(self, name: str) -> Target:
        """Return the target called `name`."""
        return self._targets_by_name[name]

    def shard(self, index: int, count: int) -> Config:
        """Return the config with only this shard's targets (of `count`, 0-based `index`).

        A target belongs to shard crc32(name) % count: stable across restarts and replicas,
        and all routes of a target stay in one replica so its ranking stays whole.
        """
        mine = tuple(t for t in self.targets if zlib.crc32(t.name.encode()) % count == index)
        return dataclasses.replace(self, targets=mine)

    def route_resolver(self, route: Route) -> Resolver:
        """Return the resolver whose answers a route connects to."""
        return self.resolver(route.resolver or SYSTEM_RESOLVER.name)


def is_ip(text: str) -> bool:
    """Return whether `text` is an IPv4 or IPv6 literal."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def parse_duration(text: str) -> float:
    """Parse `250ms`, `10s`, `5m`, `1h30m` into seconds; raise ValueError otherwise."""
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos == 0 or pos != len(text):
        raise ValueError(f"bad duration {text!r} (use e.g. 250ms, 10s, 5m, 1h)")
    return total


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """Split `host:port` or `[v6]:port` (port optional when a default is given)."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {text!r}")
        port_text = rest[1:] if rest else ""
    elif text.count(":") > 1:  # bare IPv6
        host, port_text = text, ""
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"bad address {text!r}: no host")
    if not port_text:
        if default_port is None:
            raise ValueError(f"bad address {text!r}: needs host:port")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port_text)


def parse_shard(text: str) -> tuple[int, int]:
    """Parse `i/n` (1-based, as operators count replicas) into a 0-based (index, count)."""
    index, sep, count = text.partition("/")
    if not sep or not index.isdigit() or not count.isdigit() or not 1 <= int(index) <= int(count):
        raise ValueError(f"bad shard {text!r}: use i/n with 1 <= i <= n, e.g. 2/3")
    return int(index) - 1, int(count)


def parse_proxy(text: str) -> Proxy:
    """Parse a `socks5://`, `socks5h://` or `http://` proxy URL."""
    try:
        parts = urlsplit(text)
    except ValueError as e:  # e.g. an unclosed [ of an IPv6 address
        raise ValueError(f"bad proxy {_redact(text)!r}: {str(e)[:80]}") from None
    if parts.scheme not in ("socks5", "socks5h", "http"):
        raise ValueError(f"bad proxy {_redact(text)!r}: scheme must be socks5, socks5h or http")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"bad proxy {_redact(text)!r}: only scheme://[user:pass@]host:port")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad proxy {_redact(text)!r}: bad port") from None
    if port == 0:
        raise ValueError(f"bad proxy {_redact(text)!r}: bad port")
    if not parts.hostname or port is None:
        raise ValueError(f"bad proxy {_redact(text)!r}: needs host:port")
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return Proxy(parts.scheme, parts.hostname, port, user, password)


def _redact(url: str) -> str:
    # Greedy up to the last '@': an unencoded '@' or '/' in a password must not leak.
    return re.sub(r"//.*@", "//***@", url)


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
    v = _Validator(base_dir or Path.cwd())
    config = v.config(raw, source)
    if v.problems:
        raise ConfigError(list(dict.fromkeys(v.problems)))  # defaults' problems once
    assert config is not None
    return config


T = TypeVar("T")

_TOP_KEYS = {"vantage", "listen", "defaults", "resolvers", "canaries", "bogons", "routes", "targets"}
_TARGET_KEYS = {
    "name", "url", "address", "tls", "server_name", "expect", "method", "headers",
    "max_body_bytes", "follow_redirects", "download", "routes", "resolvers",
    "interval", "timeout", "ca_file", "dnssec", "dns_reply_window", "group",
}
_DEFAULTABLE = _TARGET_KEYS - {"name", "url", "address", "group"}
_RESOLVER_KEYS = {"name", "type", "address", "url", "server_name", "control", "ca_file"}
_ROUTE_KEYS = {"name", "source_address", "proxy", "resolver"}
_EXPECT_KEYS = {"status", "body_contains", "body_regex", "headers"}
_DOWNLOAD_KEYS = {"url", "min_bytes_per_second", "max_bytes"}


class _Invalid(Exception):
    pass


class _Validator:
    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.problems: list[str] = []
        self._ca_checked: dict[str, str | None] = {}

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def mapping(self, value: Any, path: str, allowed: set[str]) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.fail(path, f"must be a mapping, not {_kind(value)}")
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
            self.fail(path, f"must be {what}, not {_kind(value)}")
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
            self.fail(path, f"must be a duration like 10s, not {_kind(value)}")
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
            self.fail(path, f"must be a string or a list of strings, not {_kind(value)}")
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

    # --- sections -------------------------------------------------------------------

    def config(self, raw: Any, source: str) -> Config | None:
        top = self.mapping(raw, "", _TOP_KEYS)
        if top is None:
            self.problems[-1] = f"{source}: the config must be a mapping with 'targets', not {_kind(raw)}"
            return None
        vantage = os.environ.get("PROBE_VANTAGE") or top.get("vantage")
        if vantage is None:
            vantage = socket.gethostname().split(".")[0].lower() or "default"
        vantage = self.typed(vantage, "vantage", str, "a string")
        if vantage is not None and not vantage.strip():
            self.fail("vantage", "must not be empty")
        listen = top.get("listen", DEFAULT_LISTEN)
        if self.typed(listen, "listen", str, "host:port") is not None:
            try:
                parse_hostport(listen)
            except ValueError as e:
                self.fail("listen", str(e))
        resolvers = self.resolvers(top.get("resolvers"))
        routes = self.routes(top.get("routes"), {r.name for r in resolvers} | {"system"})
        canaries = self.ip_list(top.get("canaries"), "canaries")
        bogons = self.cidrs(top.get("bogons"))
        defaults_raw = top.get("defaults")
        defaults = {} if defaults_raw is None else self.mapping(defaults_raw, "defaults", _DEFAULTABLE) or {}
        targets = self.targets(top.get("targets"), defaults, routes, resolvers)
        if self.problems:
            return None
        return Config(
            vantage=str(vantage),
            listen=str(listen),
            resolvers=resolvers,
            routes=routes,
            targets=targets,
            canaries=canaries,
            bogons=bogons,
            path=source,
        )

    def ip_list(self, raw: Any, path: str) -> tuple[str, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.fail(path, f"must be a list of IP addresses, not {_kind(raw)}")
            return ()
        return tuple(ip for i, v in enumerate(raw) if (ip := self.ip(v, f"{path}[{i}]")))

    def cidrs(self, raw: Any) -> tuple[str, ...] | None:
        if raw is None:
            return None
        if not isinstance(raw, list):
            self.fail("bogons", f"must be null or a list of CIDRs, not {_kind(raw)}")
            return None
        out = []
        for i, item in enumerate(raw):
            text = self.typed(item, f"bogons[{i}]", str, "a CIDR")
            if text is None:
                continue
            try:
                out.append(str(ipaddress.ip_network(text, strict=False)))
            except ValueError:
                self.fail(f"bogons[{i}]", f"{text!r} is not a CIDR")
        return tuple(out)

    def named_list(self, raw: Any, path: str, parse: Callable[[Any, str], T | None]) -> list[T]:
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.fail(path, f"must be a list, not {_kind(raw)}")
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

    def resolvers(self, raw: Any) -> tuple[Resolver, ...]:
        if raw is None:
            return (SYSTEM_RESOLVER,)
        return tuple(self.named_list(raw, "resolvers", self.resolver))

    def resolver(self, raw: Any, path: str) -> Resolver | None:
        m = self.mapping(raw, path, _RESOLVER_KEYS)
        if m is None:
            return None
        name = self.name(m.get("name"), f"{path}.name") if "name" in m else None
        if "name" not in m:
            self.fail(f"{path}.name", "missing")
        rtype_raw = m.get("type")
        if rtype_raw is None:
            self.fail(f"{path}.type", "missing (one of system, udp, tcp, dot, doh)")
            return None
        try:
            rtype = ResolverType(rtype_raw)
        except ValueError:
            self.fail(f"{path}.type", f"unknown type {rtype_raw!r} (one of system, udp, tcp, dot, doh)")
            return None
        control = self.typed(m.get("control", False), f"{path}.control", bool, "true or false")
        ca = self.ca_file(m.get("ca_file"), f"{path}.ca_file")
        host: str | None = None
        port: int | None = None
        url: str | None = None
        server_name = m.get("server_name")
        if server_name is not None:
            server_name = self.typed(server_name, f"{path}.server_name", str, "a host name")
        allowed_extra = {
            ResolverType.SYSTEM: set(),
            ResolverType.UDP: {"address"},
            ResolverType.TCP: {"address"},
            ResolverType.DOT: {"address", "server_name", "ca_file"},
            ResolverType.DOH: {"url", "ca_file"},
        }[rtype]
        for key in ("address", "url", "server_name", "ca_file"):
            if key in m and key not in allowed_extra:
                self.fail(f"{path}.{key}", f"not used by a {rtype} resolver")
        if rtype in (ResolverType.UDP, ResolverType.TCP, ResolverType.DOT):
            addr = m.get("address")
            if addr is None:
                self.fail(f"{path}.address", f"missing (a {rtype} resolver needs ip or ip:port)")
            elif (text := self.typed(addr, f"{path}.address", str, "ip or ip:port")) is not None:
                try:
                    host, port = parse_hostport(text, 853 if rtype is ResolverType.DOT else 53)
                    ipaddress.ip_address(host)
                except ValueError:
                    self.fail(f"{path}.address", f"{text!r} is not ip or ip:port")
        elif rtype is ResolverType.DOH:
            raw_url = m.get("url")
            if raw_url is None:
                self.fail(f"{path}.url", "missing (a doh resolver needs an https:// URL)")
            elif (text := self.typed(raw_url, f"{path}.url", str, "an https:// URL")) is not None:
                parts = urlsplit(text)
                if parts.scheme != "https" or not parts.hostname:
                    self.fail(f"{path}.url", f"{text!r} must be an https:// URL")
                else:
                    url = text
        if name is None or self.problems and self.problems[-1].startswith(path):
            return None
        return Resolver(name, rtype, host, port, url, server_name, bool(control), ca)

    def routes(self, raw: Any, resolver_names: set[str]) -> tuple[Route, ...]:
        routes = self.named_list(raw, "routes", lambda r, p: self.route(r, p, resolver_names))
        if not any(r.name == "direct" for r in routes):
            routes.insert(0, DIRECT_ROUTE)
        return tuple(routes)

    def route(self, raw: Any, path: str, resolver_names: set[str]) -> Route | None:
        m = self.mapping(raw, path, _ROUTE_KEYS)
        if m is None:
            return None
        before = len(self.problems)
        if "name" not in m:
            self.fail(f"{path}.name", "missing")
        name = self.name(m.get("name"), f"{path}.name") if "name" in m else None
        source = self.ip(m["source_address"], f"{path}.source_address") if "source_address" in m else None
        proxy = None
        if "proxy" in m:
            text = self.typed(m["proxy"], f"{path}.proxy", str, "a proxy URL")
            if text is not None:
                try:
                    proxy = parse_proxy(text)
                except ValueError as e:
                    self.fail(f"{path}.proxy", str(e))
        resolver = None
        if "resolver" in m:
            resolver = self.typed(m["resolver"], f"{path}.resolver", str, "a resolver name")
            if resolver is not None and resolver not in resolver_names:
                self.fail(f"{path}.resolver", f"unknown resolver {resolver!r}")
        if name == "direct" and (source or proxy):
            self.fail(path, "the route 'direct' cannot have a source_address or proxy")
        if len(self.problems) > before or name is None:
            return None
        return Route(name, source, proxy, resolver)

    def targets(
        self,
        raw: Any,
        defaults: Mapping[str, Any],
        routes: tuple[Route, ...],
        resolvers: tuple[Resolver, ...],
    ) -> tuple[Target, ...]:
        if raw is None:
            self.fail("targets", "missing: list at least one target")
            return ()
        if isinstance(raw, list) and not raw:
            self.fail("targets", "empty: list at least one target")
            return ()
        ctx = (defaults, {r.name for r in routes}, tuple(r.name for r in resolvers))
        return tuple(self.named_list(raw, "targets", lambda t, p: self.target(t, p, *ctx)))

    def target(
        self,
        raw: Any,
        path: str,
        defaults: Mapping[str, Any],
        route_names: set[str],
        resolver_names: tuple[str, ...],
    ) -> Target | None:
        m = self.mapping(raw, path, _TARGET_KEYS)
        if m is None:
            return None
        before = len(self.problems)

        def get(key: str, default: Any = None) -> tuple[Any, str]:
            if key in m:
                return m[key], f"{path}.{key}"
            return defaults.get(key, default), f"defaults.{key}"

        if "name" not in m:
            self.fail(f"{path}.name", "missing")
        name = self.name(m.get("name"), f"{path}.name") if "name" in m else None
        kwargs: dict[str, Any] = {}
        if ("url" in m) == ("address" in m):
            self.fail(path, "needs exactly one of 'url' (http/https) or 'address' (host:port)")
            return None
        tls_raw, tls_path = get("tls", False)
        tls = self.typed(tls_raw, tls_path, bool, "true or false")
        # A bad url or address still lets the rest of the target be checked, so that
        # every problem is reported at once; the target is dropped at the end.
        host, port = "", 0
        if "url" in m:
            kind = TargetKind.HTTP
            url = self.typed(m["url"], f"{path}.url", str, "a URL")
            parsed = self.http_url(url, f"{path}.url") if url is not None else None
            if parsed is not None:
                host, port = parsed
                kwargs["url"] = url
            if "tls" in m:
                self.fail(f"{path}.tls", "only for 'address' targets (an https:// url implies TLS)")
        else:
            kind = TargetKind.TLS if tls else TargetKind.TCP
            text = self.typed(m["address"], f"{path}.address", str, "host:port")
            if text is not None:
                try:
                    host, port = parse_hostport(text)
                except ValueError as e:
                    self.fail(f"{path}.address", str(e))
            for key in ("expect", "method", "headers", "download", "follow_redirects", "max_body_bytes"):
                if key in m:
                    self.fail(f"{path}.{key}", "only for 'url' targets")
        sni, sni_path = get("server_name")
        if sni is not None and self.typed(sni, sni_path, str, "a host name") is not None:
            if "server_name" in m and kind is TargetKind.TCP:
                self.fail(sni_path, "only for TLS targets (https:// url or tls: true)")
            kwargs["server_name"] = sni
        if kind is TargetKind.HTTP:
            expect_raw, expect_path = get("expect")
            if expect_raw is not None:
                expect = self.expect(expect_raw, expect_path)
                if expect is not None:
                    kwargs["expect"] = expect
            method, method_path = get("method", "GET")
            if self.typed(method, method_path, str, "an HTTP method") is not None:
                if not re.fullmatch(r"[A-Z]+", method):
                    self.fail(method_path, f"{method!r} is not an HTTP method like GET or HEAD")
                kwargs["method"] = method
            headers_raw, headers_path = get("headers")
            if headers_raw is not None:
                kwargs["headers"] = self.request_headers(headers_raw, headers_path)
            mbb, mbb_path = get("max_body_bytes")
            if mbb is not None and (n := self.positive_int(mbb, mbb_path)) is not None:
                kwargs["max_body_bytes"] = n
            fr, fr_path = get("follow_redirects", True)
            if self.typed(fr, fr_path, bool, "true or false") is not None:
                kwargs["follow_redirects"] = fr
            dl_raw, dl_path = get("download")
            if dl_raw is not None:
                kwargs["download"] = self.download(dl_raw, dl_path)
        interval_raw, interval_path = get("interval", None)
        interval = DEFAULT_INTERVAL if interval_raw is None else self.duration(interval_raw, interval_path)
        timeout_raw, timeout_path = get("timeout", None)
        timeout = DEFAULT_TIMEOUT if timeout_raw is None else self.duration(timeout_raw, timeout_path)
        if interval is not None and timeout is not None:
            if timeout_raw is None:
                timeout = min(timeout, interval)
            elif timeout > interval and "interval" in m and "timeout" not in m:
                message = f"interval {interval_raw} is shorter than {timeout_path} ({timeout:g}s)"
                self.fail(interval_path, message)
            elif timeout > interval:
                self.fail(timeout_path, f"timeout {timeout_raw} is longer than the interval ({interval:g}s)")
        kwargs["interval"], kwargs["timeout"] = interval, timeout
        ca_raw, ca_path = get("ca_file")
        kwargs["ca_file"] = self.ca_file(ca_raw, ca_path)
        dnssec_raw, dnssec_path = get("dnssec", False)
        if self.typed(dnssec_raw, dnssec_path, bool, "true or false") is not None:
            kwargs["dnssec"] = dnssec_raw
        window_raw, window_path = get("dns_reply_window")
        if window_raw is not None and (window := self.duration(window_raw, window_path)) is not None:
            if timeout is not None and window >= timeout:
                self.fail(window_path, f"dns_reply_window {window_raw} must be shorter than the timeout ({timeout:g}s)")
            else:
                kwargs["dns_reply_window"] = window
        if "group" in m:
            group = self.name(m["group"], f"{path}.group")
            if group is not None:
                kwargs["group"] = group
        routes_raw, routes_path = get("routes", ["direct"])
        kwargs["routes"] = self.references(routes_raw, routes_path, set(route_names), "route")
        res_raw, res_path = get("resolvers")
        if res_raw is None:
            kwargs["resolvers"] = resolver_names
        else:
            known = set(resolver_names) | {SYSTEM_RESOLVER.name}  # like routes and Config.resolver
            kwargs["resolvers"] = self.references(res_raw, res_path, known, "resolver")
        if len(self.problems) > before or name is None:
            return None
        return Target(name=name, kind=kind, host=host, port=port, **kwargs)

    def http_url(self, url: str, path: str) -> tuple[str, int] | None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            self.fail(path, f"{url!r} must start with http:// or https://")
            return None
        try:
            explicit_port = parts.port
        except ValueError:
            explicit_port = 0
        if explicit_port == 0:
            self.fail(path, f"{url!r} has a bad port")
            return None
        port = explicit_port or (443 if parts.scheme == "https" else 80)
        if not parts.hostname:
            self.fail(path, f"{url!r} has no host")
            return None
        return parts.hostname, port

    def references(self, raw: Any, path: str, known: set[str], what: str) -> tuple[str, ...]:
        if not isinstance(raw, list) or not raw:
            got = "an empty list" if raw == [] else _kind(raw)
            self.fail(path, f"must be a non-empty list of {what} names, not {got}")
            return ()
        out: list[str] = []
        for i, item in enumerate(raw):
            text = self.typed(item, f"{path}[{i}]", str, f"a {what} name")
            if text is None:
                continue
            if text not in known:
                self.fail(f"{path}[{i}]", f"unknown {what} {text!r}")
            elif text in out:
                self.fail(f"{path}[{i}]", f"{what} {text!r} listed twice")
            else:
                out.append(text)
        return tuple(out)

    def expect(self, raw: Any, path: str) -> Expect | None:
        m = self.mapping(raw, path, _EXPECT_KEYS)
        if m is None:
            return None
        status: list[int] = []
        if "status" in m:
            is_list = isinstance(m["status"], list)
            values = m["status"] if is_list else [m["status"]]
            for i, v in enumerate(values):
                item_path = f"{path}.status[{i}]" if is_list else f"{path}.status"
                code = self.typed(v, item_path, int, "an HTTP status code")
                if code is not None and not 100 <= code <= 599:
                    self.fail(item_path, f"{code} is not an HTTP status code")
                elif code is not None:
                    status.append(code)
        contains: tuple[str, ...] | None = ()
        if "body_contains" in m:
            contains = self.string_list(m["body_contains"], f"{path}.body_contains")
        regexes: list[re.Pattern[str]] = []
        if "body_regex" in m:
            is_list = isinstance(m["body_regex"], list)
            for i, text in enumerate(self.string_list(m["body_regex"], f"{path}.body_regex") or ()):
                pattern = self.regex(text, f"{path}.body_regex[{i}]" if is_list else f"{path}.body_regex")
                if pattern is not None:
                    regexes.append(pattern)
        headers: list[tuple[str, re.Pattern[str]]] = []
        if "headers" in m:
            hm = m["headers"]
            if not isinstance(hm, dict):
                self.fail(f"{path}.headers", f"must be a mapping of header name to regex, not {_kind(hm)}")
            else:
                for key, value in hm.items():
                    source = self.typed(value, f"{path}.headers.{key}", str, "a regex")
                    if source is not None and (pattern := self.regex(source, f"{path}.headers.{key}")):
                        headers.append((str(key).lower(), pattern))
        return Expect(tuple(status), contains or (), tuple(regexes), tuple(headers))

    def regex(self, text: str, path: str) -> re.Pattern[str] | None:
        try:
            return re.compile(text)
        except re.error as e:
            self.fail(path, f"bad regex {text!r}: {e}")
            return None

    def request_headers(self, raw: Any, path: str) -> tuple[tuple[str, str], ...]:
        if not isinstance(raw, dict):
            self.fail(path, f"must be a mapping of header name to value, not {_kind(raw)}")
            return ()
        out = []
        for key, value in raw.items():
            if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", key):
                self.fail(f"{path}.{key}", "not a valid header name")
                continue
            text = self.typed(value, f"{path}.{key}", str, "a string")
            if text is not None and ("\r" in text or "\n" in text):
                self.fail(f"{path}.{key}", "header values cannot contain line breaks")
            elif text is not None:
                out.append((key, text))
        return tuple(out)

    def download(self, raw: Any, path: str) -> Download | None:
        m = self.mapping(raw, path, _DOWNLOAD_KEYS)
        if m is None:
            return None
        url = None
        if "url" not in m:
            self.fail(f"{path}.url", "missing")
        elif (text := self.typed(m["url"], f"{path}.url", str, "a URL")) is not None:
            if self.http_url(text, f"{path}.url") is not None:
                url = text
        if "min_bytes_per_second" not in m:
            self.fail(f"{path}.min_bytes_per_second", "missing")
            rate = None
        else:
            rate = self.positive_number(m["min_bytes_per_second"], f"{path}.min_bytes_per_second")
        max_bytes = DEFAULT_DOWNLOAD_MAX_BYTES
        if "max_bytes" in m:
            max_bytes = self.positive_int(m["max_bytes"], f"{path}.max_bytes") or max_bytes
        if url is None or rate is None:
            return None
        return Download(url, rate, max_bytes)


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


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean", int: "a number", float: "a number", str: "a string",
        list: "a list", dict: "a mapping",
    }.get(type(value), type(value).__name__)
