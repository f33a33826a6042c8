"""Registry credentials and authentication.

Credentials are looked up in this order (first hit wins):

1. ``BARGE_REGISTRY_USERNAME`` / ``BARGE_REGISTRY_PASSWORD`` (any registry);
2. ``TART_REGISTRY_USERNAME`` / ``TART_REGISTRY_PASSWORD`` (Tart compatibility);
3. barge's own store ``$BARGE_HOME/auth.json`` (mode 0600, written atomically, Docker's
   ``{"auths": {host: {"auth": base64(user:password)}}}`` shape), written by ``barge login``;
4. Docker's ``$DOCKER_CONFIG/config.json`` (default ``~/.docker/config.json``): ``credHelpers``
   for the host, else ``auths`` (base64 ``auth``), else ``credsStore`` -- helpers run
   ``docker-credential-<name> get``;
5. anonymous.

:class:`Authenticator` speaks the two schemes registries use: Basic, and Bearer tokens
obtained from the realm named in the ``WWW-Authenticate`` challenge (Docker's token spec),
cached per scope set until shortly before they expire.

Passwords and tokens never appear in reprs, log lines or exception messages.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from barge.oci.errors import Denied, RegistryResponseError, Unauthorized
from barge.reference import ReferenceError, parse_registry
from barge.untrusted import load_json

__all__ = [
    "Authenticator",
    "Challenge",
    "CredentialStore",
    "Credentials",
    "default_home",
    "parse_challenge",
]

log = logging.getLogger("barge.oci")

_DOCKER_HUB_KEYS = (
    "https://index.docker.io/v1/",
    "index.docker.io",
    "docker.io",
    "registry-1.docker.io",
)
HELPER_TIMEOUT = 30.0


def default_home() -> Path:
    """``$BARGE_HOME``, else ``$XDG_DATA_HOME/barge``, else ``~/.local/share/barge``."""
    env = os.environ.get("BARGE_HOME")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg:
        return Path(xdg) / "barge"
    return Path.home() / ".local" / "share" / "barge"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    source: str = "explicit"  # where they came from, for messages ("auth.json", "env", ...)

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password='***', source={self.source!r})"

    __str__ = __repr__

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def _normalise_key(key: str) -> str:
    """``https://host:port/v1/`` -> ``host:port`` (canonical); "" for a key that names no
    registry host (it then matches only when spelt exactly as the registry)."""
    try:
        return parse_registry(key, url=True).name
    except ReferenceError:
        return ""


def _keys_for(registry: str) -> tuple[str, ...]:
    if registry in _DOCKER_HUB_KEYS:
        return _DOCKER_HUB_KEYS
    return (registry,)


class CredentialStore:
    """Where credentials come from (see module doc), and barge's own ``auth.json``."""

    def __init__(
        self, home: Path | None = None, *, environ: Mapping[str, str] | None = None
    ) -> None:
        self._home = home
        self._environ = environ
        self._fixed: Credentials | None = None
        self._anonymous = False

    @classmethod
    def fixed(cls, username: str, password: str) -> CredentialStore:
        """A store that always answers these credentials (``barge login`` verification)."""
        store = cls()
        store._fixed = Credentials(username, password, "explicit")
        return store

    @classmethod
    def anonymous(cls) -> CredentialStore:
        store = cls()
        store._anonymous = True
        return store

    def __repr__(self) -> str:
        return f"CredentialStore(home={self._home!r})"

    @property
    def home(self) -> Path:
        return self._home if self._home is not None else default_home()

    @property
    def path(self) -> Path:
        return self.home / "auth.json"

    def _env(self) -> Mapping[str, str]:
        return self._environ if self._environ is not None else os.environ

    # -- lookup -----------------------------------------------------------------------------
    def get(self, registry: str) -> Credentials | None:
        if self._fixed is not None:
            return self._fixed
        if self._anonymous:
            return None
        env = self._env()
        for prefix in ("BARGE", "TART"):
            user = env.get(f"{prefix}_REGISTRY_USERNAME")
            password = env.get(f"{prefix}_REGISTRY_PASSWORD")
            if user and password is not None:
                return Credentials(user, password, f"{prefix}_REGISTRY_USERNAME")
        creds = self._from_auths(self._load_json(self.path), registry, "barge auth.json")
        if creds:
            return creds
        return self._from_docker(registry)

    def _load_json(self, path: Path) -> dict[str, Any]:
        try:
            with open(path, "rb") as f:
                doc = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.debug("ignoring unreadable %s: %s", path, type(e).__name__)
            return {}
        return doc if isinstance(doc, dict) else {}

    def _from_auths(self, doc: dict[str, Any], registry: str, source: str) -> Credentials | None:
        auths = doc.get("auths")
        if not isinstance(auths, dict):
            return None
        wanted = _keys_for(registry)
        for key, entry in auths.items():
            if _normalise_key(str(key)) not in wanted and str(key) not in wanted:
                continue
            if not isinstance(entry, dict):
                continue
            user, password = entry.get("username"), entry.get("password")
            if isinstance(user, str) and isinstance(password, str) and user:
                return Credentials(user, password, source)
            auth = entry.get("auth")
            if isinstance(auth, str) and auth:
                try:
                    raw = base64.b64decode(auth).decode("utf-8")
                except (ValueError, UnicodeDecodeError):
                    continue
                user, sep, password = raw.partition(":")
                if sep and user:
                    return Credentials(user, password, source)
        return None

    def _docker_config_path(self) -> Path:
        d = self._env().get("DOCKER_CONFIG")
        return Path(d) / "config.json" if d else Path.home() / ".docker" / "config.json"

    def _from_docker(self, registry: str) -> Credentials | None:
        path = self._docker_config_path()
        doc = self._load_json(path)
        if not doc:
            return None
        helpers = doc.get("credHelpers")
        if isinstance(helpers, dict):
            for key, helper in helpers.items():
                if _normalise_key(str(key)) in _keys_for(registry) and isinstance(helper, str):
                    return self._run_helper(helper, registry)
        creds = self._from_auths(doc, registry, "docker config.json")
        if creds:
            return creds
        store = doc.get("credsStore")
        if isinstance(store, str) and store:
            return self._run_helper(store, registry)
        return None

    def _run_helper(self, name: str, registry: str) -> Credentials | None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            return None
        server = "https://index.docker.io/v1/" if registry in _DOCKER_HUB_KEYS else registry
        try:
            proc = subprocess.run(
                [f"docker-credential-{name}", "get"],
                input=server.encode(),
                capture_output=True,
                timeout=HELPER_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            log.debug("credential helper %s unavailable: %s", name, type(e).__name__)
            return None
        if proc.returncode != 0:
            return None
        try:
            doc = json.loads(proc.stdout)
        except ValueError:
            return None
        user, secret = doc.get("Username"), doc.get("Secret")
        if isinstance(user, str) and isinstance(secret, str) and user and secret:
            return Credentials(user, secret, f"docker-credential-{name}")
        return None

    # -- barge's own store -------------------------------------------------------------------
    def _write(self, doc: dict[str, Any]) -> None:
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".auth.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def save(self, registry: str, username: str, password: str) -> Path:
        doc = self._load_json(self.path)
        auths = doc.get("auths")
        if not isinstance(auths, dict):
            auths = {}
        raw = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        auths[registry] = {"auth": raw}
        doc["auths"] = auths
        self._write(doc)
        return self.path

    def remove(self, registry: str) -> bool:
        doc = self._load_json(self.path)
        auths = doc.get("auths")
        if not isinstance(auths, dict) or registry not in auths:
            return False
        del auths[registry]
        self._write(doc)
        return True


# -- challenges ------------------------------------------------------------------------------

_PARAM = re.compile(r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "basic" or "bearer" (lower-case)
    params: dict[str, str]

    @property
    def realm(self) -> str | None:
        return self.params.get("realm")

    @property
    def scopes(self) -> tuple[str, ...]:
        s = self.params.get("scope")
        return tuple(s.split(" ")) if s else ()


def parse_challenge(header: str) -> Challenge | None:
    """Parse one ``WWW-Authenticate`` value (``Bearer realm="..",service="..",scope=".."``)."""
    header = header.strip()
    if not header:
        return None
    scheme, _, rest = header.partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2)
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[m.group(1).lower()] = value
        pos = m.end()
    return Challenge(scheme.lower(), params)


# -- authenticator ---------------------------------------------------------------------------

# fetch(url, headers) -> (status, body, headers); provided by the client (pooled, TLS-aware)
TokenFetch = Callable[[str, dict[str, str]], tuple[int, bytes, Mapping[str, str]]]


def login_hint(registry: str) -> str:
    return f'run "barge login {registry}" (or set BARGE_REGISTRY_USERNAME/BARGE_REGISTRY_PASSWORD)'


class Authenticator:
    """Produces the Authorization header for a request's scopes; learns from challenges."""

    def __init__(self, registry: str, credentials: Credentials | None, fetch: TokenFetch) -> None:
        self.registry = registry
        self.credentials = credentials
        self._fetch = fetch
        self._challenge: Challenge | None = None
        self._tokens: dict[frozenset[str], tuple[str, float]] = {}
        self._lock = threading.Lock()
        self.token_requests = 0

    def __repr__(self) -> str:
        scheme = self._challenge.scheme if self._challenge else None
        return f"Authenticator(registry={self.registry!r}, scheme={scheme!r})"

    @property
    def scheme(self) -> str | None:
        return self._challenge.scheme if self._challenge else None

    def header(self, scopes: tuple[str, ...]) -> str | None:
        """The Authorization value for these scopes, or None (anonymous / not yet challenged)."""
        ch = self._challenge
        if ch is None:
            return None
        if ch.scheme == "basic":
            return self.credentials.basic() if self.credentials else None
        if ch.scheme == "bearer":
            key = frozenset(scopes)
            with self._lock:
                hit = self._tokens.get(key)
                if hit and hit[1] > time.monotonic():
                    return "Bearer " + hit[0]
                token, expiry = self._fetch_token(ch, scopes)
                self._tokens[key] = (token, expiry)
                return "Bearer " + token
        return None

    def challenged(self, header: str | None, scopes: tuple[str, ...], what: str) -> None:
        """A 401 arrived. Learn the scheme and drop cached tokens for ``scopes``.

        Raises :class:`Unauthorized` when retrying cannot help (Basic without credentials,
        unknown scheme).
        """
        ch = parse_challenge(header or "")
        if ch is None or ch.scheme not in ("basic", "bearer"):
            raise Unauthorized(
                f"{self.registry}: {what}: unauthorized (no usable authentication challenge)",
                status=401,
                hint=login_hint(self.registry),
            )
        with self._lock:
            self._challenge = ch
            self._tokens.pop(frozenset(scopes), None)
        if ch.scheme == "basic" and self.credentials is None:
            raise Unauthorized(
                f"{self.registry}: {what}: authentication required",
                status=401,
                hint=login_hint(self.registry),
            )

    def fail(self, header: str | None, what: str, *, denied_hint: str | None = None) -> Exception:
        """The exception for a 401 that survived a fresh token / credentials."""
        ch = parse_challenge(header or "")
        if self.credentials is None:
            return Unauthorized(
                f"{self.registry}: {what}: authentication required",
                status=401,
                hint=login_hint(self.registry),
            )
        if ch is not None and ch.params.get("error") == "insufficient_scope":
            return Denied(
                f"{self.registry}: {what}: access denied for user {self.credentials.username!r}",
                status=401,
                hint=denied_hint,
            )
        return Unauthorized(
            f"{self.registry}: {what}: authentication failed for user "
            f"{self.credentials.username!r} (credentials from {self.credentials.source})",
            status=401,
            hint=login_hint(self.registry),
        )

    def _fetch_token(self, ch: Challenge, scopes: tuple[str, ...]) -> tuple[str, float]:
        realm = ch.realm
        if not realm:
            raise Unauthorized(f"{self.registry}: bearer challenge without a realm", status=401)
        query: list[tuple[str, str]] = []
        if ch.params.get("service"):
            query.append(("service", ch.params["service"]))
        for s in sorted(set(scopes) | set(ch.scopes)):
            if s:
                query.append(("scope", s))
        url = realm + ("&" if "?" in realm else "?") + urlencode(query) if query else realm
        headers = {"Accept": "application/json"}
        if self.credentials is not None:
            headers["Authorization"] = self.credentials.basic()
        self.token_requests += 1
        started = time.monotonic()
        status, body, _ = self._fetch(url, headers)
        if status in (401, 403):
            who = (
                f"user {self.credentials.username!r} (credentials from {self.credentials.source})"
                if self.credentials
                else "anonymous access"
            )
            raise Unauthorized(
                f"{self.registry}: token server refused {who}",
                status=status,
                hint=login_hint(self.registry),
            )
        if status != 200:
            raise RegistryResponseError(
                f"{self.registry}: token server answered HTTP {status}", status=status
            )
        try:
            doc = load_json(body, "token answer")
            token = doc.get("token") or doc.get("access_token")
            expires_in = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            token = None
            expires_in = 60.0
        if not isinstance(token, str) or not token:
            raise RegistryResponseError(f"{self.registry}: token server sent no token")
        # renew a little early; never cache for less than a second or longer than a day
        life = min(max(expires_in * 0.9, min(expires_in, 1.0)), 86400.0)
        return token, started + life
