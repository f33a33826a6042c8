"""What both kinds of OCI layout share: names and limits, digests as paths, the verifying
reader, index.json and oci-layout checks, and :class:`LayoutReader`, the read API of a
directory and an archive alike (``has_blob``, ``open_blob``, ``get_manifest``, ``tags``,
``manifests``)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol

from barge.errors import (
    IntegrityError,
    NoSpaceError,
    NotFoundError,
    UnsupportedError,
    UsageError,
)
from barge.reference import ReferenceError, validate_tag
from barge.untrusted import load_json

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

DIGEST = re.compile(r"(sha256):([a-f0-9]{64})|(sha512):([a-f0-9]{128})")
HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}


class ReadableStream(Protocol):
    """Anything with ``read(n) -> bytes`` (a file, a BinaryIO, an HTTP body reader)."""

    def read(self, size: int = -1, /) -> bytes: ...


# ---------------------------------------------------------------------------------------------
# helpers


def split_digest(digest: object) -> tuple[str, str]:
    """Return (algorithm, hex) of a well-formed digest; raise IntegrityError otherwise.

    This is the only way a digest becomes a path component.
    """
    if not isinstance(digest, str):
        raise IntegrityError(f"invalid digest {digest!r}: not a string")
    m = DIGEST.fullmatch(digest)
    if m is None:
        shown = json.dumps(digest[:200])
        raise IntegrityError(
            f"invalid digest {shown}: expected sha256:<64 lowercase hex> or "
            "sha512:<128 lowercase hex>"
        )
    if m.group(1):
        return m.group(1), m.group(2)
    return m.group(3), m.group(4)


def blob_relpath(digest: str) -> str:
    algo, hexpart = split_digest(digest)
    return f"{BLOBS_DIR}/{algo}/{hexpart}"


def hasher(digest: str) -> Any:
    algo, _ = split_digest(digest)
    return HASHES[algo]()


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def no_space(e: OSError, what: str) -> None:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise NoSpaceError(f"no space left while writing {what}") from e


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_tag(tag: str) -> str:
    try:
        return validate_tag(tag)
    except ReferenceError as e:
        raise UsageError(e.message) from None


class VerifyingReader(io.RawIOBase):
    """Pass bytes through, hashing them; at EOF check the digest (and size, if known)."""

    def __init__(self, raw: IO[bytes], digest: str, size: int | None, what: str) -> None:
        super().__init__()
        self._raw = raw
        self._digest = digest
        self._size = size
        self._what = what
        self._hash = hasher(digest)
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


def verifying(raw: IO[bytes], digest: str, size: int | None, what: str) -> BinaryIO:
    return io.BufferedReader(VerifyingReader(raw, digest, size, what), CHUNK_SIZE)


def parse_index(data: bytes, where: str) -> dict[str, Any]:
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
            split_digest(d.get("digest"))
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


def check_oci_layout(data: bytes, where: str) -> None:
    doc = load_json(data, f"{where}: oci-layout")
    version = doc.get("imageLayoutVersion") if isinstance(doc, dict) else None
    if version != IMAGE_LAYOUT_VERSION:
        raise UnsupportedError(
            f"{where}: unsupported OCI layout version {version!r} "
            f"(barge reads {IMAGE_LAYOUT_VERSION})"
        )


def empty_index() -> dict[str, Any]:
    return {"schemaVersion": 2, "mediaType": OCI_INDEX_MEDIA_TYPE, "manifests": []}


def index_bytes(index: dict[str, Any]) -> bytes:
    return json.dumps(index, separators=(",", ":")).encode()


def layout_bytes() -> bytes:
    return json.dumps({"imageLayoutVersion": IMAGE_LAYOUT_VERSION}).encode()


# ---------------------------------------------------------------------------------------------
# shared read API


class LayoutReader(ABC):
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
        split_digest(digest)
        raw = self._open_raw(digest)
        return verifying(raw, digest, size, f"blob {digest} in {self.location}")

    def _index(self) -> dict[str, Any]:
        return parse_index(self._read_index(), self.location)

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
