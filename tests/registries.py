"""Real registry fixtures: Debian's ``docker-registry`` (distribution 2.8) on loopback, the test
CA, the token server, and the object store a redirect points to.

Fixtures (all function-scoped; a registry starts in well under 0.2 s):

* ``registry``        plain HTTP on 127.0.0.1, absolute Location headers
* ``registry2``       a second, independent one (``relativeurls: true``: relative Locations)
* ``registry_ipv6``   plain HTTP on ``[::1]`` (skipped when the host has no IPv6 loopback)
* ``registry_basic``  htpasswd (bcrypt) auth; ``username``/``password`` set
* ``registry_tls``    HTTPS with a generated CA (``ca_cert``), SAN 127.0.0.1 + localhost
* ``registry_token``  ``auth: token`` + :class:`TokenServer` issuing RS256 JWTs (``x5c``);
                      users ``pusher`` (pull+push+delete) and ``puller`` (pull only)

Helpers for other tests: :class:`RunningRegistry`, :func:`start_registry`,
:func:`free_port`, :class:`ObjectStore`. The fault proxy is :mod:`faultproxy`; images put
into a registry without the client under test are :mod:`seed`.

Every process is stopped by its PID (terminate, wait, kill, wait); every wait is bounded.
The module is a little over 600 lines: it is the servers a registry test needs (the registry
process, the CA it serves with, the token server it trusts, the object store it redirects
to), each small, with the fixtures that start them.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

REGISTRY_BIN = "/usr/bin/docker-registry"
STARTUP_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

__all__ = [
    "ObjectStore",
    "RunningRegistry",
    "TestCA",
    "TokenServer",
    "free_port",
    "start_registry",
    "write_htpasswd",
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

        server = Server(("127.0.0.1", 0), Handler)
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


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


class Server6(Server):
    address_family = socket.AF_INET6


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

        self._server = Server((bind, 0), Handler)
        self.url = f"http://{bind}:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(STOP_TIMEOUT)


def other_loopback() -> str:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return "127.0.0.2"
    except OSError:
        return "localhost"


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


def copy_registry_storage(src: RunningRegistry, dst: Path) -> None:  # pragma: no cover - helper
    shutil.copytree(src.storage_dir, dst, dirs_exist_ok=True)
