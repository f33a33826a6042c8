"""Real registry fixtures: Debian's ``docker-registry`` (distribution 2.8) on loopback.

Fixtures (all function-scoped; a registry starts in well under 0.2 s):

* ``registry``        plain HTTP on 127.0.0.1, absolute Location headers
* ``registry2``       a second, independent one (``relativeurls: true``: relative Locations)
* ``registry_ipv6``   plain HTTP on ``[::1]`` (skipped when the host has no IPv6 loopback)
* ``registry_basic``  htpasswd (bcrypt) auth; ``username``/``password`` set
* ``registry_tls``    HTTPS with a generated CA (``ca_cert``), SAN 127.0.0.1 + localhost
* ``registry_token``  ``auth: token`` + :class:`TokenServer` issuing RS256 JWTs (``x5c``);
                      users ``pusher`` (pull+push+delete) and ``puller`` (pull only)
* ``make_proxy``      factory: ``make_proxy(reg) -> FaultProxy`` in front of a registry
* ``redirect_setup``  a basic-auth registry behind a proxy that 307-redirects blob GETs to
                      an "object store" on another host (127.0.0.2 or localhost), which
                      records the headers it receives

Helpers for other tests: :class:`RunningRegistry`, :func:`put_blob`, :func:`put_manifest`,
:func:`push_image`, :func:`start_registry`.

Every process is stopped by its PID (terminate, wait, kill, wait); every wait is bounded.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import http.client
import ipaddress
import json
import os
import random
import re
import select
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

REGISTRY_BIN = "/usr/bin/docker-registry"
STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"

__all__ = [
    "FaultProxy",
    "FaultRule",
    "ObjectStore",
    "RunningRegistry",
    "TestCA",
    "TokenServer",
    "put_blob",
    "put_manifest",
    "push_image",
    "start_registry",
]


# -- certificates ------------------------------------------------------------------------------


@dataclass
class TestCA:
    """A CA plus one server certificate for 127.0.0.1 / ::1 / localhost."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    __test__ = False  # not a test class


def _name(cn: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(directory: Path) -> TestCA:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("barge test CA"))
        .issuer_name(_name("barge test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca.public_bytes(pem))
    (directory / "server.crt").write_bytes(cert.public_bytes(pem))
    (directory / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return TestCA(directory / "ca.crt", directory / "server.crt", directory / "server.key")


# -- the registry process ------------------------------------------------------------------------


@dataclass
class RunningRegistry:
    host: str  # "127.0.0.1:PORT" / "[::1]:PORT"
    url: str  # "http://127.0.0.1:PORT"
    storage_dir: Path  # filesystem driver root
    log_path: Path
    config_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    ca_cert: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    users: dict[str, str] = field(default_factory=dict, repr=False)  # user -> password
    token_server: TokenServer | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def blob_path(self, digest: str) -> Path:
        algo, hexd = digest.split(":", 1)
        return self.storage_dir / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.ca_cert is None:
            return None
        return ssl.create_default_context(cafile=str(self.ca_cert))

    def stop(self) -> None:
        p, self.process = self.process, None
        if p is None:
            return
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(STOP_TIMEOUT)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, proc: subprocess.Popen[bytes], ctx: ssl.SSLContext | None) -> bool:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    delay = 0.01
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url + "/v2/", timeout=2, context=ctx) as r:
                r.read()
            return True
        except urllib.error.HTTPError:
            return True  # 401 is an answer
        except (OSError, http.client.HTTPException):
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
    return False


def start_registry(
    workdir: Path,
    *,
    bind: str = "127.0.0.1",
    tls: TestCA | None = None,
    htpasswd: Path | None = None,
    token: TokenServer | None = None,
    relativeurls: bool = False,
    extra: dict[str, Any] | None = None,
) -> RunningRegistry:
    """Start ``docker-registry serve`` on a free port of ``bind``; bounded wait for /v2/."""
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    last_log = ""
    for _attempt in range(5):
        port = free_port(bind)
        hostport = f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"
        scheme = "https" if tls else "http"
        cfg: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": hostport,
                "secret": "barge-test-secret",
                "relativeurls": relativeurls,
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if tls:
            cfg["http"]["tls"] = {"certificate": str(tls.server_cert), "key": str(tls.server_key)}
        if htpasswd:
            cfg["auth"] = {"htpasswd": {"realm": "barge-test", "path": str(htpasswd)}}
        if token:
            cfg["auth"] = {
                "token": {
                    "realm": token.url + "/token",
                    "service": token.service,
                    "issuer": token.issuer,
                    "rootcertbundle": str(token.cert_path),
                }
            }
        if extra:
            cfg.update(extra)
        config_path = workdir / "config.yml"  # JSON is YAML
        config_path.write_text(json.dumps(cfg, indent=2))
        log_path = workdir / "registry.log"
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(config_path)],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        reg = RunningRegistry(
            host=hostport,
            url=f"{scheme}://{hostport}",
            storage_dir=storage,
            log_path=log_path,
            config_path=config_path,
            process=proc,
            ca_cert=tls.ca_cert if tls else None,
            token_server=token,
        )
        ctx = ssl.create_default_context(cafile=str(tls.ca_cert)) if tls else None
        if _wait_ready(reg.url, proc, ctx):
            return reg
        last_log = reg.log_text()
        reg.stop()
        if "address already in use" not in last_log:
            break
    raise RuntimeError(f"docker-registry did not start:\n{last_log[-3000:]}")


# -- token server -------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenServer:
    """Docker token-auth server: GET /token?service=&scope=..., Basic auth, RS256 JWTs.

    ``users``: name -> (password, actions granted on every repository). Anonymous callers
    get no access (so a bare registry request is refused). ``requests`` records
    (user, scopes) for every token request.
    """

    service = "barge-test-registry"
    issuer = "barge-test-token-issuer"

    def __init__(self, workdir: Path, users: dict[str, tuple[str, list[str]]]) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        workdir.mkdir(parents=True, exist_ok=True)
        self.users = users
        self.expires_in = 300
        self.requests: list[tuple[str | None, list[str]]] = []
        self._lock = threading.Lock()
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("barge token signer"))
            .issuer_name(_name("barge token signer"))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = workdir / "token-signer.crt"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def sign(self, claims: dict[str, Any]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        sig = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)

    def issue(self, user: str | None, scopes: list[str]) -> str:
        granted = self.users[user][1] if user else []
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) < 3 or parts[0] != "repository":
                continue
            name = ":".join(parts[1:-1])
            wanted = parts[-1].split(",")
            actions = [a for a in wanted if a in granted or ("*" in granted)]
            access.append({"type": "repository", "name": name, "actions": actions})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "exp": now + 600,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        return self.sign(claims)

    def start(self) -> TokenServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                u = urllib.parse.urlsplit(self.path)
                q = urllib.parse.parse_qs(u.query)
                user: str | None = None
                auth = self.headers.get("Authorization", "")
                if auth.lower().startswith("basic "):
                    raw = base64.b64decode(auth[6:]).decode()
                    name, _, pw = raw.partition(":")
                    if name not in outer.users or outer.users[name][0] != pw:
                        return self._send(401, {"details": "invalid credentials"})
                    user = name
                scopes = q.get("scope", [])
                scopes = [s for sc in scopes for s in sc.split(" ")]
                with outer._lock:
                    outer.requests.append((user, scopes))
                if u.path != "/token" or q.get("service", [""])[0] != outer.service:
                    return self._send(400, {"details": "bad request"})
                token = outer.issue(user, scopes)
                self._send(
                    200,
                    {
                        "token": token,
                        "access_token": token,
                        "expires_in": outer.expires_in,
                        "issued_at": datetime.datetime.now(datetime.UTC).isoformat(),
                    },
                )

            def _send(self, code: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = _Server(("127.0.0.1", 0), Handler)
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


class _Server6(_Server):
    address_family = socket.AF_INET6


# -- fault-injecting proxy ----------------------------------------------------------------------


@dataclass
class FaultRule:
    """Misbehave for matching requests.

    ``action``: ``"reset"`` (RST; with ``forward=True`` after the upstream answered, else
    before forwarding; with ``after_request_bytes`` after reading that much of the request
    body, forwarding the part read), ``"truncate"`` (forward, send only ``keep`` bytes of
    the body, close), ``"status"`` (answer ``status`` with ``headers`` without forwarding),
    ``"redirect"`` (answer 307 to ``location.format(path=..., digest=...)``), ``"slow"``
    (forward, but move the request and response bodies at ``rate`` bytes per second),
    ``"stall"`` (forward, send the answer's head and ``keep`` bytes of its body, then send
    nothing more for ``hold`` seconds, or until the client hangs up, without closing),
    ``"silent"`` (read the request, never answer; held like ``"stall"``), ``"deaf"`` (read
    the request's head only: its body is never read, so the client's sends block; no answer
    for ``hold`` seconds), ``"chaos"`` (with
    probability ``chance``, one transient fault picked by the proxy's seeded generator:
    reset before or after forwarding, 503, 429 with ``Retry-After: 0``, a request body cut
    part-way, an answer body cut part-way; :attr:`FaultProxy.faults` counts them).
    The rule fires for matching requests number ``skip+1 .. skip+times`` (``times=None``:
    forever).
    """

    method: str = "*"
    path: str = ".*"  # regex searched in the path (query excluded)
    action: str = "status"
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)
    times: int | None = 1
    skip: int = 0
    keep: int = 0
    forward: bool = False
    after_request_bytes: int | None = None
    location: str = ""
    require_header: str | None = None  # only requests carrying this header match
    body: bytes = b""  # the answer's body for "status" (default: an OCI error naming it)
    rate: int = 1 << 20  # bytes per second for "slow"
    hold: float = 3600.0  # "stall"/"silent": seconds to keep quiet (ends early on hang-up)
    chance: float = 1.0  # "chaos": the probability that a matching request meets a fault
    kinds: tuple[str, ...] = ()  # "chaos": the faults to pick from (default: all that apply)
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, path: str, headers: dict[str, str]) -> bool:
        if self.require_header and not any(
            k.lower() == self.require_header.lower() for k in headers
        ):
            return False
        return (self.method in ("*", method)) and re.search(self.path, path) is not None


@dataclass
class Exchange:
    method: str
    path: str
    request_bytes: int  # request body bytes forwarded to the registry
    response_bytes: int
    status: int | None
    fault: str | None
    headers: dict[str, str]
    dropped_bytes: int = 0  # request body bytes read but not forwarded (injected answers)


class _Pace:
    """Sleeps so that the bytes passed through ``step`` move at ``rate`` per second (``rate``
    None: no pacing). Pieces are at most ``piece`` bytes so a slowed body trickles."""

    def __init__(self, rate: int | None) -> None:
        self.rate = rate
        self.piece = 1 << 20 if rate is None else max(1024, min(64 << 10, rate // 20))
        self.start = time.monotonic()
        self.moved = 0

    def step(self, n: int) -> None:
        if self.rate is None:
            return
        self.moved += n
        ahead = self.moved / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)


_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


class FaultProxy:
    """A loopback HTTP proxy in front of one registry that can misbehave on purpose.

    ``ignore_tls``: a connection that opens with a TLS ClientHello gets no answer at all (the
    proxy holds it until the client hangs up), like a plain-HTTP server waiting for a request
    line that never comes. ``atomic_patches``: a ``PATCH`` body is forwarded only once it has
    arrived whole, so a client killed mid-``PATCH`` leaves the registry's upload session at
    the end of its last complete ``PATCH`` (a registry whose ``PATCH`` requests are atomic
    parts, as ECR's are). ``seed`` drives the ``"chaos"`` rules.
    """

    def __init__(
        self,
        upstream: RunningRegistry,
        bind: str = "127.0.0.1",
        *,
        ignore_tls: bool = False,
        atomic_patches: bool = False,
        seed: int = 0,
    ) -> None:
        self.upstream = upstream
        parsed = urllib.parse.urlsplit(upstream.url)
        self._up_host = parsed.hostname or "127.0.0.1"
        self._up_port = parsed.port or 80
        self._up_tls = parsed.scheme == "https"
        self.rules: list[FaultRule] = []
        self.log: list[Exchange] = []
        self.ignore_tls = ignore_tls
        self.atomic_patches = atomic_patches
        self.tls_hellos = 0  # connections that opened with a TLS ClientHello
        self.faults: dict[str, int] = {}  # "chaos" faults injected, by kind
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30

            def log_message(self, *a: Any) -> None:
                pass

            def handle(self) -> None:
                if outer.ignore_tls:
                    with contextlib.suppress(OSError):
                        if self.connection.recv(1, socket.MSG_PEEK) == b"\x16":
                            with outer._lock:
                                outer.tls_hellos += 1
                            outer._hold(self.connection, 3600.0)
                            return
                super().handle()

            def do_GET(self) -> None:
                outer._handle(self)

            do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

        server = (_Server6 if ":" in bind else _Server)((bind, 0), Handler)
        self._server = server
        port = server.server_address[1]
        self.host = f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    # -- configuration / assertions --
    def add(self, **kw: Any) -> FaultRule:
        rule = FaultRule(**kw)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.log.clear()

    def _matching(self, method: str, path: str) -> list[Exchange]:
        with self._lock:
            return [
                e
                for e in self.log
                if method in ("*", e.method) and re.search(path, e.path) is not None
            ]

    def count(self, method: str = "*", path: str = ".*") -> int:
        return len(self._matching(method, path))

    def request_bytes(self, method: str = "*", path: str = ".*") -> int:
        return sum(e.request_bytes for e in self._matching(method, path))

    def response_bytes(self, method: str = "*", path: str = ".*") -> int:
        return sum(e.response_bytes for e in self._matching(method, path))

    def stop(self) -> None:
        self._stopping.set()  # held connections let go
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(STOP_TIMEOUT)

    # -- the proxying --
    def _pick(self, method: str, path: str, headers: dict[str, str]) -> FaultRule | None:
        with self._lock:
            for rule in self.rules:
                if not rule.matches(method, path, headers):
                    continue
                rule.seen += 1
                if rule.seen <= rule.skip:
                    continue
                if rule.times is not None and rule.fired >= rule.times:
                    continue
                if rule.action == "chaos":
                    if self._rng.random() >= rule.chance:
                        continue
                    rule.fired += 1
                    return self._chaos(method, path, headers, rule.kinds)
                rule.fired += 1
                return rule
        return None

    def _chaos(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        only: tuple[str, ...] = (),
    ) -> FaultRule:
        """One transient fault for this request (called under the lock)."""
        cl = next((v for k, v in headers.items() if k.lower() == "content-length"), "0")
        length = int(cl) if cl.isdigit() else 0
        body = length > 0 or _is_chunked_headers(headers)
        kinds = ["reset", "lost-answer", "503", "429"]
        if body:
            kinds.append("cut-request")
        if method == "GET" and "/blobs/" in path and "/uploads/" not in path:
            kinds.append("cut-answer")
        kinds = [k for k in kinds if not only or k in only] or list(only)
        kind = self._rng.choice(kinds)
        self.faults[kind] = self.faults.get(kind, 0) + 1
        if kind == "reset":
            return FaultRule(action="reset")
        if kind == "lost-answer":
            return FaultRule(action="reset", forward=True)
        if kind == "503":
            return FaultRule(action="status", status=503)
        if kind == "429":
            return FaultRule(action="status", status=429, headers={"Retry-After": "0"})
        if kind == "cut-request":
            cut = self._rng.randrange(max(1, length)) if length else self._rng.randrange(1 << 20)
            return FaultRule(action="reset", after_request_bytes=cut)
        return FaultRule(action="truncate", keep=self._rng.randrange(1 << 20))

    def _hold(self, sock: socket.socket, seconds: float) -> None:
        """Send nothing on ``sock`` for ``seconds``, reading (and discarding) whatever the
        client sends; return early when the client hangs up or the proxy stops."""
        end = time.monotonic() + seconds
        while not self._stopping.is_set() and time.monotonic() < end:
            try:
                ready, _, _ = select.select([sock], [], [], 0.1)
                if ready and not sock.recv(1 << 16):
                    return
            except (OSError, ValueError):
                return

    def _record(self, e: Exchange) -> None:
        with self._lock:
            self.log.append(e)

    @staticmethod
    def _reset(h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        with contextlib.suppress(OSError):
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with contextlib.suppress(OSError):
            h.rfile.close()
        with contextlib.suppress(OSError):
            h.connection.close()

    def _upstream(self, h: Any) -> http.client.HTTPConnection:
        conn = getattr(h, "_barge_upstream", None)
        if conn is None:
            if self._up_tls:
                ctx = self.upstream.ssl_context()
                conn = http.client.HTTPSConnection(
                    self._up_host, self._up_port, timeout=60, context=ctx
                )
            else:
                conn = http.client.HTTPConnection(self._up_host, self._up_port, timeout=60)
            h._barge_upstream = conn
        return conn

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        method = h.command
        path = urllib.parse.urlsplit(h.path).path
        headers = {k: v for k, v in h.headers.items()}
        length = int(h.headers.get("Content-Length") or 0)
        rule = self._pick(method, path, headers)
        ex = Exchange(method, path, 0, 0, None, rule.action if rule else None, headers)
        self._record(ex)

        if rule and rule.action == "silent":
            self._hold(h.connection, rule.hold)
            h.close_connection = True
            return
        if rule and rule.action == "deaf":
            self._stopping.wait(rule.hold)
            self._reset(h)
            return

        if (
            rule
            and rule.action == "reset"
            and not rule.forward
            and rule.after_request_bytes is None
        ):
            self._reset(h)
            return
        if rule and rule.action == "paginate":
            self._drain(h, length, ex)
            self._paginate(h, ex)
            return
        if rule and rule.action in ("status", "redirect"):
            self._drain(h, length, ex)
            hdrs = dict(rule.headers)
            if rule.action == "redirect":
                status = 307
                digest = path.rsplit("/", 1)[-1]
                hdrs["Location"] = rule.location.format(path=path, digest=digest)
            else:
                status = rule.status
            body = (
                rule.body
                if rule.body
                else b""
                if status < 400
                else json.dumps(
                    {"errors": [{"code": "UNKNOWN", "message": f"injected {status}"}]}
                ).encode()
            )
            ex.status = status
            h.send_response(status)
            for k, v in hdrs.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            if body:
                h.send_header("Content-Type", "application/json")
            h.end_headers()
            if method != "HEAD":
                h.wfile.write(body)
            return

        whole: bytes | None = None  # atomic_patches: the PATCH body, read before forwarding
        if self.atomic_patches and method == "PATCH":
            got = bytearray()
            try:
                if _is_chunked(h):
                    for piece in _read_chunked(h):
                        got += piece
                else:
                    while len(got) < length:
                        data = h.rfile.read(min(length - len(got), 1 << 20))
                        if not data:
                            raise ConnectionError("client went away mid-body")
                        got += data
            except (OSError, ValueError):
                ex.dropped_bytes += len(got)  # the client went away: forward nothing
                self._reset(h)
                return
            whole = bytes(got)
        conn = self._upstream(h)
        try:
            conn.putrequest(method, h.path, skip_host=True, skip_accept_encoding=True)
            for k, v in h.headers.items():
                if k.lower() not in _HOP and not (
                    whole is not None and k.lower() == "content-length"
                ):
                    conn.putheader(k, v)
            limit = rule.after_request_bytes if rule and rule.action == "reset" else None
            pace = _Pace(rule.rate if rule and rule.action == "slow" else None)
            if whole is not None:
                conn.putheader("Content-Length", str(len(whole)))
                conn.endheaders()
                conn.send(whole)
                ex.request_bytes += len(whole)
            elif _is_chunked(h):  # a streamed upload: forward it chunk by chunk
                conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                # a client that goes away mid-body makes _read_chunked raise: the upstream
                # request is then broken off too, never completed with what arrived
                for piece in _read_chunked(h):
                    if limit is not None and ex.request_bytes + len(piece) > limit:
                        conn.close()
                        h._barge_upstream = None  # type: ignore[attr-defined]
                        self._reset(h)
                        return
                    for k in range(0, len(piece), pace.piece):
                        part = piece[k : k + pace.piece]
                        conn.send(b"%x\r\n" % len(part) + part + b"\r\n")
                        pace.step(len(part))
                    ex.request_bytes += len(piece)
                conn.send(b"0\r\n\r\n")
            else:
                conn.endheaders()
            left = 0 if whole is not None or _is_chunked(h) else length
            while left > 0:
                want = min(left, pace.piece)
                if limit is not None:
                    want = min(want, limit - ex.request_bytes)
                    if want <= 0:
                        conn.close()
                        h._barge_upstream = None  # type: ignore[attr-defined]
                        self._reset(h)
                        return
                data = h.rfile.read(want)
                if not data:  # the client went away mid-body: break the upstream request off
                    raise ConnectionError("client went away mid-body")
                conn.send(data)
                pace.step(len(data))
                ex.request_bytes += len(data)
                left -= len(data)
            resp = conn.getresponse()
        except (OSError, ValueError, http.client.HTTPException):
            conn.close()
            h._barge_upstream = None  # type: ignore[attr-defined]
            self._reset(h)
            return
        ex.status = resp.status
        if rule and rule.action == "reset":  # forward=True: upstream acted, client never hears
            resp.read()
            self._reset(h)
            return
        h.send_response_only(resp.status, resp.reason)
        body_len = resp.getheader("Content-Length")
        chunked = body_len is None and method != "HEAD" and resp.status not in (204, 304)
        pre: bytes | None = None
        if chunked:
            pre = resp.read()
        for k, v in resp.getheaders():
            if k.lower() in _HOP or (chunked and k.lower() == "content-length"):
                continue
            h.send_header(k, v)
        if pre is not None:
            h.send_header("Content-Length", str(len(pre)))
        h.end_headers()
        if method == "HEAD":
            resp.read()
            return
        budget = rule.keep if rule and rule.action in ("truncate", "stall") else None
        pace = _Pace(rule.rate if rule and rule.action == "slow" else None)
        try:
            if pre is not None:
                out = pre if budget is None else pre[:budget]
                h.wfile.write(out)
                ex.response_bytes += len(out)
            else:
                while True:
                    data = resp.read(pace.piece)
                    if not data:
                        break
                    pace.step(len(data))
                    if budget is not None:
                        data = data[: max(0, budget - ex.response_bytes)]
                    if data:
                        h.wfile.write(data)
                        ex.response_bytes += len(data)
                    if budget is not None and ex.response_bytes >= budget:
                        break
        except OSError:
            budget = 0
        if budget is not None and rule is not None and rule.action == "stall":
            with contextlib.suppress(OSError):
                h.wfile.flush()
            self._hold(h.connection, rule.hold)
        if budget is not None:
            conn.close()
            h._barge_upstream = None  # type: ignore[attr-defined]
            h.wfile.flush()
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)

    def _paginate(self, h: BaseHTTPRequestHandler, ex: Exchange) -> None:
        """Emulate tags/list pagination (distribution 2.8 ignores ``n``; 3.x, Docker Hub,
        GHCR... honour it): sorted tags after ``last``, at most ``n``, relative Link."""
        u = urllib.parse.urlsplit(h.path)
        q = urllib.parse.parse_qs(u.query)
        req = urllib.request.Request(self.upstream.url + u.path, headers=dict(h.headers.items()))
        try:
            with urllib.request.urlopen(req, timeout=60, context=self.upstream.ssl_context()) as r:
                status, doc = r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            status, doc = e.code, json.loads(e.read() or b"{}")
        headers = {"Content-Type": "application/json"}
        if status == 200:
            tags = sorted(doc.get("tags") or [])
            last = q.get("last", [""])[0]
            n = int(q.get("n", ["0"])[0] or 0) or len(tags) or 1
            rest = [t for t in tags if t > last]
            doc["tags"] = rest[:n]
            if len(rest) > n:
                nxt = urllib.parse.urlencode({"n": n, "last": rest[n - 1]})
                headers["Link"] = f'<{u.path}?{nxt}>; rel="next"'
        body = json.dumps(doc).encode()
        ex.status = status
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
        ex.response_bytes += len(body)

    @staticmethod
    def _drain(h: BaseHTTPRequestHandler, length: int, ex: Exchange) -> None:
        if _is_chunked(h):
            with contextlib.suppress(OSError, ValueError):
                for piece in _read_chunked(h):
                    ex.dropped_bytes += len(piece)
            return
        left = length
        while left > 0:
            data = h.rfile.read(min(left, 1 << 20))
            if not data:
                break
            ex.dropped_bytes += len(data)
            left -= len(data)


def _is_chunked(h: BaseHTTPRequestHandler) -> bool:
    return "chunked" in (h.headers.get("Transfer-Encoding") or "").lower()


def _is_chunked_headers(headers: dict[str, str]) -> bool:
    return any(
        k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers.items()
    )


def _read_chunked(h: BaseHTTPRequestHandler) -> Iterator[bytes]:
    """The pieces of a chunked request body (bounded: at most 1 GiB per piece). A body that
    ends before its last (zero-length) chunk raises ConnectionError: the client went away."""
    for _ in range(1 << 20):
        line = h.rfile.readline(1024)
        if not line:
            raise ConnectionError("client went away mid-body")
        n = int(line.split(b";")[0].strip() or b"0", 16)
        if n == 0:
            while h.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass
            return
        if n > 1 << 30:
            raise ValueError("chunk too large")
        data = h.rfile.read(n)
        if len(data) < n:
            raise ConnectionError("client went away mid-body")
        yield data
        h.rfile.readline(8)


# -- object store (redirect target) -------------------------------------------------------------


class ObjectStore:
    """Serves blobs straight from a registry's storage dir at /blobs/<digest>, like S3 behind
    a redirect; records every request's headers in ``requests``."""

    def __init__(self, registry: RunningRegistry, bind: str) -> None:
        self.registry = registry
        self.requests: list[dict[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append({k: v for k, v in self.headers.items()})
                digest = self.path.split("?")[0].rsplit("/", 1)[-1]
                try:
                    data = outer.registry.blob_path(digest).read_bytes()
                except (OSError, ValueError):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start, end = 0, len(data) - 1
                m = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
                status = 200
                if m:
                    status = 206
                    start = int(m.group(1))
                    end = int(m.group(2)) if m.group(2) else len(data) - 1
                part = data[start : end + 1]
                self.send_response(status)
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.send_header("Content-Length", str(len(part)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                self.wfile.write(part)

        self._server = _Server((bind, 0), Handler)
        self.url = f"http://{bind}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(STOP_TIMEOUT)


def _other_loopback() -> str:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return "127.0.0.2"
    except OSError:
        return "localhost"


# -- helpers: seed a registry without the client under test --------------------------------------


def _auth_header(reg: RunningRegistry, repo: str) -> dict[str, str]:
    if reg.token_server is not None:
        user = next(u for u, (_p, acts) in reg.token_server.users.items() if "push" in acts)
        token = reg.token_server.issue(user, [f"repository:{repo}:pull,push"])
        return {"Authorization": f"Bearer {token}"}
    if reg.username:
        raw = base64.b64encode(f"{reg.username}:{reg.password}".encode()).decode()
        return {"Authorization": f"Basic {raw}"}
    return {}


def _http(
    reg: RunningRegistry, method: str, url: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60, context=reg.ssl_context()) as r:
            r.read()
            return r.status, r.headers
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{method} {url}: HTTP {e.code}: {e.read()[:500]!r}") from None


def put_blob(reg: RunningRegistry, repo: str, data: bytes) -> str:
    """Upload ``data`` as a blob (POST + PUT) with stdlib HTTP; returns its digest."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    auth = _auth_header(reg, repo)
    _, h = _http(reg, "POST", f"{reg.url}/v2/{repo}/blobs/uploads/", b"", auth)
    loc = urllib.parse.urljoin(reg.url + "/", h["Location"])
    sep = "&" if "?" in loc else "?"
    put_url = f"{loc}{sep}digest={urllib.parse.quote(digest)}"
    _http(reg, "PUT", put_url, data, {**auth, "Content-Type": "application/octet-stream"})
    return digest


def put_manifest(
    reg: RunningRegistry, repo: str, ref: str, data: bytes, media_type: str = OCI_MANIFEST
) -> str:
    _http(
        reg,
        "PUT",
        f"{reg.url}/v2/{repo}/manifests/{ref}",
        data,
        {**_auth_header(reg, repo), "Content-Type": media_type},
    )
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_image(
    reg: RunningRegistry,
    repo: str,
    tag: str,
    *,
    layers: list[bytes] | None = None,
    config: bytes | None = None,
    layer_annotations: list[dict[str, str]] | None = None,
    annotations: dict[str, str] | None = None,
    config_media_type: str = OCI_CONFIG,
    layer_media_type: str = OCI_LAYER,
) -> tuple[str, bytes]:
    """Push a small OCI image; returns (manifest digest, manifest bytes)."""
    layers = layers if layers is not None else [b"layer-one", b"layer-two"]
    config = (
        config
        if config is not None
        else json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    )
    cdig = put_blob(reg, repo, config)
    descs = []
    for i, data in enumerate(layers):
        d = {"mediaType": layer_media_type, "digest": put_blob(reg, repo, data), "size": len(data)}
        if layer_annotations and i < len(layer_annotations):
            d["annotations"] = layer_annotations[i]
        descs.append(d)
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": config_media_type, "digest": cdig, "size": len(config)},
        "layers": descs,
    }
    if annotations:
        doc["annotations"] = annotations
    data = json.dumps(doc).encode()
    return put_manifest(reg, repo, tag, data), data


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_ca(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def _token_signer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("token")


@contextlib.contextmanager
def _running(reg: RunningRegistry) -> Iterator[RunningRegistry]:
    try:
        yield reg
    finally:
        reg.stop()


def _need_registry() -> None:
    if not os.access(REGISTRY_BIN, os.X_OK):
        pytest.skip(f"{REGISTRY_BIN} not installed (apt install docker-registry)")


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RunningRegistry]:
    _need_registry()
    with _running(start_registry(tmp_path / "registry")) as reg:
        yield reg


@pytest.fixture
def registry2(tmp_path: Path) -> Iterator[RunningRegistry]:
    _need_registry()
    with _running(start_registry(tmp_path / "registry2", relativeurls=True)) as reg:
        yield reg


@pytest.fixture
def registry_ipv6(tmp_path: Path) -> Iterator[RunningRegistry]:
    _need_registry()
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with _running(start_registry(tmp_path / "registry6", bind="::1")) as reg:
        yield reg


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    import bcrypt

    lines = [
        f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}"
        for u, p in users.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def registry_basic(tmp_path: Path) -> Iterator[RunningRegistry]:
    _need_registry()
    users = {"alice": "s3cret-Pa55word", "bob": "bobs-password"}
    ht = write_htpasswd(tmp_path / "htpasswd", users)
    with _running(start_registry(tmp_path / "registry-basic", htpasswd=ht)) as reg:
        reg.username, reg.password, reg.users = "alice", users["alice"], users
        yield reg


@pytest.fixture
def registry_tls(tmp_path: Path, test_ca: TestCA) -> Iterator[RunningRegistry]:
    _need_registry()
    with _running(start_registry(tmp_path / "registry-tls", tls=test_ca)) as reg:
        yield reg


TOKEN_USERS = {
    "pusher": ("push-password", ["pull", "push", "delete"]),
    "puller": ("pull-password", ["pull"]),
}


@pytest.fixture
def token_server(_token_signer_dir: Path) -> Iterator[TokenServer]:
    ts = TokenServer(_token_signer_dir / uuid.uuid4().hex, TOKEN_USERS).start()
    try:
        yield ts
    finally:
        ts.stop()


@pytest.fixture
def registry_token(tmp_path: Path, token_server: TokenServer) -> Iterator[RunningRegistry]:
    _need_registry()
    with _running(start_registry(tmp_path / "registry-token", token=token_server)) as reg:
        reg.users = {u: p for u, (p, _a) in TOKEN_USERS.items()}
        reg.username, reg.password = "pusher", TOKEN_USERS["pusher"][0]
        yield reg


@pytest.fixture
def make_proxy() -> Iterator[Callable[..., FaultProxy]]:
    proxies: list[FaultProxy] = []

    def make(reg: RunningRegistry, bind: str = "127.0.0.1", **kw: Any) -> FaultProxy:
        p = FaultProxy(reg, bind, **kw)
        proxies.append(p)
        return p

    try:
        yield make
    finally:
        for p in proxies:
            p.stop()


@dataclass
class RedirectSetup:
    registry: RunningRegistry  # the real (basic-auth) registry
    proxy: FaultProxy  # what clients talk to; redirects blob GETs
    store: ObjectStore  # the redirect target, on another host


@pytest.fixture
def redirect_setup(
    registry_basic: RunningRegistry, make_proxy: Callable[..., FaultProxy]
) -> Iterator[RedirectSetup]:
    store = ObjectStore(registry_basic, _other_loopback())
    proxy = make_proxy(registry_basic)
    proxy.add(
        method="GET",
        path=r"/blobs/sha256:",
        action="redirect",
        times=None,
        require_header="Authorization",  # unauthenticated requests get the registry's 401
        location=store.url + "/blobs/{digest}?X-Amz-Signature=secret-signature",
    )
    try:
        yield RedirectSetup(registry_basic, proxy, store)
    finally:
        store.stop()


def copy_registry_storage(src: RunningRegistry, dst: Path) -> None:  # pragma: no cover - helper
    shutil.copytree(src.storage_dir, dst, dirs_exist_ok=True)
