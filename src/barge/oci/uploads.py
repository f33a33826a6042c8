"""Blob uploads: one session loop for monolithic, chunked and streamed uploads.

An upload is ``POST`` (a session), then the bytes — one ``PUT ?digest=`` carrying them all
(monolithic), ``PATCH`` requests of a fixed size with ``Content-Range`` (chunked: registries
that cap PATCH bodies), or one streamed ``PATCH`` (chunked transfer encoding) — then
``PUT ?digest=`` closing the session. The rules:

* **Never send twice what the registry holds.** After a failed ``PATCH`` the session is
  asked where it stands (``GET`` → ``Range``) and the upload continues from there; the
  session's URL is kept on disk (:mod:`barge.oci.sessions`) so the next run of a killed
  push does the same. A registry that no longer knows the session (expired; or, like
  Docker's distribution, invalidated by a ``PATCH`` that broke off mid-body) answers 404:
  the session is dropped and a fresh one starts from byte 0.
* **Never duplicate a blob that arrived.** When the answer to the closing ``PUT`` is lost
  (or is an error), ``HEAD`` asks whether the blob exists before anything is sent again.
* **Give up only when stuck.** All requests of one blob share one
  :class:`~barge.oci.retry.Budget`; the furthest byte sent is its progress.
* A blob being produced while it is sent (:class:`Produced`: compressed frames) is hashed as
  it is produced; to continue at an offset it is produced again and the bytes before the
  offset are hashed but not sent. If a resumed session's bytes turn out not to be ours (the
  registry's digest check fails), a fresh session sends everything.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from barge.errors import RegistryError
from barge.oci.errors import (
    BlobUploadUnknown,
    DigestInvalid,
    RegistryResponseError,
    RegistryUnreachable,
)
from barge.oci.retry import Budget
from barge.oci.sessions import Claim

if TYPE_CHECKING:
    from barge.oci.client import RegistryClient

__all__ = ["Produced", "SessionLost", "Stored", "Upload"]

log = logging.getLogger("barge.oci")

RETRYABLE_STATUS = frozenset({408, 416, 429, 500, 502, 503, 504})
MAX_ERROR_BODY = 64 << 10
READ_BLOCK = 1 << 20


class SessionLost(Exception):
    """The upload session is gone (expired, cancelled, invalidated): start a fresh one.
    ``error`` is what the registry said (it counts against the blob's budget)."""

    def __init__(self, error: RegistryError | None = None) -> None:
        super().__init__(error.message if error is not None else "upload session gone")
        self.error = error


class _SourceFailed(Exception):
    """The blob's own source failed while its bytes were being sent (a local error, not the
    registry's): carried through urllib3 untouched and re-raised as the original."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _NotReplayable(RegistryUnreachable):
    """A streamed body cannot be sent again as is (an auth retry or a redirect asked for it):
    the upload continues from the offset the session reports."""


class _Progress:
    """Bytes reported to the caller's ``progress(delta)``; its position follows the offset
    being sent and is moved back when an upload continues from an earlier one."""

    def __init__(self, callback: Callable[[int], None] | None, budget: Budget) -> None:
        self._callback = callback
        self._budget = budget
        self.position = 0

    def sent(self, n: int) -> None:
        self.position += n
        if self._callback is not None and n:
            self._callback(n)
        self._budget.advance(self.position)
        self._budget.check_deadline()

    def at(self, offset: int) -> None:
        delta = offset - self.position
        self.position = offset
        if self._callback is not None and delta:
            self._callback(delta)


class _Reader:
    """``n`` bytes of ``f`` as a request body (urllib3 reads it); reports what it hands out."""

    def __init__(self, f: IO[bytes], n: int, progress: _Progress) -> None:
        self._f = f
        self._left = n
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if size is None or size < 0 else min(size, self._left)
        try:
            data = self._f.read(want)
        except Exception as e:  # noqa: BLE001 - a local failure, not the registry's
            raise _SourceFailed(e) from e
        if not data:
            raise _SourceFailed(OSError(f"upload source ended early ({self._left} bytes missing)"))
        self._left -= len(data)
        self._progress.sent(len(data))
        return data


class Stored:
    """A blob whose digest and size are known; ``open_at(offset)`` gives its bytes from any
    offset (re-called for every attempt)."""

    def __init__(self, digest: str, size: int, open_at: Callable[[int], BinaryIO]) -> None:
        self._digest = digest
        self._size = size
        self._open_at = open_at
        self._open: list[IO[bytes]] = []

    def digest(self) -> str:
        return self._digest

    @property
    def size(self) -> int | None:
        return self._size

    def body(self, offset: int, n: int, progress: _Progress) -> Callable[[], Any]:
        """A body factory for bytes ``offset .. offset+n``; every call starts them again."""

        def make() -> Any:
            self.close()
            progress.at(offset)
            if n == 0:
                return b""
            try:
                f = self._open_at(offset)
            except Exception as e:  # noqa: BLE001 - a local failure
                raise _SourceFailed(e) from e
            self._open.append(f)
            return _Reader(f, n, progress)

        return make

    def close(self) -> None:
        for f in self._open:
            f.close()
        self._open.clear()


class Produced:
    """The bytes of a blob produced while it is uploaded (``produce()`` must yield the same
    bytes every time: barge's encoder is deterministic), hashed as they are produced.

    The position is where the next byte handed out starts. :meth:`seek` moves it: forward by
    producing and hashing without handing out; backward within the last piece taken (kept
    in memory) at no cost; further back by producing again from the start."""

    def __init__(self, produce: Callable[[], Iterable[bytes]]) -> None:
        self._produce = produce
        self._it: Iterator[bytes] | None = None
        self._hash = hashlib.sha256()
        self._pos = 0
        self._pending = memoryview(b"")
        self._last: tuple[int, bytes] | None = None  # the last piece taken: (offset, bytes)
        self._done = False

    @property
    def position(self) -> int:
        return self._pos

    @property
    def size(self) -> int | None:
        return self._pos if self._done and not self._pending else None

    def digest(self) -> str:
        if self.size is None:
            raise AssertionError("the blob is not produced to its end yet")
        return "sha256:" + self._hash.hexdigest()

    def _restart(self) -> None:
        try:
            self._it = iter(self._produce())
        except Exception as e:  # noqa: BLE001 - a local failure
            raise _SourceFailed(e) from e
        self._hash = hashlib.sha256()
        self._pos = 0
        self._pending = memoryview(b"")
        self._last = None
        self._done = False

    def _fill(self) -> bool:
        """Produce the next piece into ``_pending``; False at the end."""
        assert self._it is not None
        while not self._pending:
            if self._done:
                return False
            try:
                piece = next(self._it)
            except StopIteration:
                self._done = True
                return False
            except Exception as e:  # noqa: BLE001 - a local failure (disk, encoder)
                raise _SourceFailed(e) from e
            if piece:
                self._hash.update(piece)
                self._pending = memoryview(piece)
        return True

    def seek(self, offset: int) -> None:
        if self._it is None:
            self._restart()
        if offset < self._pos:
            last = self._last
            if last is not None and last[0] <= offset:
                start, data = last
                # pending may already hold the tail of the last piece (an earlier step back)
                after = self._pending[max(0, start + len(data) - self._pos) :]
                self._pending = memoryview(bytes(data[offset - start :]) + bytes(after))
                self._pos = offset
            else:
                self._restart()
        if self._pos < offset:
            self._last = None  # what is skipped is not kept: the last piece is no longer last
        while self._pos < offset:  # produce and hash what the registry already holds
            if not self._fill():
                raise SessionLost()  # the registry holds more than the blob has
            k = min(offset - self._pos, len(self._pending))
            self._pending = self._pending[k:]
            self._pos += k

    def take(self, n: int) -> bytes:
        """Up to ``n`` bytes from the position (fewer only at the end)."""
        if self._it is None:
            self._restart()
        out = bytearray()
        start = self._pos
        while len(out) < n and self._fill():
            k = min(n - len(out), len(self._pending))
            out += self._pending[:k]
            self._pending = self._pending[k:]
        self._pos += len(out)
        data = bytes(out)
        self._last = (start, data)
        return data

    def pieces(self, progress: _Progress) -> Iterator[bytes]:
        """Everything from the position to the end, piece by piece as produced."""
        if self._it is None:
            self._restart()
        self._last = None
        while self._fill():
            view = self._pending
            whole = view.obj if isinstance(view.obj, bytes) and len(view.obj) == len(view) else None
            piece = whole if whole is not None else bytes(view)  # no copy of a whole piece
            self._pending = memoryview(b"")
            self._pos += len(piece)
            progress.sent(len(piece))
            yield piece

    def close(self) -> None:
        pass


Source = Stored | Produced


class Upload:
    """One blob's upload into ``repo`` (:meth:`run`). ``chunk``: PATCH body size (None: one
    streamed PATCH); ``monolithic``: one PUT with the body (a :class:`Stored` source only);
    ``key``: keep the session across runs under this key."""

    def __init__(
        self,
        client: RegistryClient,
        repo: str,
        source: Source,
        *,
        what: str,
        chunk: int | None,
        monolithic: bool,
        key: str | None,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.c = client
        self.repo = repo
        self.src = source
        self.what = what
        self.chunk = chunk
        self.monolithic = monolithic
        self.key = key if not monolithic else None
        self.claim: Claim | None = None
        self.budget = client._budget(what)
        self.progress = _Progress(progress, self.budget)
        self.location: str | None = None
        self.offset = 0
        self.piece = chunk
        self.resumed = False  # this session holds bytes an earlier attempt or run sent
        self.trust_resume = True  # False once a resumed session proved not to hold our bytes

    def run(self, before_commit: Callable[[str, int], None] | None = None) -> tuple[str, int]:
        """Upload; returns the blob's (digest, size). ``before_commit(digest, size)`` runs
        before the closing PUT (a :class:`Produced` blob's digest is known only then)."""
        if self.key is not None:
            self.claim = self.c.sessions.claim(self.c.registry, self.repo, self.key)
        try:
            return self._loop(before_commit)
        finally:
            self.src.close()
            if self.claim is not None:
                self.claim.release()

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self, before_commit: Callable[[str, int], None] | None) -> tuple[str, int]:
        if self.claim is not None and self.claim.location:
            self._resume_saved(self.claim.location)
        while True:
            closing = False
            try:
                if self.location is None:
                    self._start()
                if self.monolithic:
                    closing = True
                    self._put_whole()
                else:
                    self._send_rest()
                    digest, size = self._finished()
                    if before_commit is not None:
                        before_commit(digest, size)
                    closing = True
                    self._step(
                        "PUT",
                        self.c._with_digest(self._loc(), digest),
                        headers={"Content-Length": "0"},
                        body=lambda: b"",
                        what=f"finish upload of {digest} to {self.repo}",
                    )
                return self._done()
            except _SourceFailed as e:
                raise e.error from None
            except SessionLost as e:
                self._lost()
                self.budget.retry(self._gone(e.error))
            except (RegistryUnreachable, RegistryResponseError) as e:
                if closing and self._arrived():
                    return self._done()
                if isinstance(e, DigestInvalid) and self.resumed and self.trust_resume:
                    # the session held bytes that were not ours (the disk changed since a
                    # killed run, or a registry's Range lied): send everything afresh
                    log.debug("upload of %s: resumed session rejected; starting over", self.what)
                    self.trust_resume = False
                    self._lost()
                    continue
                if not _retryable(e):
                    raise
                self.budget.retry(e)
                if self.location is None or self.monolithic:
                    self._lost()
                    continue
                try:
                    self._status(self.location)
                except SessionLost:
                    self._lost()

    def _loc(self) -> str:
        assert self.location is not None
        return self.location

    def _finished(self) -> tuple[str, int]:
        size = self.src.size
        assert size is not None and self.offset == size
        return self.src.digest(), size

    def _done(self) -> tuple[str, int]:
        size = self.src.size
        assert size is not None
        self.progress.at(size)
        if self.claim is not None:
            self.claim.clear()
        return self.src.digest(), size

    def _gone(self, cause: RegistryError | None = None) -> RegistryError:
        """The error for a lost session, should losing them use up the budget: a registry
        failure (exit 7), not "not found"."""
        said = f" ({cause.message})" if cause is not None else ""
        return RegistryResponseError(
            f"{self.c.registry}: upload {self.what}: the registry lost the upload session{said}",
            status=404,
        )

    def _lost(self) -> None:
        """The session is gone: the next attempt opens a fresh one and starts at byte 0."""
        self.location = None
        self.offset = 0
        self.resumed = False
        self.progress.at(0)
        if self.claim is not None:
            self.claim.clear()

    def _arrived(self) -> bool:
        """Did the blob land although the closing PUT's answer was lost or an error?"""
        size = self.src.size
        if size is None:
            return False
        digest = self.src.digest()
        try:
            r = self.c._request(
                "HEAD",
                f"/v2/{self.repo}/blobs/{digest}",
                scopes=self.c._pull(self.repo),
                ok=(200,),
                missing_ok=True,
                kind="blob",
                what=f"blob {self.repo}@{digest}",
                budget=self.budget,
            )
        except RegistryError:
            return False
        return r.status == 200 and r.headers.get("Content-Length") == str(size)

    # -- session -----------------------------------------------------------------------------
    def _start(self) -> None:
        location, min_len = self.c._start_upload(self.repo, budget=self.budget)
        if self.chunk is not None:
            self.piece = max(self.chunk, min_len, 1)
        self._moved(location, 0)
        self.resumed = False

    def _moved(self, location: str, offset: int) -> None:
        self.location, self.offset = location, offset
        self.progress.at(offset)
        self.budget.advance(offset)
        if self.claim is not None:
            self.claim.save(location, offset)

    def _status(self, location: str) -> None:
        """Where the session stands (``GET`` → ``Range``); SessionLost if it is gone."""
        try:
            r = self.c._request(
                "GET",
                location,
                scopes=self.c._push(self.repo),
                ok=(204, 200),
                missing_ok=True,
                kind="upload",
                what=f"upload status in {self.repo}",
                max_body=MAX_ERROR_BODY,
                budget=self.budget,
            )
        except RegistryResponseError as e:
            raise SessionLost(e) from e
        if r.status == 404:
            raise SessionLost()
        loc = r.headers.get("Location")
        offset = parse_range(r.headers.get("Range"))
        size = self.src.size
        if size is not None and offset > size:  # holds more than the blob has: not ours
            raise SessionLost()
        if offset > 0:
            if not self.trust_resume:
                raise SessionLost()
            self.resumed = True
        self._moved(self.c._transport.resolve(loc) if loc else location, offset)

    def _resume_saved(self, location: str) -> None:
        try:
            self._status(location)
            log.debug("upload of %s: resuming a saved session at byte %d", self.what, self.offset)
        except SessionLost:
            self._lost()
        except RegistryError:
            self._lost()  # unreachable for now: the loop decides (a fresh session, retried)

    # -- sending -----------------------------------------------------------------------------
    def _step(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        body: Callable[[], Any],
        what: str,
        ok: tuple[int, ...] = (201, 204),
    ) -> Any:
        """One request of the session, not retried on its own (the loop decides)."""
        try:
            return self.c._request(
                method,
                url,
                scopes=self.c._push(self.repo),
                ok=ok,
                headers=headers,
                body=body,
                kind="upload",
                what=what,
                retry=False,
                max_body=MAX_ERROR_BODY,
                budget=self.budget,
            )
        except BlobUploadUnknown as e:
            raise SessionLost(e) from e

    def _put_whole(self) -> None:
        src = self.src
        assert isinstance(src, Stored) and src.size is not None
        self._step(
            "PUT",
            self.c._with_digest(self._loc(), src.digest()),
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(src.size),
            },
            body=src.body(0, src.size, self.progress),
            what=f"upload blob {src.digest()} to {self.repo}",
        )

    def _send_rest(self) -> None:
        """PATCH the bytes from the session's offset to the end."""
        src = self.src
        if self.piece is None:
            assert isinstance(src, Produced)
            while True:
                src.seek(self.offset)
                size = src.size
                if size is not None and self.offset >= size:
                    return
                self._patch(self._one_shot(src), {}, None)
        while True:
            if isinstance(src, Produced):
                src.seek(self.offset)
                data = src.take(self.piece)
                if not data:
                    return
                n = len(data)
                body = self._bytes_body(data, self.offset)
            else:
                size = src.size
                assert size is not None
                if self.offset >= size:
                    return
                n = min(self.piece, size - self.offset)
                body = src.body(self.offset, n, self.progress)
            headers = {
                "Content-Range": f"{self.offset}-{self.offset + n - 1}",
                "Content-Length": str(n),
            }
            self._patch(body, headers, self.offset + n)

    def _bytes_body(self, data: bytes, start: int) -> Callable[[], Any]:
        progress = self.progress

        def body() -> Any:
            progress.at(start)
            progress.sent(len(data))
            return data

        return body

    def _one_shot(self, src: Produced) -> Callable[[], Any]:
        used = [False]
        progress, start = self.progress, self.offset

        def body() -> Any:
            if used[0]:
                raise _NotReplayable(f"{self.what}: the streamed body must be sent again")
            used[0] = True
            progress.at(start)
            return src.pieces(progress)

        return body

    def _patch(self, body: Callable[[], Any], headers: dict[str, str], end: int | None) -> None:
        """One PATCH; ``end``: the offset after it (None: wherever the streamed source got)."""
        r = self._step(
            "PATCH",
            self._loc(),
            headers={"Content-Type": "application/octet-stream", **headers},
            body=body,
            what=f"upload {self.what}",
            ok=(202, 204),
        )
        if end is None:
            assert isinstance(self.src, Produced)
            end = self.src.position
        loc = r.headers.get("Location")
        location = self.c._transport.resolve(loc) if loc else self._loc()
        said = r.headers.get("Range")
        confirmed = parse_range(said) if said else end
        if confirmed != end and not (confirmed == 0 and end == 1):  # "0-0" is 0 or 1 byte
            # the registry holds something else than what was sent: ask where it stands
            self._status(location)
            return
        self._moved(location, end)


def parse_range(value: str | None) -> int:
    """The offset an upload session's ``Range: 0-N`` says comes next (N+1). Distribution
    answers ``0-0`` for both 0 and 1 byte: read as 0 (a 416 sends the upload back here)."""
    m = re.match(r"(?:bytes=)?(\d+)-(\d+)", value or "")
    if not m:
        return 0
    end = int(m.group(2))
    return 0 if end == 0 else end + 1


def _retryable(e: BaseException) -> bool:
    if isinstance(e, RegistryUnreachable):
        return getattr(e, "retryable", True) is not False
    return isinstance(e, RegistryResponseError) and e.status in RETRYABLE_STATUS
