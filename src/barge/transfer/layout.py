"""The OCI layout ends: a layout directory (read and write), an archive being read, an archive
being written (``oci:PATH``, ``oci-archive:FILE``), over :mod:`barge.oci.layout`."""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from pathlib import Path
from typing import IO, BinaryIO, cast

from barge.errors import IntegrityError, NotFoundError, UnsupportedError
from barge.oci.errors import DigestMismatch
from barge.oci.layout import (
    MAX_MANIFEST_SIZE,
    OCIArchiveReader,
    OCIArchiveWriter,
    OCILayout,
)
from barge.oci.types import Descriptor, Manifest, is_digest, media_type_of, sha256_digest
from barge.reference import Reference
from barge.transfer.base import Counting, EndBase, skip
from barge.transfer.end import End, OpenAt, Progress, Reuse

__all__ = ["ArchiveReadEnd", "ArchiveWriteEnd", "LayoutEnd"]


class _Reading(EndBase):
    """What a layout directory and an archive being read share."""

    layout: OCILayout | OCIArchiveReader

    def get_manifest(self, reference: str) -> Manifest:
        """A tag (``""``: the layout's only image), or a digest (a child of an index: a blob,
        not an index.json entry)."""
        if is_digest(reference):
            data = self.read_blob(reference, MAX_MANIFEST_SIZE)
            return Manifest(data=data, media_type=media_type_of(data, None), digest=reference)
        data, media_type, digest = self.layout.get_manifest(reference or None)
        return Manifest(data=data, media_type=media_type_of(data, media_type), digest=digest)

    def list_tags(self) -> list[str]:
        return self.layout.tags()

    def images(self) -> int:
        """How many images index.json names."""
        return len(self.layout.manifests())

    def open_blob(self, digest: str, offset: int = 0) -> BinaryIO:
        f = self.layout.open_blob(digest)
        if offset:
            if f.seekable():
                f.seek(offset)
            else:
                skip(f, offset)
        return f

    def read_blob(self, digest: str, max_size: int) -> bytes:
        size = self.layout.has_blob(digest)
        if size is None:
            raise NotFoundError(f"blob {digest} is not in {self.label}")
        if size > max_size:
            raise IntegrityError(f"blob {digest} is {size} bytes, over the {max_size} limit")
        with self.layout.open_blob(digest) as f:
            data = f.read(max_size + 1)
        if sha256_digest(data) != digest:
            raise DigestMismatch(f"blob in {self.label}", digest, sha256_digest(data))
        return data


class LayoutEnd(_Reading):
    """An OCI image layout directory, read and written in place."""

    layout: OCILayout

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = path
        self.label = f"oci:{path}"
        self.ref = Reference.layout("oci", path)
        self.layout = OCILayout(path, create=create)

    def try_reusing_blob(self, blob: Descriptor, source: End | None) -> Reuse | None:
        return Reuse.PRESENT if self.layout.has_blob(blob.digest) is not None else None

    def put_blob(self, blob: Descriptor, open_at: OpenAt, progress: Progress | None) -> None:
        def counted(offset: int) -> BinaryIO:
            src = open_at(offset)
            return cast(BinaryIO, Counting(src, progress)) if progress else src

        self.layout.write_blob_at(blob.digest, blob.size, counted)  # resumes a killed write

    def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        return self.layout.put_manifest(data, media_type, tag)

    def put_child_manifest(self, data: bytes, media_type: str) -> str:
        return self.layout.write_blob_bytes(data)


class ArchiveReadEnd(_Reading):
    """``oci-archive:FILE`` as a source. Every blob stream has its own file handle (or its
    own decompressor), so blobs are read in parallel."""

    layout: OCIArchiveReader

    def __init__(self, path: Path) -> None:
        self.path = path
        self.label = f"oci-archive:{path}"
        self.ref = Reference.layout("oci-archive", path)
        self.layout = OCIArchiveReader(path)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.layout.close()


class ArchiveWriteEnd(EndBase):
    """``oci-archive:FILE`` as a destination: a tar stream written to a hidden ``.partial``
    file and renamed into place by :meth:`commit` (:meth:`close` before that removes it).
    Blobs are added one at a time (a lock serialises concurrent writers), each streamed, so the
    archive needs no space beyond itself."""

    serial = True

    def __init__(self, path: Path) -> None:
        self.path = path
        self.label = f"oci-archive:{path}"
        self.ref = Reference.layout("oci-archive", path)
        self.tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
        self._file: IO[bytes] = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/close
        self.writer = OCIArchiveWriter(self._file)
        self._lock = threading.Lock()
        self._done = False

    def get_manifest(self, reference: str) -> Manifest:
        raise UnsupportedError(f"{self.label} is being written; it cannot be read")

    def open_blob(self, digest: str, offset: int = 0) -> BinaryIO:
        raise UnsupportedError(f"{self.label} is being written; it cannot be read")

    def try_reusing_blob(self, blob: Descriptor, source: End | None) -> Reuse | None:
        with self._lock:
            return Reuse.PRESENT if self.writer.has_blob(blob.digest) is not None else None

    def put_blob(self, blob: Descriptor, open_at: OpenAt, progress: Progress | None) -> None:
        with self._lock:
            if self.writer.has_blob(blob.digest) is not None:
                return
            src = open_at(0)
            try:
                self.writer.add_blob(
                    blob.digest, blob.size, cast(BinaryIO, Counting(src, progress))
                )
            finally:
                src.close()

    def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        with self._lock:
            return self.writer.add_manifest(data, media_type, tag)

    def put_child_manifest(self, data: bytes, media_type: str) -> str:
        with self._lock:
            return self.writer.add_blob_bytes(data)

    def commit(self) -> None:
        if self._done:
            return
        self.writer.finish()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        self._done = True

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()
