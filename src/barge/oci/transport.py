"""HTTP transport for one registry: pooled urllib3 connections, TLS, scheme choice, redirects.

* TLS is verified by default against the system store (``SSL_CERT_FILE``/``SSL_CERT_DIR``
  honoured) plus every ``*.crt`` in ``$BARGE_HOME/certs.d/<host:port>/`` (Docker's layout;
  ``client.cert``/``client.key`` there enable mutual TLS) and the host's ``ca_file``
  (:class:`~barge.oci.settings.HostSettings`).
* ``insecure`` (in the host's settings; ``--insecure``): HTTPS without verification, falling
  back to plain HTTP.
* Loopback registries (127.0.0.0/8, ::1, localhost) fall back to plain HTTP when the TLS
  handshake fails for a reason other than certificate verification (the server speaks HTTP).
  A certificate that does not verify is never silently accepted. The probe is bounded: a
  server that says nothing to a TLS ClientHello within :data:`TLS_PROBE_TIMEOUT` (a TLS
  server on loopback answers in milliseconds; a plain-HTTP one waits for a request line that
  never comes) is asked ``GET /v2/`` in plain HTTP, and used that way when it answers like a
  registry (200 or 401).
* Timeouts come from :class:`~barge.oci.settings.HostSettings`: ``connect_timeout`` bounds
  the TCP connect and the TLS handshake, ``stall_timeout`` every wait for a byte after that,
  sending included (urllib3 would bound sends by the connect timeout: :class:`_StallBound`).
  A timeout is raised as :class:`~barge.oci.errors.RegistryTimeout` naming the host, the
  seconds waited and what for.
* Redirects are followed by hand (at most :data:`MAX_REDIRECTS`); ``Authorization`` is
  dropped whenever the scheme, host or port changes.
* A connection goes back to the pool only when its response was read to the end
  (:func:`release`: a small remainder is drained, anything else closes the connection).
  http.client cannot send a request on a connection whose previous response is unfinished
  (``ResponseNotReady``); an idempotent request that meets such a broken pooled connection
  is retried once at once on a new connection. Every connection-level failure (including
  ``ValueError`` from a torn-down connection) is raised as :class:`RegistryUnreachable`
  (classified by :mod:`barge.oci.failures`).
* ``debug``/``BARGE_DEBUG=1`` logs each exchange to the ``barge.oci`` logger with the
  Authorization header and signed-URL query strings redacted.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import ssl
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import urllib3
import urllib3.connection
import urllib3.connectionpool
from urllib3.exceptions import ConnectTimeoutError, SSLError
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from barge import cancel
from barge.errors import UsageError
from barge.oci.errors import RegistryTimeout, RegistryUnreachable
from barge.oci.failures import (
    CONNECTION_ERRORS,
    broken_connection,
    is_verify_error,
    reason,
    timed_out,
    unreachable,
)
from barge.oci.settings import HostSettings
from barge.reference import Registry

__all__ = [
    "MAX_REDIRECTS",
    "TLS_PROBE_TIMEOUT",
    "Transport",
    "redact_url",
    "release",
]

log = logging.getLogger("barge.oci")

MAX_REDIRECTS = 5
TLS_PROBE_TIMEOUT = 2.0  # seconds a loopback server may take to answer a TLS ClientHello
USER_AGENT = "barge/0.1 (+https://github.com/barge)"
BLOCKSIZE = 1 << 20
DRAIN_LIMIT = 64 << 10  # unread body bytes worth reading to keep a connection


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


def _origin(url: str) -> tuple[str, str]:
    p = urlsplit(url)
    default = 443 if p.scheme == "https" else 80
    return p.scheme, f"{(p.hostname or '').lower()}:{p.port or default}"


def _certs_dir(home: Path, registry: Registry) -> Path:
    return home / "certs.d" / registry.name


class _StallBound:
    """Connection mixin: the socket is tracked for cancellation (:mod:`barge.cancel`) and the
    request is sent under the stall timeout, not the connect timeout.

    urllib3 sets a connection's timeout to the connect timeout before sending a request and
    to the read timeout only once it waits for the answer, so a registry that stops taking an
    upload's body would be given up after the (short) connect timeout. Here the connection
    is made (TCP, TLS) under the connect timeout, then the socket gets the stall timeout for
    sending too. ``stall`` is set by the pool (:class:`_StallPoolMixin`)."""

    stall: float | None = None
    sock: Any
    timeout: Any

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        cancel.track_socket(self.sock)  # a cancellation request shuts it down (barge.cancel)

    def request(self, *args: Any, **kwargs: Any) -> None:
        if self.sock is None:
            self.connect()  # under the pool's connect timeout
        if self.stall is not None:
            self.timeout = self.stall  # urllib3's request() applies it to the socket
        super().request(*args, **kwargs)  # type: ignore[misc]


class _Conn(_StallBound, urllib3.connection.HTTPConnection):
    pass


class _TLSConn(_StallBound, urllib3.connection.HTTPSConnection):
    pass


class _StallPoolMixin:
    timeout: urllib3.Timeout

    def _new_conn(self) -> Any:
        conn = super()._new_conn()  # type: ignore[misc]
        read = self.timeout.read_timeout
        conn.stall = read if isinstance(read, (int, float)) else None
        return conn


class _Pool(_StallPoolMixin, urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _Conn


class _TLSPool(_StallPoolMixin, urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _TLSConn


class Transport:
    """Pooled, thread-safe HTTP for one registry host."""

    def __init__(
        self, registry: Registry, *, home: Path, debug: bool, settings: HostSettings
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.api_host = registry.api_name  # docker.io is a name; its API is elsewhere
        self.insecure = settings.insecure
        self.home = home
        self.debug = debug
        self._lock = threading.Lock()
        self._base: str | None = None
        timeout = urllib3.Timeout(
            connect=self.settings.connect_timeout, read=self.settings.stall_timeout
        )
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
        if self.insecure:
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
        if self.settings.ca_file:  # named in the host's settings: it must be there
            try:
                ctx.load_verify_locations(cafile=self.settings.ca_file)
            except (OSError, ssl.SSLError) as e:
                raise UsageError(
                    f"{self.registry}: cannot read the CA file {self.settings.ca_file}: {e}"
                ) from None
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
        """The scheme for a registry that may speak plain HTTP (loopback, ``--insecure``).

        TLS first, with the handshake bounded by :data:`TLS_PROBE_TIMEOUT`. A server that
        answers the ClientHello with something other than TLS speaks HTTP. One that says
        nothing at all is asked ``GET /v2/`` in plain HTTP and used so if it answers like a
        registry (200 or 401); otherwise TLS is kept (a real TLS server that was slow gets
        the full connect timeout on the next request). Failures that say nothing about the
        scheme (connection refused, a server silent to both) raise and are not remembered,
        so the next attempt probes again."""
        https = f"https://{self.api_host}"
        http = f"http://{self.api_host}"
        if not (self.insecure or self.registry.is_loopback):
            return https
        probe_timeout = urllib3.Timeout(
            connect=min(self.settings.connect_timeout, TLS_PROBE_TIMEOUT),
            read=self.settings.stall_timeout,
        )
        try:
            r = self._pool_for(https).request(
                "GET",
                https + "/v2/",
                preload_content=False,
                redirect=False,
                headers={"User-Agent": USER_AGENT},
                timeout=probe_timeout,
            )
            release(r)
            return https
        except SSLError as e:
            if not self.insecure and is_verify_error(e):
                err = RegistryUnreachable(
                    f"cannot reach registry {self.registry}: TLS certificate not trusted ({reason(e)})",
                    hint=f"put the registry's CA certificate in {_certs_dir(self.home, self.registry)}/ca.crt",
                )
                err.retryable = False  # type: ignore[attr-defined] # retrying will not help
                raise err from None
            if not timed_out(e):
                log.debug("%s: HTTPS failed (%s); using plain HTTP", self.registry, reason(e))
                return http
        except ConnectTimeoutError as e:  # refused, unresolvable, or no TCP connection in time
            raise unreachable(self.registry, https, e, self.settings) from None
        except Urllib3Timeout:
            pass  # connected, but no answer to the ClientHello (or to GET /v2/)
        except Urllib3Error as e:
            log.debug("%s: HTTPS failed (%s); using plain HTTP", self.registry, reason(e))
            return http
        # no answer to the ClientHello: does it answer plain HTTP like a registry?
        log.debug("%s: no answer to a TLS ClientHello; trying plain HTTP", self.registry)
        try:
            r = self._verified.request(
                "GET",
                http + "/v2/",
                preload_content=False,
                redirect=False,
                headers={"User-Agent": USER_AGENT},
            )
        except CONNECTION_ERRORS as e:
            if timed_out(e):
                raise RegistryTimeout(
                    f"no answer from {self.api_host} for {self.settings.stall_timeout:g} s "
                    f"(it answered neither a TLS handshake nor a plain HTTP request)"
                ) from None
            raise unreachable(self.registry, http, e, self.settings) from None
        status = r.status
        release(r)
        return http if status in (200, 401) else https

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
        what: str | None = None,
    ) -> tuple[urllib3.BaseHTTPResponse, str]:
        """Send one request following redirects; returns (response, final url). ``what``
        names the request in a timeout's message.

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
            resp = self._exchange(method, url, hdrs, body, idempotent, body_again, what)
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
        what: str | None = None,
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
                if attempt == 0 and idempotent and replayable and broken_connection(e):
                    log.debug(
                        "%s %s: connection broken (%s); retrying on a new connection",
                        method,
                        redact_url(url),
                        reason(e),
                    )
                    if body is not None and not isinstance(body, bytes):
                        body = body_again()
                    continue
                raise unreachable(
                    self.registry, url, e, self.settings, method=method, what=what
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    def fetch(self, url: str, headers: dict[str, str]) -> tuple[int, bytes, Mapping[str, str]]:
        """Small GET (token endpoint); body read fully, at most 1 MiB."""
        resp, _ = self.send("GET", url, headers, what="a token")
        try:
            data = resp.read(1 << 20, decode_content=True)
        except CONNECTION_ERRORS as e:
            resp.close()
            raise unreachable(self.registry, url, e, self.settings, what="a token") from None
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


def _pool_manager(**kw: Any) -> urllib3.PoolManager:
    """A PoolManager whose connections send under the stall timeout (:class:`_StallBound`)."""
    pm = urllib3.PoolManager(**kw)
    pm.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}
    return pm
