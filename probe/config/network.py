"""Check the resolvers and routes sections."""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from probe.config.checks import Checks
from probe.config.model import DIRECT_ROUTE, SYSTEM_RESOLVER, Resolver, ResolverType, Route
from probe.config.values import parse_hostport, parse_proxy

_RESOLVER_KEYS = {"name", "type", "address", "url", "server_name", "control", "ca_file"}
_ROUTE_KEYS = {"name", "source_address", "proxy", "resolver"}


class NetworkChecks(Checks):
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
                try:
                    parts = urlsplit(text)
                    host_ok = bool(parts.hostname) and parts.port != 0  # .port raises on a bad port
                except ValueError:  # an unclosed [ of an IPv6 address, a bad port
                    host_ok = False
                if not host_ok or parts.scheme != "https":
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
