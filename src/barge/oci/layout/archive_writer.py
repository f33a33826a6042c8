"""Writing an OCI archive (``oci-archive:FILE``): a tar stream of a layout, written in one
pass (blobs as they come, ``index.json`` last), so it can go to a pipe. Member names and
metadata are fixed (mtime 0, uid 0, modes 0644/0755), so the same content makes the same
bytes.
"""

from __future__ import annotations

import io
import os
import tarfile
from types import TracebackType
from typing import IO, Any, cast

from barge.errors import (
    IntegrityError,
)
from barge.oci.layout.common import (
    BLOBS_DIR,
    CHUNK_SIZE,
    HASHES,
    INDEX_FILE,
    OCI_LAYOUT_FILE,
    REF_NAME_ANNOTATION,
    ReadableStream,
    blob_relpath,
    check_tag,
    empty_index,
    index_bytes,
    layout_bytes,
    no_space,
    parse_index,
    sha256_of,
    split_digest,
)
from barge.oci.layout.directory import OCILayout


def _tarinfo(name: str, size: int, *, directory: bool = False) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = 0 if directory else size
    ti.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    ti.mode = 0o755 if directory else 0o644
    ti.mtime = 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


class _CountingHasher:
    """A read-only stream wrapper that hashes and counts what tarfile reads from it.

    ``read(n)`` returns exactly ``n`` bytes unless at EOF: tarfile treats a short read as
    the end of the data, while pipes and network streams may legitimately return less."""

    def __init__(self, raw: ReadableStream, algo: str) -> None:
        self._raw = raw
        self.hash = HASHES[algo]()
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        if n > 0 and data and len(data) < n:
            parts = [data]
            got = len(data)
            while got < n:
                more = self._raw.read(n - got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self.hash.update(data)
        self.count += len(data)
        return data


class OCIArchiveWriter:
    """Write an OCI layout as a tar stream onto ``fileobj`` (which may be a pipe).

    Blobs are streamed into tar members in pieces (never buffered whole). A size or digest
    mismatch raises :class:`IntegrityError`; the bytes are already in the stream by then, so
    the caller must discard the archive. Call :meth:`finish` last; it does not close
    ``fileobj``.
    """

    def __init__(self, fileobj: IO[bytes]) -> None:
        self._tar = tarfile.open(None, "w|", fileobj, format=tarfile.PAX_FORMAT)  # noqa: SIM115
        # stream blobs in 1 MiB pieces (typeshed does not know the attribute)
        self._tar.copybufsize = CHUNK_SIZE  # type: ignore[attr-defined]
        self._dirs: set[str] = set()
        self._blobs: dict[str, int] = {}
        self._manifests: list[dict[str, Any]] = []
        self._finished = False

    def _add_dir(self, name: str) -> None:
        if name not in self._dirs:
            self._tar.addfile(_tarinfo(name + "/", 0, directory=True))
            self._dirs.add(name)

    def has_blob(self, digest: str) -> int | None:
        return self._blobs.get(digest)

    def add_blob(self, digest: str, size: int, stream: ReadableStream) -> None:
        """Stream ``size`` bytes of blob ``digest`` from ``stream`` into the archive,
        verifying size and digest. A blob already added is skipped (the stream is not read)."""
        algo, _ = split_digest(digest)
        if size < 0:
            raise IntegrityError(f"invalid size {size} for blob {digest}")
        if digest in self._blobs:
            return
        self._add_dir(BLOBS_DIR)
        self._add_dir(f"{BLOBS_DIR}/{algo}")
        src = _CountingHasher(stream, algo)
        try:
            self._tar.addfile(_tarinfo(blob_relpath(digest), size), cast(IO[bytes], src))
        except OSError as e:
            if src.count < size:
                raise IntegrityError(
                    f"blob {digest} has {src.count} bytes, {size} were declared"
                ) from None
            no_space(e, "the archive")
            raise
        if stream.read(1):
            raise IntegrityError(f"blob {digest} has more than the {size} bytes declared")
        actual = f"{algo}:{src.hash.hexdigest()}"
        if actual != digest:
            raise IntegrityError(f"digest mismatch for blob {digest}: got {actual}")
        self._blobs[digest] = size

    def add_blob_bytes(self, data: bytes) -> str:
        digest = sha256_of(data)
        self.add_blob(digest, len(data), io.BytesIO(data))
        return digest

    def add_manifest(
        self,
        data: bytes,
        media_type: str,
        tag: str | None,
        platform: dict[str, Any] | None = None,
    ) -> str:
        """Add a manifest blob and remember its descriptor for the index :meth:`finish`
        writes when not given one. Returns the digest."""
        if tag is not None:
            check_tag(tag)
        digest = self.add_blob_bytes(data)
        desc: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(data)}
        if platform:
            desc["platform"] = dict(platform)
        if tag is not None:
            self._manifests = [
                d
                for d in self._manifests
                if d.get("annotations", {}).get(REF_NAME_ANNOTATION) != tag
            ]
            desc["annotations"] = {REF_NAME_ANNOTATION: tag}
        self._manifests.append(desc)
        return digest

    def finish(self, index_json: bytes | None = None) -> None:
        """Write ``oci-layout`` and ``index.json`` (``index_json``, or an index of the
        manifests added with :meth:`add_manifest`) and end the tar stream."""
        if self._finished:
            return
        if index_json is None:
            index_json = index_bytes({**empty_index(), "manifests": self._manifests})
        index = parse_index(index_json, "archive index")
        for d in index["manifests"]:
            if d["digest"] not in self._blobs:
                raise IntegrityError(
                    f"index.json names manifest {d['digest']}, which was not added"
                )
        layout = layout_bytes()
        self._tar.addfile(_tarinfo(OCI_LAYOUT_FILE, len(layout)), io.BytesIO(layout))
        self._tar.addfile(_tarinfo(INDEX_FILE, len(index_json)), io.BytesIO(index_json))
        self._tar.close()
        self._finished = True

    def __enter__(self) -> OCIArchiveWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.finish()


def write_archive(source: OCILayout | str | os.PathLike[str], fileobj: IO[bytes]) -> None:
    """Write the layout directory ``source`` as a tar archive onto ``fileobj``: every blob
    (verified while streamed), then ``oci-layout`` and its ``index.json``."""
    layout = source if isinstance(source, OCILayout) else OCILayout(source)
    index_json = layout._read_index()
    parse_index(index_json, layout.location)
    writer = OCIArchiveWriter(fileobj)
    for digest in layout.blobs():
        size = layout.has_blob(digest)
        if size is None:  # pragma: no cover - raced with a delete
            continue
        with layout._open_raw(digest) as f:
            writer.add_blob(digest, size, f)
    writer.finish(index_json)
