"""Access control for `probe run`'s endpoints: the exporter-toolkit web config Prometheus users know.

    tls_server_config:
      cert_file: /etc/probe/tls/server.crt
      key_file: /etc/probe/tls/server.key
      client_ca_file: /etc/probe/tls/clients.pem   # optional: require client certificates
    basic_auth_users:
      prometheus: $2y$10$...                        # bcrypt hashes (htpasswd -nBC 10 "" | tr -d ':')

Basic auth covers every endpoint but `/-/healthy` (liveness probes carry no credentials and
learn nothing). Hashes never appear in errors or logs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import yaml
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from probe.config import ConfigError

OPEN_PATHS = frozenset({"/-/healthy"})
_TOP_KEYS = {"tls_server_config", "basic_auth_users"}
_TLS_KEYS = {"cert_file", "key_file", "client_ca_file", "client_auth_type", "min_version"}
_CLIENT_AUTH = {"NoClientCert", "RequireAndVerifyClientCert"}
_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
_REALM = 'Basic realm="probe", charset="UTF-8"'
# Checked for unknown users too, so that a wrong name costs as long as a wrong password.
_DUMMY_HASH = bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds=10))
_CACHE_SIZE = 1024
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")


class WebConfigError(ConfigError):
    """The web config file is invalid; `path` names it."""

    def __init__(self, path: str, problems: list[str]) -> None:
        super().__init__(problems)
        self.path = path


@dataclass(frozen=True)
class TlsServerConfig:
    """The server certificate and key; optionally the CA that client certificates must chain to."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2

    def context(self) -> ssl.SSLContext:
        """Return the server SSL context."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = self.min_version
        ctx.load_cert_chain(self.cert_file, self.key_file)
        if self.client_ca_file is not None:
            ctx.load_verify_locations(cafile=self.client_ca_file)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@dataclass(frozen=True)
class WebConfig:
    """What `--web.config.file` asks for: TLS, basic-auth users (name -> bcrypt hash), or neither."""

    tls: TlsServerConfig | None = None
    users: dict[str, bytes] = field(default_factory=dict)

    def __repr__(self) -> str:  # never the hashes
        return f"WebConfig(tls={self.tls!r}, users={sorted(self.users)!r})"


def load(path: str) -> WebConfig:
    """Read and validate a web config file; raise ConfigError naming each bad field."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise WebConfigError(path, [f"{path}: cannot read: {getattr(e, 'strerror', None) or e}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise WebConfigError(path, [f"{path}: YAML syntax error{where}"]) from None
    problems: list[str] = []
    config = _parse(raw if raw is not None else {}, Path(path).parent, problems)
    if problems:
        raise WebConfigError(path, problems)
    return config


def _parse(raw: Any, base: Path, problems: list[str]) -> WebConfig:
    if not isinstance(raw, dict):
        problems.append("web config: must be a mapping")
        return WebConfig()
    problems.extend(f"{key}: unknown key" for key in raw if key not in _TOP_KEYS)
    return WebConfig(tls=_tls(raw.get("tls_server_config"), base, problems),
                     users=_users(raw.get("basic_auth_users"), problems))


def _tls(raw: Any, base: Path, problems: list[str]) -> TlsServerConfig | None:
    if raw is None:
        return None
    where = "tls_server_config"
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be a mapping")
        return None
    problems.extend(f"{where}.{key}: unknown key" for key in raw if key not in _TLS_KEYS)
    files: dict[str, str | None] = {}
    for key in ("cert_file", "key_file", "client_ca_file"):
        value = raw.get(key)
        if value is None:
            files[key] = None
            if key != "client_ca_file":
                problems.append(f"{where}.{key}: required")
            continue
        if not isinstance(value, str):
            problems.append(f"{where}.{key}: must be a file path")
            continue
        resolved = str(base / value)
        try:
            with open(resolved, "rb"):
                pass
        except OSError as e:
            problems.append(f"{where}.{key}: cannot read {resolved}: {e.strerror}")
        files[key] = resolved
    auth = raw.get("client_auth_type", "NoClientCert" if files.get("client_ca_file") is None else
                   "RequireAndVerifyClientCert")
    if auth not in _CLIENT_AUTH:
        problems.append(f"{where}.client_auth_type: must be one of {', '.join(sorted(_CLIENT_AUTH))}")
    elif (auth == "RequireAndVerifyClientCert") != (files.get("client_ca_file") is not None):
        problems.append(f"{where}.client_auth_type: RequireAndVerifyClientCert goes with client_ca_file")
    version = raw.get("min_version", "TLS12")
    if version not in _VERSIONS:
        problems.append(f"{where}.min_version: must be TLS12 or TLS13")
        version = "TLS12"
    cert_file, key_file = files.get("cert_file"), files.get("key_file")
    if cert_file is None or key_file is None or any(p.startswith(f"{where}.") for p in problems):
        return None
    tls = TlsServerConfig(cert_file, key_file, files.get("client_ca_file"), _VERSIONS[version])
    try:
        tls.context()
    except (ssl.SSLError, OSError) as e:
        problems.append(f"{where}: cannot use cert_file and key_file: {getattr(e, 'reason', None) or e}")
        return None
    return tls


def _users(raw: Any, problems: list[str]) -> dict[str, bytes]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append("basic_auth_users: must be a mapping of user name to bcrypt hash")
        return {}
    users: dict[str, bytes] = {}
    for name, hashed in raw.items():
        where = f"basic_auth_users.{name}"
        if not isinstance(name, str) or not name or ":" in name:
            problems.append(f"basic_auth_users: user names must be non-empty strings without ':' ({name!r})")
        elif not isinstance(hashed, str) or not _is_bcrypt(hashed):
            # The value itself is a secret: never echo it.
            problems.append(f"{where}: not a bcrypt hash (want $2a$, $2b$ or $2y$...; make one with htpasswd -nB)")
        else:
            users[name] = hashed.encode()
    return users


def _is_bcrypt(text: str) -> bool:
    if _BCRYPT.fullmatch(text) is None:
        return False
    try:
        bcrypt.checkpw(b"", text.encode())
    except ValueError:
        return False
    return True


class BasicAuth:
    """Check `Authorization: Basic` against bcrypt hashes; successes are cached as exporter-toolkit does."""

    def __init__(self, users: dict[str, bytes]) -> None:
        self._users = dict(users)
        self._cache: dict[bytes, bool] = {}
        # An unknown user is checked against a hash of the users' highest cost: with a fixed cost,
        # the answer's time would tell known user names from unknown ones.
        cost = max((_cost(h) for h in self._users.values()), default=10)
        self._dummy = _DUMMY_HASH if cost == 10 else bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds=cost))

    async def check(self, header: str | None) -> str | None:
        """Return the authenticated user name, or None."""
        if header is None or not header.startswith("Basic "):
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        if not sep:
            return None
        hashed = self._users.get(user)
        key = hashlib.sha256(b"\0".join((user.encode(), password.encode(), hashed or b""))).digest()
        ok = self._cache.get(key)
        if ok is None:
            # bcrypt is slow on purpose: off the event loop, so the scheduler keeps its cadence.
            ok = await asyncio.to_thread(bcrypt.checkpw, password.encode(), hashed or self._dummy)
            ok = ok and hashed is not None
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = ok
        return user if ok else None


def _cost(hashed: bytes) -> int:
    """Return the cost (log2 rounds) of a bcrypt hash such as $2y$12$..."""
    try:
        return min(max(int(hashed.split(b"$")[2]), 4), 31)
    except (IndexError, ValueError):
        return 10


def auth_middleware(auth: BasicAuth) -> Middleware:
    """Return an aiohttp middleware that demands basic auth on every path but OPEN_PATHS."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS and await auth.check(request.headers.get("Authorization")) is None:
            raise web.HTTPUnauthorized(text="Unauthorized\n", headers={"WWW-Authenticate": _REALM})
        return await handler(request)

    return middleware
