"""The registry client: OCI distribution-spec endpoints over one pooled, thread-safe transport.

One :class:`RegistryClient` talks to one registry and may be shared by worker threads.
Every step is retried with exponential backoff and jitter on connection errors, stalls, 408,
429 (honouring Retry-After) and 5xx, within a :class:`~barge.oci.retry.Budget`: until
``retry_timeout`` passes without progress (the furthest byte reached growing), so a moving
transfer is never given up and a stuck one is, with a message naming what was waited for.
Timings come from the host's :class:`~barge.oci.settings.HostSettings`. Steps that carry data
are never blindly repeated: uploads resume from the offset the server confirms (GET on the
upload URL, also across runs: :mod:`barge.oci.sessions`) and a lost answer to the closing PUT
is checked with HEAD before anything is sent again (:mod:`barge.oci.uploads`); downloads
resume with ``Range``. Every downloaded byte of a whole blob or manifest is checked against
its digest.

Connections: every response is finished with :func:`~barge.oci.transport.release`, which puts
its connection back in the pool only when the body was read to the end (draining a small
remainder) and closes it otherwise; a broken connection is a retryable connection error,
never a raw exception.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import http.client
import io
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any, BinaryIO, NoReturn
from urllib.parse import quote, urlencode, urlsplit

import urllib3

from barge.errors import LimitError, RegistryError
from barge.oci.auth import Authenticator, CredentialStore, default_home
from barge.oci.errors import (
    DigestMismatch,
    RegistryResponseError,
    RegistryTimeout,
    RegistryUnreachable,
    error_from_response,
)
from barge.oci.retry import Budget, RetryPolicy
from barge.oci.sessions import UploadSessions
from barge.oci.settings import HostSettings, settings_for
from barge.oci.transport import (
    CONNECTION_ERRORS,
    Transport,
    redact_url,
    release,
    timed_out,
)
from barge.oci.types import (
    MANIFEST_ACCEPT,
    Descriptor,
    Index,
    Manifest,
    is_digest,
    media_type_of,
)
from barge.oci.uploads import Produced, Stored, Upload
from barge.untrusted import load_json

__all__ = ["BlobReader", "RegistryClient"]

log = logging.getLogger("barge.oci")

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE"})  # plus PUT of a manifest
MAX_MANIFEST_SIZE = 8 << 20
MAX_ERROR_BODY = 64 << 10
MAX_TAG_PAGES = 10_000
MAX_REFERRER_PAGES = 1_000

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


class _Response:
    """A finished small response: status, headers, body (already read)."""

    __slots__ = ("status", "headers", "data", "url")

    def __init__(self, status: int, headers: Any, data: bytes, url: str) -> None:
        self.status = status
        self.headers = headers
        self.data = data
        self.url = url


class _LimitedReader:
    """Reads at most ``n`` bytes from ``f``; reports progress; urllib3 streams it as a body."""

    def __init__(self, f: IO[bytes], n: int, progress: Callable[[int], None] | None) -> None:
        self._f = f
        self._left = n
        self._progress = progress
        self.sent = 0

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if size is None or size < 0 else min(size, self._left)
        data = self._f.read(want)
        if not data:
            raise OSError(f"upload source ended early ({self._left} bytes missing)")
        self._left -= len(data)
        self.sent += len(data)
        if self._progress is not None:
            self._progress(len(data))
        return data


class BlobReader(io.RawIOBase):
    """A streaming blob download; ``readinto`` reads straight from the socket.

    Interrupted or stalled transfers resume with ``Range`` from the current position, within
    one :class:`~barge.oci.retry.Budget` for the whole blob (every byte read is progress).
    When reading a whole blob (offset 0, no length), the sha256 is checked at EOF and a
    mismatch raises :class:`DigestMismatch`.
    """

    def __init__(
        self,
        client: RegistryClient,
        repo: str,
        digest: str,
        offset: int = 0,
        length: int | None = None,
    ) -> None:
        super().__init__()
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must be >= 0")
        self._client = client
        self._repo = repo
        self.digest = digest
        self._start = offset
        self._pos = offset
        self._end: int | None = offset + length if length is not None else None  # exclusive
        self._verify = offset == 0 and length is None and digest.startswith("sha256:")
        self._hash = hashlib.sha256() if self._verify else None
        self._resp: urllib3.BaseHTTPResponse | None = None
        self._fp: Any = None
        label = transfer_label.get()
        self._doing = f"downloading {short_digest(digest)}" + (f" ({label})" if label else "")
        self._budget = client._budget(f"blob {repo}@{digest}")
        self._eof = False
        self.total_size: int | None = None  # the whole blob's size when the server said it
        if length == 0:
            self._eof = True
        else:
            self._open()

    # -- plumbing ---------------------------------------------------------------------------
    def _open(self) -> None:
        headers = {"Accept-Encoding": "identity"}
        if self._pos > 0 or self._end is not None:
            last = "" if self._end is None else str(self._end - 1)
            headers["Range"] = f"bytes={self._pos}-{last}"
        resp = self._client._stream(
            "GET",
            f"/v2/{self._repo}/blobs/{self.digest}",
            scopes=self._client._pull(self._repo),
            headers=headers,
            kind="blob",
            what=f"blob {self._repo}@{self.digest}",
            budget=self._budget,
        )
        skip = 0
        if resp.status == 206:
            m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != self._pos:
                resp.close()
                release(resp, drain=0)
                raise RegistryResponseError(
                    f"{self._client.registry}: blob {self.digest}: bad Content-Range answer"
                )
            if m.group(3) != "*":
                self.total_size = int(m.group(3))
            self._remaining: int | None = int(m.group(2)) - int(m.group(1)) + 1
        else:  # 200: the whole blob, whatever we asked for
            cl = resp.headers.get("Content-Length")
            whole = int(cl) if cl and cl.isdigit() else None
            self.total_size = whole
            skip = self._pos
            if whole is not None:
                end = whole if self._end is None else min(self._end, whole)
                self._remaining = end - self._pos
            else:
                self._remaining = None if self._end is None else self._end - self._pos
        if self._end is None and self.total_size is not None:
            self._end = self.total_size
        self._resp = resp
        raw = getattr(resp, "_fp", None)
        # zero-copy path: http.client's readinto fills our buffer from the socket
        encoded = resp.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
        self._fp = raw if isinstance(raw, http.client.HTTPResponse) and not encoded else None
        while skip > 0:  # server ignored Range: discard the prefix
            buf = bytearray(min(skip, 1 << 20))
            n = self._raw_readinto(memoryview(buf))
            if n == 0:
                raise RegistryResponseError(
                    f"{self._client.registry}: blob {self.digest}: short body"
                )
            skip -= n

    def _raw_readinto(self, mv: memoryview) -> int:
        if self._fp is not None:
            return int(self._fp.readinto(mv))
        assert self._resp is not None
        data = self._resp.read(len(mv), decode_content=True)
        mv[: len(data)] = data
        return len(data)

    def _drop(self, reusable: bool) -> None:
        """Let go of the response. ``reusable``: the stream is healthy, so the connection may
        go back to the pool once the rest of the body (e.g. the tail a server sent when it
        ignored ``Range``) is drained, if short; otherwise (or after an error) it is closed."""
        resp, self._resp, self._fp = self._resp, None, None
        if resp is None:
            return
        if not reusable:
            with contextlib.suppress(Exception):
                resp.close()
        release(resp, drain=0 if not reusable else 64 << 10)

    def _resume(self, err: BaseException) -> None:
        """The body broke off or stalled: count it against the blob's budget (which raises
        when it is spent), then ask again from the current position."""
        self._drop(False)
        where = f"at byte {self._pos}" + (f" of {self._end}" if self._end is not None else "")
        self._budget.retry(self._client._body_error(err, f"{self._doing} {where}"))
        log.debug("blob %s: resuming at %d after %s", self.digest, self._pos, type(err).__name__)
        self._open()

    def _finish(self) -> None:
        self._eof = True
        self._drop(True)
        if self._hash is not None:
            actual = "sha256:" + self._hash.hexdigest()
            if actual != self.digest:
                raise DigestMismatch(
                    f"blob {self._repo}@{self.digest}", self.digest, actual, size=self._pos
                )

    # -- io API -----------------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._eof or self.closed:
            return 0
        mv = memoryview(b).cast("B")
        if len(mv) == 0:
            return 0
        self._budget.check_deadline()
        while True:
            want = len(mv)
            if self._remaining is not None:
                want = min(want, self._remaining)
                if want == 0:
                    self._finish()
                    return 0
            try:
                n = self._raw_readinto(mv[:want])
            except CONNECTION_ERRORS as e:
                self._resume(e)
                continue
            if n == 0:
                if self._remaining is None:
                    self._finish()
                    return 0
                self._resume(EOFError("connection closed early"))
                continue
            if self._hash is not None:
                self._hash.update(mv[:n])
            self._pos += n
            self._budget.advance(self._pos)
            if self._remaining is not None:
                self._remaining -= n
                if self._remaining == 0:
                    # verify now: a caller that stops at the known size never asks for EOF
                    self._finish()
            return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        buf = bytearray(size)
        n = self.readinto(buf)
        del buf[n:]
        return bytes(buf)

    def readall(self) -> bytes:
        out = bytearray()
        chunk = bytearray(1 << 20)
        while True:
            n = self.readinto(chunk)
            if n == 0:
                return bytes(out)
            out += memoryview(chunk)[:n]

    @property
    def position(self) -> int:
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self._drop(self._eof)
        super().close()

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(
        self,
        t: type[BaseException] | None,
        v: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class RegistryClient:
    """Client for one OCI registry (``host[:port]``). Thread-safe; pooled connections."""

    def __init__(
        self,
        registry: str,
        *,
        insecure: bool = False,
        home: Path | None = None,
        credentials: CredentialStore | None = None,
        debug: bool = False,
        settings: HostSettings | None = None,
    ) -> None:
        self.registry = registry
        self.home = home if home is not None else default_home()
        self.debug = debug or os.environ.get("BARGE_DEBUG", "") not in ("", "0")
        self.settings = settings if settings is not None else settings_for(registry)
        self.retry = RetryPolicy()
        # the operation's deadline counts from the moment this command first needs the host
        self._deadline = (
            time.monotonic() + self.settings.timeout if self.settings.timeout > 0 else None
        )
        self._transport = Transport(
            registry, insecure=insecure, home=self.home, debug=self.debug, settings=self.settings
        )
        self._store = credentials if credentials is not None else CredentialStore(self.home)
        self._auth_lock = threading.Lock()
        self._auth: Authenticator | None = None
        self.sessions = UploadSessions(self.home / "uploads")

    def __repr__(self) -> str:
        return f"RegistryClient({self.registry!r})"

    def __enter__(self) -> RegistryClient:
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

    # -- scopes -----------------------------------------------------------------------------
    @staticmethod
    def _pull(repo: str) -> tuple[str, ...]:
        return (f"repository:{repo}:pull",)

    @staticmethod
    def _push(repo: str) -> tuple[str, ...]:
        return (f"repository:{repo}:pull,push",)

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
    ) -> _Response:
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
            return _Response(resp.status, resp.headers, data, resp.geturl() or path)

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

    def _raise(
        self, status: int, data: bytes, headers: Any, what: str, kind: str | None
    ) -> NoReturn:
        raise error_from_response(
            status, data, headers, registry=self.registry, what=what, kind=kind
        )

    # -- API --------------------------------------------------------------------------------
    def ping(self) -> None:
        """Check the registry answers ``/v2/``, authenticating if it asks."""
        self._request("GET", "/v2/", scopes=(), ok=(200,), what="ping", max_body=MAX_ERROR_BODY)

    def blob_exists(self, repo: str, digest: str) -> int | None:
        r = self._request(
            "HEAD",
            f"/v2/{repo}/blobs/{digest}",
            scopes=self._pull(repo),
            ok=(200,),
            missing_ok=True,
            kind="blob",
            what=f"blob {repo}@{digest}",
        )
        if r.status == 404:
            return None
        cl = r.headers.get("Content-Length")
        return int(cl) if cl and cl.isdigit() else 0

    def open_blob(
        self, repo: str, digest: str, *, offset: int = 0, length: int | None = None
    ) -> BlobReader:
        return BlobReader(self, repo, digest, offset, length)

    def read_blob(self, repo: str, digest: str, *, max_size: int) -> bytes:
        with self.open_blob(repo, digest) as r:
            if r.total_size is not None and r.total_size > max_size:
                raise LimitError(
                    f"{self.registry}: blob {repo}@{digest} is {r.total_size} bytes, "
                    f"more than the {max_size} allowed here"
                )
            out = bytearray()
            buf = bytearray(min(max_size + 1, 1 << 20) or 1)
            while True:
                n = r.readinto(buf)
                if n == 0:
                    return bytes(out)
                out += memoryview(buf)[:n]
                if len(out) > max_size:
                    raise LimitError(
                        f"{self.registry}: blob {repo}@{digest} is larger than {max_size} bytes"
                    )

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        q = urlencode({"mount": digest, "from": from_repo})
        r = self._request(
            "POST",
            f"/v2/{repo}/blobs/uploads/?{q}",
            scopes=self._push(repo) + self._pull(from_repo),
            ok=(201, 202),
            headers={"Content-Length": "0"},
            kind="upload",
            what=f"mount {digest} from {from_repo} into {repo}",
            max_body=MAX_ERROR_BODY,
        )
        if r.status == 201:
            return True
        loc = r.headers.get("Location")
        if loc:  # the registry opened a normal upload session instead: cancel it
            with contextlib.suppress(RegistryError):
                self._request(
                    "DELETE",
                    self._transport.resolve(loc),
                    scopes=self._push(repo),
                    ok=(200, 202, 204),
                    missing_ok=True,
                    retry=False,
                    what="cancel upload",
                    max_body=MAX_ERROR_BODY,
                )
        return False

    # -- uploads ----------------------------------------------------------------------------
    def _start_upload(self, repo: str, *, budget: Budget | None = None) -> tuple[str, int]:
        """Open an upload session: (its URL, the registry's OCI-Chunk-Min-Length or 0)."""
        r = self._request(
            "POST",
            f"/v2/{repo}/blobs/uploads/",
            scopes=self._push(repo),
            ok=(202,),
            headers={"Content-Length": "0"},
            kind="upload",
            what=f"start upload to {repo}",
            max_body=MAX_ERROR_BODY,
            budget=budget,
        )
        loc = r.headers.get("Location")
        if not loc:
            raise RegistryResponseError(f"{self.registry}: upload to {repo}: no Location")
        min_len = r.headers.get("OCI-Chunk-Min-Length", "")
        return self._transport.resolve(loc), int(min_len) if min_len.isdigit() else 0

    @staticmethod
    def _with_digest(location: str, digest: str) -> str:
        sep = "&" if urlsplit(location).query else "?"
        return f"{location}{sep}digest={quote(digest, safe='')}"

    def upload_blob(
        self,
        repo: str,
        digest: str,
        size: int,
        open_at: Callable[[int], BinaryIO],
        *,
        chunk_size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Upload a blob: one ``PUT`` with the body when ``chunk_size`` is None, else
        ``PATCH`` requests of ``chunk_size`` bytes (a session kept across runs, so a killed
        upload continues where the registry says it stands). ``open_at(offset)`` gives the
        bytes from ``offset`` (called again for every attempt). ``progress(delta)`` gets bytes
        sent (negative when a restart undoes some); the deltas of a success sum to ``size``."""
        label = transfer_label.get()
        what = short_digest(digest) + (f" ({label})" if label else "")
        Upload(
            self,
            repo,
            Stored(digest, size, open_at),
            what=what,
            chunk=chunk_size,
            monolithic=chunk_size is None,
            key=f"blob:{digest}:{size}",
            progress=progress,
        ).run()

    def upload_stream(
        self,
        repo: str,
        produce: Callable[[], Iterable[bytes]],
        *,
        chunk_size: int | None = None,
        progress: Callable[[int], None] | None = None,
        before_commit: Callable[[str, int], None] | None = None,
        resume_key: str | None = None,
    ) -> tuple[str, int]:
        """Upload a blob while it is being produced (compressed): its digest and size are known
        only at the end. Returns ``(digest, size)``. ``before_commit(digest, size)`` runs once
        all bytes are sent, before the ``PUT`` that makes the blob exist, so a caller can record
        what it is about to create (a process killed after the PUT then still knows it).

        With ``chunk_size`` None the bytes go in one streamed ``PATCH`` (chunked transfer
        encoding), so producing and sending overlap and nothing is spooled; otherwise in
        ``PATCH`` requests of ``chunk_size`` bytes (registries that cap PATCH bodies). Then
        ``PUT ?digest=`` closes the session. To continue at an offset (a failed PATCH, a
        resumed session) ``produce()`` is called again and the bytes before it are hashed but
        not sent, so it must yield the same bytes each time (barge's encoder is
        deterministic). ``resume_key`` (naming exactly these bytes) keeps the session across
        runs. ``progress(delta)`` as for :meth:`upload_blob`.
        """
        label = transfer_label.get()
        return Upload(
            self,
            repo,
            Produced(produce),
            what="a blob" + (f" ({label})" if label else ""),
            chunk=chunk_size,
            monolithic=False,
            key=f"stream:{resume_key}" if resume_key else None,
            progress=progress,
        ).run(before_commit)

    # -- manifests --------------------------------------------------------------------------
    def get_manifest(self, repo: str, reference: str) -> Manifest:
        what = f"manifest {repo}{'@' if is_digest(reference) else ':'}{reference}"
        r = self._request(
            "GET",
            f"/v2/{repo}/manifests/{reference}",
            scopes=self._pull(repo),
            ok=(200,),
            headers={"Accept": ", ".join(MANIFEST_ACCEPT)},
            kind="manifest",
            what=what,
        )
        algo = reference.split(":", 1)[0] if is_digest(reference) else "sha256"
        actual = f"{algo}:{hashlib.new(algo, r.data).hexdigest()}"
        expected = reference if is_digest(reference) else None
        header = r.headers.get("Docker-Content-Digest")
        if expected is None and header and header.startswith("sha256:"):
            expected = header
        if expected is not None and actual != expected:
            raise DigestMismatch(what, expected, actual, size=len(r.data))
        digest = actual if algo == "sha256" else "sha256:" + hashlib.sha256(r.data).hexdigest()
        if is_digest(reference):
            digest = reference
        return Manifest(r.data, media_type_of(r.data, r.headers.get("Content-Type")), digest)

    def head_manifest(self, repo: str, reference: str) -> Descriptor | None:
        r = self._request(
            "HEAD",
            f"/v2/{repo}/manifests/{reference}",
            scopes=self._pull(repo),
            ok=(200,),
            headers={"Accept": ", ".join(MANIFEST_ACCEPT)},
            missing_ok=True,
            kind="manifest",
            what=f"manifest {repo}:{reference}",
        )
        if r.status == 404:
            return None
        digest = r.headers.get("Docker-Content-Digest")
        cl = r.headers.get("Content-Length")
        ct = (r.headers.get("Content-Type") or "").split(";")[0].strip()
        if not digest or not is_digest(digest) or not (cl and cl.isdigit()) or not ct:
            return self.get_manifest(repo, reference).descriptor()
        if is_digest(reference) and digest != reference:
            raise DigestMismatch(f"manifest {repo}@{reference}", reference, digest)
        return Descriptor(ct, digest, int(cl))

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if is_digest(reference) and reference != digest:
            raise DigestMismatch(f"manifest to push to {repo}", reference, digest)
        r = self._request(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            scopes=self._push(repo),
            ok=(200, 201, 202, 204),
            headers={"Content-Type": media_type, "Content-Length": str(len(data))},
            body=lambda: data,
            kind="manifest",
            what=f"push manifest {repo}:{reference}",
            max_body=MAX_ERROR_BODY,
        )
        served = r.headers.get("Docker-Content-Digest")
        if served and served.startswith("sha256:") and served != digest:
            log.debug("registry reports digest %s for manifest %s", served, digest)
        return digest

    def delete_manifest(self, repo: str, digest: str) -> None:
        self._request(
            "DELETE",
            f"/v2/{repo}/manifests/{digest}",
            scopes=(f"repository:{repo}:delete", f"repository:{repo}:pull"),
            ok=(200, 202, 204),
            kind="manifest",
            what=f"delete manifest {repo}@{digest}",
            max_body=MAX_ERROR_BODY,
        )

    # -- listings ---------------------------------------------------------------------------
    def _paged(self, first: str, scopes: tuple[str, ...], what: str, max_pages: int) -> Any:
        path: str | None = first
        pages = 0
        seen: set[str] = set()
        while path is not None:
            pages += 1
            if pages > max_pages:
                raise LimitError(f"{self.registry}: {what}: more than {max_pages} pages")
            r = self._request("GET", path, scopes=scopes, ok=(200,), missing_ok=True, what=what)
            yield r
            if r.status != 200:
                return
            nxt = _next_link(r.headers.get("Link"))
            if nxt is None:
                return
            url = self._transport.resolve(nxt)
            if url in seen:
                return
            seen.add(url)
            path = url

    def list_tags(self, repo: str) -> list[str]:
        tags: list[str] = []
        for r in self._paged(
            f"/v2/{repo}/tags/list", self._pull(repo), f"tags of {repo}", MAX_TAG_PAGES
        ):
            if r.status == 404:
                self._raise(404, r.data, r.headers, f"tags of {repo}", None)
            doc = _json(r.data, f"tags of {repo}", self.registry)
            page = doc.get("tags") or [] if isinstance(doc, dict) else []
            tags.extend(str(t) for t in page)
        return tags

    def referrers(
        self, repo: str, digest: str, artifact_type: str | None = None
    ) -> list[Descriptor] | None:
        path = f"/v2/{repo}/referrers/{digest}"
        if artifact_type:
            path += "?" + urlencode({"artifactType": artifact_type})
        out: list[Descriptor] = []
        for r in self._paged(
            path, self._pull(repo), f"referrers of {repo}@{digest}", MAX_REFERRER_PAGES
        ):
            if r.status == 404:
                return None
            try:
                idx = Index.from_json(_json(r.data, "referrers", self.registry))
            except ValueError as e:
                raise RegistryResponseError(f"{self.registry}: bad referrers answer: {e}") from None
            out.extend(idx.manifests)
        if artifact_type:
            out = [d for d in out if d.artifact_type == artifact_type]
        return out


def _denied_hint(scopes: tuple[str, ...]) -> str | None:
    if any(s.endswith("push") or ":delete" in s for s in scopes):
        return "the account may only pull from this repository"
    return None


_LINK = re.compile(r"<([^>]*)>\s*;\s*(?:[^,]*?;\s*)*rel=\"?next\"?", re.IGNORECASE)


def _next_link(header: str | None) -> str | None:
    if not header:
        return None
    m = _LINK.search(header)
    return m.group(1) if m else None


def _json(data: bytes, what: str, registry: str) -> Any:
    try:
        return load_json(data, what)
    except ValueError:
        raise RegistryResponseError(f"{registry}: {what}: answer is not JSON") from None
