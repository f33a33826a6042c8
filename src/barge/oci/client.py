"""The registry client: OCI distribution-spec endpoints over one pooled, thread-safe transport.

One :class:`RegistryClient` talks to one registry and may be shared by worker threads.
Every step is retried with exponential backoff and jitter on connection errors, 408, 429
(honouring Retry-After) and 5xx, bounded in attempts and time (:class:`RetryPolicy`). Steps
that carry data are never blindly repeated: uploads resume from the offset the server
confirms (GET on the upload URL) or start a fresh session; downloads resume with ``Range``.
Every downloaded byte of a whole blob or manifest is checked against its digest.

Connections: every response is finished with :func:`~barge.oci.transport.release`, which puts
its connection back in the pool only when the body was read to the end (draining a small
remainder) and closes it otherwise; a broken connection is a retryable connection error,
never a raw exception.
"""

from __future__ import annotations

import contextlib
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
from typing import IO, Any, BinaryIO, NoReturn, TypeVar, cast
from urllib.parse import quote, urlencode, urlsplit

import urllib3

from barge import cancel
from barge.errors import LimitError, RegistryError
from barge.oci.auth import Authenticator, CredentialStore, default_home
from barge.oci.errors import (
    BlobUploadUnknown,
    DigestMismatch,
    RegistryResponseError,
    RegistryUnreachable,
    TooManyRequests,
    error_from_response,
)
from barge.oci.transport import CONNECTION_ERRORS, RetryPolicy, Transport, redact_url, release
from barge.oci.types import (
    MANIFEST_ACCEPT,
    Descriptor,
    Index,
    Manifest,
    is_digest,
    media_type_of,
)
from barge.untrusted import load_json

__all__ = ["BlobReader", "RegistryClient"]

log = logging.getLogger("barge.oci")

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE"})  # plus PUT of a manifest
MAX_MANIFEST_SIZE = 8 << 20
MAX_ERROR_BODY = 64 << 10
MAX_TAG_PAGES = 10_000
MAX_REFERRER_PAGES = 1_000
UPLOAD_SESSIONS = 4  # fresh upload sessions tried for one blob before giving up

BodyFactory = Callable[[], Any]


T = TypeVar("T")


class _Restart(Exception):
    """The upload session is lost or its state is unknowable; start a fresh one."""


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

    Interrupted transfers resume with ``Range`` from the current position (bounded). When
    reading a whole blob (offset 0, no length), the sha256 is checked at EOF and a mismatch
    raises :class:`DigestMismatch`.
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
        self._resumes = 0
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
        self._drop(False)
        policy = self._client.retry
        if self._resumes >= policy.attempts * 2:
            raise RegistryUnreachable(
                f"cannot download blob {self.digest} from {self._client.registry}: "
                f"transfer kept failing at byte {self._pos} ({type(err).__name__})"
            ) from None
        self._resumes += 1
        cancel.sleep(policy.delay(min(self._resumes - 1, 3)))
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
    ) -> None:
        self.registry = registry
        self.home = home if home is not None else default_home()
        self.debug = debug or os.environ.get("BARGE_DEBUG", "") not in ("", "0")
        self.retry = RetryPolicy()
        self._transport = Transport(registry, insecure=insecure, home=self.home, debug=self.debug)
        self._store = credentials if credentials is not None else CredentialStore(self.home)
        self._auth_lock = threading.Lock()
        self._auth: Authenticator | None = None

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
    ) -> urllib3.BaseHTTPResponse:
        """Send with auth + retries; return the (unread) response whose status is in ``ok``.

        Error statuses raise the typed exception; 404 with ``missing_ok`` is returned.
        ``body`` is a factory so the request can be replayed (auth retry, 307, retries).
        """
        policy = self.retry
        started = time.monotonic()
        attempt = 0
        auth_tries = 0
        idempotent = method in IDEMPOTENT or (method == "PUT" and kind == "manifest")
        while True:
            url = self._url(path)
            hdrs = dict(headers or {})
            auth = self.auth.header(scopes)
            if auth:
                hdrs["Authorization"] = auth
            try:
                resp, final = self._transport.send(
                    method,
                    url,
                    hdrs,
                    body() if body else None,
                    body_again=body,
                    idempotent=idempotent,
                )
            except RegistryUnreachable as e:
                if not retry or not getattr(e, "retryable", True):
                    raise
                attempt += 1
                # a refused connection rarely heals in seconds: fewer tries
                limit = min(policy.attempts, 3) if "refused" in e.message else policy.attempts
                if attempt >= limit or time.monotonic() - started > policy.total:
                    raise
                cancel.sleep(policy.delay(attempt - 1))
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
            if status in RETRY_STATUS and retry:
                ra = _retry_after(resp.headers)
                data = self._read_error(resp, method)
                attempt += 1
                elapsed = time.monotonic() - started
                delay = policy.delay(attempt - 1, ra)
                if attempt >= policy.attempts or elapsed + delay > policy.total:
                    self._raise(status, data, resp.headers, what, kind)
                log.debug(
                    "%s %s: HTTP %s, retry %d in %.2fs",
                    method,
                    redact_url(url),
                    status,
                    attempt,
                    delay,
                )
                cancel.sleep(delay)
                continue
            data = self._read_error(resp, method)
            self._raise(status, data, resp.headers, what, kind)

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
    ) -> _Response:
        # a connection that breaks while the answer is read: idempotent requests get one
        # more try (the transport opens a new connection), others report it
        again = retry and (method in IDEMPOTENT or (method == "PUT" and kind == "manifest"))
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
            )
            try:
                data = self._read_body(resp, method, what, max_body)
            except CONNECTION_ERRORS as e:
                resp.close()
                if again:
                    again = False
                    log.debug("%s %s: answer broken off (%s); retrying", method, what, e)
                    continue
                raise RegistryUnreachable(
                    f"cannot reach registry {self.registry}: {what}: {type(e).__name__}"
                ) from None
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
    def _start_upload(self, repo: str) -> tuple[str, int]:
        r = self._request(
            "POST",
            f"/v2/{repo}/blobs/uploads/",
            scopes=self._push(repo),
            ok=(202,),
            headers={"Content-Length": "0"},
            kind="upload",
            what=f"start upload to {repo}",
            max_body=MAX_ERROR_BODY,
        )
        loc = r.headers.get("Location")
        if not loc:
            raise RegistryResponseError(f"{self.registry}: upload to {repo}: no Location")
        min_len = r.headers.get("OCI-Chunk-Min-Length", "")
        return self._transport.resolve(loc), int(min_len) if min_len.isdigit() else 0

    def _upload_status(self, repo: str, location: str) -> tuple[str, int]:
        """(location, offset the server holds) for an upload session; _Restart if it is gone."""
        try:
            r = self._request(
                "GET",
                location,
                scopes=self._push(repo),
                ok=(204, 200),
                missing_ok=True,
                kind="upload",
                what=f"upload status in {repo}",
                max_body=MAX_ERROR_BODY,
            )
        except (BlobUploadUnknown, RegistryResponseError) as e:
            raise _Restart() from e
        if r.status == 404:
            raise _Restart()
        loc = r.headers.get("Location")
        new_loc = self._transport.resolve(loc) if loc else location
        m = re.match(r"(?:bytes=)?(\d+)-(\d+)", r.headers.get("Range", ""))
        if not m:
            return new_loc, 0
        end = int(m.group(2))
        # distribution answers "0-0" for both 0 and 1 byte; assume 0 (a 416 sends us back here)
        return new_loc, 0 if end == 0 else end + 1

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
        """Upload a blob. ``progress(delta)`` gets bytes sent (negative when a restart undoes
        some); the deltas of a successful upload sum to ``size``."""

        def session(location: str, min_len: int, report: Callable[[int], None]) -> None:
            if chunk_size is None:
                self._upload_monolithic(repo, digest, size, open_at, location, report)
            else:
                self._upload_chunked(
                    repo, digest, size, open_at, location, max(chunk_size, min_len, 1), report
                )

        def arrived() -> bool:  # a lost answer to a PUT that did land
            return self._exists_quietly(repo, digest) == size

        self._in_sessions(repo, f"blob {digest}", session, progress, arrived, size)

    def upload_stream(
        self,
        repo: str,
        produce: Callable[[], Iterable[bytes]],
        *,
        chunk_size: int | None = None,
        progress: Callable[[int], None] | None = None,
        before_commit: Callable[[str, int], None] | None = None,
    ) -> tuple[str, int]:
        """Upload a blob while it is being produced (compressed): its digest and size are known
        only at the end. Returns ``(digest, size)``. ``before_commit(digest, size)`` runs once
        all bytes are sent, before the ``PUT`` that makes the blob exist, so a caller can record
        what it is about to create (a process killed after the PUT then still knows it).

        With ``chunk_size`` None the bytes go in one streamed ``PATCH`` (chunked transfer
        encoding), so producing and sending overlap and nothing is spooled; otherwise in
        ``PATCH`` requests of ``chunk_size`` bytes (registries that cap PATCH bodies). Then
        ``PUT ?digest=`` closes the session. A failure restarts a fresh session and calls
        ``produce()`` again, so it must yield the same bytes each time (barge's encoder is
        deterministic). ``progress(delta)`` as for :meth:`upload_blob`.
        """

        def session(location: str, min_len: int, report: Callable[[int], None]) -> tuple[str, int]:
            chunk = None if chunk_size is None else max(chunk_size, min_len, 1)
            return self._upload_streamed(repo, produce, location, chunk, report, before_commit)

        return self._in_sessions(repo, "a blob", session, progress)

    def _in_sessions(
        self,
        repo: str,
        what: str,
        session: Callable[[str, int, Callable[[int], None]], T],
        progress: Callable[[int], None] | None,
        arrived: Callable[[], bool] | None = None,
        size: int = 0,
    ) -> T:
        """Run an upload in fresh sessions until one completes (bounded in count and time).
        A session that raises _Restart is abandoned, its progress undone, and, unless
        ``arrived()`` says the blob landed after all, the next one starts after a backoff."""
        sent = 0

        def report(n: int) -> None:
            nonlocal sent
            sent += n
            if progress is not None and n:
                progress(n)

        started = time.monotonic()
        for attempt in range(UPLOAD_SESSIONS):
            location, min_len = self._start_upload(repo)
            try:
                return session(location, min_len, report)
            except _Restart as e:
                cause = e.__cause__ or e
                if arrived is not None and arrived():
                    report(size - sent)
                    return cast(T, None)
                report(-sent)
                last = attempt == UPLOAD_SESSIONS - 1
                if last or time.monotonic() - started > self.retry.total:
                    if isinstance(cause, RegistryError):
                        raise cause from None
                    raise RegistryUnreachable(
                        f"cannot upload {what} to {self.registry}/{repo}: "
                        f"upload kept failing ({type(cause).__name__})"
                    ) from None
                log.debug("upload of %s: fresh session after %s", what, type(cause).__name__)
                cancel.sleep(self.retry.delay(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _upload_streamed(
        self,
        repo: str,
        produce: Callable[[], Iterable[bytes]],
        location: str,
        chunk: int | None,
        report: Callable[[int], None],
        before_commit: Callable[[str, int], None] | None,
    ) -> tuple[str, int]:
        h = hashlib.sha256()
        size = 0
        what = f"upload a blob to {repo}"

        def patch(body: Callable[[], Any], headers: dict[str, str]) -> None:
            nonlocal location
            r = self._upload_step(
                "PATCH",
                location,
                repo,
                headers={"Content-Type": "application/octet-stream", **headers},
                body=body,
                what=what,
                ok=(202, 204),
            )
            loc = r.headers.get("Location")
            if loc:
                location = self._transport.resolve(loc)

        if chunk is None:
            started = [False]

            def stream() -> Any:
                if started[0]:  # a replay (auth retry) would need the bytes again
                    raise _Restart()
                started[0] = True

                def gen() -> Iterator[bytes]:
                    nonlocal size
                    for piece in produce():
                        if piece:
                            h.update(piece)
                            size += len(piece)
                            report(len(piece))
                            yield piece

                return gen()

            patch(stream, {})
        else:
            buf = bytearray()
            offset = 0

            def flush(data: bytes) -> None:
                nonlocal offset
                end = offset + len(data) - 1
                patch(
                    lambda: data,
                    {"Content-Range": f"{offset}-{end}", "Content-Length": str(len(data))},
                )
                offset += len(data)
                report(len(data))

            for piece in produce():
                if not piece:
                    continue
                h.update(piece)
                size += len(piece)
                buf += piece
                while len(buf) >= chunk:
                    flush(bytes(buf[:chunk]))
                    del buf[:chunk]
            if buf:
                flush(bytes(buf))
        digest = "sha256:" + h.hexdigest()
        if before_commit is not None:
            before_commit(digest, size)
        self._upload_step(
            "PUT",
            self._with_digest(location, digest),
            repo,
            headers={"Content-Length": "0"},
            body=lambda: b"",
            what=f"finish upload of {digest} to {repo}",
        )
        return digest, size

    def _upload_step(
        self,
        method: str,
        url: str,
        repo: str,
        *,
        headers: dict[str, str],
        body: Callable[[], Any],
        what: str,
        ok: tuple[int, ...] = (201, 204),
    ) -> _Response:
        """One request of an upload session, not retried on its own: a lost connection, a
        retryable status or a vanished session means the session restarts (_Restart)."""
        try:
            return self._request(
                method,
                url,
                scopes=self._push(repo),
                ok=ok,
                headers=headers,
                body=body,
                kind="upload",
                what=what,
                retry=False,
                max_body=MAX_ERROR_BODY,
            )
        except RegistryUnreachable as e:
            raise _Restart() from e
        except RegistryResponseError as e:
            if e.status in RETRY_STATUS or isinstance(e, BlobUploadUnknown):
                raise _Restart() from e
            raise

    def _exists_quietly(self, repo: str, digest: str) -> int | None:
        try:
            return self.blob_exists(repo, digest)
        except RegistryError:
            return None

    def _upload_monolithic(
        self,
        repo: str,
        digest: str,
        size: int,
        open_at: Callable[[int], BinaryIO],
        location: str,
        report: Callable[[int], None],
    ) -> None:
        streams: list[IO[bytes]] = []
        partial: list[_LimitedReader] = []

        def body() -> Any:
            for s in streams:
                s.close()
            streams.clear()
            for p in partial:  # a replay (auth retry, 307) re-sends: undo the first attempt
                report(-p.sent)
            partial.clear()
            if size == 0:
                return b""
            f = open_at(0)
            streams.append(f)
            lr = _LimitedReader(f, size, report)
            partial.append(lr)
            return lr

        try:
            self._upload_step(
                "PUT",
                self._with_digest(location, digest),
                repo,
                headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                body=body,
                what=f"upload blob {digest} to {repo}",
            )
        finally:
            for s in streams:
                s.close()

    def _upload_chunked(
        self,
        repo: str,
        digest: str,
        size: int,
        open_at: Callable[[int], BinaryIO],
        location: str,
        chunk: int,
        report: Callable[[int], None],
    ) -> None:
        offset = 0
        confirmed_sent = 0  # bytes reported for confirmed chunks
        failures = 0
        started = time.monotonic()
        policy = self.retry
        while offset < size:
            n = min(chunk, size - offset)
            streams: list[IO[bytes]] = []
            partial: list[_LimitedReader] = []

            def body(
                off: int = offset,
                n: int = n,
                streams: list[IO[bytes]] = streams,
                partial: list[_LimitedReader] = partial,
            ) -> Any:
                for s in streams:
                    s.close()
                streams.clear()
                for p in partial:  # a replay (auth retry) re-sends: undo the first attempt
                    report(-p.sent)
                partial.clear()
                f = open_at(off)
                streams.append(f)
                lr = _LimitedReader(f, n, report)
                partial.append(lr)
                return lr

            try:
                r = self._request(
                    "PATCH",
                    location,
                    scopes=self._push(repo),
                    ok=(202, 204),
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + n - 1}",
                        "Content-Length": str(n),
                    },
                    body=body,
                    kind="upload",
                    what=f"upload chunk of {digest} to {repo}",
                    retry=False,
                    max_body=MAX_ERROR_BODY,
                )
            except (RegistryUnreachable, RegistryResponseError) as e:
                for p in partial:
                    report(-p.sent)
                if isinstance(e, BlobUploadUnknown):
                    raise _Restart() from e
                retryable = isinstance(e, RegistryUnreachable) or (
                    isinstance(e, RegistryResponseError) and e.status in (RETRY_STATUS | {416})
                )
                if not retryable:
                    raise
                failures += 1
                if failures >= policy.attempts * 2 or time.monotonic() - started > policy.total:
                    raise _Restart() from e
                ra = e.retry_after if isinstance(e, TooManyRequests) else None
                cancel.sleep(policy.delay(min(failures - 1, 4), ra))
                location, offset = self._upload_status(repo, location)
                # progress follows the server-confirmed offset
                report(offset - confirmed_sent)
                confirmed_sent = offset
                continue
            finally:
                for s in streams:
                    s.close()
            loc = r.headers.get("Location")
            if loc:
                location = self._transport.resolve(loc)
            offset += n
            confirmed_sent = offset
        self._upload_step(
            "PUT",
            self._with_digest(location, digest),
            repo,
            headers={"Content-Length": "0"},
            body=lambda: b"",
            what=f"finish upload of {digest} to {repo}",
        )

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
