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

import logging
import re
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO
from urllib.parse import quote, urlsplit

from barge.errors import RegistryError
from barge.oci.api import MAX_ERROR_BODY, RegistryAPI, short_digest, transfer_label
from barge.oci.errors import (
    BlobUploadUnknown,
    DigestInvalid,
    RegistryResponseError,
    RegistryUnreachable,
)
from barge.oci.sessions import Claim
from barge.oci.upload_sources import (
    Produced,
    Progress,
    SessionLost,
    Source,
    SourceFailed,
    Stored,
)
from barge.reference import Reference

__all__ = ["Upload", "Uploads", "parse_range"]

log = logging.getLogger("barge.oci")

RETRYABLE_STATUS = frozenset({408, 416, 429, 500, 502, 503, 504})


class _NotReplayable(RegistryUnreachable):
    """A streamed body cannot be sent again as is (an auth retry or a redirect asked for it):
    the upload continues from the offset the session reports."""


class Upload:
    """One blob's upload into ``ref``'s repository (:meth:`run`). ``chunk``: PATCH body size (None: one
    streamed PATCH); ``monolithic``: one PUT with the body (a :class:`Stored` source only);
    ``key``: keep the session across runs under this key."""

    def __init__(
        self,
        client: RegistryAPI,
        ref: Reference,
        source: Source,
        *,
        what: str,
        chunk: int | None,
        monolithic: bool,
        key: str | None,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.c = client
        self.ref = ref
        self.repo = client._check(ref)
        self.pull = (ref.scope("pull"),)
        self.push = (ref.scope("pull", "push"),)
        self.src = source
        self.what = what
        self.chunk = chunk
        self.monolithic = monolithic
        self.key = key if not monolithic else None
        self.claim: Claim | None = None
        self.budget = client._budget(what)
        self.progress = Progress(progress, self.budget)
        self.location: str | None = None
        self.offset = 0
        self.piece = chunk
        self.resumed = False  # this session holds bytes an earlier attempt or run sent
        self.trust_resume = True  # False once a resumed session proved not to hold our bytes

    def run(self, before_commit: Callable[[str, int], None] | None = None) -> tuple[str, int]:
        """Upload; returns the blob's (digest, size). ``before_commit(digest, size)`` runs
        before the closing PUT (a :class:`Produced` blob's digest is known only then)."""
        if self.key is not None:
            self.claim = self.c.sessions.claim(self.ref, self.key)
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
                        _with_digest(self._loc(), digest),
                        headers={"Content-Length": "0"},
                        body=lambda: b"",
                        what=f"finish upload of {digest} to {self.repo}",
                    )
                return self._done()
            except SourceFailed as e:
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
                scopes=self.pull,
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
        location, min_len = self._open_session()
        if self.chunk is not None:
            self.piece = max(self.chunk, min_len, 1)
        self._moved(location, 0)
        self.resumed = False

    def _open_session(self) -> tuple[str, int]:
        """``POST`` a session: (its URL, the registry's OCI-Chunk-Min-Length or 0)."""
        r = self.c._request(
            "POST",
            f"/v2/{self.repo}/blobs/uploads/",
            scopes=self.push,
            ok=(202,),
            headers={"Content-Length": "0"},
            kind="upload",
            what=f"start upload to {self.repo}",
            max_body=MAX_ERROR_BODY,
            budget=self.budget,
        )
        loc = r.headers.get("Location")
        if not loc:
            raise RegistryResponseError(f"{self.c.registry}: upload to {self.repo}: no Location")
        min_len = r.headers.get("OCI-Chunk-Min-Length", "")
        return self.c._transport.resolve(loc), int(min_len) if min_len.isdigit() else 0

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
                scopes=self.push,
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
                scopes=self.push,
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
            _with_digest(self._loc(), src.digest()),
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


def _with_digest(location: str, digest: str) -> str:
    sep = "&" if urlsplit(location).query else "?"
    return f"{location}{sep}digest={quote(digest, safe='')}"


class Uploads(RegistryAPI):
    """The upload endpoints of :class:`~barge.oci.client.RegistryClient`."""

    def upload_blob(
        self,
        ref: Reference,
        digest: str,
        size: int,
        open_at: Callable[[int], BinaryIO],
        *,
        chunk_size: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Upload a blob into ``ref``'s repository: one ``PUT`` with the body when
        ``chunk_size`` is None, else ``PATCH`` requests of ``chunk_size`` bytes (a session kept
        across runs, so a killed upload continues where the registry says it stands).
        ``open_at(offset)`` gives the bytes from ``offset`` (called again for every attempt).
        ``progress(delta)`` gets bytes sent (negative when a restart undoes some); the deltas
        of a success sum to ``size``."""
        label = transfer_label.get()
        what = short_digest(digest) + (f" ({label})" if label else "")
        Upload(
            self,
            ref,
            Stored(digest, size, open_at),
            what=what,
            chunk=chunk_size,
            monolithic=chunk_size is None,
            key=f"blob:{digest}:{size}",
            progress=progress,
        ).run()

    def upload_stream(
        self,
        ref: Reference,
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
            ref,
            Produced(produce),
            what="a blob" + (f" ({label})" if label else ""),
            chunk=chunk_size,
            monolithic=False,
            key=f"stream:{resume_key}" if resume_key else None,
            progress=progress,
        ).run(before_commit)
