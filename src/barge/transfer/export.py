"""Export and import: a local VM or an image to an OCI image layout, and back.

``export`` of a local VM is the push pipeline with a layout end as the destination (a directory,
or an archive whose members are added one at a time from the push spool, so a 20 GiB sparse VM
needs no 20 GiB of temporary space); ``export`` of a reference is a copy to the layout.
``import`` is a pull with a layout as the source, then a clone into a local VM; the cache keeps
no reference to the layout afterwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from barge.disk.codec import DEFAULT_CODEC
from barge.disk.sizing import DEFAULT_FRAME_SIZE
from barge.errors import BargeError
from barge.progress import Reporter
from barge.reference import parse_location
from barge.store import Store
from barge.transfer.clone import clone_image
from barge.transfer.copy import CopyOptions, copy
from barge.transfer.end import Target
from barge.transfer.open import is_vm_name, layout_text
from barge.transfer.pull import PullOptions
from barge.transfer.push import Pushing, PushOptions

__all__ = ["ExportOptions", "ExportResult", "ImportResult", "export_image", "import_image"]


@dataclass
class ExportOptions:
    """Options of :func:`export_image`."""

    platform: str | None = None
    """An image's ``OS/ARCH`` to export from a multi-platform index."""
    codec: str | None = None
    """A local VM's frame codec (default ``zstd:1``)."""
    chunk_size: int | None = None
    """A local VM's disk bytes per layer."""
    frame_size: int | None = None
    concurrency: int = 4
    insecure: bool = False


@dataclass
class ExportResult:
    """Where an export put the image, its digest, and what it took."""

    source: str
    destination: str
    """``oci:DIR:tag`` / ``oci-archive:FILE:tag``."""
    digest: str
    copied_blobs: int | None = None  # an image: what the copy sent
    copied_bytes: int | None = None
    layers: int | None = None  # a local VM: what the push wrote
    chunk_size: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source,
            "destination": self.destination,
            "digest": self.digest,
        }
        if self.layers is None:
            out.update(copiedBlobs=self.copied_blobs, copiedBytes=self.copied_bytes)
        else:
            out.update(layers=self.layers, chunkSize=self.chunk_size)
        return out


@dataclass
class ImportResult:
    """The local VM an import made, from which layout and image."""

    source: str
    digest: str
    format: str
    name: str

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "digest": self.digest,
            "format": self.format,
            "name": self.name,
        }


def export_image(
    store: Store,
    source: str,
    path: str,
    opts: ExportOptions | None = None,
    reporter: Reporter | None = None,
) -> ExportResult:
    """Write ``source`` (a local VM name or an image reference) as an OCI layout at ``path``
    (``oci:DIR[:tag]``, ``oci-archive:FILE[:tag]``, a ``.tar`` file or a directory)."""
    opts = opts or ExportOptions()
    if not is_vm_name(source):
        res = copy(
            store,
            source,
            layout_text(path),
            CopyOptions(
                concurrency=opts.concurrency, insecure=opts.insecure, platform=opts.platform
            ),
            reporter,
        )
        img = res.images[0]
        return ExportResult(
            source,
            img.destination.rsplit("@", 1)[0],
            img.digest,
            copied_blobs=res.stats.copied_blobs,
            copied_bytes=res.stats.copied_bytes,
        )
    popts = PushOptions(
        codec=opts.codec or DEFAULT_CODEC,
        chunk_size=opts.chunk_size,
        frame_size=opts.frame_size or DEFAULT_FRAME_SIZE,
        concurrency=opts.concurrency,
    )
    with Pushing(store, popts, reporter) as run:
        dest = run.ends.open(path, "destination", "export-vm")
        assert dest.tag is not None
        pushed = run.push(source, [Target(dest.end, [dest.tag])])
        return ExportResult(
            source,
            f"{dest.ref.scheme}:{dest.ref.path}:{dest.tag}",
            pushed.digest,
            layers=pushed.layers,
            chunk_size=pushed.chunk_size,
        )


def import_image(
    store: Store,
    path: str,
    name: str,
    platform: str | None = None,
    concurrency: int = 4,
    reporter: Reporter | None = None,
) -> ImportResult:
    """Make local VM ``name`` from the OCI layout at ``path`` (verified while decoded)."""
    text = layout_text(path)
    scheme, where, _ = parse_location(text).cache_key()
    cat = store.catalog
    ok = False
    try:
        res, _cloned = clone_image(
            store,
            text,
            name,
            PullOptions(concurrency=concurrency, platform=platform),
            reporter,
            verb="import",
        )
        ok = True
    finally:
        # the pull was only the way in: keep no cache reference to the layout, also when the
        # clone failed (an image that was cached before stays, under its own references)
        dropped: set[str] = set()
        for r in cat.refs():
            if r.registry == scheme and r.repository == where:
                cat.remove_ref(r.registry, r.repository, r.tag, r.digest)
                dropped.add(r.digest)
        if ok and res.up_to_date:
            dropped.discard(res.digest)
        elif ok:
            dropped.add(res.digest)
        orphans = {d for d in dropped if not cat.refs(d)}
        if orphans:  # resumable work of other pulls in tmp/ stays (only prune removes it)
            if ok:
                store.gc(only=orphans, clean_tmp=False)
            else:  # the clone's error is the one to report
                with contextlib.suppress(BargeError, OSError):
                    store.gc(only=orphans, clean_tmp=False)
    return ImportResult(text, res.digest, res.format, name)
