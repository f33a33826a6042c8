"""Copy: move an image between two remote ends (registries and OCI layouts) as it is.

The manifest bytes are copied exactly, so the digest at the destination is the source's (for an
index: every child manifest and its blobs first, then the index bytes). Blobs stream source ->
destination without touching the local disk, and every blob goes through one rule, *never send
a byte the destination has*: HEAD at the destination, then a cross-repository mount (from the
source repository when both are on one registry, else from any repository of that registry the
catalog knows holds it), and only then an upload. A re-run therefore resumes where an
interrupted copy stopped. Nothing here knows a VM image format: barge, Tart, Vetu and plain
container images copy alike.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from barge import cancel
from barge.endpoints import End, LayoutEnd, Location, OpenAt, RegistryEnd, parse_location
from barge.errors import IntegrityError, Interrupted, UnsupportedError, UsageError
from barge.oci.client import RegistryClient
from barge.oci.types import Descriptor, Manifest
from barge.progress import NullReporter, Reporter, Task
from barge.reference import ReferenceError, validate_tag
from barge.store import Store
from barge.units import format_size

MAX_INDEX_DEPTH = 4  # an index of indexes of ... is refused beyond this


# ---------------------------------------------------------------------------------------------
# an OCI archive being written (tar members streamed, one at a time)


class _Counting(io.RawIOBase):
    def __init__(self, src: BinaryIO, progress: Callable[[int], None] | None) -> None:
        super().__init__()
        self.src = src
        self.progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        data = self.src.read(len(view))
        n = len(data)
        view[:n] = data
        if n and self.progress:
            self.progress(n)
        return n


class ArchiveWriteEnd:
    """``oci-archive:FILE`` as a destination: a tar stream written to ``FILE.partial`` and
    renamed into place by :meth:`finish`. Blobs are added one at a time (a lock serialises
    concurrent writers), each streamed, so the archive needs no space beyond itself."""

    def __init__(self, path: Path, tag: str | None) -> None:
        from barge.oci.layout import OCIArchiveWriter

        self.path = path
        self.tag = tag
        self.label = f"oci-archive:{path}"
        self.tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
        self._file: IO[bytes] = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish/abort
        self.writer = OCIArchiveWriter(self._file)
        self._lock = threading.Lock()
        self._done = False

    def has_blob(self, digest: str) -> int | None:
        with self._lock:
            return self.writer.has_blob(digest)

    def open_blob(self, digest: str, offset: int = 0) -> BinaryIO:
        raise UnsupportedError(f"{self.label} is being written; it cannot be read")

    def put_blob(
        self, digest: str, size: int, open_at: OpenAt, progress: Callable[[int], None] | None
    ) -> None:
        with self._lock:
            if self.writer.has_blob(digest) is not None:
                return
            src = open_at(0)
            try:
                self.writer.add_blob(digest, size, cast(BinaryIO, _Counting(src, progress)))
            finally:
                src.close()

    def try_mount(self, digest: str, size: int) -> bool:
        return False

    def get_manifest(self, reference: str) -> Manifest:
        raise UnsupportedError(f"{self.label} is being written; it cannot be read")

    def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        with self._lock:
            return self.writer.add_manifest(data, media_type, tag)

    def put_blob_bytes(self, data: bytes) -> str:
        with self._lock:
            return self.writer.add_blob_bytes(data)

    def finish(self) -> None:
        if self._done:
            return
        self.writer.finish()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()


def put_child_manifest(end: End, data: bytes, media_type: str) -> str:
    """Store a manifest that an index names: by digest only (no tag, no index.json entry)."""
    if isinstance(end, LayoutEnd):
        from barge.oci.layout import OCILayout

        assert isinstance(end.layout, OCILayout)
        return end.layout.write_blob_bytes(data)
    if isinstance(end, ArchiveWriteEnd):
        return end.put_blob_bytes(data)
    return end.put_manifest(data, media_type, None)


# ---------------------------------------------------------------------------------------------
# opening ends


class Ends:
    """Opens ends for location strings, sharing one registry client per registry."""

    def __init__(self, store: Store, *, insecure: bool = False) -> None:
        self.store = store
        self.insecure = insecure
        self._clients: dict[str, RegistryClient] = {}
        self._archives: list[ArchiveWriteEnd] = []
        self._readers: list[LayoutEnd] = []  # archives being read: each holds a file open

    def client(self, registry: str) -> RegistryClient:
        if registry not in self._clients:
            self._clients[registry] = RegistryClient(
                registry, insecure=self.insecure, home=self.store.home
            )
        return self._clients[registry]

    def source(self, text: str) -> tuple[End, Location, str]:
        """(end, location, manifest reference) of a source: a registry or a layout."""
        loc = parse_location(text, allow_vm=False)
        if loc.kind == "registry":
            assert loc.ref is not None
            ref = loc.ref
            end = RegistryEnd(self.store, self.client(ref.registry), ref)
            return end, loc, ref.ref
        assert loc.path is not None
        if loc.kind == "oci" and not (loc.path / "oci-layout").exists():
            from barge.errors import NotFoundError

            raise NotFoundError(f"{loc.path} is not an OCI image layout (no oci-layout file)")
        lend = LayoutEnd(loc.path, loc.tag, archive=loc.kind == "oci-archive")
        if lend.archive:
            self._readers.append(lend)
        return lend, loc, loc.tag or ""

    def read_archive(self, path: Path) -> LayoutEnd:
        """An archive just written, opened for reading (closed by :meth:`close`)."""
        lend = LayoutEnd(path, None, archive=True)
        self._readers.append(lend)
        return lend

    def destination(self, text: str) -> tuple[End, Location]:
        loc = parse_location(text, allow_vm=False)
        if loc.kind == "registry":
            assert loc.ref is not None
            if loc.ref.digest:
                raise UsageError(
                    f"cannot copy to {text!r}: a digest names existing content; give a tag "
                    "or no tag (the source's tag is kept)"
                )
            return RegistryEnd(self.store, self.client(loc.ref.registry), loc.ref), loc
        assert loc.path is not None
        if loc.kind == "oci":
            return LayoutEnd(loc.path, loc.tag, create=True), loc
        if loc.path.exists() and loc.path.is_dir():
            raise UsageError(f"cannot write the archive {loc.path}: it is a directory")
        aend = ArchiveWriteEnd(loc.path, loc.tag)
        self._archives.append(aend)
        return aend, loc

    def close(self) -> None:
        for a in self._archives:
            a.abort()
        for r in self._readers:
            close = getattr(r.layout, "close", None)
            if close is not None:
                with contextlib.suppress(OSError):
                    close()
        for c in self._clients.values():
            c.close()


# ---------------------------------------------------------------------------------------------
# the copy


@dataclass
class CopyOptions:
    concurrency: int = 4
    insecure: bool = False
    platform: str | None = None
    all_tags: bool = False
    verify: bool = False
    deep: bool = False  # with verify: decode every chunk
    allow_upload: bool = True  # False: mounts only (barge tag across repositories)


@dataclass
class CopyStats:
    manifests: int = 0
    blobs: int = 0
    copied_blobs: int = 0
    copied_bytes: int = 0
    existing_blobs: int = 0
    mounted_blobs: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "manifests": self.manifests,
            "blobs": self.blobs,
            "copiedBlobs": self.copied_blobs,
            "copiedBytes": self.copied_bytes,
            "existingBlobs": self.existing_blobs,
            "mountedBlobs": self.mounted_blobs,
        }


@dataclass
class CopiedImage:
    source: str
    destination: str
    digest: str
    media_type: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "digest": self.digest,
            "mediaType": self.media_type,
            "size": self.size,
        }


@dataclass
class CopyResult:
    images: list[CopiedImage]
    stats: CopyStats
    notes: list[str] = field(default_factory=list)
    verified: list[Any] = field(default_factory=list)  # barge.verify.VerifyReport

    def to_json(self) -> dict[str, Any]:
        return {
            "images": [i.to_json() for i in self.images],
            **self.stats.to_json(),
            "verified": [v.to_json() for v in self.verified],
            "notes": self.notes,
        }


class Copier:
    """Copies manifests and their blobs from one end to another."""

    def __init__(self, store: Store, opts: CopyOptions, reporter: Reporter | None = None) -> None:
        self.store = store
        self.opts = opts
        self.reporter = reporter or NullReporter()
        self.stats = CopyStats()
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self._done: set[tuple[str, str]] = set()  # (destination label, digest)
        self._blobs_total = 0  # blobs this run set out to copy, and those the destination holds
        self._blobs_held = 0
        self._bytes_held = 0

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self.reporter.note(msg)

    def _count(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    # -- one manifest (recursively for an index) -------------------------------------------
    def copy_manifest(
        self, src: End, dst: End, manifest: Manifest, tag: str | None, *, depth: int = 0
    ) -> str:
        """Copy ``manifest`` and everything it names; put it at ``dst`` under ``tag`` (or by
        digest when ``tag`` is None). Returns the digest, which is the source's."""
        if depth > MAX_INDEX_DEPTH:
            raise UnsupportedError(f"image indexes nested deeper than {MAX_INDEX_DEPTH} levels")
        if manifest.is_index:
            for d in manifest.index().manifests:
                child = src.get_manifest(d.digest)
                if child.digest != d.digest:
                    raise IntegrityError(
                        f"index {manifest.digest} names {d.digest}, {src.label} served "
                        f"{child.digest}"
                    )
                self.copy_manifest(src, dst, child, None, depth=depth + 1)
        else:
            try:
                im = manifest.image()
            except ValueError as e:
                raise IntegrityError(f"manifest {manifest.digest}: {e}") from None
            blobs: dict[str, Descriptor] = {}
            for d in (im.config, *im.layers):
                if d.urls:  # a foreign layer (Windows base layers): not distributable
                    continue
                blobs.setdefault(d.digest, d)
            self.copy_blobs(src, dst, list(blobs.values()))
        if tag is None and depth > 0:
            digest = put_child_manifest(dst, manifest.data, manifest.media_type)
        else:
            digest = dst.put_manifest(manifest.data, manifest.media_type, tag)
        if digest != manifest.digest:
            raise IntegrityError(
                f"{dst.label} stored manifest {manifest.digest} as {digest}: the bytes changed"
            )
        self._count(manifests=1)
        return digest

    def copy_blobs(self, src: End, dst: End, blobs: list[Descriptor]) -> None:
        total = sum(d.size for d in blobs)
        task = self.reporter.task(f"copying to {dst.label}", total)
        serial = isinstance(dst, ArchiveWriteEnd) or (isinstance(src, LayoutEnd) and src.archive)
        workers = 1 if serial else max(1, self.opts.concurrency)
        with self._lock:
            self._blobs_total += len(blobs)
        cancel.parallel(lambda d: self.copy_blob(src, dst, d, task), blobs, workers, name="copy")
        if isinstance(dst, RegistryEnd):
            self.store.catalog.add_blob_locations([d.digest for d in blobs], dst.registry, dst.repo)
        if isinstance(src, RegistryEnd):
            self.store.catalog.add_blob_locations([d.digest for d in blobs], src.registry, src.repo)

    def copy_blob(self, src: End, dst: End, d: Descriptor, task: Task) -> None:
        key = (dst.label, d.digest)
        with self._lock:
            if key in self._done:
                task.advance(d.size)
                return
        self._count(blobs=1)
        have = dst.has_blob(d.digest)
        if have is not None:
            self._count(existing_blobs=1)
        elif self._mount(src, dst, d):
            self._count(mounted_blobs=1)
        elif not self.opts.allow_upload:
            raise UnsupportedError(
                f"{dst.label} would not mount blob {d.digest} from {src.label}",
                hint="use `barge copy`, which uploads what cannot be mounted",
            )
        else:

            def open_at(off: int) -> BinaryIO:
                return src.open_blob(d.digest, off)

            # the upload reports every read it sends: each is a cancellation check
            dst.put_blob(d.digest, d.size, open_at, lambda n: cancel.check())
            self._count(copied_blobs=1, copied_bytes=d.size)
        task.advance(d.size)
        with self._lock:
            self._done.add(key)
            self._blobs_held += 1
            self._bytes_held += d.size

    def kept_message(self, dst: End | None) -> str:
        """What an interrupted copy leaves for the next run."""
        if isinstance(dst, ArchiveWriteEnd):
            return "interrupted: the partial archive was removed"
        if not self._blobs_held:
            return "interrupted: no blob was complete yet; run the same command to copy again"
        return (
            f"interrupted: {self._blobs_held} of {self._blobs_total} blobs "
            f"({format_size(self._bytes_held)}) are at the destination; run the same command "
            "to resume (they are not copied again)"
        )

    def _mount(self, src: End, dst: End, d: Descriptor) -> bool:
        if (
            isinstance(src, RegistryEnd)
            and isinstance(dst, RegistryEnd)
            and src.registry == dst.registry
            and src.repo != dst.repo
            and dst.client.mount_blob(dst.ref, d.digest, src.ref)
        ):
            return True
        return dst.try_mount(d.digest, d.size)

    # -- whole operations ------------------------------------------------------------------
    def copy(self, source: str, destination: str) -> CopyResult:
        ends = Ends(self.store, insecure=self.opts.insecure)
        dst: End | None = None
        try:
            with self.store.lease("copy"):
                src, sloc, reference = ends.source(source)
                dst, dloc = ends.destination(destination)
                if self.opts.all_tags:
                    images = self._copy_all_tags(src, sloc, dst, dloc)
                else:
                    images = [self._copy_one(src, sloc, reference, dst, dloc)]
                if isinstance(dst, ArchiveWriteEnd):
                    dst.finish()
                result = CopyResult(images, self.stats, self.notes)
                if self.opts.verify:
                    from barge.verify import verify_end

                    vdst: End = dst
                    if isinstance(dst, ArchiveWriteEnd):
                        vdst = ends.read_archive(dst.path)
                    for img in images:
                        m = vdst.get_manifest(img.digest)
                        result.verified.append(
                            verify_end(
                                vdst,
                                m,
                                img.destination,
                                deep=self.opts.deep,
                                concurrency=self.opts.concurrency,
                                reporter=self.reporter,
                            )
                        )
                return result
        except Exception as e:
            if isinstance(e, Interrupted) or cancel.requested():
                raise Interrupted(self.kept_message(dst)) from e
            raise
        finally:
            ends.close()

    def _dest_tag(self, src_tag: str | None, dloc: Location) -> str | None:
        if dloc.kind == "registry":
            assert dloc.ref is not None
            return dloc.ref.tag or src_tag
        return dloc.tag or src_tag

    def _copy_one(
        self, src: End, sloc: Location, reference: str, dst: End, dloc: Location
    ) -> CopiedImage:
        src_tag: str | None
        if sloc.kind == "registry":
            assert sloc.ref is not None
            src_tag = sloc.ref.tag
            if sloc.ref.tag is None and sloc.ref.digest is None:
                src_tag = "latest"
                self.note(f"no tag given: copying {sloc.ref.with_tag('latest')}")
        else:
            src_tag = sloc.tag
        tag = self._dest_tag(src_tag, dloc)
        top = src.get_manifest(reference)
        chosen = top
        if top.is_index and self.opts.platform:
            from barge.pull import select_platform

            chosen = select_platform(src, top, self.opts.platform)
        digest = self.copy_manifest(src, dst, chosen, tag)
        return CopiedImage(
            str(sloc), _shown(dloc, tag, digest), digest, chosen.media_type, chosen.size
        )

    def _copy_all_tags(
        self, src: End, sloc: Location, dst: End, dloc: Location
    ) -> list[CopiedImage]:
        if sloc.kind != "registry" or not isinstance(src, RegistryEnd):
            raise UsageError("--all-tags copies a registry repository; give one as the source")
        assert sloc.ref is not None
        if sloc.ref.tag or sloc.ref.digest:
            raise UsageError("--all-tags takes a repository without a tag or digest")
        if dloc.kind == "registry" and dloc.ref is not None and dloc.ref.tag:
            raise UsageError("--all-tags keeps the source's tags: give a destination repository")
        if dloc.kind != "registry" and dloc.tag:
            raise UsageError("--all-tags keeps the source's tags: give no tag in the destination")
        tags = sorted(set(src.client.list_tags(src.ref)))
        if not tags:
            self.note(f"{src.label} has no tags")
        out = []
        for t in tags:
            sl = Location(kind="registry", ref=sloc.ref.with_tag(t))
            dl = dloc
            if dloc.kind == "registry":
                assert dloc.ref is not None
                dl = Location(kind="registry", ref=dloc.ref.with_tag(t))
            else:
                dl = Location(kind=dloc.kind, path=dloc.path, tag=t)
            out.append(self._copy_one(src, sl, t, dst, dl))
        return out


def _shown(loc: Location, tag: str | None, digest: str) -> str:
    if loc.kind == "registry":
        assert loc.ref is not None
        base = f"{loc.ref.registry}/{loc.ref.repository}"
        return f"{base}:{tag}@{digest}" if tag else f"{base}@{digest}"
    return f"{loc.kind}:{loc.path}" + (f":{tag}" if tag else "") + f"@{digest}"


def copy(
    store: Store,
    source: str,
    destination: str,
    opts: CopyOptions | None = None,
    reporter: Reporter | None = None,
) -> CopyResult:
    """Copy the image ``source`` names to ``destination`` (registries, ``oci:``,
    ``oci-archive:``), keeping its digest."""
    return Copier(store, opts or CopyOptions(), reporter).copy(source, destination)


# ---------------------------------------------------------------------------------------------
# tags


@dataclass
class TagResult:
    digest: str
    references: list[str]
    stats: CopyStats

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "references": self.references, **self.stats.to_json()}


def _is_bare_tag(text: str) -> bool:
    if "/" in text or ":" in text or "@" in text:
        return False
    try:
        validate_tag(text)
    except ReferenceError:
        return False
    return True


def tag(
    store: Store,
    source: str,
    new_tags: list[str],
    *,
    insecure: bool = False,
    reporter: Reporter | None = None,
) -> TagResult:
    """Add tags to an image in a registry by re-putting its exact manifest bytes. A bare tag
    means the source's repository; a full reference must be on the same registry (its blobs
    are mounted there, never uploaded)."""
    if not new_tags:
        raise UsageError("give at least one new tag")
    opts = CopyOptions(insecure=insecure, allow_upload=False)
    copier = Copier(store, opts, reporter)
    ends = Ends(store, insecure=insecure)
    try:
        src, sloc, reference = ends.source(source)
        if not isinstance(src, RegistryEnd):
            raise UsageError("barge tag works on registry references; use barge copy for layouts")
        if sloc.ref is not None and sloc.ref.tag is None and sloc.ref.digest is None:
            reference = "latest"
        top = src.get_manifest(reference)
        refs: list[str] = []
        for text in new_tags:
            if _is_bare_tag(text):
                src.put_manifest(top.data, top.media_type, text)
                refs.append(f"{src.label}:{text}")
                continue
            dst, dloc = ends.destination(text)
            if not isinstance(dst, RegistryEnd) or dst.registry != src.registry:
                raise UsageError(
                    f"cannot tag {text!r}: a new tag must be in the same registry ({src.registry})",
                    hint="use `barge copy` to copy between registries",
                )
            assert dloc.ref is not None
            t = dloc.ref.tag or "latest"
            copier.copy_manifest(src, dst, top, t)
            refs.append(f"{dst.label}:{t}")
        return TagResult(top.digest, refs, copier.stats)
    finally:
        ends.close()


def iter_blobs(manifest: Manifest) -> Iterator[Descriptor]:
    """The config and layers of an image manifest."""
    im = manifest.image()
    yield im.config
    yield from im.layers


__all__ = [
    "ArchiveWriteEnd",
    "CopiedImage",
    "CopyOptions",
    "CopyResult",
    "Copier",
    "Ends",
    "TagResult",
    "copy",
    "put_child_manifest",
    "tag",
]
