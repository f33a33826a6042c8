"""An end in memory, for tests of the pipeline's rules (as httpx ships ``MockTransport`` beside
its transports): blobs and manifests in dicts, every call the pipeline makes recorded in
:attr:`MemoryEnd.calls`, failures injected on demand. Never a stand-in for a real registry in
tests of the network: those run against ``docker-registry``.

Repositories of one :class:`MemoryRegistry` can mount blobs from each other, as a registry's
do: from the source's repository, or from one the registry says holds the blob.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable
from typing import BinaryIO

from barge.errors import IntegrityError, NotFoundError, RegistryError
from barge.oci.types import Descriptor, Manifest, is_digest, media_type_of, sha256_digest
from barge.reference import Reference
from barge.transfer.base import EndBase
from barge.transfer.end import End, OpenAt, Produce, Progress, Reuse

__all__ = ["MemoryEnd", "MemoryRegistry"]


class MemoryRegistry:
    """A registry in memory: repositories (:class:`MemoryEnd`) by name."""

    def __init__(self, host: str = "memory.test") -> None:
        self.host = host
        self.repos: dict[str, MemoryEnd] = {}
        self.mounts_allowed = True

    def repo(self, name: str) -> MemoryEnd:
        if name not in self.repos:
            self.repos[name] = MemoryEnd(name, registry=self)
        return self.repos[name]


class MemoryEnd(EndBase):
    """One repository (or a standalone store of blobs and manifests) in memory."""

    def __init__(self, name: str = "mem", *, registry: MemoryRegistry | None = None) -> None:
        self.name = name
        self.memory_registry = registry
        host = registry.host if registry is not None else "memory.test"
        self.label = f"{host}/{name}"
        self.ref = Reference(host, name)
        self.registry = host if registry is not None else None
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, tuple[bytes, str]] = {}  # by digest
        self.tags: dict[str, str] = {}  # tag -> digest
        self.calls: list[tuple[str, str]] = []  # (what, digest or tag), in order
        self.fail_after_puts: int | None = None  # raise RegistryError on the put after N
        self.fail_after_opens: int | None = None  # and on the blob read after N
        self._lock = threading.Lock()

    # -- filling it ------------------------------------------------------------------------
    def add_blob(self, data: bytes) -> Descriptor:
        digest = sha256_digest(data)
        self.blobs[digest] = data
        return Descriptor("application/octet-stream", digest, len(data))

    def add_manifest(self, data: bytes, media_type: str, tag: str | None = None) -> Manifest:
        digest = sha256_digest(data)
        self.manifests[digest] = (data, media_type)
        if tag is not None:
            self.tags[tag] = digest
        return Manifest(data=data, media_type=media_type, digest=digest)

    def _log(self, what: str, key: str) -> None:
        with self._lock:
            self.calls.append((what, key))

    def count(self, what: str) -> int:
        return sum(1 for w, _ in self.calls if w == what)

    # -- as a source -----------------------------------------------------------------------
    def get_manifest(self, reference: str) -> Manifest:
        self._log("get_manifest", reference)
        digest = reference if is_digest(reference) else self.tags.get(reference)
        if digest is None or digest not in self.manifests:
            raise NotFoundError(f"no manifest {reference} in {self.label}")
        data, media_type = self.manifests[digest]
        return Manifest(data=data, media_type=media_type_of(data, media_type), digest=digest)

    def open_blob(self, digest: str, offset: int = 0) -> BinaryIO:
        with self._lock:
            if self.fail_after_opens is not None:
                if self.fail_after_opens <= 0:
                    raise RegistryError(f"{self.label}: injected failure reading {digest}")
                self.fail_after_opens -= 1
        self._log("open_blob", digest)
        if digest not in self.blobs:
            raise NotFoundError(f"blob {digest} is not in {self.label}")
        f = io.BytesIO(self.blobs[digest])
        f.seek(offset)
        return f

    def read_blob(self, digest: str, max_size: int) -> bytes:
        with self.open_blob(digest) as f:
            data = f.read(max_size + 1)
        if len(data) > max_size:
            raise IntegrityError(f"blob {digest} is over the {max_size} limit")
        return data

    def list_tags(self) -> list[str]:
        return sorted(self.tags)

    def images(self) -> int:
        return len(self.tags) or len(self.manifests)

    # -- as a destination ------------------------------------------------------------------
    def try_reusing_blob(self, blob: Descriptor, source: End | None) -> Reuse | None:
        self._log("try_reusing_blob", blob.digest)
        if blob.digest in self.blobs:
            return Reuse.PRESENT
        reg = self.memory_registry
        if reg is None or not reg.mounts_allowed:
            return None
        candidates = []
        if isinstance(source, MemoryEnd) and source.memory_registry is reg:
            candidates.append(source)
        candidates += [r for r in reg.repos.values() if r is not self and r not in candidates]
        for other in candidates:
            if blob.digest in other.blobs:
                self._log("mount", blob.digest)
                self.blobs[blob.digest] = other.blobs[blob.digest]
                return Reuse.MOUNTED
        return None

    def _count_put(self) -> None:
        with self._lock:
            if self.fail_after_puts is not None:
                if self.fail_after_puts <= 0:
                    raise RegistryError(f"{self.label}: injected failure")
                self.fail_after_puts -= 1

    def put_blob(self, blob: Descriptor, open_at: OpenAt, progress: Progress | None) -> None:
        self._count_put()
        with open_at(0) as f:
            data = f.read()
        if sha256_digest(data) != blob.digest or len(data) != blob.size:
            raise IntegrityError(f"blob {blob.digest}: got other bytes")
        if progress is not None:
            progress(len(data))
        self._log("put_blob", blob.digest)
        self.blobs[blob.digest] = data

    def put_stream(
        self,
        produce: Produce,
        progress: Progress | None = None,
        before_commit: Callable[[str, int], None] | None = None,
        resume_key: str | None = None,
    ) -> tuple[str, int]:
        self._count_put()
        h = hashlib.sha256()
        out = bytearray()
        for piece in produce():
            h.update(piece)
            out += piece
        digest = "sha256:" + h.hexdigest()
        if before_commit is not None:
            before_commit(digest, len(out))
        self._log("put_stream", digest)
        self.blobs[digest] = bytes(out)
        return digest, len(out)

    def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        self._log("put_manifest", tag or sha256_digest(data))
        return self._store_manifest(data, media_type, tag)

    def put_child_manifest(self, data: bytes, media_type: str) -> str:
        self._log("put_child_manifest", sha256_digest(data))
        return self._store_manifest(data, media_type, None)

    def _store_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        """Like a registry, refuse a manifest naming what is not here."""
        manifest = Manifest(data=data, media_type=media_type, digest=sha256_digest(data))
        if not manifest.is_index:
            for d in manifest.image().layers + [manifest.image().config]:
                if d.digest not in self.blobs and not d.urls:
                    raise IntegrityError(f"manifest names blob {d.digest}, which is not here")
        else:
            for d in manifest.index().manifests:
                if d.digest not in self.manifests:
                    raise IntegrityError(f"index names manifest {d.digest}, which is not here")
        self.add_manifest(data, media_type, tag)
        return manifest.digest
