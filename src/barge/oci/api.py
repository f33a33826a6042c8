"""The registry API's request loop: one host, its transport, its credentials, its budgets.

:class:`RegistryAPI` is the base the registry client is built on (regclient's
``scheme/reg`` is the model: ``ping.go``, ``blob.go``, ``manifest.go``, ``tag.go``,
``referrer.go`` are methods of one type, here one mixin per module over this base —
:mod:`barge.oci.blobs`, :mod:`barge.oci.uploads`, :mod:`barge.oci.manifests`,
:mod:`barge.oci.listings`; :class:`barge.oci.client.RegistryClient` puts them together).

It owns the loop every request goes through (:meth:`RegistryAPI._stream`,
:meth:`RegistryAPI._request`): the ``Authorization`` header for the request's scopes,
one answer to a 401 challenge (a token for the scopes, or Basic), and retries with
exponential backoff and jitter on connection errors, stalls, 408, 429 (honouring
Retry-After) and 5xx, within a :class:`~barge.oci.retry.Budget`: until ``retry_timeout``
passes without progress (the furthest byte reached growing), so a moving transfer is never
given up and a stuck one is, with a message naming what was waited for. Timings come from
the host's :class:`~barge.oci.settings.HostSettings`.

Connections: every response is finished with :func:`~barge.oci.transport.release`, which puts
its connection back in the pool only when the body was read to the end (draining a small
remainder) and closes it otherwise; a broken connection is a retryable connection error,
never a raw exception.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import urllib3

from barge.errors import LimitError
from barge.oci import registries_conf
from barge.oci.auth import Authenticator, CredentialStore, default_home
from barge.oci.errors import (
    RegistryTimeout,
    RegistryUnreachable,
    error_from_response,
)
from barge.oci.failures import CONNECTION_ERRORS, timed_out
from barge.oci.retry import Budget, RetryPolicy
from barge.oci.sessions import UploadSessions
from barge.oci.settings import HostSettings, settings_for
from barge.oci.transport import Transport, redact_url, release
from barge.reference import Reference, Registry, parse_registry

__all__ = [
    "MAX_ERROR_BODY",
    "MAX_MANIFEST_SIZE",
    "RegistryAPI",
    "Response",
    "labelled",
    "short_digest",
    "transfer_label",
]

log = logging.getLogger("barge.oci")

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE"})  # plus PUT of a manifest
MAX_MANIFEST_SIZE = 8 << 20
MAX_ERROR_BODY = 64 << 10

BodyFactory = Callable[[], Any]

#: what a transfer is, for messages ("layer 3/40"); set by callers around a transfer
transfer_label: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "barge_transfer_label", default=None
)


@contextlib.contextmanager
def labelled(label: str | None) -> Iterator[None]:
    """Name the transfers started in this block (this thread) in their error messages."""
    token = transfer_label.set(label)
    try:
        yield
    finally:
        transfer_label.reset(token)


def short_digest(digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    return f"{algo}:{hexd[:12]}…" if len(hexd) > 12 else digest


def _retry_after(headers: Any) -> float | None:
    v = headers.get("Retry-After")
    if not v:
        return None
    try:
        return float(v)
    except ValueError:
        return None


class Response:
    """A finished small answer: status, headers, body (already read)."""

    __slots__ = ("status", "headers", "data", "url")

    def __init__(self, status: int, headers: Any, data: bytes, url: str) -> None:
        self.status = status
        self.headers = headers
        self.data = data
        self.url = url


class RegistryAPI:
    """One OCI registry (``host[:port]``): transport, credentials, settings, the request
    loop and ``ping``. Thread-safe; pooled connections.

    ``settings`` default to :func:`~barge.oci.settings.settings_for` the registry, with the
    registry configuration file's host settings (:mod:`barge.oci.registries_conf`);
    ``insecure=True`` (``--insecure``) turns TLS verification off whatever they say."""

    def __init__(
        self,
        registry: str | Registry,
        *,
        insecure: bool = False,
        home: Path | None = None,
        credentials: CredentialStore | None = None,
        debug: bool = False,
        settings: HostSettings | None = None,
    ) -> None:
        host = registry if isinstance(registry, Registry) else parse_registry(registry)
        self.registry_host = host
        self.registry = host.name
        self.home = home if home is not None else default_home()
        self.debug = debug or os.environ.get("BARGE_DEBUG", "") not in ("", "0")
        if settings is None:
            settings = settings_for(host, hosts=registries_conf.load().hosts)
        if insecure and not settings.insecure:
            settings = settings.with_values({"insecure": True}, "--insecure")
        self.settings = settings
        self.retry = RetryPolicy()
        # the operation's deadline counts from the moment this command first needs the host
        self._deadline = (
            time.monotonic() + self.settings.timeout if self.settings.timeout > 0 else None
        )
        self._transport = Transport(host, home=self.home, debug=self.debug, settings=settings)
        self._store = credentials if credentials is not None else CredentialStore(self.home)
        self._auth_lock = threading.Lock()
        self._auth: Authenticator | None = None
        self.sessions = UploadSessions(self.home / "uploads")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.registry!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._transport.close()

    @property
    def auth(self) -> Authenticator:
        with self._auth_lock:
            if self._auth is None:
                self._auth = Authenticator(
                    self.registry, self._store.get(self.registry), self._transport.fetch
                )
            return self._auth

    def _check(self, ref: Reference) -> str:
        """``ref``'s repository, once it is known to be on this registry."""
        if ref.registry != self.registry:
            raise ValueError(f"{ref} is not on the registry {self.registry}")
        return ref.repository

    def ping(self) -> None:
        """Check the registry answers ``/v2/``, authenticating if it asks."""
        self._request("GET", "/v2/", scopes=(), ok=(200,), what="ping", max_body=MAX_ERROR_BODY)

    # -- the request loop -------------------------------------------------------------------
    def _url(self, path_or_url: str) -> str:
        if path_or_url.startswith(("http://", "https://")):
            return path_or_url
        return self._transport.base_url() + path_or_url

    def _budget(self, what: str) -> Budget:
        return Budget(
            self.retry, self.settings, registry=self.registry, what=what, deadline=self._deadline
        )

    def _body_error(self, e: BaseException, doing: str) -> RegistryUnreachable:
        """The error for a body that broke off (``doing``: "downloading sha256:… at byte 9")."""
        if timed_out(e):
            return RegistryTimeout(
                f"no data from {self._transport.api_host} for "
                f"{self.settings.stall_timeout:g} s while {doing}"
            )
        reason = "connection closed early" if isinstance(e, EOFError) else type(e).__name__
        return RegistryUnreachable(f"cannot reach registry {self.registry}: {doing}: {reason}")

    def _stream(
        self,
        method: str,
        path: str,
        *,
        scopes: tuple[str, ...],
        headers: dict[str, str] | None = None,
        body: BodyFactory | None = None,
        ok: tuple[int, ...] = (200, 206),
        kind: str | None = None,
        what: str,
        retry: bool = True,
        missing_ok: bool = False,
        budget: Budget | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """Send with auth + retries; return the (unread) response whose status is in ``ok``.

        Error statuses raise the typed exception; 404 with ``missing_ok`` is returned.
        ``body`` is a factory so the request can be replayed (auth retry, 307, retries).
        Failures are retried within ``budget`` (a fresh one for this request when None);
        ``retry=False``: the first failure is raised.
        """
        budget = budget if budget is not None else self._budget(what)
        auth_tries = 0
        idempotent = method in IDEMPOTENT or (method == "PUT" and kind == "manifest")
        while True:
            budget.check_deadline()
            hdrs = dict(headers or {})
            auth = self.auth.header(scopes)
            if auth:
                hdrs["Authorization"] = auth
            try:
                url = self._url(path)  # the first request probes the scheme
                resp, final = self._transport.send(
                    method,
                    url,
                    hdrs,
                    body() if body else None,
                    body_again=body,
                    idempotent=idempotent,
                    what=what,
                )
            except RegistryUnreachable as e:
                if not retry or not getattr(e, "retryable", True):
                    raise
                # a refused connection rarely heals in seconds: fewer tries
                budget.retry(e, limit=3 if "refused" in e.message else None)
                continue
            status = resp.status
            if status in ok or (missing_ok and status == 404):
                return resp
            from_registry = self._transport.is_registry_url(final)
            if status == 401 and from_registry:
                challenge = resp.headers.get("WWW-Authenticate")
                self._discard(resp)
                if auth_tries >= 2 or (auth_tries == 1 and self.auth.scheme == "basic"):
                    raise self.auth.fail(challenge, what, denied_hint=_denied_hint(scopes))
                auth_tries += 1
                self.auth.challenged(challenge, scopes, what)
                continue
            data = self._read_error(resp, method)
            err = error_from_response(
                status, data, resp.headers, registry=self.registry, what=what, kind=kind
            )
            if status in RETRY_STATUS and retry:
                log.debug("%s %s: HTTP %s, retrying", method, redact_url(url), status)
                budget.retry(err, retry_after=_retry_after(resp.headers))
                continue
            raise err

    def _request(
        self,
        method: str,
        path: str,
        *,
        scopes: tuple[str, ...],
        ok: tuple[int, ...],
        what: str,
        headers: dict[str, str] | None = None,
        body: BodyFactory | None = None,
        kind: str | None = None,
        retry: bool = True,
        missing_ok: bool = False,
        max_body: int = MAX_MANIFEST_SIZE,
        budget: Budget | None = None,
    ) -> Response:
        # a connection that breaks while the answer is read: idempotent requests are tried
        # again within the budget, others report it
        again = retry and (method in IDEMPOTENT or (method == "PUT" and kind == "manifest"))
        budget = budget if budget is not None else self._budget(what)
        while True:
            resp = self._stream(
                method,
                path,
                scopes=scopes,
                headers=headers,
                body=body,
                ok=ok,
                kind=kind,
                what=what,
                retry=retry,
                missing_ok=missing_ok,
                budget=budget,
            )
            try:
                data = self._read_body(resp, method, what, max_body)
            except CONNECTION_ERRORS as e:
                resp.close()
                err = self._body_error(e, f"reading the answer to {method} ({what})")
                if not again:
                    raise err from None
                log.debug("%s %s: answer broken off (%s); retrying", method, what, e)
                budget.retry(err)
                continue
            finally:
                release(resp)
            return Response(resp.status, resp.headers, data, resp.geturl() or path)

    def _read_body(
        self, resp: urllib3.BaseHTTPResponse, method: str, what: str, max_body: int
    ) -> bytes:
        if method == "HEAD":
            return b""
        cl = resp.headers.get("Content-Length")
        if cl and cl.isdigit() and int(cl) > max_body:
            raise LimitError(f"{self.registry}: {what}: answer too large ({cl} bytes)")
        data = resp.read(max_body + 1, decode_content=True)
        if len(data) > max_body:
            raise LimitError(f"{self.registry}: {what}: answer larger than {max_body} bytes")
        return data

    @staticmethod
    def _discard(resp: urllib3.BaseHTTPResponse) -> None:
        release(resp, drain=MAX_ERROR_BODY)

    @staticmethod
    def _read_error(resp: urllib3.BaseHTTPResponse, method: str) -> bytes:
        data = b""
        if method != "HEAD":
            try:
                data = resp.read(MAX_ERROR_BODY, decode_content=True)
            except Exception:
                resp.close()
        release(resp)
        return data


def _denied_hint(scopes: tuple[str, ...]) -> str | None:
    if any(s.endswith("push") or ":delete" in s for s in scopes):
        return "the account may only pull from this repository"
    return None
