"""The two ends of every copy: where blobs and manifests come from and go to.

A *location* is what a user types: a local VM name, a registry reference, or an OCI layout
(``oci:PATH[:tag]`` / ``oci-archive:FILE[:tag]``). :class:`RegistryEnd` and :class:`LayoutEnd`
give the pipeline one interface over both remote kinds; local VMs and the cache are handled by
the disk codec at the edges (push encodes, pull decodes).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, cast

from barge.errors import NotFoundError, UsageError
from barge.oci.client import RegistryClient
from barge.oci.types import Manifest, media_type_of, sha256_digest
from barge.reference import (
    LAYOUT_SCHEMES,
    Reference,
    layout_key,
    looks_like_reference,
    parse,
    parse_layout,
)
from barge.store import Store

OpenAt = Callable[[int], BinaryIO]


class End(Protocol):
    """A place blobs and manifests live (a registry repository or an OCI layout)."""

    label: str

    def has_blob(self, digest: str) -> int | None: ...
    def open_blob(self, digest: str, offset: int = 0) -> BinaryIO: ...
    def put_blob(
        self, digest: str, size: int, open_at: OpenAt, progress: Callable[[int], None] | None
    ) -> None: ...
    def try_mount(self, digest: str, size: int) -> bool: ...
    def get_manifest(self, reference: str) -> Manifest: ...
    def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str: ...


class RegistryEnd:
    """One repository in one registry."""

    def __init__(
        self,
        store: Store,
        client: RegistryClient,
        ref: Reference,
        *,
        upload_chunk_size: int | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.ref = ref
        self.repo = ref.repository
        self.registry = ref.registry
        self.label = f"{ref.registry}/{ref.repository}"
        self.upload_chunk_size = upload_chunk_size

    def has_blob(self, digest: str) -> int | None:
        size = self.client.blob_exists(self.ref, digest)
        if size is not None:
            self.store.catalog.add_blob_location(digest, self.registry, self.repo)
        return size

    def open_blob(self, digest: str, offset: int = 0) -> BinaryIO:
        return self.client.open_blob(self.ref, digest, offset=offset)  # type: ignore[return-value]

    def read_blob(self, digest: str, max_size: int) -> bytes:
        return self.client.read_blob(self.ref, digest, max_size=max_size)

    def put_blob(
        self, digest: str, size: int, open_at: OpenAt, progress: Callable[[int], None] | None
    ) -> None:
        self.client.upload_blob(
            self.ref, digest, size, open_at, chunk_size=self.upload_chunk_size, progress=progress
        )
        self.store.catalog.add_blob_location(digest, self.registry, self.repo)

    def put_stream(
        self,
        produce: Callable[[], Iterable[bytes]],
        progress: Callable[[int], None] | None = None,
        before_commit: Callable[[str, int], None] | None = None,
        resume_key: str | None = None,
    ) -> tuple[str, int]:
        """Upload a blob while it is produced; returns its (digest, size). ``resume_key``
        (naming exactly the bytes ``produce`` yields) lets a later run continue the upload."""
        digest, size = self.client.upload_stream(
            self.ref,
            produce,
            chunk_size=self.upload_chunk_size,
            progress=progress,
            before_commit=before_commit,
            resume_key=resume_key,
        )
        self.store.catalog.add_blob_location(digest, self.registry, self.repo)
        return digest, size

    def try_mount(self, digest: str, size: int) -> bool:
        for other in self.store.catalog.blob_repositories(digest, self.registry):
            if other == self.repo:
                continue
            source = Reference(self.registry, other)
            if self.client.mount_blob(self.ref, digest, source):
                self.store.catalog.add_blob_location(digest, self.registry, self.repo)
                return True
        return False

    def get_manifest(self, reference: str) -> Manifest:
        return self.client.get_manifest(self.ref.at(reference))

    def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        target = self.ref.with_tag(tag) if tag else self.ref.with_digest(sha256_digest(data))
        return self.client.put_manifest(target, data, media_type)


class LayoutEnd:
    """An OCI image layout directory (read/write) or archive (read)."""

    def __init__(self, path: Path, tag: str | None, *, archive: bool = False, create: bool = False):
        from barge.oci.layout import OCIArchiveReader, OCILayout

        self.path = path
        self.tag = tag
        self.label = f"oci{'-archive' if archive else ''}:{path}"
        self.archive = archive
        self.layout: OCILayout | OCIArchiveReader
        if archive:
            self.layout = OCIArchiveReader(path)
        else:
            self.layout = OCILayout(path, create=create)

    def has_blob(self, digest: str) -> int | None:
        return self.layout.has_blob(digest)

    def open_blob(self, digest: str, offset: int = 0) -> BinaryIO:
        f = self.layout.open_blob(digest)
        if offset:
            if f.seekable():
                f.seek(offset)
            else:
                _skip(f, offset)
        return f

    def read_blob(self, digest: str, max_size: int) -> bytes:
        size = self.layout.has_blob(digest)
        if size is None:
            raise NotFoundError(f"blob {digest} is not in {self.label}")
        if size > max_size:
            from barge.errors import IntegrityError

            raise IntegrityError(f"blob {digest} is {size} bytes, over the {max_size} limit")
        with self.layout.open_blob(digest) as f:
            data = f.read(max_size + 1)
        if sha256_digest(data) != digest:
            from barge.oci.errors import DigestMismatch

            raise DigestMismatch(f"blob in {self.label}", digest, sha256_digest(data))
        return data

    def put_blob(
        self, digest: str, size: int, open_at: OpenAt, progress: Callable[[int], None] | None
    ) -> None:
        from barge.oci.layout import OCILayout

        assert isinstance(self.layout, OCILayout)

        def counted(offset: int) -> BinaryIO:
            src = open_at(offset)
            return cast(BinaryIO, _Counting(src, progress)) if progress else src

        self.layout.write_blob_at(digest, size, counted)  # resumes a killed write of it

    def try_mount(self, digest: str, size: int) -> bool:
        return False

    def get_manifest(self, reference: str) -> Manifest:
        from barge.oci.layout import MAX_MANIFEST_SIZE
        from barge.oci.types import is_digest

        if is_digest(reference):  # a child of an index: a blob, not an index.json entry
            data = self.read_blob(reference, MAX_MANIFEST_SIZE)
            return Manifest(data=data, media_type=media_type_of(data, None), digest=reference)
        tag = reference or self.tag
        try:
            data, media_type, digest = self.layout.get_manifest(tag)
        except NotFoundError:
            # "latest" is only the default name: a layout holding one untagged image answers
            if tag != "latest" or self.tag is not None or len(self.layout.manifests()) != 1:
                raise
            data, media_type, digest = self.layout.get_manifest(None)
        return Manifest(data=data, media_type=media_type_of(data, media_type), digest=digest)

    def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        from barge.oci.layout import OCILayout

        assert isinstance(self.layout, OCILayout)
        return self.layout.put_manifest(data, media_type, tag)


class _Counting(io.RawIOBase):
    def __init__(self, src: BinaryIO, progress: Callable[[int], None] | None) -> None:
        self.src = src
        self.progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = self.src.readinto(b)  # type: ignore[attr-defined]
        if n and self.progress:
            self.progress(n)
        return int(n or 0)

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        if data and self.progress:
            self.progress(len(data))
        return data

    def close(self) -> None:
        if not self.closed:
            self.src.close()
        super().close()


def _skip(f: BinaryIO, n: int) -> None:
    while n > 0:
        piece = f.read(min(n, 1 << 20))
        if not piece:
            break
        n -= len(piece)


@dataclass(frozen=True)
class Location:
    kind: str  # "vm" | "registry" | "oci" | "oci-archive"
    name: str = ""
    ref: Reference | None = None
    path: Path | None = None
    tag: str | None = None

    def __str__(self) -> str:
        if self.kind == "vm":
            return self.name
        if self.kind == "registry":
            return str(self.ref)
        return f"{self.kind}:{self.path}" + (f":{self.tag}" if self.tag else "")

    def cache_key(self) -> tuple[str, str, str]:
        """(registry, repository, tag) as the catalog keys an image pulled from here; the tag
        is "" when none was given (a digest, if any, is ``ref.digest``)."""
        if self.kind == "registry":
            assert self.ref is not None
            return self.ref.cache_key()
        if self.kind in LAYOUT_SCHEMES:
            assert self.path is not None
            return self.kind, layout_key(self.path), self.tag or ""
        raise UsageError(f"{self} is a local VM, not an image location")


def parse_location(text: str, *, allow_vm: bool = True) -> Location:
    """``myvm`` | ``host[:port]/repo[:tag][@digest]`` | ``oci:PATH[:tag]`` | ``oci-archive:FILE``."""
    if text.startswith(("oci:", "oci-archive:")):
        layout = parse_layout(text)
        if layout.digest is not None:
            raise UsageError(f"{text!r}: a digest in an OCI layout location is not taken here")
        assert layout.path is not None
        return Location(kind=layout.scheme, path=Path(layout.path), tag=layout.tag)
    if allow_vm and not looks_like_reference(text):
        return Location(kind="vm", name=text)
    return Location(kind="registry", ref=parse(text))
