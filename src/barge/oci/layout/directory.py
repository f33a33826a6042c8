"""An OCI image layout directory (``oci:PATH[:tag]``), read and written.

Blobs are written to a partial file in the same directory (``.partial-<hex>``, one per blob,
locked while written), verified (size and digest) while copied, fsynced and renamed; a write
killed part-way leaves the partial file for the next writer of that blob, which re-verifies it
and fetches only the rest. ``index.json`` is replaced atomically under a lock on the directory,
so :meth:`OCILayout.put_manifest` is safe across processes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from barge.errors import (
    ConflictError,
    IntegrityError,
    NotFoundError,
    UsageError,
)
from barge.oci.layout.common import (
    BLOBS_DIR,
    CHUNK_SIZE,
    DIGEST,
    HASHES,
    INDEX_FILE,
    MAX_INDEX_SIZE,
    OCI_INDEX_MEDIA_TYPE,
    OCI_LAYOUT_FILE,
    REF_NAME_ANNOTATION,
    LayoutReader,
    ReadableStream,
    blob_relpath,
    check_oci_layout,
    check_tag,
    empty_index,
    fsync_dir,
    index_bytes,
    layout_bytes,
    no_space,
    sha256_of,
    split_digest,
)


@contextlib.contextmanager
def _claimed(partial: Path) -> Iterator[int]:
    """The partial file of one blob, open and exclusively locked: a second writer of the blob
    waits here for the first, then sees the partial gone (renamed into place) and opens anew."""
    for _ in range(64):
        try:
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            no_space(e, partial.name)
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(partial, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                yield fd
                return
        finally:
            os.close(fd)
    raise IntegrityError(f"{partial} keeps being replaced by another writer")


def _rehash(fd: int, size: int, algo: str) -> tuple[int, Any]:
    """(bytes kept, their hash) of a partial blob file; one longer than the blob is emptied."""
    h = HASHES[algo]()
    have = os.fstat(fd).st_size
    if have > size:
        have = 0
    pos = 0
    while pos < have:
        piece = os.pread(fd, min(CHUNK_SIZE, have - pos), pos)
        if not piece:
            break
        h.update(piece)
        pos += len(piece)
    return pos, h


def _fill(
    fd: int,
    kept: tuple[int, Any],
    size: int,
    open_at: Callable[[int], ReadableStream],
    digest: str,
    *,
    owned: bool,
) -> str:
    """Write the blob from ``kept[0]`` on, reading ``open_at(kept[0])`` (closed when
    ``owned``); the digest of the whole. A source with more or fewer bytes than ``size`` is
    an IntegrityError."""
    pos, h = kept
    os.ftruncate(fd, pos)
    if pos == size:  # all kept: nothing to read (a source asked for no bytes may refuse)
        algo, _ = split_digest(digest)
        return f"{algo}:{h.hexdigest()}"
    stream = open_at(pos)
    try:
        while True:
            piece = stream.read(min(CHUNK_SIZE, size + 1 - pos))
            if not piece:
                break
            if pos + len(piece) > size:
                raise IntegrityError(f"blob {digest} has more than the {size} bytes declared")
            h.update(piece)
            view = memoryview(piece)
            while view:
                n = os.pwrite(fd, view, pos)
                view = view[n:]
                pos += n
    finally:
        close = getattr(stream, "close", None) if owned else None
        if close is not None:
            close()
    if pos != size:
        raise IntegrityError(f"blob {digest} has {pos} bytes, {size} were declared")
    algo, _ = split_digest(digest)
    return f"{algo}:{h.hexdigest()}"


class OCILayout(LayoutReader):
    """An OCI image layout directory.

    ``OCILayout(path)`` opens an existing layout (NotFoundError if there is none);
    ``OCILayout(path, create=True)`` also creates one (in a missing or empty directory) and
    opens an existing one as is.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = Path(path)
        layout_file = self.path / OCI_LAYOUT_FILE
        if create and not layout_file.exists():
            self._create()
        try:
            data = layout_file.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(
                f"{self.path} is not an OCI image layout (no {OCI_LAYOUT_FILE} file)"
            ) from None
        except OSError as e:
            raise NotFoundError(f"cannot read the OCI layout {self.path}: {e.strerror}") from None
        check_oci_layout(data, str(self.path))

    def _create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if any(p.name not in (INDEX_FILE, BLOBS_DIR) for p in self.path.iterdir()):
                raise ConflictError(
                    f"{self.path} exists and is not an OCI image layout",
                    hint="give a new or empty directory",
                )
            (self.path / BLOBS_DIR).mkdir(exist_ok=True)
            if not (self.path / INDEX_FILE).exists():
                self._write_atomic(INDEX_FILE, index_bytes(empty_index()))
            self._write_atomic(OCI_LAYOUT_FILE, layout_bytes())
        except OSError as e:
            no_space(e, str(self.path))
            raise UsageError(f"cannot create the OCI layout {self.path}: {e.strerror}") from None

    @property
    def location(self) -> str:
        return f"oci:{self.path}"

    # -- reading

    def _read_index(self) -> bytes:
        try:
            with open(self.path / INDEX_FILE, "rb") as f:
                data = f.read(MAX_INDEX_SIZE + 1)
        except FileNotFoundError:
            raise IntegrityError(f"{self.location}: index.json is missing") from None
        if len(data) > MAX_INDEX_SIZE:
            raise IntegrityError(
                f"{self.location}: index.json is larger than {MAX_INDEX_SIZE} bytes"
            )
        return data

    def _blob_size(self, digest: str) -> int | None:
        try:
            st = os.lstat(self.path / blob_relpath(digest))
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return st.st_size

    def _open_raw(self, digest: str) -> IO[bytes]:
        path = self.path / blob_relpath(digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest} is not in {self.location}") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise IntegrityError(f"blob {digest} in {self.location} is a symlink") from None
            raise
        return os.fdopen(fd, "rb", buffering=0)

    # -- writing

    def _write_atomic(self, relname: str, data: bytes) -> None:
        """Write a small file in the layout root: temp file, fsync, rename, fsync dir."""
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{relname}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path / relname)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(self.path)

    def write_blob(self, digest: str, size: int, stream: ReadableStream) -> None:
        """Copy ``size`` bytes from ``stream`` into the blob ``digest``.

        The bytes go to the blob's partial file next to the final one and are hashed and
        counted in 1 MiB pieces; on a size or digest mismatch :class:`IntegrityError` is
        raised and nothing is left behind. If the blob is already present (same size) the
        stream is not read. A partial file an interrupted write left is started over (see
        :meth:`write_blob_at` to resume it).
        """

        def from_start(offset: int) -> ReadableStream:
            return stream

        self._write_blob(digest, size, from_start, resume=False)

    def write_blob_at(
        self, digest: str, size: int, open_at: Callable[[int], ReadableStream]
    ) -> None:
        """:meth:`write_blob` from ``open_at(offset)`` (a stream of the blob from ``offset``,
        closed here), resuming: the bytes a killed or interrupted write of this blob kept in
        its partial file are hashed again and only the rest is read; if the whole does not
        verify, it is written once more from ``open_at(0)``."""
        self._write_blob(digest, size, open_at, resume=True)

    def _write_blob(
        self,
        digest: str,
        size: int,
        open_at: Callable[[int], ReadableStream],
        *,
        resume: bool,
    ) -> None:
        """One partial file per blob (``.partial-<hex>``, locked while written): a writer
        killed part-way leaves it for the next writer of the blob to take over, never a file
        nobody will reuse; a second writer of the same blob waits and finds it written."""
        algo, hexpart = split_digest(digest)
        if size < 0:
            raise IntegrityError(f"invalid size {size} for blob {digest}")
        if self._blob_size(digest) == size:
            return
        blob_dir = self.path / BLOBS_DIR / algo
        partial = blob_dir / f".partial-{hexpart}"
        try:
            blob_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            no_space(e, f"blob {digest}")
            raise
        with _claimed(partial) as fd:
            if self._blob_size(digest) == size:  # the writer we waited for finished it
                os.unlink(partial)
                return
            try:
                kept = _rehash(fd, size, algo) if resume else (0, HASHES[algo]())
                actual = _fill(fd, kept, size, open_at, digest, owned=resume)
                if actual != digest and kept[0]:  # the kept bytes were wrong: start over
                    actual = _fill(fd, (0, HASHES[algo]()), size, open_at, digest, owned=resume)
                if actual != digest:
                    raise IntegrityError(
                        f"digest mismatch for blob {digest}: got {actual}; nothing was written"
                    )
                os.fsync(fd)
                os.fchmod(fd, 0o644)
                os.replace(partial, blob_dir / hexpart)
            except BaseException as e:
                # wrong bytes and a full disk leave nothing; anything else (an interrupt, a
                # network error) keeps what was written for the next writer to verify
                full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
                if isinstance(e, IntegrityError) or full:
                    with contextlib.suppress(OSError):
                        os.unlink(partial)
                if isinstance(e, OSError):
                    no_space(e, f"blob {digest}")
                raise
        fsync_dir(blob_dir)

    def write_blob_bytes(self, data: bytes) -> str:
        """Store ``data`` as a sha256 blob; return its digest."""
        digest = sha256_of(data)
        self.write_blob(digest, len(data), io.BytesIO(data))
        return digest

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def put_manifest(
        self,
        data: bytes,
        media_type: str,
        tag: str | None,
        platform: dict[str, Any] | None = None,
    ) -> str:
        """Store a manifest and reference it from index.json (atomically), tagged ``tag``.

        An existing descriptor with the same tag is replaced; without a tag, an untagged
        descriptor of the same digest is not added twice. Returns the manifest's digest.
        """
        if tag is not None:
            check_tag(tag)
        if not media_type:
            raise UsageError("a manifest needs a media type")
        digest = self.write_blob_bytes(data)
        desc: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(data)}
        if platform:
            desc["platform"] = dict(platform)
        if tag is not None:
            desc["annotations"] = {REF_NAME_ANNOTATION: tag}
        with self._locked():
            index = self._index()
            kept = []
            for d in index["manifests"]:
                name = d.get("annotations", {}).get(REF_NAME_ANNOTATION)
                if tag is not None and name == tag:
                    continue
                if tag is None and name is None and d["digest"] == digest:
                    continue
                kept.append(d)
            kept.append(desc)
            index["manifests"] = kept
            index.setdefault("schemaVersion", 2)
            index.setdefault("mediaType", OCI_INDEX_MEDIA_TYPE)
            try:
                self._write_atomic(INDEX_FILE, index_bytes(index))
            except OSError as e:
                no_space(e, "index.json")
                raise
        return digest

    def blobs(self) -> list[str]:
        """Digests of all well-formed blob files in the layout (temporary files excluded)."""
        out: list[str] = []
        root = self.path / BLOBS_DIR
        for algo in sorted(HASHES):
            d = root / algo
            if not d.is_dir():
                continue
            for p in sorted(d.iterdir()):
                digest = f"{algo}:{p.name}"
                if DIGEST.fullmatch(digest) and p.is_file() and not p.is_symlink():
                    out.append(digest)
        return out
