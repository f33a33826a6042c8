"""The End protocol: one interface over every place an image can be read from or written to.

Every move of an image is a copy between two ends (containers/image's transports). The ends:

========================  ============================  ==========================================
end                       module                        as a source / as a destination
========================  ============================  ==========================================
a registry repository     :mod:`barge.transfer.registry`  blobs and manifests / uploads, mounts
an OCI layout directory   :mod:`barge.transfer.layout`    blobs and manifests / blob files, index.json
an OCI archive (tar)      :mod:`barge.transfer.layout`    read, one stream at a time / written once
the image cache           :mod:`barge.transfer.cache`     (read as a VM) / decodes disks: the decoding edge
a local VM                :mod:`barge.transfer.local`     encodes disks: the encoding edge / (clone)
in memory (tests)         :mod:`barge.transfer.memory`    both
========================  ============================  ==========================================

The destination side has **one blob-reuse entry point**, :meth:`End.try_reusing_blob`, modelled
on containers/image's ``ImageDestination.TryReusingBlob``: can this end hold the blob without
its bytes being sent (it has it; it can mount it from a known location; the cache: a base
image holds it)? The pipeline (:mod:`barge.transfer.pipeline`) asks it once per blob and
destination, and only then sends bytes (:meth:`End.put_blob`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import BinaryIO, Protocol

from barge.oci.types import Descriptor, Manifest
from barge.reference import Reference

#: ``open_at(offset)``: a stream of a blob's bytes from ``offset`` (called again on a retry).
OpenAt = Callable[[int], BinaryIO]
#: Bytes moved (negative when a restarted transfer undoes some).
Progress = Callable[[int], None]
#: A restartable producer of a blob's bytes (a chunk being compressed).
Produce = Callable[[], Iterable[bytes]]


class Reuse(enum.Enum):
    """How a destination came to hold a blob without its bytes being sent."""

    PRESENT = "present"  # it already had it
    MOUNTED = "mounted"  # it took it from a location it knows (another repository, a base)


class End(Protocol):
    """A place blobs and manifests live. An end that cannot do something (an archive being
    written cannot be read) raises :class:`barge.errors.UnsupportedError`."""

    label: str
    """How messages name it: ``host/repo``, ``oci:PATH``, ``oci-archive:FILE``, ``cache``."""

    @property
    def ref(self) -> Reference | None:
        """The repository or layout it is (without tag), or None (the cache)."""
        ...

    registry: str | None
    """The registry host for a registry end (ends of one registry can mount from each other,
    and a produced blob streams only into registry ends); else None."""
    serial: bool
    """Blobs are read or written one at a time (an archive is one stream)."""
    verifies_reads: bool
    """A whole-blob read (offset 0) checks the blob's digest at EOF itself."""
    layer_limit: int | None
    """The most layers a manifest may have here, when known (a registry's cap)."""
    large_first: bool
    """As a destination, it prefers big blobs first (decoding is CPU-bound: the biggest go
    first and the workers stay busy to the end)."""

    # -- as a source -----------------------------------------------------------------------
    def get_manifest(self, reference: str) -> Manifest:
        """The manifest (or index) a tag or digest names (``latest``: see the ends)."""
        ...

    def open_blob(self, digest: str, offset: int = 0) -> BinaryIO: ...

    def read_blob(self, digest: str, max_size: int) -> bytes:
        """A small blob, whole, verified against its digest, at most ``max_size`` bytes."""
        ...

    def list_tags(self) -> list[str]: ...

    def seen(self, digests: list[str]) -> None:
        """The pipeline read these blobs from here (a registry end records where they are:
        later mounts come from here)."""
        ...

    def reject_blob(self, digest: str, error: BaseException) -> bool:
        """The blob ``digest`` just read from here failed a check (``error``). True: this end
        has another source for it (a registry read through mirrors), which the next
        :meth:`open_blob` of it uses; False: the error stands."""
        ...

    # -- as a destination ------------------------------------------------------------------
    def begin(self, manifest: Manifest, source: End) -> bool:
        """An image manifest is about to be copied here from ``source`` (its blobs follow,
        then :meth:`put_manifest`). True: this end already holds the image; nothing is sent."""
        ...

    def try_reusing_blob(self, blob: Descriptor, source: End | None) -> Reuse | None:
        """Make this end hold ``blob`` without its bytes, if it can: it has it, or it mounts it
        from a location it knows of (``source``'s repository on the same registry, the
        catalog's known locations). None: its bytes must be sent."""
        ...

    def put_blob(self, blob: Descriptor, open_at: OpenAt, progress: Progress | None) -> None:
        """Store ``blob`` from its bytes (``open_at(offset)`` may be called again to resume)."""
        ...

    def put_stream(
        self,
        produce: Produce,
        progress: Progress | None = None,
        before_commit: Callable[[str, int], None] | None = None,
        resume_key: str | None = None,
    ) -> tuple[str, int]:
        """Store a blob while it is produced; its (digest, size). Registry ends only."""
        ...

    def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        """Store a manifest under ``tag`` (None: by digest only); returns its digest."""
        ...

    def put_child_manifest(self, data: bytes, media_type: str) -> str:
        """Store a manifest an index names: by digest only (no tag, no index.json entry)."""
        ...

    def commit(self) -> None:
        """Make what was written visible (an archive is renamed into place)."""
        ...

    def close(self) -> None:
        """Release what it holds; an uncommitted destination discards its work."""
        ...


class Target:
    """A destination end and the tags the image gets there (none: by digest only)."""

    __slots__ = ("end", "tags")

    def __init__(self, end: End, tags: list[str] | None = None) -> None:
        self.end = end
        self.tags: list[str] = list(tags or [])

    def __repr__(self) -> str:
        return f"Target({self.end.label!r}, {self.tags!r})"
