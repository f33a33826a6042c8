"""The one pipeline: how blobs and manifests move from a source end to destination ends.

Two rules, each written once:

* **Never send a byte a destination can do without** (:class:`Sender`). Each destination is
  asked once per blob, through its one reuse entry point
  (:meth:`~barge.transfer.end.End.try_reusing_blob`: it has the blob, or mounts it from a
  location it knows), whether it can hold the blob without its bytes; only those that cannot
  get them (:meth:`~barge.transfer.end.End.put_blob`). A blob being produced (a disk chunk
  compressed during a push) has no digest to ask about before it exists: it streams into the
  first destination, and the others are asked once it does (they can mount it then).
* **Order** (:class:`ImageCopy`): a manifest is stored only after every blob it names is at
  the destination, an index only after every manifest it names (each stored by digest), so a
  destination never names what it does not hold, and an interrupted copy leaves only whole
  blobs, which the next run finds.

The sources are stored images (a registry, a layout: :class:`ImageCopy` walks their manifests)
or a local VM, whose blobs are produced as its disks are encoded (:mod:`barge.transfer.local`);
the destinations are registries, layouts and the image cache (which decodes disks as their
blobs arrive: :mod:`barge.transfer.cache`). push, pull, copy, export, import and clone are
compositions of these (:mod:`barge.transfer.push` and the modules beside it).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from barge import cancel
from barge.errors import IntegrityError, UnsupportedError
from barge.oci.types import Descriptor, Manifest
from barge.progress import Reporter, Task
from barge.transfer.end import End, OpenAt, Produce, Progress, Reuse

__all__ = ["BlobCounts", "ImageCopy", "Sender", "image_blobs", "open_file_at"]

MAX_INDEX_DEPTH = 4  # an index of indexes of ... is refused beyond this


@dataclass
class BlobCounts:
    """What settling blobs took, summed over destinations."""

    present: int = 0  # the destination had it
    mounted: int = 0  # it took it from a location it knows
    sent_blobs: int = 0
    sent_bytes: int = 0


def checking(progress: Progress | None) -> Progress:
    """A progress callback that is also a cancellation check (uploads report every read)."""

    def report(n: int) -> None:
        cancel.check()
        if progress is not None:
            progress(n)

    return report


def open_file_at(path: Path) -> OpenAt:
    """``open_at`` over a file (a spool file): the reader closes what it is given."""

    def open_at(off: int) -> BinaryIO:
        f = open(path, "rb")  # noqa: SIM115 - the uploader closes it
        f.seek(off)
        return f

    return open_at


class Sender:
    """Settles blobs at destinations by the one rule (see the module docstring). Thread-safe.

    ``source`` is where the blobs come from (a destination may mount from it);
    ``allow_upload=False`` refuses to send bytes (``barge tag``: mounts only)."""

    def __init__(self, source: End | None = None, *, allow_upload: bool = True) -> None:
        self.source = source
        self.allow_upload = allow_upload
        self.counts = BlobCounts()
        self._lock = threading.Lock()

    def _count(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self.counts, k, getattr(self.counts, k) + v)

    # -- asking ----------------------------------------------------------------------------
    def reused(self, end: End, blob: Descriptor) -> bool:
        """Ask ``end`` once whether it can hold ``blob`` without its bytes."""
        how = end.try_reusing_blob(blob, self.source)
        if how is Reuse.PRESENT:
            self._count(present=1)
        elif how is Reuse.MOUNTED:
            self._count(mounted=1)
        return how is not None

    def first_missing(self, blob: Descriptor, ends: list[End]) -> int | None:
        """Ask the ends in order whether they can hold ``blob`` without its bytes: the index
        of the first that cannot, or None when all can. The ends after it are not asked yet:
        once it has the blob, they may mount it from there (:meth:`send`)."""
        for i, end in enumerate(ends):
            if not self.reused(end, blob):
                return i
        return None

    # -- sending ---------------------------------------------------------------------------
    def send(
        self,
        blob: Descriptor,
        open_at: OpenAt,
        ends: list[End],
        progress: Progress | None = None,
    ) -> None:
        """Settle a blob whose bytes are stored (``open_at``) at every end of ``ends``, one
        after the other: an end of a registry that got it can be mounted from by the next."""
        for end in ends:
            if not self.reused(end, blob):
                self.upload(end, blob, open_at, progress)

    def upload(
        self, end: End, blob: Descriptor, open_at: OpenAt, progress: Progress | None = None
    ) -> None:
        """Send ``blob``'s bytes to ``end`` (which could not reuse it)."""
        if not self.allow_upload:
            src = self.source.label if self.source is not None else "the source"
            raise UnsupportedError(
                f"{end.label} would not mount blob {blob.digest} from {src}",
                hint="use `barge copy`, which uploads what cannot be mounted",
            )
        end.put_blob(blob, open_at, checking(progress))
        self._count(sent_blobs=1, sent_bytes=blob.size)

    def stream(
        self,
        end: End,
        produce: Produce,
        *,
        before_commit: Callable[[str, int], None] | None = None,
        resume_key: str | None = None,
    ) -> tuple[str, int]:
        """Send a blob to ``end`` while it is produced; its (digest, size). Counted as sent
        unless it is empty (a chunk whose frames are all zeros)."""
        digest, size = end.put_stream(
            produce, checking(None), before_commit=before_commit, resume_key=resume_key
        )
        if size:
            self._count(sent_blobs=1, sent_bytes=size)
        return digest, size

    def stream_to_rest(self, blob: Descriptor, produce: Produce, ends: list[End]) -> None:
        """A blob just streamed into one end of a registry, to the other ``ends`` of that
        registry: each is asked (it can mount it now), and streamed again if it cannot."""
        for end in ends:
            if self.reused(end, blob):
                continue
            digest, _ = self.stream(end, produce)
            if digest != blob.digest:  # pragma: no cover - the encoder is deterministic
                raise IntegrityError(f"{blob.digest} was produced differently twice")


def image_blobs(manifest: Manifest) -> list[Descriptor]:
    """The distributable blobs of an image manifest (config first), each once: a foreign
    layer (Windows base layers, with ``urls``) is not copied."""
    try:
        im = manifest.image()
    except ValueError as e:
        raise IntegrityError(f"manifest {manifest.digest}: {e}") from None
    blobs: dict[str, Descriptor] = {}
    for d in (im.config, *im.layers):
        if not d.urls:
            blobs.setdefault(d.digest, d)
    return list(blobs.values())


class ImageCopy:
    """Copies a stored image (a manifest or an index, with everything it names) from one end
    to another, keeping its digest. ``task_label``: each manifest's blobs are one progress
    task (None: the destination reports its own progress, as the cache does)."""

    def __init__(
        self,
        src: End,
        dst: End,
        sender: Sender,
        reporter: Reporter,
        *,
        concurrency: int = 4,
        task_label: str | None = None,
    ) -> None:
        self.src = src
        self.dst = dst
        self.sender = sender
        self.reporter = reporter
        self.concurrency = concurrency
        self.task_label = task_label
        self.manifests = 0
        self.blobs = 0  # blobs this copy settled (each once)
        self._lock = threading.Lock()
        self._done: set[str] = set()  # digests settled at the destination
        self.blobs_total = 0  # blobs it set out to settle, and those the destination holds
        self.blobs_held = 0
        self.bytes_held = 0

    def copy(self, manifest: Manifest, tag: str | None, *, depth: int = 0) -> str:
        """Copy ``manifest`` and everything it names; store it under ``tag`` (or by digest
        when ``tag`` is None). Returns the digest, which is the source's."""
        if depth > MAX_INDEX_DEPTH:
            raise UnsupportedError(f"image indexes nested deeper than {MAX_INDEX_DEPTH} levels")
        if manifest.is_index:
            for d in manifest.index().manifests:
                child = self.src.get_manifest(d.digest)
                if child.digest != d.digest:
                    raise IntegrityError(
                        f"index {manifest.digest} names {d.digest}, {self.src.label} served "
                        f"{child.digest}"
                    )
                self.copy(child, None, depth=depth + 1)
        elif not self.dst.begin(manifest, self.src):
            self.copy_blobs(image_blobs(manifest))
        if tag is None and depth > 0:
            digest = self.dst.put_child_manifest(manifest.data, manifest.media_type)
        else:
            digest = self.dst.put_manifest(manifest.data, manifest.media_type, tag)
        if digest != manifest.digest:
            raise IntegrityError(
                f"{self.dst.label} stored manifest {manifest.digest} as {digest}: the bytes changed"
            )
        self.manifests += 1
        return digest

    def copy_blobs(self, blobs: list[Descriptor]) -> None:
        if self.dst.large_first:
            blobs = sorted(blobs, key=lambda d: -d.size)
        task = self._task(sum(d.size for d in blobs))
        workers = 1 if self.dst.serial or self.src.serial else max(1, self.concurrency)
        with self._lock:
            self.blobs_total += len(blobs)
        cancel.parallel(lambda d: self._blob(d, task), blobs, workers, name="copy")
        self.src.seen([d.digest for d in blobs])

    def _task(self, total: int) -> Task | None:
        if self.task_label is None:
            return None
        return self.reporter.task(self.task_label, total)

    def _blob(self, d: Descriptor, task: Task | None) -> None:
        with self._lock:
            done = d.digest in self._done
        if not done:
            with self._lock:
                self.blobs += 1
            src = self.src

            def open_at(off: int) -> BinaryIO:
                return src.open_blob(d.digest, off)

            while True:  # a blob that fails a check is read again from another source
                try:
                    self.sender.send(d, open_at, [self.dst])
                    break
                except IntegrityError as e:
                    if not src.reject_blob(d.digest, e):
                        raise
        if task is not None:
            task.advance(d.size)
        if done:
            return
        with self._lock:
            self._done.add(d.digest)
            self.blobs_held += 1
            self.bytes_held += d.size


def spool_path(tmp_dir: Path, what: str, offset: int) -> Path:
    """A spool file for one produced blob of this process and thread."""
    return tmp_dir / f"{what}-{os.getpid()}-{threading.get_ident()}-{offset}.layer"
