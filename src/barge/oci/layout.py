"""OCI image layouts: a directory (``oci:PATH[:tag]``) and a tar archive (``oci-archive:FILE``).

Implements https://github.com/opencontainers/image-spec/blob/main/image-layout.md so that
skopeo, podman and friends read what barge writes and barge reads what they write:

* ``oci-layout``: ``{"imageLayoutVersion":"1.0.0"}``;
* ``index.json``: an OCI image index whose descriptors name the manifests; a descriptor's
  ``org.opencontainers.image.ref.name`` annotation is its tag;
* ``blobs/<alg>/<hex>``: content-addressed blobs.

Safety: a path is only ever made from a digest that matched ``sha256:<64 hex>`` or
``sha512:<128 hex>``; names from index.json or a tar archive never become paths. Blobs are
written to a partial file in the same directory (``.partial-<hex>``, one per blob, locked while
written), verified (size and digest) while copied, fsynced and renamed, so a reader never sees
a partial or wrong blob; a write killed part-way leaves the partial file for the next writer of
that blob, which re-verifies it and fetches only the rest. Every blob read through
:meth:`open_blob` is verified against its digest at EOF.

The readers (:class:`OCILayout`, :class:`OCIArchiveReader`) share one API: ``has_blob``,
``open_blob``, ``get_manifest``, ``tags``, ``manifests``. Neither is safe for concurrent use
from several threads; :meth:`OCILayout.put_manifest` is safe across processes (it locks the
layout directory while it updates index.json).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import stat
import tarfile
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO, Any, BinaryIO, Literal, Protocol, cast

from barge.errors import (
    ConflictError,
    IntegrityError,
    NoSpaceError,
    NotFoundError,
    UnsupportedError,
    UsageError,
)
from barge.reference import ReferenceError, validate_tag
from barge.untrusted import load_json

__all__ = [
    "IMAGE_LAYOUT_VERSION",
    "REF_NAME_ANNOTATION",
    "LayoutKind",
    "OCIArchiveReader",
    "OCIArchiveWriter",
    "OCILayout",
    "parse_layout_location",
    "write_archive",
]

IMAGE_LAYOUT_VERSION = "1.0.0"
OCI_LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
BLOBS_DIR = "blobs"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
OCI_INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"

CHUNK_SIZE = 1 << 20
MAX_INDEX_SIZE = 16 << 20
"""index.json larger than this is refused (a hostile layout could claim gigabytes)."""
MAX_MANIFEST_SIZE = 4 << 20
"""Registries cap manifests at 4 MiB; so does barge when reading a layout."""

_DIGEST = re.compile(r"(sha256):([a-f0-9]{64})|(sha512):([a-f0-9]{128})")
_HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}

LayoutKind = Literal["oci", "oci-archive"]


class ReadableStream(Protocol):
    """Anything with ``read(n) -> bytes`` (a file, a BinaryIO, an HTTP body reader)."""

    def read(self, size: int = -1, /) -> bytes: ...


# ---------------------------------------------------------------------------------------------
# helpers


def _split_digest(digest: object) -> tuple[str, str]:
    """Return (algorithm, hex) of a well-formed digest; raise IntegrityError otherwise.

    This is the only way a digest becomes a path component.
    """
    if not isinstance(digest, str):
        raise IntegrityError(f"invalid digest {digest!r}: not a string")
    m = _DIGEST.fullmatch(digest)
    if m is None:
        shown = json.dumps(digest[:200])
        raise IntegrityError(
            f"invalid digest {shown}: expected sha256:<64 lowercase hex> or "
            "sha512:<128 lowercase hex>"
        )
    if m.group(1):
        return m.group(1), m.group(2)
    return m.group(3), m.group(4)


def _blob_relpath(digest: str) -> str:
    algo, hexpart = _split_digest(digest)
    return f"{BLOBS_DIR}/{algo}/{hexpart}"


def _hasher(digest: str) -> Any:
    algo, _ = _split_digest(digest)
    return _HASHES[algo]()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _no_space(e: OSError, what: str) -> None:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise NoSpaceError(f"no space left while writing {what}") from e


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _claimed(partial: Path) -> Iterator[int]:
    """The partial file of one blob, open and exclusively locked: a second writer of the blob
    waits here for the first, then sees the partial gone (renamed into place) and opens anew."""
    for _ in range(64):
        try:
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            _no_space(e, partial.name)
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
    h = _HASHES[algo]()
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
        algo, _ = _split_digest(digest)
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
    algo, _ = _split_digest(digest)
    return f"{algo}:{h.hexdigest()}"


def _check_tag(tag: str) -> str:
    try:
        return validate_tag(tag)
    except ReferenceError as e:
        raise UsageError(e.message) from None


class _VerifyingReader(io.RawIOBase):
    """Pass bytes through, hashing them; at EOF check the digest (and size, if known)."""

    def __init__(self, raw: IO[bytes], digest: str, size: int | None, what: str) -> None:
        super().__init__()
        self._raw = raw
        self._digest = digest
        self._size = size
        self._what = what
        self._hash = _hasher(digest)
        self._count = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._done:
            return 0
        data = self._raw.read(len(view))
        if not data:
            self._finish()
            return 0
        n = len(data)
        self._count += n
        if self._size is not None and self._count > self._size:
            raise IntegrityError(
                f"{self._what} is larger than the {self._size} bytes its descriptor declares"
            )
        self._hash.update(data)
        view[:n] = data
        return n

    def _finish(self) -> None:
        self._done = True
        if self._size is not None and self._count != self._size:
            raise IntegrityError(
                f"{self._what} has {self._count} bytes, its descriptor declares {self._size}"
            )
        actual = f"{self._digest.split(':', 1)[0]}:{self._hash.hexdigest()}"
        if actual != self._digest:
            raise IntegrityError(
                f"digest mismatch for {self._what}: expected {self._digest}, got {actual}"
            )

    def close(self) -> None:
        if not self.closed:
            try:
                self._raw.close()
            finally:
                super().close()


def _verifying(raw: IO[bytes], digest: str, size: int | None, what: str) -> BinaryIO:
    return io.BufferedReader(_VerifyingReader(raw, digest, size, what), CHUNK_SIZE)


def _parse_index(data: bytes, where: str) -> dict[str, Any]:
    """Parse and validate index.json; every descriptor gets a checked digest and size."""
    index = load_json(data, f"{where}: index.json", max_size=MAX_INDEX_SIZE)
    if not isinstance(index, dict):
        raise IntegrityError(f"{where}: index.json is not a JSON object")
    if index.get("schemaVersion", 2) != 2:
        raise UnsupportedError(
            f"{where}: index.json has schemaVersion {index.get('schemaVersion')!r}, not 2"
        )
    manifests = index.get("manifests", [])
    if not isinstance(manifests, list):
        raise IntegrityError(f"{where}: index.json 'manifests' is not a list")
    for i, d in enumerate(manifests):
        if not isinstance(d, dict):
            raise IntegrityError(f"{where}: index.json manifests[{i}] is not an object")
        if not isinstance(d.get("mediaType"), str):
            raise IntegrityError(f"{where}: index.json manifests[{i}] has no mediaType")
        try:
            _split_digest(d.get("digest"))
        except IntegrityError as e:
            raise IntegrityError(f"{where}: index.json manifests[{i}]: {e.message}") from None
        size = d.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise IntegrityError(f"{where}: index.json manifests[{i}] has an invalid size")
        ann = d.get("annotations", {})
        if not isinstance(ann, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in ann.items()
        ):
            raise IntegrityError(f"{where}: index.json manifests[{i}] has invalid annotations")
    index["manifests"] = manifests
    return index


def _check_oci_layout(data: bytes, where: str) -> None:
    doc = load_json(data, f"{where}: oci-layout")
    version = doc.get("imageLayoutVersion") if isinstance(doc, dict) else None
    if version != IMAGE_LAYOUT_VERSION:
        raise UnsupportedError(
            f"{where}: unsupported OCI layout version {version!r} "
            f"(barge reads {IMAGE_LAYOUT_VERSION})"
        )


def _empty_index() -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": OCI_INDEX_MEDIA_TYPE, "manifests": []}


def _index_bytes(index: dict[str, Any]) -> bytes:
    return json.dumps(index, separators=(",", ":")).encode()


def _layout_bytes() -> bytes:
    return json.dumps({"imageLayoutVersion": IMAGE_LAYOUT_VERSION}).encode()


# ---------------------------------------------------------------------------------------------
# shared read API


class _LayoutReader(ABC):
    """The read API that directory layouts and archives share."""

    @property
    @abstractmethod
    def location(self) -> str: ...

    @abstractmethod
    def _read_index(self) -> bytes: ...

    @abstractmethod
    def _blob_size(self, digest: str) -> int | None: ...

    @abstractmethod
    def _open_raw(self, digest: str) -> IO[bytes]: ...

    def has_blob(self, digest: str) -> int | None:
        """The blob's size if the layout holds it, else None."""
        return self._blob_size(digest)

    def open_blob(self, digest: str, *, size: int | None = None) -> BinaryIO:
        """A stream of the blob; reading it to EOF verifies its digest (and ``size`` if given)
        and raises :class:`IntegrityError` on a mismatch. Raises NotFoundError if absent."""
        _split_digest(digest)
        raw = self._open_raw(digest)
        return _verifying(raw, digest, size, f"blob {digest} in {self.location}")

    def _index(self) -> dict[str, Any]:
        return _parse_index(self._read_index(), self.location)

    def manifests(self) -> list[dict[str, Any]]:
        """The descriptors in index.json (validated copies)."""
        return [dict(d) for d in self._index()["manifests"]]

    def tags(self) -> list[str]:
        """The ref names (tags) in index.json, in index order, without duplicates."""
        out: list[str] = []
        for d in self._index()["manifests"]:
            name = d.get("annotations", {}).get(REF_NAME_ANNOTATION)
            if name is not None and name not in out:
                out.append(name)
        return out

    def _find_manifest(self, tag: str | None) -> dict[str, Any]:
        manifests = self._index()["manifests"]
        if tag is None:
            if len(manifests) == 1:
                only: dict[str, Any] = manifests[0]
                return only
            if not manifests:
                raise NotFoundError(f"the OCI layout {self.location} holds no image")
            raise UsageError(
                f"the OCI layout {self.location} holds {len(manifests)} images; name one "
                f"with ':tag' (tags: {', '.join(self.tags()) or 'none'})"
            )
        found: list[dict[str, Any]] = [
            d for d in manifests if d.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag
        ]
        if not found:
            raise NotFoundError(
                f"no image tagged {json.dumps(tag)} in the OCI layout {self.location}"
            )
        if len(found) > 1 and len({d["digest"] for d in found}) > 1:
            raise IntegrityError(
                f"the OCI layout {self.location} names more than one image {json.dumps(tag)}"
            )
        return found[0]

    def get_manifest(self, tag: str | None = None) -> tuple[bytes, str, str]:
        """(data, media type, digest) of the manifest tagged ``tag`` (or the only one when
        ``tag`` is None), verified against its descriptor's digest and size."""
        d = self._find_manifest(tag)
        digest, size, media_type = d["digest"], d["size"], d["mediaType"]
        if size > MAX_MANIFEST_SIZE:
            raise IntegrityError(
                f"manifest {digest} in {self.location} declares {size} bytes, more than the "
                f"{MAX_MANIFEST_SIZE} byte limit"
            )
        with self.open_blob(digest, size=size) as f:
            data = f.read(size + 1)
            if f.read(1):  # pragma: no cover - the verifying reader raises first
                raise IntegrityError(f"manifest {digest} is larger than declared")
        return data, media_type, digest


# ---------------------------------------------------------------------------------------------
# directory layout


class OCILayout(_LayoutReader):
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
        _check_oci_layout(data, str(self.path))

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
                self._write_atomic(INDEX_FILE, _index_bytes(_empty_index()))
            self._write_atomic(OCI_LAYOUT_FILE, _layout_bytes())
        except OSError as e:
            _no_space(e, str(self.path))
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
            st = os.lstat(self.path / _blob_relpath(digest))
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return st.st_size

    def _open_raw(self, digest: str) -> IO[bytes]:
        path = self.path / _blob_relpath(digest)
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
        _fsync_dir(self.path)

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
        algo, hexpart = _split_digest(digest)
        if size < 0:
            raise IntegrityError(f"invalid size {size} for blob {digest}")
        if self._blob_size(digest) == size:
            return
        blob_dir = self.path / BLOBS_DIR / algo
        partial = blob_dir / f".partial-{hexpart}"
        try:
            blob_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _no_space(e, f"blob {digest}")
            raise
        with _claimed(partial) as fd:
            if self._blob_size(digest) == size:  # the writer we waited for finished it
                os.unlink(partial)
                return
            try:
                kept = _rehash(fd, size, algo) if resume else (0, _HASHES[algo]())
                actual = _fill(fd, kept, size, open_at, digest, owned=resume)
                if actual != digest and kept[0]:  # the kept bytes were wrong: start over
                    actual = _fill(fd, (0, _HASHES[algo]()), size, open_at, digest, owned=resume)
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
                    _no_space(e, f"blob {digest}")
                raise
        _fsync_dir(blob_dir)

    def write_blob_bytes(self, data: bytes) -> str:
        """Store ``data`` as a sha256 blob; return its digest."""
        digest = _sha256(data)
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
            _check_tag(tag)
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
                self._write_atomic(INDEX_FILE, _index_bytes(index))
            except OSError as e:
                _no_space(e, "index.json")
                raise
        return digest

    def blobs(self) -> list[str]:
        """Digests of all well-formed blob files in the layout (temporary files excluded)."""
        out: list[str] = []
        root = self.path / BLOBS_DIR
        for algo in sorted(_HASHES):
            d = root / algo
            if not d.is_dir():
                continue
            for p in sorted(d.iterdir()):
                digest = f"{algo}:{p.name}"
                if _DIGEST.fullmatch(digest) and p.is_file() and not p.is_symlink():
                    out.append(digest)
        return out


# ---------------------------------------------------------------------------------------------
# tar archives


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
        self.hash = _HASHES[algo]()
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
        algo, _ = _split_digest(digest)
        if size < 0:
            raise IntegrityError(f"invalid size {size} for blob {digest}")
        if digest in self._blobs:
            return
        self._add_dir(BLOBS_DIR)
        self._add_dir(f"{BLOBS_DIR}/{algo}")
        src = _CountingHasher(stream, algo)
        try:
            self._tar.addfile(_tarinfo(_blob_relpath(digest), size), cast(IO[bytes], src))
        except OSError as e:
            if src.count < size:
                raise IntegrityError(
                    f"blob {digest} has {src.count} bytes, {size} were declared"
                ) from None
            _no_space(e, "the archive")
            raise
        if stream.read(1):
            raise IntegrityError(f"blob {digest} has more than the {size} bytes declared")
        actual = f"{algo}:{src.hash.hexdigest()}"
        if actual != digest:
            raise IntegrityError(f"digest mismatch for blob {digest}: got {actual}")
        self._blobs[digest] = size

    def add_blob_bytes(self, data: bytes) -> str:
        digest = _sha256(data)
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
            _check_tag(tag)
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
            index_json = _index_bytes({**_empty_index(), "manifests": self._manifests})
        index = _parse_index(index_json, "archive index")
        for d in index["manifests"]:
            if d["digest"] not in self._blobs:
                raise IntegrityError(
                    f"index.json names manifest {d['digest']}, which was not added"
                )
        layout = _layout_bytes()
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
    _parse_index(index_json, layout.location)
    writer = OCIArchiveWriter(fileobj)
    for digest in layout.blobs():
        size = layout.has_blob(digest)
        if size is None:  # pragma: no cover - raced with a delete
            continue
        with layout._open_raw(digest) as f:
            writer.add_blob(digest, size, f)
    writer.finish(index_json)


def _member_name(name: str, where: str) -> str:
    """Normalise a tar member name; refuse absolute paths and '..'."""
    if name.startswith("/") or "\\" in name or "\0" in name:
        raise IntegrityError(f"{where}: refusing tar member {json.dumps(name[:200])}")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if any(p == ".." for p in parts):
        raise IntegrityError(f"{where}: refusing tar member {json.dumps(name[:200])}")
    return "/".join(parts)


class _MemberStream(io.RawIOBase):
    """``size`` bytes of an underlying stream (one tar member), with its own file handle."""

    def __init__(self, f: IO[bytes], size: int, also_close: Any = None) -> None:
        super().__init__()
        self._f = f
        self._left = size
        self._also = also_close

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._left <= 0:
            return 0
        mv = memoryview(b).cast("B")[: self._left]
        n = self._f.readinto(mv)  # type: ignore[attr-defined]
        n = int(n or 0)
        self._left -= n
        return n

    def close(self) -> None:
        if not self.closed:
            self._f.close()
            if self._also is not None:
                self._also.close()
        super().close()


class OCIArchiveReader(_LayoutReader):
    """Read an OCI layout from a tar archive (``oci-archive:FILE``), uncompressed or
    gzip/bzip2/xz compressed. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self._tar = tarfile.open(self.path, mode="r:*")  # noqa: SIM115
        except FileNotFoundError:
            raise NotFoundError(f"no such archive: {self.path}") from None
        except tarfile.TarError as e:
            raise IntegrityError(f"{self.path} is not a tar archive ({e})") from None
        try:
            self._members: dict[str, tarfile.TarInfo] = {}
            for m in self._tar.getmembers():
                name = _member_name(m.name, self.location)
                if m.isdir() or not name:
                    continue
                if name in self._members:
                    raise IntegrityError(f"{self.location}: tar member {name} appears twice")
                self._members[name] = m
            layout = self._small_member(OCI_LAYOUT_FILE, 4096)
            if layout is None:
                raise NotFoundError(f"{self.location} is not an OCI layout archive (no oci-layout)")
            _check_oci_layout(layout, self.location)
        except BaseException:
            self._tar.close()
            raise

    @property
    def location(self) -> str:
        return f"oci-archive:{self.path}"

    def _small_member(self, name: str, limit: int) -> bytes | None:
        m = self._members.get(name)
        if m is None:
            return None
        if not m.isreg():
            raise IntegrityError(f"{self.location}: {name} is not a regular file")
        if m.size > limit:
            raise IntegrityError(f"{self.location}: {name} is larger than {limit} bytes")
        f = self._tar.extractfile(m)
        assert f is not None
        with f:
            return f.read(limit + 1)

    def _read_index(self) -> bytes:
        data = self._small_member(INDEX_FILE, MAX_INDEX_SIZE)
        if data is None:
            raise IntegrityError(f"{self.location}: index.json is missing")
        return data

    def _blob_size(self, digest: str) -> int | None:
        m = self._members.get(_blob_relpath(digest))
        if m is None or not m.isreg():
            return None
        return m.size

    def _open_raw(self, digest: str) -> IO[bytes]:
        """A stream of one blob, independent of every other open stream, so that several
        threads can read blobs at once (one shared tar file object would interleave their
        seeks). An uncompressed archive gets its own file handle positioned at the member's
        data; a compressed one its own tarfile."""
        m = self._members.get(_blob_relpath(digest))
        if m is None:
            raise NotFoundError(f"blob {digest} is not in {self.location}")
        if not m.isreg():
            raise IntegrityError(f"blob {digest} in {self.location} is not a regular file")
        if (
            self._tar.mode == "r"
            and not m.issparse()
            and isinstance(getattr(self._tar, "fileobj", None), io.BufferedReader)
        ):
            raw = open(self.path, "rb")  # noqa: SIM115 - closed by the returned stream
            raw.seek(m.offset_data)
            return cast(IO[bytes], _MemberStream(raw, m.size))
        tar = tarfile.open(self.path, mode="r:*")  # noqa: SIM115 - closed with the stream
        f = tar.extractfile(m.name)
        if f is None:
            tar.close()
            raise IntegrityError(f"blob {digest} in {self.location} cannot be read")
        return cast(IO[bytes], _MemberStream(f, m.size, also_close=tar))

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> OCIArchiveReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# location strings


def parse_layout_location(s: str) -> tuple[LayoutKind, Path, str | None]:
    """Split ``oci:PATH[:tag]`` / ``oci-archive:FILE[:tag]`` into (kind, path, tag).

    As in skopeo, the tag follows a ':' after the path. barge takes the *last* ':' and only
    if what follows is a valid tag (so ``oci:/a:b/dir`` is the path ``/a:b/dir``, and
    ``oci:dir:v1`` is the path ``dir`` with tag ``v1``). An empty tag (``oci:dir:``) means no
    tag, as in skopeo.
    """
    kind: LayoutKind
    if s.startswith("oci:"):
        kind, rest = "oci", s[len("oci:") :]
    elif s.startswith("oci-archive:"):
        kind, rest = "oci-archive", s[len("oci-archive:") :]
    else:
        raise UsageError(
            f"invalid OCI layout location {json.dumps(s)}: expected oci:PATH[:tag] or "
            "oci-archive:FILE[:tag]"
        )
    tag: str | None = None
    colon = rest.rfind(":")
    if colon != -1:
        candidate = rest[colon + 1 :]
        if candidate == "":
            rest = rest[:colon]
        else:
            try:
                validate_tag(candidate)
            except ReferenceError:
                pass
            else:
                rest, tag = rest[:colon], candidate
    if rest == "":
        raise UsageError(f"invalid OCI layout location {json.dumps(s)}: the path is empty")
    if "\0" in rest:
        raise UsageError(f"invalid OCI layout location {json.dumps(s)}: NUL in path")
    return kind, Path(rest), tag
