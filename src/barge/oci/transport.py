"""HTTP transport for one registry: pooled urllib3 connections, TLS, scheme choice, redirects.

* TLS is verified by default against the system store (``SSL_CERT_FILE``/``SSL_CERT_DIR``
  honoured) plus every ``*.crt`` in ``$BARGE_HOME/certs.d/<host:port>/`` (Docker's layout;
  ``client.cert``/``client.key`` there enable mutual TLS).
* ``insecure=True``: HTTPS without verification, falling back to plain HTTP.
* Loopback registries (127.0.0.0/8, ::1, localhost) fall back to plain HTTP when the TLS
  handshake fails for a reason other than certificate verification (the server speaks HTTP).
  A certificate that does not verify is never silently accepted.
* Redirects are followed by hand (at most :data:`MAX_REDIRECTS`); ``Authorization`` is
  dropped whenever the scheme, host or port changes.
* A connection goes back to the pool only when its response was read to the end
  (:func:`release`: a small remainder is drained, anything else closes the connection).
  http.client cannot send a request on a connection whose previous response is unfinished
  (``ResponseNotReady``); an idempotent request that meets such a broken pooled connection
  is retried once at once on a new connection. Every connection-level failure (including
  ``ValueError`` from a torn-down connection) is raised as :class:`RegistryUnreachable`.
* ``debug``/``BARGE_DEBUG=1`` logs each exchange to the ``barge.oci`` logger with the
  Authorization header and signed-URL query strings redacted.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import os
import random
import ssl
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import urllib3
import urllib3.connection
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import LocationValueError, SSLError

from barge import cancel
from barge.oci.errors import RegistryUnreachable

__all__ = [
    "CONNECTION_ERRORS",
    "MAX_REDIRECTS",
    "RetryPolicy",
    "Transport",
    "is_loopback",
    "redact_url",
    "release",
]

log = logging.getLogger("barge.oci")

MAX_REDIRECTS = 5
USER_AGENT = "barge/0.1 (+https://github.com/barge)"
BLOCKSIZE = 1 << 20
DRAIN_LIMIT = 64 << 10  # unread body bytes worth reading to keep a connection

# What a request or a body read raises when the connection breaks. ValueError: http.client
# and the socket file raise "I/O operation on closed file" when a connection is torn down
# under a request (urllib3 closing a broken pooled connection can raise it too).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    Urllib3Error,
    http.client.HTTPException,
    OSError,
    ValueError,
)


class _HTTPConnection(urllib3.connection.HTTPConnection):
    """A connection whose socket a cancellation request shuts down (barge.cancel)."""

    def connect(self) -> None:
        super().connect()
        cancel.track_socket(self.sock)


class _HTTPSConnection(urllib3.connection.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        cancel.track_socket(self.sock)


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def _pool_manager(**kw: Any) -> urllib3.PoolManager:
    pm = urllib3.PoolManager(**kw)
    pm.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
    return pm


def release(resp: urllib3.BaseHTTPResponse, *, drain: int = DRAIN_LIMIT) -> None:
    """Give ``resp``'s connection back to the pool, but only if the response is finished.

    The body left unread is read and discarded when it is at most ``drain`` bytes; a longer
    or unknown remainder, or a failed read, closes the connection instead. A connection put
    back with an unfinished response would break the next request made on it, in whatever
    thread takes it (``ResponseNotReady('Request-sent')``). This matters even for HEAD and
    empty bodies: http.client marks such a response finished only once it is read or
    closed, which urllib3 otherwise leaves to garbage collection of the response object,
    after the connection is already back in the pool.

    Must be called by the thread that owns ``resp``; idempotent.
    """
    raw = getattr(resp, "_original_response", None)
    finished = False
    try:
        if isinstance(raw, http.client.HTTPResponse):
            left = drain
            while not raw.isclosed():
                if raw.length is not None and raw.length > left:
                    break  # known to be too long to drain
                # HEAD, 204/304 and read-to-the-end bodies: read() returns b"" and closes
                data = raw.read(min(left if raw.length is None else raw.length, 1 << 16))
                left -= len(data)
                if not data or left < 0:
                    break
            finished = raw.isclosed()
    except Exception:  # noqa: BLE001 - any failure: the connection is not reusable
        finished = False
    if not finished:
        with contextlib.suppress(Exception):
            resp.close()  # closes the connection; the pool opens a new one in its place
    with contextlib.suppress(Exception):
        resp.release_conn()


def _broken_connection(e: BaseException) -> bool:
    """The failure says only that the pooled connection was unusable, nothing about the server:
    http.client refused to use it (a previous response on it was unfinished:
    ``ResponseNotReady``/``CannotSendRequest``) or it was torn down under the request
    (``ValueError: I/O operation on closed file``). Worth one immediate retry on a new
    connection. Resets, refusals, timeouts and TLS failures are left to the caller's backoff."""
    seen: set[int] = set()
    todo: list[BaseException] = [e]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, LocationValueError):
            return False
        if isinstance(cur, (http.client.ImproperConnectionState, ValueError)):
            return True
        todo.extend(a for a in getattr(cur, "args", ()) if isinstance(a, BaseException))
        todo.extend(x for x in (cur.__cause__, cur.__context__) if x is not None)
    return False


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter, bounded in attempts and total time."""

    attempts: int = 6  # total tries for one step, including the first
    base: float = 0.5  # first backoff (seconds), doubled each time
    cap: float = 15.0  # longest single sleep
    total: float = 120.0  # give up once this much time has been spent on one step
    retry_after_cap: float = 60.0  # longest Retry-After we honour

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_cap)
        return random.uniform(0, min(self.cap, self.base * (2**attempt)))


def is_loopback(host: str) -> bool:
    h = host.strip("[]").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


_SECRET_QUERY = ("signature", "token", "credential", "sig", "key-pair-id", "policy", "x-amz-")


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if not parts.query:
        return url
    out = []
    for item in parts.query.split("&"):
        k, sep, _v = item.partition("=")
        if sep and any(s in k.lower() for s in _SECRET_QUERY):
            out.append(f"{k}=REDACTED")
        else:
            out.append(item)
    return parts._replace(query="&".join(out)).geturl()


def split_host(registry: str) -> tuple[str, int | None]:
    """``host:port`` / ``[v6]:port`` -> (host without brackets, port)."""
    if registry.startswith("["):
        host, _, rest = registry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return host, int(port) if port else None
    host, sep, port = registry.rpartition(":")
    if sep and port.isdigit():
        return host, int(port)
    return registry, None


def _origin(url: str) -> tuple[str, str]:
    p = urlsplit(url)
    default = 443 if p.scheme == "https" else 80
    return p.scheme, f"{(p.hostname or '').lower()}:{p.port or default}"


def _certs_dir(home: Path, registry: str) -> Path:
    return home / "certs.d" / registry


class Transport:
    """Pooled, thread-safe HTTP for one registry host."""

    def __init__(self, registry: str, *, insecure: bool, home: Path, debug: bool) -> None:
        self.registry = registry
        # docker.io is a name; its API lives on registry-1.docker.io
        self.api_host = (
            "registry-1.docker.io" if registry in ("docker.io", "index.docker.io") else registry
        )
        self.host, self.port = split_host(self.api_host)
        self.insecure = insecure
        self.loopback = is_loopback(self.host)
        self.debug = debug
        self.home = home
        self._lock = threading.Lock()
        self._base: str | None = None
        timeout = urllib3.Timeout(connect=15.0, read=120.0)
        common: dict[str, Any] = dict(
            num_pools=8,
            maxsize=16,
            block=False,
            retries=False,
            timeout=timeout,
            blocksize=BLOCKSIZE,
        )
        self._verified = _pool_manager(ssl_context=self._ssl_context(), **common)
        self._unverified: urllib3.PoolManager | None = None
        if insecure:
            # the user asked for it (--insecure); urllib3 would warn on every request
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self._unverified = _pool_manager(
                ssl_context=ctx, cert_reqs="CERT_NONE", assert_hostname=False, **common
            )
        if debug and not log.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("barge: debug: %(message)s"))
            log.addHandler(handler)
        if debug:
            log.setLevel(logging.DEBUG)

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()  # honours SSL_CERT_FILE / SSL_CERT_DIR
        cafile = os.environ.get("SSL_CERT_FILE")
        if cafile and os.path.isfile(cafile):
            ctx.load_verify_locations(cafile=cafile)
        d = _certs_dir(self.home, self.registry)
        if d.is_dir():
            for crt in sorted(d.glob("*.crt")):
                ctx.load_verify_locations(cafile=str(crt))
            cert, key = d / "client.cert", d / "client.key"
            if cert.is_file() and key.is_file():
                ctx.load_cert_chain(str(cert), str(key))
        return ctx

    def close(self) -> None:
        self._verified.clear()
        if self._unverified is not None:
            self._unverified.clear()

    # -- scheme ---------------------------------------------------------------------------
    def base_url(self) -> str:
        """``https://host:port`` or ``http://host:port``, decided once (probing if needed)."""
        with self._lock:
            if self._base is None:
                self._base = self._probe()
            return self._base

    def _probe(self) -> str:
        https = f"https://{self.api_host}"
        http = f"http://{self.api_host}"
        if not (self.insecure or self.loopback):
            return https
        try:
            r = self._pool_for(https).request(
                "GET",
                https + "/v2/",
                preload_content=False,
                redirect=False,
                headers={"User-Agent": USER_AGENT},
            )
            release(r)
            return https
        except SSLError as e:
            if not self.insecure and _is_verify_error(e):
                raise RegistryUnreachable(
                    f"cannot reach registry {self.registry}: TLS certificate not trusted ({_reason(e)})",
                    hint=f"put the registry's CA certificate in {_certs_dir(self.home, self.registry)}/ca.crt",
                ) from None
            log.debug("%s: HTTPS failed (%s); using plain HTTP", self.registry, _reason(e))
            return http
        except Urllib3Error as e:
            log.debug("%s: HTTPS failed (%s); using plain HTTP", self.registry, _reason(e))
            return http

    def _pool_for(self, url: str) -> urllib3.PoolManager:
        if (
            self._unverified is not None
            and _origin(url)[1] == _origin(f"https://{self.api_host}")[1]
        ):
            return self._unverified
        return self._verified

    def is_registry_url(self, url: str) -> bool:
        return _origin(url) == _origin(self.base_url())

    def resolve(self, location: str, base: str | None = None) -> str:
        return urljoin(base or self.base_url() + "/", location)

    # -- one exchange -----------------------------------------------------------------------
    def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: Any = None,
        *,
        follow: bool = True,
        body_again: Any = None,
        idempotent: bool | None = None,
    ) -> tuple[urllib3.BaseHTTPResponse, str]:
        """Send one request following redirects; returns (response, final url).

        The response body is not read (``preload_content=False``); the caller hands the
        response to :func:`release` when done. ``body_again`` is a zero-argument callable
        producing a fresh body for a 307/308 replay or a retry. ``idempotent`` (default: GET,
        HEAD, DELETE) allows one immediate retry when the connection turns out broken.
        """
        if idempotent is None:
            idempotent = method in ("GET", "HEAD", "DELETE")
        hdrs = dict(headers)
        hdrs.setdefault("User-Agent", USER_AGENT)
        for hop in range(MAX_REDIRECTS + 1):
            resp = self._exchange(method, url, hdrs, body, idempotent, body_again)
            self._log_response(resp)
            if not follow or resp.status not in (301, 302, 303, 307, 308):
                return resp, url
            location = resp.headers.get("Location")
            if not location or hop == MAX_REDIRECTS:
                return resp, url
            release(resp)
            target = urljoin(url, location)
            if _origin(target) != _origin(url):
                hdrs.pop("Authorization", None)
            if resp.status == 303 or (resp.status in (301, 302) and method not in ("GET", "HEAD")):
                method, body = "GET", None
                idempotent = True
                hdrs.pop("Content-Length", None)
                hdrs.pop("Content-Type", None)
            elif body is not None:
                body = body_again() if body_again is not None else body
            url = target
        raise AssertionError("unreachable")  # pragma: no cover

    def _exchange(
        self,
        method: str,
        url: str,
        hdrs: dict[str, str],
        body: Any,
        idempotent: bool,
        body_again: Any,
    ) -> urllib3.BaseHTTPResponse:
        """One request/response. A connection-level failure raises :class:`RegistryUnreachable`
        (never a raw urllib3/http.client/ValueError); an idempotent request whose connection
        turned out broken is first retried once at once. urllib3 closes the broken connection
        and puts an empty slot back in its (LIFO) pool, so the retry normally opens a new
        connection; any other pooled one it may get was put back finished (:func:`release`)."""
        for attempt in (0, 1):
            cancel.check()  # no new request once the user asked to stop
            self._log_request(method, url, hdrs)
            try:
                return self._pool_for(url).request(
                    method,
                    url,
                    headers=hdrs,
                    body=body,
                    preload_content=False,
                    decode_content=False,
                    redirect=False,
                    retries=False,
                )
            except CONNECTION_ERRORS as e:
                replayable = body is None or isinstance(body, bytes) or body_again is not None
                if attempt == 0 and idempotent and replayable and _broken_connection(e):
                    log.debug(
                        "%s %s: connection broken (%s); retrying on a new connection",
                        method,
                        redact_url(url),
                        _reason(e),
                    )
                    if body is not None and not isinstance(body, bytes):
                        body = body_again()
                    continue
                raise _unreachable(self.registry, url, e) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def fetch(self, url: str, headers: dict[str, str]) -> tuple[int, bytes, Mapping[str, str]]:
        """Small GET (token endpoint); body read fully, at most 1 MiB."""
        resp, _ = self.send("GET", url, headers)
        try:
            data = resp.read(1 << 20, decode_content=True)
        except CONNECTION_ERRORS as e:
            resp.close()
            raise _unreachable(self.registry, url, e) from None
        finally:
            release(resp)
        return resp.status, data, resp.headers

    # -- debug ------------------------------------------------------------------------------
    def _log_request(self, method: str, url: str, headers: Mapping[str, str]) -> None:
        if not self.debug:
            return
        shown = {
            k: ("REDACTED" if k.lower() in ("authorization", "cookie") else v)
            for k, v in headers.items()
        }
        log.debug("> %s %s %s", method, redact_url(url), shown)

    def _log_response(self, resp: urllib3.BaseHTTPResponse) -> None:
        if not self.debug:
            return
        shown = {
            k: (redact_url(v) if k.lower() == "location" else v)
            for k, v in resp.headers.items()
            if k.lower() != "set-cookie"
        }
        log.debug("< %s %s", resp.status, shown)


def _is_verify_error(e: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLCertVerificationError):
            return True
        if "CERTIFICATE_VERIFY_FAILED" in str(cur) or "certificate verify failed" in str(cur):
            return True
        for a in getattr(cur, "args", ()):
            if isinstance(a, BaseException) and _is_verify_error(a):
                return True
        cur = cur.__cause__ or cur.__context__
    return False


def _reason(e: BaseException) -> str:
    cur: BaseException = e
    for _ in range(5):
        nxt = getattr(cur, "reason", None) or cur.__cause__ or cur.__context__
        if not isinstance(nxt, BaseException):
            break
        cur = nxt
    if isinstance(cur, ConnectionRefusedError) or "Connection refused" in str(cur):
        return "connection refused"
    if isinstance(cur, ssl.SSLError):
        return f"TLS error: {cur.reason or cur}"
    text = str(cur)
    # urllib3 messages embed the connection object's repr; keep the end
    if ": " in text and "object at 0x" in text:
        text = text.rsplit(": ", 1)[-1]
    return text or type(cur).__name__


def _unreachable(registry: str, url: str, e: BaseException) -> RegistryUnreachable:
    reason = _reason(e)
    host = urlsplit(url).netloc
    where = registry if _origin(url)[1].split(":")[0] in registry else f"{registry} (via {host})"
    hint = None
    if isinstance(e, SSLError) and _is_verify_error(e):
        hint = "put the registry's CA certificate in $BARGE_HOME/certs.d/HOST:PORT/ca.crt"
        reason = f"TLS certificate not trusted ({reason})"
    err = RegistryUnreachable(f"cannot reach registry {where}: {reason}", hint=hint)
    err.__cause__ = None
    err.retryable = not (isinstance(e, SSLError) and _is_verify_error(e))  # type: ignore[attr-defined]
    return err


def header_list(value: str | None) -> Iterable[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]
