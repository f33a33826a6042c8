"""Push: a local VM to registry references or OCI layouts, and multi-platform indexes.

The pipeline with a local VM as the source (:func:`barge.transfer.local.encode_vm`, the
encoding edge) and barge's or Tart's writer. Destinations are grouped by repository: one
upload serves every tag of a repository, other repositories of the same registry get the blobs
by cross-repository mount, other registries get them once each. The chunk size is decided
before any upload, from the destinations' layer cap (``--max-layers``, else the smallest known
cap among them).

``push --index``: each VM is pushed with the same pipeline, its manifest by digest (no tag);
then an index naming every manifest with the VM's platform (``os`` + OCI architecture, from
its config) is put under the tag. Pull, clone and copy pick the host's platform or
``--platform``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from barge import cancel
from barge.disk.codec import DEFAULT_CODEC, parse_codec
from barge.disk.sizing import DEFAULT_FRAME_SIZE
from barge.errors import Interrupted, UnsupportedError, UsageError
from barge.oci.types import OCI_INDEX, OCI_MANIFEST, Descriptor, Index, Platform
from barge.progress import NullReporter, Reporter
from barge.store import Store
from barge.store.vmconfig import OCI_ARCH
from barge.transfer.end import Target
from barge.transfer.layout import ArchiveWriteEnd
from barge.transfer.local import EncodeCounts, ImageWriter, LayerCap, encode_vm
from barge.transfer.open import Ends, Verb
from barge.transfer.pipeline import Sender
from barge.transfer.write_barge import BargeWriter
from barge.transfer.write_tart import TartWriter
from barge.units import format_size

__all__ = ["IndexResult", "PushOptions", "PushResult", "PushStats", "Pushing", "push", "push_index"]


@dataclass
class PushOptions:
    """Options of :func:`push` (and :func:`push_index`)."""

    codec: str = DEFAULT_CODEC
    """Frame codec: ``zstd[:LEVEL]`` (default ``zstd:1``), ``lz4[:LEVEL]`` or ``none``."""
    chunk_size: int | None = None
    """Disk bytes per layer (default 512 MiB, raised to fit a layer cap)."""
    frame_size: int = DEFAULT_FRAME_SIZE
    max_layers: int | None = None
    """The destinations' layer cap, when barge does not know it."""
    upload_chunk_size: int | None = None
    """PATCH body size; None: the per-host default (monolithic where allowed)."""
    monolithic: bool = False
    """Force monolithic uploads whatever the host table says."""
    concurrency: int = 2
    labels: dict[str, str] = field(default_factory=dict)
    """Labels in the OCI config."""
    insecure: bool = False
    format: str = "barge"
    """``barge`` or ``tart`` (what Tart pulls)."""
    placeholder_nvram: bool = False
    """Tart format only: push a zero-filled NVRAM when the VM has no nvram.bin."""


@dataclass
class PushStats:
    """What a push took: chunks hashed, compressed and sent, blobs found or mounted."""

    chunks: int = 0
    zero_chunks: int = 0
    uploaded_blobs: int = 0
    uploaded_bytes: int = 0
    existing_blobs: int = 0
    mounted_blobs: int = 0
    compressed_chunks: int = 0
    hashed_bytes: int = 0
    unchanged_disks: int = 0

    @classmethod
    def of(cls, counts: EncodeCounts, sender: Sender) -> PushStats:
        s = sender.counts
        return cls(
            chunks=counts.chunks,
            zero_chunks=counts.zero_chunks,
            uploaded_blobs=s.sent_blobs,
            uploaded_bytes=s.sent_bytes,
            existing_blobs=s.present,
            mounted_blobs=s.mounted,
            compressed_chunks=counts.compressed_chunks,
            hashed_bytes=counts.hashed_bytes,
            unchanged_disks=counts.unchanged_disks,
        )


@dataclass
class PushResult:
    """What a push made (its manifest digest and size, the references) and what it took."""

    digest: str
    size: int
    references: list[str]
    chunk_size: int
    layers: int
    stats: PushStats
    notes: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "size": self.size,
            "references": self.references,
            "chunkSize": self.chunk_size,
            "layers": self.layers,
            "uploadedBlobs": self.stats.uploaded_blobs,
            "uploadedBytes": self.stats.uploaded_bytes,
            "existingBlobs": self.stats.existing_blobs,
            "mountedBlobs": self.stats.mounted_blobs,
            "compressedChunks": self.stats.compressed_chunks,
            "notes": self.notes,
        }


class Pushing:
    """One push operation: its ends (closed by :meth:`close`), notes and options."""

    def __init__(self, store: Store, opts: PushOptions, reporter: Reporter | None = None) -> None:
        self.store = store
        self.opts = opts
        self.reporter = reporter or NullReporter()
        self.notes: list[str] = []
        parse_codec(opts.codec)  # a bad --compression is refused before anything is opened
        self.ends = Ends(
            store,
            insecure=opts.insecure,
            note=self.note,
            upload_chunk_size=opts.upload_chunk_size,
            host_upload_defaults=not opts.monolithic,
        )
        self._lock = threading.Lock()
        self._chunks_done = 0  # chunks the destinations hold (what an interrupt keeps)
        self._bytes_done = 0
        self._chunks_total = 0

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self.reporter.note(msg)

    def close(self) -> None:
        self.ends.close()

    def __enter__(self) -> Pushing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def targets(self, texts: list[str], verb: Verb = "push") -> list[Target]:
        """The destinations, one per repository (or layout) with its tags; ends on one
        registry next to each other (the first uploads, the others mount)."""
        if not texts:
            raise UsageError("give at least one destination reference")
        by_end: dict[int, Target] = {}
        for text in texts:
            opened = self.ends.open(text, "destination", verb)
            assert opened.tag is not None
            t = by_end.setdefault(id(opened.end), Target(opened.end))
            if opened.tag not in t.tags:
                t.tags.append(opened.tag)
        return sorted(by_end.values(), key=lambda t: t.end.label)

    def layer_cap(self, targets: list[Target]) -> LayerCap:
        if self.opts.max_layers is not None:
            return LayerCap(self.opts.max_layers, "--max-layers")
        caps = [
            (t.end.layer_limit, t.end.registry or t.end.label)
            for t in targets
            if t.end.layer_limit is not None
        ]
        if not caps:
            return LayerCap(None)
        cap, host = min(caps)
        return LayerCap(cap, f"the known cap of {host}")

    def writer(self) -> ImageWriter:
        o = self.opts
        if o.format == "tart":
            return TartWriter(
                chunk_size=o.chunk_size, labels=o.labels, placeholder_nvram=o.placeholder_nvram
            )
        if o.format != "barge":
            raise UsageError(f"unknown image format {o.format!r}: use barge or tart")
        return BargeWriter(
            parse_codec(o.codec), chunk_size=o.chunk_size, frame_size=o.frame_size, labels=o.labels
        )

    def push(self, vm_name: str, targets: list[Target]) -> PushResult:
        """Push VM ``vm_name`` to ``targets`` (a target without tags gets the manifest by
        digest only: an image index names it)."""
        writer = self.writer()
        sender = Sender()
        self._chunks_done = self._bytes_done = 0
        with self.store.lock_vm(vm_name, shared=True), self.store.lease("push") as lease_id:
            vm = self.store.get_vm(vm_name)
            try:
                digest, image, refs, counts = encode_vm(
                    self.store,
                    vm,
                    writer,
                    targets,
                    sender,
                    cap=self.layer_cap(targets),
                    concurrency=self.opts.concurrency,
                    reporter=self.reporter,
                    note=self.note,
                    lease_id=lease_id,
                    on_chunk=self._chunk_done,
                    on_plan=self._planned,
                )
                for t in targets:
                    t.end.commit()
            except Exception as e:
                if isinstance(e, Interrupted) or cancel.requested():
                    raise Interrupted(self.kept_message(targets)) from e
                raise
        stats = PushStats.of(counts, sender)
        return PushResult(
            digest, len(image.manifest), refs, image.chunk_size, image.layers, stats, self.notes
        )

    def _planned(self, chunks: int) -> None:
        self._chunks_total = chunks

    def _chunk_done(self, length: int) -> None:
        """One chunk is at every destination (uploaded, found or mounted)."""
        with self._lock:
            self._chunks_done += 1
            self._bytes_done += length

    def kept_message(self, targets: list[Target]) -> str:
        """What an interrupted push leaves for the next run."""
        if any(isinstance(t.end, ArchiveWriteEnd) for t in targets):  # it is removed
            return "interrupted: nothing was kept; run the same command to start again"
        if not self._chunks_done:
            return "interrupted: no chunk was complete yet; run the same command to push again"
        where = (
            "in the registry"
            if all(t.end.registry is not None for t in targets)
            else "at the destination"
        )
        return (
            f"interrupted: {self._chunks_done} of {self._chunks_total} chunks "
            f"({format_size(self._bytes_done)} of disk) are {where} and in the chunk index; "
            "run the same command to resume (they are not sent again)"
        )


def push(
    store: Store,
    vm_name: str,
    destinations: list[str],
    opts: PushOptions | None = None,
    reporter: Reporter | None = None,
) -> PushResult:
    """Push local VM ``vm_name`` to every destination (registry references, ``oci:DIR``,
    ``oci-archive:FILE``)."""
    with Pushing(store, opts or PushOptions(), reporter) as run:
        return run.push(vm_name, run.targets(destinations))


# ---------------------------------------------------------------------------------------------
# multi-platform indexes


@dataclass
class IndexResult:
    """The image index a :func:`push_index` put, and each VM's push."""

    reference: str
    digest: str
    size: int
    entries: list[tuple[str, str, PushResult]] = field(default_factory=list)  # vm, platform

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "digest": self.digest,
            "size": self.size,
            "manifests": [
                {
                    "vm": vm,
                    "platform": plat,
                    "digest": r.digest,
                    "size": r.size,
                    "uploadedBlobs": r.stats.uploaded_blobs,
                    "uploadedBytes": r.stats.uploaded_bytes,
                }
                for vm, plat, r in self.entries
            ],
        }


def vm_platform(store: Store, name: str) -> Platform:
    cfg = store.get_vm(name).config
    return Platform(architecture=OCI_ARCH.get(cfg.arch, cfg.arch), os=cfg.os)


def push_index(
    store: Store,
    vm_names: list[str],
    reference: str,
    opts: PushOptions | None = None,
    reporter: Reporter | None = None,
) -> IndexResult:
    """Push every VM in ``vm_names`` and publish one image index naming them at
    ``reference`` (a registry reference; ``:latest`` when no tag is given)."""
    if opts is not None and opts.format == "tart":
        # Tart's Registry.pullManifest asks only for an OCI image manifest and decodes the
        # answer as one: a tag holding an index is one that `tart pull` cannot pull.
        raise UnsupportedError(
            "--index cannot be combined with --format tart: Tart's pull accepts only an OCI "
            "image manifest, so `tart pull` of an image index fails",
            hint="push each VM in Tart's format to its own tag (barge push NAME REF --format "
            "tart), or the index in barge's format",
        )
    if not vm_names:
        raise UsageError("give at least one VM for --index")
    if len(set(vm_names)) != len(vm_names):
        raise UsageError("a VM is named twice")
    with Pushing(store, opts or PushOptions(), reporter) as run:
        dest = run.ends.open(reference, "destination", "index")
        platforms: dict[str, str] = {}
        for name in vm_names:
            p = str(vm_platform(store, name))
            if p in platforms:
                raise UsageError(
                    f"{name!r} and {platforms[p]!r} are both {p}: an index holds one image "
                    "per platform"
                )
            platforms[p] = name
        result = IndexResult(str(dest.ref), "", 0)
        descs: list[Descriptor] = []
        for name in vm_names:
            plat = vm_platform(store, name)
            res = run.push(name, [Target(dest.end)])
            result.entries.append((name, str(plat), res))
            descs.append(Descriptor(OCI_MANIFEST, res.digest, res.size, platform=plat))
        data = Index(descs, media_type=OCI_INDEX).to_bytes()
        result.digest = dest.end.put_manifest(data, OCI_INDEX, dest.ref.tag)
        result.size = len(data)
        return result
