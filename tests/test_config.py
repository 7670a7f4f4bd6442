"""Config loading: every validation rule has a bad-config fixture with its exact message."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import trustme

from probe import config

ROOT = Path(__file__).resolve().parent.parent
TESTDATA = Path(__file__).resolve().parent / "testdata"

# (fixture, the exact problems, in order). `{file}` stands for the fixture's path and
# `{testdata}` for its folder: messages about the whole file or a resolved ca_file
# path carry them.
INVALID: list[tuple[str, list[str]]] = [
    ("invalid-unknown-top-level-key.yml", ["target: unknown key"]),
    ("invalid-unknown-target-key.yml", ["targets[0].hostname: unknown key"]),
    ("invalid-unknown-expect-key.yml", ["targets[0].expect.foo: unknown key"]),
    (
        "invalid-duration-bad.yml",
        ["targets[0].interval: bad duration '10 seconds' (use e.g. 250ms, 10s, 5m, 1h)"],
    ),
    ("invalid-duration-without-unit.yml", ["targets[0].interval: needs a unit: write 30s or 30ms"]),
    (
        "invalid-duration-zero-or-negative.yml",
        [
            "targets[0].interval: must be longer than zero, not '0s'",
            "defaults.timeout: bad duration '-1s' (use e.g. 250ms, 10s, 5m, 1h)",
            "targets[1].interval: must be longer than zero, not -5",
        ],
    ),
    (
        "invalid-timeout-longer-than-interval.yml",
        ["targets[0].timeout: timeout 20s is longer than the interval (10s)"],
    ),
    (
        "invalid-interval-shorter-than-default-timeout.yml",
        ["targets[1].interval: interval 5s is shorter than defaults.timeout (10s)"],
    ),
    ("invalid-duplicate-target-name.yml", ["targets[1].name: duplicate name 'a' (first at targets[0])"]),
    ("invalid-duplicate-route-name.yml", ["routes[2].name: duplicate name 'hk' (first at routes[1])"]),
    (
        "invalid-duplicate-resolver-name.yml",
        ["resolvers[1].name: duplicate name 'ali' (first at resolvers[0])"],
    ),
    ("invalid-target-name-characters.yml", ["targets[0].name: name 'Sesame HK' must match [a-z0-9_.-]+"]),
    ("invalid-missing-targets.yml", ["targets: missing: list at least one target"]),
    ("invalid-unknown-route.yml", ["targets[2].routes[1]: unknown route 'hk'"]),
    ("invalid-unknown-resolver.yml", ["targets[0].resolvers[1]: unknown resolver 'google'"]),
    (
        "invalid-url-bad-scheme.yml",
        ["targets[0].url: 'ftp://files.example/' must start with http:// or https://"],
    ),
    (
        "invalid-url-and-address.yml",
        ["targets[0]: needs exactly one of 'url' (http/https) or 'address' (host:port)"],
    ),
    (
        "invalid-neither-url-nor-address.yml",
        ["targets[0]: needs exactly one of 'url' (http/https) or 'address' (host:port)"],
    ),
    ("invalid-address-without-port.yml", ["targets[0].address: bad address 'example.com': needs host:port"]),
    (
        "invalid-address-bad-port.yml",
        [
            "targets[0].address: bad port in 'example.com:70000'",
            "targets[1].address: bad port in 'example.com:https'",
            "targets[2].address: bad port in 'example.com:0'",
        ],
    ),
    (
        "invalid-tls-on-url-target.yml",
        ["targets[0].tls: only for 'address' targets (an https:// url implies TLS)"],
    ),
    ("invalid-expect-on-address-target.yml", ["targets[0].expect: only for 'url' targets"]),
    (
        "invalid-http3-proxy-route.yml",
        [
            "targets[0].routes[2]: route 'hk-socks' uses a proxy; http_version 3 (QUIC, over UDP) takes only "
            "direct and source_address routes"
        ],
    ),
    (
        "invalid-http3-plain-http.yml",
        ["targets[0].http_version: HTTP/3 needs an https:// url, not 'http://example.com/'"],
    ),
    (
        "invalid-http-version-value.yml",
        ["targets[0].http_version: must be 1 (HTTP/1.1 over TCP) or 3 (HTTP/3 over QUIC), not 2"],
    ),
    ("invalid-http-version-on-address-target.yml", ["targets[0].http_version: only for 'url' targets"]),
    (
        "invalid-control-sni.yml",
        [
            "defaults.control_sni: 'not a name' is not a host name",
            "targets[1].control_sni: only for TLS targets (https:// url or tls: true)",
        ],
    ),
    (
        "invalid-http3-download-not-https.yml",
        ["targets[0].download.url: an http_version 3 target downloads over HTTP/3: use an https:// url"],
    ),
    ("invalid-status-code.yml", ["targets[0].expect.status[1]: 999 is not an HTTP status code"]),
    (
        "invalid-body-regex.yml",
        ["targets[0].expect.body_regex: bad regex 'ok(': missing ), unterminated subpattern at position 2"],
    ),
    (
        "invalid-resolver-missing-address.yml",
        ["resolvers[1].address: missing (a udp resolver needs ip or ip:port)"],
    ),
    ("invalid-resolver-address-not-ip.yml", ["resolvers[0].address: 'dns.google' is not ip or ip:port"]),
    (
        "invalid-resolver-type.yml",
        ["resolvers[1].type: unknown type 'dnscrypt' (one of system, udp, tcp, dot, doh)"],
    ),
    ("invalid-resolver-key-for-other-type.yml", ["resolvers[0].server_name: not used by a udp resolver"]),
    ("invalid-doh-url-not-https.yml", ["resolvers[1].url: 'http://1.1.1.1/dns-query' must be an https:// URL"]),
    (
        "invalid-proxy-scheme.yml",
        ["routes[1].proxy: bad proxy 'ftp://10.0.0.5:21': scheme must be socks5, socks5h or http"],
    ),
    ("invalid-proxy-without-port.yml", ["routes[1].proxy: bad proxy 'socks5://10.0.0.5': needs host:port"]),
    (
        "invalid-proxy-secrets-not-echoed.yml",
        [
            "routes[1].proxy: bad proxy 'socks5://***@10.0.0.5': needs host:port",
            "routes[2].proxy: bad proxy 'http://***@10.0.0.6:3128': only scheme://[user:pass@]host:port",
            "routes[3].proxy: bad proxy 'socks5h://***@10.0.0.7:99999': bad port",
            "routes[4].proxy: bad proxy 'socks5://***@10.0.0.8': needs host:port",
        ],
    ),
    (
        "invalid-url-ipv6-unclosed.yml",
        [
            "resolvers[0].url: 'https://[2001:db8::53/dns-query' must be an https:// URL",
            "targets[0].url: 'http://[2001:db8::1/' is not a URL: Invalid IPv6 URL",
            "targets[1].download.url: 'https://[2001:db8::2/1MiB.bin' is not a URL: Invalid IPv6 URL",
        ],
    ),
    (
        "invalid-yaml-nested-too-deep.yml",
        ["{file}: YAML syntax error at line 2, column 73: nested deeper than 64 levels"],
    ),
    ("invalid-yaml-bad-int-tag.yml", ["{file}: YAML syntax error at line 3, column 55: bad !!int value 'lots'"]),
    ("invalid-yaml-bad-float-tag.yml", ["{file}: YAML syntax error at line 5, column 21: bad !!float value 'big'"]),
    ("invalid-yaml-unhashable-key.yml", ["{file}: YAML syntax error at line 3, column 5: unhashable key (set)"]),
    (
        "invalid-yaml-bad-timestamp-tag.yml",
        ["{file}: YAML syntax error at line 3, column 49: bad !!timestamp value 'yesterday'"],
    ),
    ("invalid-source-address-not-ip.yml", ["routes[1].source_address: 'eth1' is not an IP address"]),
    (
        "invalid-direct-route-with-proxy.yml",
        ["routes[0]: the route 'direct' cannot have a source_address or proxy"],
    ),
    ("invalid-route-resolver-unknown.yml", ["routes[1].resolver: unknown resolver 'ali'"]),
    (
        "invalid-ca-file-unreadable.yml",
        [
            "resolvers[1].ca_file: cannot read {testdata}/missing-ca.pem: No such file or directory",
            "targets[0].ca_file: cannot read {testdata}/missing-ca.pem: No such file or directory",
        ],
    ),
    (
        "invalid-ca-file-not-pem.yml",
        [
            "targets[0].ca_file: {testdata}/not-a-certificate.pem holds no usable PEM certificate"
            " (NO_CERTIFICATE_OR_CRL_FOUND)"
        ],
    ),
    ("invalid-download-without-min-rate.yml", ["targets[0].download.min_bytes_per_second: missing"]),
    (
        "invalid-download-negative-rate.yml",
        ["targets[0].download.min_bytes_per_second: must be greater than zero, not -100"],
    ),
    (
        "invalid-type-string-for-list.yml",
        [
            "canaries: must be a list of IP addresses, not a string",
            "targets[0].routes: must be a non-empty list of route names, not a string",
        ],
    ),
    (
        "invalid-type-list-for-mapping.yml",
        ["defaults: must be a mapping, not a list", "targets[0].expect: must be a mapping, not a list"],
    ),
    (
        "invalid-type-number-for-string.yml",
        [
            "vantage: must be a string, not a number",
            "targets[0].name: must be a string, not a number",
            "targets[1].url: must be a URL, not a number",
        ],
    ),
    (
        "invalid-locate-not-boolean.yml",
        [
            "defaults.locate: must be true or false, not a string",
            "targets[1].locate: must be true or false, not a number",
        ],
    ),
    (
        "invalid-locate-nothing-to-repeat.yml",
        [
            "targets[0].locate: nothing to localise: a plain TCP target with an IP address sends no DNS query, "
            "ClientHello or request",
        ],
    ),
    (
        "invalid-type-string-for-boolean.yml",
        [
            "resolvers[0].control: must be true or false, not a string",
            "targets[0].follow_redirects: must be true or false, not a string",
            "targets[0].allow_insecure_redirects: must be true or false, not a string",
        ],
    ),
    (
        "invalid-yaml-syntax.yml",
        ["{file}: YAML syntax error at line 5, column 4: expected <block end>, but found '<block mapping start>'"],
    ),
    (
        "invalid-yaml-duplicate-key.yml",
        ["{file}: YAML syntax error at line 5, column 5: duplicate key 'url' (first at line 4)"],
    ),
    (
        "invalid-yaml-tab-indent.yml",
        ["{file}: YAML syntax error at line 3, column 1: found character '\\t' that cannot start any token"],
    ),
    (
        "invalid-proxy-malformed.yml",
        [
            "routes[0].proxy: bad proxy 'socks5h://[::1': Invalid IPv6 URL",
            "routes[1].proxy: bad proxy 'http://***@:3128': needs host:port",
            "routes[2].proxy: bad proxy 'http://h.example:99999': bad port",
            "routes[3].proxy: bad proxy 'socks5://h.example:1080/path?x': only scheme://[user:pass@]host:port",
            "routes[4].proxy: must be a proxy URL, not a number",
        ],
    ),
    ("invalid-empty.yml", ["{file}: the config is empty; it needs at least 'targets'"]),
    ("invalid-top-level-not-mapping.yml", ["{file}: the config must be a mapping with 'targets', not a list"]),
    ("invalid-canaries-not-ips.yml", ["canaries[1]: 'canary.example' is not an IP address"]),
    (
        "invalid-dns-integrity-keys.yml",
        [
            "targets[0].dnssec: must be true or false, not a string",
            "targets[1].dns_reply_window: dns_reply_window 2s must be shorter than the timeout (2s)",
            "targets[2].dns_reply_window: needs a unit: write 500s or 500ms",
        ],
    ),
    (
        "invalid-histograms-not-boolean.yml",
        [
            "targets[0].histograms: must be true or false, not a number",
            "defaults.histograms: must be true or false, not a string",
        ],
    ),
    (
        "invalid-bogons-not-cidrs.yml",
        ["bogons[0]: '10.0.0.0/33' is not a CIDR", "bogons[1]: 'private' is not a CIDR"],
    ),
    (
        "invalid-path-samples-zero.yml",
        [
            "targets[0].path.samples: must be greater than zero, not 0",
            "targets[1].path.samples: 500 is more than 100 samples per run",
        ],
    ),
    (
        "invalid-path-spread-longer-than-interval.yml",
        [
            "targets[0].path.spread: spread 40s is longer than the interval (30s)",
            "targets[1].path.spread: the last of 20 samples goes out 4.75s into the run and may wait 0.9s for its"
            " answer: past the interval (5s)",
        ],
    ),
    (
        "invalid-path-icmp-on-proxy-route.yml",
        [
            "targets[1].path.method: icmp cannot go through proxy route 'hk-socks': use method tcp"
            " (the proxy's CONNECT reply)"
        ],
    ),
    (
        "invalid-path-tcp-on-http3.yml",
        [
            "targets[0].path.method: tcp times TCP handshakes to port 443, but an http_version 3 target is served"
            " over QUIC (UDP): use method icmp, or sample the TCP path on an http_version 1 target",
            "targets[1].path.method: tcp times TCP handshakes to port 8443, but an http_version 3 target is served"
            " over QUIC (UDP): use method icmp, or sample the TCP path on an http_version 1 target (its path"
            " comes from defaults.path: `path: null` samples none)",
        ],
    ),
    (
        "invalid-path-keys.yml",
        [
            "defaults.path.spread: missing (the time the samples are spread over, e.g. 5s)",
            "targets[1].path.count: unknown key",
            "targets[1].path.method: unknown method 'udp' (one of tcp, icmp)",
            "targets[2].path.spread: 50 samples over 1s are 20 ms apart; the least is 50 ms (at most 20 a second"
            " per pair)",
        ],
    ),
    (
        "invalid-path-rate-cap.yml",
        [
            "targets: path sampling would send 2,010 samples a second on average; the cap is 2,000 (fewer samples,"
            " longer intervals or fewer routes)"
        ],
    ),
    ("invalid-timezone.yml", ["timezone: unknown time zone 'Asia/Shangai' (an IANA name like Asia/Shanghai or UTC)"]),
    (
        "invalid-multiple-problems.yml",
        [
            "listen: bad address '0.0.0.0': needs host:port",
            "routes[0].proxy: bad proxy 'socks5://10.0.0.5': needs host:port",
            "targets[0].interval: needs a unit: write 5s or 5ms",
            "targets[0].routes[0]: unknown route 'hk'",
            "targets[1].address: bad address 'example.com': needs host:port",
            "targets[1].resolvers[1]: unknown resolver 'cloudflare'",
            "targets[2].name: duplicate name 'a' (first at targets[0])",
        ],
    ),
]


@pytest.fixture(autouse=True)
def no_vantage_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a PROBE_VANTAGE of the machine running the tests out of every config."""
    monkeypatch.delenv("PROBE_VANTAGE", raising=False)


def load_text(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "targets.yml"
    path.write_text(text, encoding="utf-8")
    return config.load(path)


def problems_of(path: Path) -> list[str]:
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    return info.value.problems


# --- invalid configs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "expected"),
    INVALID,
    ids=[fixture.removeprefix("invalid-").removesuffix(".yml") for fixture, _ in INVALID],
)
def test_invalid_config_is_rejected_with_exact_problems(fixture: str, expected: list[str]) -> None:
    path = TESTDATA / fixture
    wanted = [m.replace("{file}", str(path)).replace("{testdata}", str(TESTDATA)) for m in expected]
    assert problems_of(path) == wanted


def test_every_invalid_fixture_has_a_case() -> None:
    on_disk = {p.name for p in TESTDATA.glob("invalid-*.yml")}
    in_table = [fixture for fixture, _ in INVALID]
    assert len(in_table) == len(set(in_table)), "a fixture is listed twice"
    assert on_disk == set(in_table)


def test_config_error_message_is_one_line_per_problem() -> None:
    error = pytest.raises(config.ConfigError, config.load, TESTDATA / "invalid-bogons-not-cidrs.yml").value
    assert str(error) == "bogons[0]: '10.0.0.0/33' is not a CIDR\nbogons[1]: 'private' is not a CIDR"


def test_proxy_credentials_appear_in_no_problem() -> None:
    text = "\n".join(problems_of(TESTDATA / "invalid-proxy-secrets-not-echoed.yml"))
    for secret in ("alice", "s3cret", "bob", "p@ss", "w0rd", "carol", "hunter2", "dave", "line", "break"):
        assert secret not in text


def test_file_over_the_size_limit_is_rejected_unread(tmp_path: Path) -> None:
    path = tmp_path / "huge.yml"
    path.write_bytes(b"targets: []\n" + b"#" * config.MAX_CONFIG_BYTES)
    size = path.stat().st_size
    assert problems_of(path) == [f"{path}: file is {size} bytes; the limit is 4194304"]


def test_text_over_the_size_limit_is_rejected() -> None:
    with pytest.raises(config.ConfigError) as info:
        config.loads("#" * (config.MAX_CONFIG_BYTES + 1), source="big.yml")
    assert info.value.problems == ["big.yml: config is larger than 4194304 bytes"]


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.yml"
    assert problems_of(path) == [f"{path}: cannot read: No such file or directory"]


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yml"
    path.write_bytes(b"vantage: z\xfcrich\n")
    assert problems_of(path) == [f"{path}: not UTF-8 text: invalid start byte at byte 10"]


# --- the shipped default ---------------------------------------------------------------


def test_shipped_targets_yml_is_valid() -> None:
    cfg = config.load(ROOT / "targets.yml")
    assert [r.name for r in cfg.routes] == ["direct"]
    assert cfg.listen == "0.0.0.0:9516"
    assert cfg.bogons is None
    assert len(cfg.targets) >= 10
    for target in cfg.targets:
        assert target.routes == ("direct",)
        assert (target.interval, target.timeout) == (60.0, 10.0)
        assert target.uses_tls, f"{target.name} is probed without TLS"
        assert target.resolvers == tuple(r.name for r in cfg.resolvers)
        if target.kind is config.TargetKind.HTTP:
            assert target.http is not None and target.http.expect.status, f"{target.name} states no expected status"


def test_shipped_targets_yml_has_chinese_resolvers_and_encrypted_controls() -> None:
    cfg = config.load(ROOT / "targets.yml")
    by_type = {r.name: r.type for r in cfg.resolvers}
    assert by_type["system"] is config.ResolverType.SYSTEM
    assert {r.host for r in cfg.resolvers if r.type is config.ResolverType.UDP} & {"223.5.5.5", "114.114.114.114"}
    controls = {r.type for r in cfg.resolvers if r.control}
    assert controls == {config.ResolverType.DOH, config.ResolverType.DOT}
    doh = next(r for r in cfg.resolvers if r.type is config.ResolverType.DOH)
    assert doh.url is not None and config.is_ip(doh.url.split("/")[2])  # no DNS needed to reach it


def test_shipped_targets_yml_covers_both_sides_of_the_border() -> None:
    hosts = {t.host for t in config.load(ROOT / "targets.yml").targets}
    inside = {"oss-cn-hangzhou.aliyuncs.com", "cos.ap-shanghai.myqcloud.com", "s3.cn-north-1.amazonaws.com.cn"}
    outside = {"s3.amazonaws.com", "storage.googleapis.com", "api.dropboxapi.com"}
    assert inside <= hosts
    assert outside <= hosts


def test_contract_example_is_valid() -> None:
    cfg = config.load(TESTDATA / "valid-contract-example.yml")
    assert cfg.vantage == "cn-shanghai-telecom"
    assert [r.name for r in cfg.routes] == ["direct", "cn2", "hk-socks", "hk-http"]
    assert cfg.route("hk-socks").proxy == config.Proxy("socks5", "10.0.0.5", 1080)
    assert cfg.route("cn2").source_address == "10.0.0.2"
    sesame = cfg.target("sesame-hk")
    assert sesame.kind is config.TargetKind.HTTP
    assert (sesame.host, sesame.port) == ("hk.storage.example", 443)
    assert sesame.http is not None
    assert sesame.http.expect.status == (200,) and sesame.http.expect.body_contains == ("pong",)
    assert sesame.routes == ("direct", "hk-socks") and sesame.resolvers == ("system", "cf-doh")
    assert sesame.http.download == config.Download("https://hk.storage.example/probe/1MiB.bin", 200000.0)
    assert cfg.target("ssh-gw").kind is config.TargetKind.TCP
    s3 = cfg.target("s3-tls")
    assert (s3.kind, s3.sni, s3.uses_tls) == (config.TargetKind.TLS, "s3.example", True)
    dot = cfg.resolver("quad9-dot")
    assert (dot.host, dot.port, dot.server_name, dot.control) == ("9.9.9.9", 853, "dns.quad9.net", True)
    assert (cfg.resolver("ali").host, cfg.resolver("ali").port) == ("223.5.5.5", 53)
    assert cfg.canaries == ("203.0.113.53",)
    assert cfg.timezone is None and all(t.path is None for t in cfg.targets)
    assert not any(t.histograms for t in cfg.targets)


# --- defaults and built-ins ------------------------------------------------------------


def test_defaults_are_inherited_and_overridable(tmp_path: Path) -> None:
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "corp-ca.pem"))
    cfg = load_text(
        tmp_path,
        """
routes:
  - {name: hk, proxy: "socks5://10.0.0.5:1080"}
defaults:
  interval: 5m
  timeout: 20s
  ca_file: corp-ca.pem
  expect: {status: [403]}
  routes: [direct, hk]
  histograms: true
targets:
  - {name: inherits, url: "https://oss.example/"}
  - name: overrides
    url: https://s3.example/
    histograms: false
    interval: 1m
    timeout: 5s
    expect: {status: [307]}
    routes: [hk]
  - {name: plain-tcp, address: "ssh.example:22"}
""",
    )
    inherits, overrides, plain = cfg.targets
    assert (inherits.interval, inherits.timeout) == (300.0, 20.0)
    assert inherits.ca_file == str(tmp_path / "corp-ca.pem")
    assert inherits.http is not None and inherits.http.expect.status == (403,)
    assert inherits.routes == ("direct", "hk")
    assert (overrides.interval, overrides.timeout) == (60.0, 5.0)
    assert overrides.http is not None and overrides.http.expect.status == (307,)
    assert overrides.routes == ("hk",)
    assert (inherits.histograms, overrides.histograms, plain.histograms) == (True, False, True)
    assert overrides.ca_file == inherits.ca_file
    assert plain.http is None  # HTTP-only defaults skip address targets
    assert plain.routes == ("direct", "hk")


def test_timeout_defaults_to_the_interval_when_that_is_shorter(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "targets:\n  - {name: a, address: 'x.example:443', interval: 2s}\n")
    assert (cfg.targets[0].interval, cfg.targets[0].timeout) == (2.0, 2.0)


def test_direct_route_exists_even_if_not_listed(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        """
routes:
  - {name: hk, proxy: "http://user:secret@10.0.0.6:3128"}
targets:
  - {name: a, address: "x.example:443"}
""",
    )
    assert [r.name for r in cfg.routes] == ["direct", "hk"]
    assert cfg.route("direct") == config.DIRECT_ROUTE
    assert cfg.targets[0].routes == ("direct",)


def test_system_resolver_is_the_default(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "targets:\n  - {name: a, url: 'https://x.example/'}\n")
    assert cfg.resolvers == (config.SYSTEM_RESOLVER,)
    assert cfg.targets[0].resolvers == ("system",)
    assert cfg.route_resolver(cfg.route("direct")) == config.SYSTEM_RESOLVER


def test_system_resolver_can_be_named_without_being_listed(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        """
resolvers:
  - {name: ali, type: udp, address: "223.5.5.5:5353"}
routes:
  - {name: via-system, proxy: "socks5h://10.0.0.5:1080", resolver: system}
targets:
  - {name: a, address: "x.example:443", resolvers: [system, ali]}
  - {name: b, address: "y.example:443"}
""",
    )
    assert cfg.targets[0].resolvers == ("system", "ali")
    assert cfg.targets[1].resolvers == ("ali",)
    assert cfg.resolver("system") == config.SYSTEM_RESOLVER
    assert (cfg.resolver("ali").host, cfg.resolver("ali").port) == ("223.5.5.5", 5353)


def test_probe_vantage_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "vantage: from-file\ntargets:\n  - {name: a, address: 'x.example:443'}\n"
    assert load_text(tmp_path, text).vantage == "from-file"
    monkeypatch.setenv("PROBE_VANTAGE", "hk-hkt")
    assert load_text(tmp_path, text).vantage == "hk-hkt"


def test_vantage_defaults_to_the_short_host_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "Probe-SH1.corp.example")
    assert load_text(tmp_path, "targets:\n  - {name: a, address: 'x.example:443'}\n").vantage == "probe-sh1"


def test_ipv6_literal_targets_need_no_dns(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        """
targets:
  - {name: a, address: "[2001:db8::1]:443", tls: true, server_name: s3.example}
  - {name: b, url: "https://[2001:db8::2]:8443/ping"}
""",
    )
    a, b = cfg.targets
    assert (a.host, a.port, a.needs_dns, a.sni) == ("2001:db8::1", 443, False, "s3.example")
    assert (b.host, b.port, b.needs_dns) == ("2001:db8::2", 8443, False)


def test_proxy_credentials_are_kept_but_never_shown(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        """
routes:
  - {name: hk, proxy: "socks5h://alice:p%40ss@10.0.0.5:1080"}
targets:
  - {name: a, address: "x.example:443", routes: [hk]}
""",
    )
    proxy = cfg.route("hk").proxy
    assert proxy is not None
    assert (proxy.username, proxy.password) == ("alice", "p@ss")
    assert proxy.redacted() == "socks5h://***@10.0.0.5:1080"
    assert "p@ss" not in repr(cfg) and "alice" not in repr(cfg)


def test_path_is_read_from_defaults_and_overridden_per_target(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        """
timezone: Asia/Shanghai
routes:
  - {name: cn2, source_address: 10.0.0.2}
  - {name: hk, proxy: "http://10.0.0.6:3128"}
defaults:
  path: {samples: 20, spread: 5s}
targets:
  - {name: inherits, address: "x.example:443", routes: [direct, hk]}
  - {name: echo, address: "y.example:443", routes: [direct, cn2], path: {samples: 10, spread: 2s, method: icmp}}
  - {name: none, url: "https://z.example/", path: null}
""",
    )
    inherits, echo, none = cfg.targets
    assert inherits.path == config.PathCheck(samples=20, spread=5.0, method=config.PathMethod.TCP)
    assert echo.path == config.PathCheck(samples=10, spread=2.0, method=config.PathMethod.ICMP)
    assert none.path is None
    assert cfg.timezone == "Asia/Shanghai"


def test_path_and_timezone_are_off_by_default(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "targets:\n  - {name: a, address: 'x.example:443'}\n")
    assert cfg.targets[0].path is None
    assert cfg.timezone is None


# --- parsers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("10s", 10.0), ("5m", 300.0), ("1h", 3600.0), ("1h30m", 5400.0), ("1.5s", 1.5),
     ("1d", 86400.0), ("2m30s500ms", 150.5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert config.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "s", "10 s", "1h 30m", "-1s", "10sec", "1.s", "ms10"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"bad duration {text!r}")):
        config.parse_duration(text)


def test_durations_in_a_config(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "targets:\n  - {name: a, address: 'x.example:443', interval: 1h30m, timeout: 250ms}\n")
    assert (cfg.targets[0].interval, cfg.targets[0].timeout) == (5400.0, 0.25)


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("example.com:443", None, ("example.com", 443)),
        ("[2001:db8::1]:443", None, ("2001:db8::1", 443)),
        ("[::1]", 53, ("::1", 53)),
        ("2400:3200::1", 853, ("2400:3200::1", 853)),
        ("223.5.5.5", 53, ("223.5.5.5", 53)),
        ("223.5.5.5:5353", 53, ("223.5.5.5", 5353)),
    ],
    ids=["name", "ipv6-bracketed", "ipv6-bracketed-default-port", "ipv6-bare-default-port", "ipv4-default-port",
         "ipv4-port"],
)
def test_parse_hostport(text: str, default: int | None, expected: tuple[str, int]) -> None:
    assert config.parse_hostport(text, default) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2001:db8::1", "bad address '2001:db8::1': needs host:port"),
        ("[2001:db8::1]443", "bad address '[2001:db8::1]443'"),
        ("[2001:db8::1", "bad address '[2001:db8::1'"),
        ("[2001:db8::1]:65536", "bad port in '[2001:db8::1]:65536'"),
        (":443", "bad address ':443': no host"),
    ],
)
def test_parse_hostport_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        config.parse_hostport(text)
    assert str(info.value) == message


def test_locate_is_off_by_default_and_set_per_target_or_in_defaults(tmp_path: Path) -> None:
    cfg = load_text(
        tmp_path,
        "defaults: {locate: true}\n"
        "targets:\n"
        "  - {name: a, url: 'https://x.example/'}\n"
        "  - {name: b, address: 'gw.example:22', locate: false}\n"
        "  - {name: c, address: '198.51.100.20:22'}\n",  # from defaults: allowed, it just never applies
    )
    assert [t.locate for t in cfg.targets] == [True, False, True]
    assert load_text(tmp_path, "targets:\n  - {name: a, url: 'https://x.example/'}\n").targets[0].locate is False
