"""Check the targets section (with `defaults`): one Target per entry, HTTP settings only on url targets."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from probe.config.checks import kind_of
from probe.config.model import (
    DEFAULT_DOWNLOAD_MAX_BYTES,
    DEFAULT_INTERVAL,
    DEFAULT_TIMEOUT,
    SYSTEM_RESOLVER,
    Download,
    Expect,
    HttpCheck,
    Resolver,
    Route,
    Target,
    TargetKind,
    is_ip,
)
from probe.config.path import PathChecks
from probe.config.values import parse_hostport
from probe.models import PathMethod

_TARGET_KEYS = {
    "name", "url", "address", "tls", "server_name", "expect", "method", "headers",
    "max_body_bytes", "follow_redirects", "allow_insecure_redirects", "download", "routes", "resolvers",
    "interval", "timeout", "ca_file", "dnssec", "dns_reply_window", "group", "path", "locate",
    "http_version", "control_sni", "histograms",
}
DEFAULTABLE = _TARGET_KEYS - {"name", "url", "address", "group", "http_version"}
_URL_ONLY_KEYS = (
    "expect", "method", "headers", "download", "follow_redirects", "max_body_bytes", "allow_insecure_redirects",
)
_EXPECT_KEYS = {"status", "body_contains", "body_regex", "headers"}
_DOWNLOAD_KEYS = {"url", "min_bytes_per_second", "max_bytes"}



class TargetChecks(PathChecks):
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
        ctx = (defaults, {r.name: r for r in routes}, tuple(r.name for r in resolvers))
        return tuple(self.named_list(raw, "targets", lambda t, p: self.target(t, p, *ctx)))

    def target(
        self,
        raw: Any,
        path: str,
        defaults: Mapping[str, Any],
        known_routes: dict[str, Route],
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
        http_kwargs: dict[str, Any] = {}  # HttpCheck fields, for url targets
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
                http_kwargs["url"] = url
            if "tls" in m:
                self.fail(f"{path}.tls", "only for 'address' targets (an https:// url implies TLS)")
            if "http_version" in m and self.http_version(m["http_version"], f"{path}.http_version", url) == 3:
                kind = TargetKind.HTTP3
        else:
            kind = TargetKind.TLS if tls else TargetKind.TCP
            text = self.typed(m["address"], f"{path}.address", str, "host:port")
            if text is not None:
                try:
                    host, port = parse_hostport(text)
                except ValueError as e:
                    self.fail(f"{path}.address", str(e))
            for key in (*_URL_ONLY_KEYS, "http_version"):
                if key in m:
                    self.fail(f"{path}.{key}", "only for 'url' targets")
        sni, sni_path = get("server_name")
        if sni is not None and self.typed(sni, sni_path, str, "a host name") is not None:
            if "server_name" in m and kind is TargetKind.TCP:
                self.fail(sni_path, "only for TLS targets (https:// url or tls: true)")
            kwargs["server_name"] = sni
        control_raw, control_path = get("control_sni")
        if control_raw is not None and (control := self.host_name(control_raw, control_path)) is not None:
            if "control_sni" in m and kind is TargetKind.TCP:
                self.fail(control_path, "only for TLS targets (https:// url or tls: true)")
            elif kind is not TargetKind.TCP:
                kwargs["control_sni"] = control
        if kind in (TargetKind.HTTP, TargetKind.HTTP3):
            expect_raw, expect_path = get("expect")
            if expect_raw is not None:
                expect = self.once(expect_path, lambda: self.expect(expect_raw, expect_path))
                if expect is not None:
                    http_kwargs["expect"] = expect
            method, method_path = get("method", "GET")
            if self.typed(method, method_path, str, "an HTTP method") is not None:
                if not re.fullmatch(r"[A-Z]+", method):
                    self.fail(method_path, f"{method!r} is not an HTTP method like GET or HEAD")
                http_kwargs["method"] = method
            headers_raw, headers_path = get("headers")
            if headers_raw is not None:
                http_kwargs["headers"] = self.once(
                    headers_path, lambda: self.request_headers(headers_raw, headers_path))
            mbb, mbb_path = get("max_body_bytes")
            if mbb is not None and (n := self.positive_int(mbb, mbb_path)) is not None:
                http_kwargs["max_body_bytes"] = n
            fr, fr_path = get("follow_redirects", True)
            if self.typed(fr, fr_path, bool, "true or false") is not None:
                http_kwargs["follow_redirects"] = fr
            insecure, insecure_path = get("allow_insecure_redirects", False)
            if self.typed(insecure, insecure_path, bool, "true or false") is not None:
                http_kwargs["allow_insecure_redirects"] = insecure
            dl_raw, dl_path = get("download")
            if dl_raw is not None:
                http_kwargs["download"] = self.once(dl_path, lambda: self.download(dl_raw, dl_path))
                dl_url = http_kwargs["download"].url if http_kwargs["download"] is not None else ""
                if kind is TargetKind.HTTP3 and not dl_url.startswith("https://"):
                    self.fail(f"{dl_path}.url", "an http_version 3 target downloads over HTTP/3: use an https:// url")
        interval_raw, interval_path = get("interval", None)
        interval = (DEFAULT_INTERVAL if interval_raw is None
                    else self.once(interval_path, lambda: self.duration(interval_raw, interval_path)))
        timeout_raw, timeout_path = get("timeout", None)
        timeout = (DEFAULT_TIMEOUT if timeout_raw is None
                   else self.once(timeout_path, lambda: self.duration(timeout_raw, timeout_path)))
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
        kwargs["ca_file"] = self.once(ca_path, lambda: self.ca_file(ca_raw, ca_path))
        dnssec_raw, dnssec_path = get("dnssec", False)
        if self.typed(dnssec_raw, dnssec_path, bool, "true or false") is not None:
            kwargs["dnssec"] = dnssec_raw
        histograms_raw, histograms_path = get("histograms", False)
        if self.typed(histograms_raw, histograms_path, bool, "true or false") is not None:
            kwargs["histograms"] = histograms_raw
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
        locate_raw, locate_path = get("locate", False)
        if self.typed(locate_raw, locate_path, bool, "true or false") is not None:
            # A plain TCP connect to an address sends nothing a censor could be found by.
            if locate_raw and "locate" in m and kind is TargetKind.TCP and not self.is_name(host):
                self.fail(locate_path, "nothing to localise: a plain TCP target with an IP address sends no DNS "
                          "query, ClientHello or request")
            kwargs["locate"] = locate_raw
        routes_raw, routes_path = get("routes", ["direct"])
        kwargs["routes"] = self.once(
            routes_path, lambda: self.references(routes_raw, routes_path, known_routes.keys(), "route"))
        path_raw, path_path = get("path")
        if path_raw is not None:
            chosen = tuple(known_routes[r] for r in kwargs["routes"])
            kwargs["path"] = self.path_check(path_raw, path_path, interval, timeout, chosen)
            if kind is TargetKind.HTTP3 and kwargs["path"] is not None and kwargs["path"].method is PathMethod.TCP:
                # QUIC is UDP: a TCP handshake to the port times another protocol, which the path may
                # treat otherwise (censors and shapers often do), so the figures would not be the target's.
                inherited = "" if "path" in m else " (its path comes from defaults.path: `path: null` samples none)"
                self.fail(
                    f"{path}.path.method",
                    f"tcp times TCP handshakes to port {port}, but an http_version 3 target is served over QUIC "
                    f"(UDP): use method icmp, or sample the TCP path on an http_version 1 target{inherited}",
                )
        if kind is TargetKind.HTTP3 and isinstance(routes_raw, list):
            for i, route_name in enumerate(routes_raw):
                route = known_routes.get(route_name) if isinstance(route_name, str) else None
                if route is not None and route.proxy is not None:
                    self.fail(
                        f"{routes_path}[{i}]",
                        f"route {route_name!r} uses a proxy; http_version 3 (QUIC, over UDP) takes only "
                        "direct and source_address routes",
                    )
        res_raw, res_path = get("resolvers")
        if res_raw is None:
            kwargs["resolvers"] = resolver_names
        else:
            known = set(resolver_names) | {SYSTEM_RESOLVER.name}  # like routes and Config.resolver
            kwargs["resolvers"] = self.once(res_path, lambda: self.references(res_raw, res_path, known, "resolver"))
        if len(self.problems) > before or name is None or self.defaults_failed:
            return None
        if kind in (TargetKind.HTTP, TargetKind.HTTP3):
            kwargs["http"] = HttpCheck(**http_kwargs)
        return Target(name=name, kind=kind, host=host, port=port, **kwargs)

    @staticmethod
    def is_name(host: str) -> bool:
        return bool(host) and not is_ip(host)

    def http_version(self, raw: Any, path: str, url: str | None) -> int | None:
        if raw not in (1, 3) or isinstance(raw, bool):
            self.fail(path, f"must be 1 (HTTP/1.1 over TCP) or 3 (HTTP/3 over QUIC), not {raw!r}")
            return None
        if raw == 3 and url is not None and not url.startswith("https://"):
            self.fail(path, f"HTTP/3 needs an https:// url, not {url!r}")
            return None
        return int(raw)

    def host_name(self, raw: Any, path: str) -> str | None:
        text = self.typed(raw, path, str, "a host name")
        if text is not None and not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9])?", text):
            self.fail(path, f"{text!r} is not a host name")
            return None
        return text

    def http_url(self, url: str, path: str) -> tuple[str, int] | None:
        try:
            parts = urlsplit(url)
        except ValueError as e:  # an unclosed [ of an IPv6 address
            self.fail(path, f"{url[:200]!r} is not a URL: {e}")
            return None
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
                self.fail(f"{path}.headers", f"must be a mapping of header name to regex, not {kind_of(hm)}")
            else:
                for key, value in hm.items():
                    source = self.typed(value, f"{path}.headers.{key}", str, "a regex")
                    if source is not None and (pattern := self.regex(source, f"{path}.headers.{key}")):
                        headers.append((str(key).lower(), pattern))
        return Expect(tuple(status), contains or (), tuple(regexes), tuple(headers))

    def request_headers(self, raw: Any, path: str) -> tuple[tuple[str, str], ...]:
        if not isinstance(raw, dict):
            self.fail(path, f"must be a mapping of header name to value, not {kind_of(raw)}")
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

