"""The config: its values (model), how they are read (load) and checked (checks per section).

Modules that only need the types import them from here or from `probe.config.model`; only the
service and the command line load files.
"""

from probe.config.load import MAX_CONFIG_BYTES, load, loads
from probe.config.model import (
    DEFAULT_INTERVAL,
    DEFAULT_LISTEN,
    DEFAULT_TIMEOUT,
    DIRECT_ROUTE,
    PATH_SAMPLE_DEADLINE,
    SYSTEM_RESOLVER,
    Config,
    ConfigError,
    Download,
    Expect,
    HttpCheck,
    PathCheck,
    Proxy,
    Resolver,
    ResolverType,
    Route,
    Target,
    TargetKind,
    is_ip,
)
from probe.config.values import parse_duration, parse_hostport, parse_proxy, parse_shard
from probe.models import PathMethod

__all__ = [
    "DEFAULT_INTERVAL", "DEFAULT_LISTEN", "DEFAULT_TIMEOUT", "DIRECT_ROUTE", "MAX_CONFIG_BYTES",
    "PATH_SAMPLE_DEADLINE", "SYSTEM_RESOLVER", "Config", "ConfigError", "Download", "Expect", "HttpCheck",
    "PathCheck", "PathMethod", "Proxy", "Resolver", "ResolverType", "Route", "Target", "TargetKind", "is_ip", "load",
    "loads", "parse_duration", "parse_hostport", "parse_proxy", "parse_shard",
]
