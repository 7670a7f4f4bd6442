"""Check a whole config: the top-level keys, then each section with its own checks."""

from __future__ import annotations

import ipaddress
import os
import socket
import zoneinfo
from typing import Any

from probe.config.checks import kind_of
from probe.config.model import DEFAULT_LISTEN, Config
from probe.config.network import NetworkChecks
from probe.config.targets import DEFAULTABLE, TargetChecks
from probe.config.values import parse_hostport

_TOP_KEYS = {"vantage", "listen", "defaults", "resolvers", "canaries", "bogons", "routes", "targets", "timezone"}


class Validator(TargetChecks, NetworkChecks):
    """Check a parsed YAML document; `problems` lists what is wrong, each with its path."""

    def config(self, raw: Any, source: str) -> Config | None:
        top = self.mapping(raw, "", _TOP_KEYS)
        if top is None:
            self.problems[-1] = f"{source}: the config must be a mapping with 'targets', not {kind_of(raw)}"
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
        defaults = {} if defaults_raw is None else self.mapping(defaults_raw, "defaults", DEFAULTABLE) or {}
        targets = self.targets(top.get("targets"), defaults, routes, resolvers)
        self.path_rate(targets)
        timezone = self.timezone(top.get("timezone"))
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
            timezone=timezone,
        )

    def timezone(self, raw: Any) -> str | None:
        if raw is None:
            return None
        name = self.typed(raw, "timezone", str, "a time zone name like Asia/Shanghai")
        if name is None:
            return None
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            self.fail("timezone", f"unknown time zone {name!r} (an IANA name like Asia/Shanghai or UTC)")
            return None
        return name

    def ip_list(self, raw: Any, path: str) -> tuple[str, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.fail(path, f"must be a list of IP addresses, not {kind_of(raw)}")
            return ()
        return tuple(ip for i, v in enumerate(raw) if (ip := self.ip(v, f"{path}[{i}]")))

    def cidrs(self, raw: Any) -> tuple[str, ...] | None:
        if raw is None:
            return None
        if not isinstance(raw, list):
            self.fail("bogons", f"must be null or a list of CIDRs, not {kind_of(raw)}")
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
