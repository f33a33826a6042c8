"""Blobs in a registry: exists (HEAD), download (GET, streamed and resumed), mount.

:class:`BlobReader` is the hot path of every pull: ``readinto`` fills the caller's buffer
straight from the socket (http.client's ``readinto``), the sha256 of a whole blob is
updated as it streams and checked at EOF, and a body that breaks off or stalls is asked
for again with ``Range`` from the current position, within one
:class:`~barge.oci.retry.Budget` for the whole blob (every byte read is progress).
Uploads are :mod:`barge.oci.uploads`.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import logging
import re
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import urllib3

from barge.errors import LimitError, RegistryError
from barge.oci.api import MAX_ERROR_BODY, RegistryAPI, short_digest, transfer_label
from barge.oci.errors import DigestMismatch, RegistryResponseError
from barge.oci.failures import CONNECTION_ERRORS
from barge.oci.transport import release
from barge.reference import Reference

__all__ = ["BlobReader", "Blobs"]

log = logging.getLogger("barge.oci")


class BlobReader(io.RawIOBase):
    """A streaming blob download; ``readinto`` reads straight from the socket.

    Interrupted or stalled transfers resume with ``Range`` from the current position, within
    one :class:`~barge.oci.retry.Budget` for the whole blob (every byte read is progress).
    When reading a whole blob (offset 0, no length), the sha256 is checked at EOF and a
    mismatch raises :class:`DigestMismatch`.
    """

    def __init__(
        self,
        client: RegistryAPI,
        ref: Reference,
        digest: str,
        offset: int = 0,
        length: int | None = None,
    ) -> None:
        super().__init__()
        if offset < 0 or (length is not None and length < 0):
            raise ValueError("offset and length must be >= 0")
        repo = client._check(ref)
        self._client = client
        self._repo = repo
        self._scopes = (ref.scope("pull"),)
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
            scopes=self._scopes,
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


class Blobs(RegistryAPI):
    """The blob endpoints of :class:`~barge.oci.client.RegistryClient`. ``ref`` names the
    repository (its tag or digest, if any, is not used)."""

    def blob_exists(self, ref: Reference, digest: str) -> int | None:
        """The blob's size when the repository has it, else None."""
        repo = self._check(ref)
        r = self._request(
            "HEAD",
            f"/v2/{repo}/blobs/{digest}",
            scopes=(ref.scope("pull"),),
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
        self, ref: Reference, digest: str, *, offset: int = 0, length: int | None = None
    ) -> BlobReader:
        """A stream of the blob's bytes from ``offset`` (``length`` of them, or to the end);
        a whole blob is verified at EOF."""
        return BlobReader(self, ref, digest, offset, length)

    def read_blob(self, ref: Reference, digest: str, *, max_size: int) -> bytes:
        """A small blob (a config), verified; :class:`LimitError` beyond ``max_size``."""
        repo = ref.repository
        with self.open_blob(ref, digest) as r:
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

    def mount_blob(self, ref: Reference, digest: str, source: Reference) -> bool:
        """Mount the blob from the repository ``source`` (same registry) into ``ref``'s;
        False when the registry declines (202: it opened an upload instead, cancelled)."""
        repo = self._check(ref)
        from_repo = self._check(source)
        q = urlencode({"mount": digest, "from": from_repo})
        push = (ref.scope("pull", "push"),)
        r = self._request(
            "POST",
            f"/v2/{repo}/blobs/uploads/?{q}",
            scopes=push + (source.scope("pull"),),
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
                    scopes=push,
                    ok=(200, 202, 204),
                    missing_ok=True,
                    retry=False,
                    what="cancel upload",
                    max_body=MAX_ERROR_BODY,
                )
        return False
