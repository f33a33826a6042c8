"""The local VM as a source: the encoding edge of the pipeline.

A local VM has no blobs until its disks are encoded. :func:`encode_vm` drives one
:class:`ImageWriter` (barge's format, :mod:`barge.transfer.write_barge`, or Tart's,
:mod:`barge.transfer.write_tart`) over the VM's disks and settles every blob it produces at
every destination through the pipeline's :class:`~barge.transfer.pipeline.Sender`:

1. the writer cuts the disks into chunks (its own sizing rule, within the destinations' layer
   cap, decided before any upload);
2. each chunk's digests come from the *file-state cache* when the disk file is unchanged since
   it was last pushed (device, inode, size, mtime, ctime — as git's index knows; a file modified
   in the last two seconds is never trusted), else from hashing it (holes unread);
3. the writer settles each chunk (workers in parallel): a chunk the chunk index knows is asked
   for at every destination (has it? mounts it?) before anything is compressed; only what is
   missing somewhere is compressed and sent;
4. the disks must not have changed meanwhile; their chunk digests are remembered;
5. the writer's small blobs (configs, the frame index, NVRAM) are settled, then its manifest is
   put under every tag of every destination.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

from barge import cancel
from barge.disk.chunker import ChunkDigests, ChunkPlan
from barge.errors import IntegrityError, LimitError, UnsupportedError, UsageError
from barge.oci.errors import LayerLimitExceeded, RegistryResponseError
from barge.oci.types import OCI_MANIFEST
from barge.progress import Reporter, Task
from barge.store import VM, Store
from barge.transfer.end import End, OpenAt, Target
from barge.transfer.pipeline import Sender

__all__ = [
    "EncodeCounts",
    "Encoded",
    "Encoding",
    "ImageWriter",
    "LayerCap",
    "encode_vm",
    "extra_files",
]

#: What the file-state cache remembers per disk: chunk digests of one kind ("list": barge's
#: hash-list digests; "content": plain sha256 of the chunk, as Tart's format needs).
FILE_STATE_KEY = "chunks:v2:{kind}:{chunk}:{frame}"
#: Files of a cached image that describe it rather than belong to the VM.
CACHE_METADATA = frozenset({"config.json", "manifest.json", "index.json"})


@dataclass
class EncodeCounts:
    """What encoding a VM took (besides what the Sender counts)."""

    chunks: int = 0
    zero_chunks: int = 0
    compressed_chunks: int = 0
    hashed_bytes: int = 0
    unchanged_disks: int = 0


@dataclass(frozen=True)
class LayerCap:
    """The most layers the destinations take, and who says so (``--max-layers``, or the
    known cap of a registry)."""

    limit: int | None
    source: str = ""


@dataclass
class Encoding:
    """What a writer works with while it settles chunks: shared by the worker threads."""

    store: Store
    vm: VM
    targets: list[Target]
    sender: Sender
    task: Task
    lease_id: str
    note: Callable[[str], None]
    counts: EncodeCounts = field(default_factory=EncodeCounts)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ends(self) -> list[End]:
        return [t.end for t in self.targets]

    def count(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self.counts, k, getattr(self.counts, k) + v)


@dataclass
class Encoded:
    """A writer's finished image: its small blobs (settled before the manifest) and manifest."""

    blobs: list[Any]  # barge.image.Blob: media_type, data, descriptor
    manifest: bytes
    layers: int
    chunk_size: int


class ImageWriter(Protocol):
    """One image format's encoder (barge's, Tart's)."""

    format: str
    digest_kind: str  # the file-state cache's kind of chunk digests ("list", "content")
    frame_size: int  # the frame grid chunks are hashed on

    def plan(self, vm: VM, cap: LayerCap, note: Callable[[str], None]) -> list[ChunkPlan]:
        """Cut the disks into chunks (before any upload); may refuse the VM."""
        ...

    @property
    def task_label(self) -> str: ...

    def start(self, enc: Encoding) -> None:
        """Called once, before any chunk is settled."""
        ...

    def regular(self) -> int | None:
        """The chunk size when every chunk is at ``i * chunk_size`` (the file-state cache keys
        digests so), else None (nothing is looked up or remembered)."""
        ...

    def chunk(
        self, enc: Encoding, fd: int, plan: ChunkPlan, known: ChunkDigests | None
    ) -> tuple[ChunkDigests, Any]:
        """Settle one chunk at every destination; (its digests, what :meth:`finish` needs)."""
        ...

    def finish(self, enc: Encoding, results: list[tuple[ChunkPlan, ChunkDigests, Any]]) -> Encoded:
        """The small blobs and the manifest, from every chunk's result (in disk order)."""
        ...

    def refused(self, end: End, e: LayerLimitExceeded, layers: int) -> LimitError:
        """What to say when a destination refuses the manifest for its layer count."""
        ...


def extra_files(vm: VM) -> list[str]:
    """The VM's files that are neither disks, its config, nor a cached image's metadata."""
    disks = {d.name for d in vm.config.disks}
    out = []
    for name in sorted(os.listdir(vm.path)):
        p = vm.path / name
        if name in disks or name in CACHE_METADATA or name.startswith(".") or not p.is_file():
            continue
        out.append(name)
    return out


def _known_digests(
    store: Store, vm: VM, chunk_size: int, frame_size: int, kind: str, enc: Encoding
) -> dict[tuple[str, int], ChunkDigests]:
    out: dict[tuple[str, int], ChunkDigests] = {}
    key = FILE_STATE_KEY.format(kind=kind, chunk=chunk_size, frame=frame_size)
    for d in vm.config.disks:
        value = store.catalog.get_file_state(str(vm.disk_path(d.name)), key)
        if value is None:
            continue
        try:
            rows = json.loads(value)
            for i, (udigest, frames) in enumerate(rows):
                out[(d.name, i * chunk_size)] = ChunkDigests(
                    udigest, tuple((str(fd), bool(z)) for fd, z in frames)
                )
        except (ValueError, TypeError):
            continue
        enc.count(unchanged_disks=1)
    return out


def _remember_digests(
    store: Store,
    vm: VM,
    key: str,
    digests: dict[str, list[list[Any]]],
    stats: dict[str, os.stat_result],
) -> None:
    for name, rows in digests.items():
        store.catalog.put_file_state(
            str(vm.disk_path(name)), key, json.dumps(rows, separators=(",", ":")), stats[name]
        )


def _changed(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns) != (b.st_size, b.st_mtime_ns, b.st_ctime_ns)


def encode_vm(
    store: Store,
    vm: VM,
    writer: ImageWriter,
    targets: list[Target],
    sender: Sender,
    *,
    cap: LayerCap,
    concurrency: int,
    reporter: Reporter,
    note: Callable[[str], None],
    lease_id: str,
    on_plan: Callable[[int], None],
    on_chunk: Callable[[int], None],
) -> tuple[str, Encoded, list[str], EncodeCounts]:
    """Encode ``vm`` with ``writer`` and put the image at every target: (its manifest digest,
    the encoded image, the references made, what encoding took). ``on_plan(chunks)`` says how
    many chunks there are; ``on_chunk(length)`` is called (from the worker threads) as each
    chunk is at every destination (what an interrupt keeps)."""
    plans = writer.plan(vm, cap, note)
    on_plan(len(plans))
    total = sum(p.length for p in plans)
    # every frame's progress is a cancellation check
    task = cancel.checked(reporter.task(writer.task_label, total))
    enc = Encoding(store, vm, targets, sender, task, lease_id, note)
    enc.counts.chunks = len(plans)
    writer.start(enc)
    regular = writer.regular()
    known = (
        _known_digests(store, vm, regular, writer.frame_size, writer.digest_kind, enc)
        if regular is not None
        else {}
    )
    disks = {d.name: d.size for d in vm.config.disks}
    fds = {name: os.open(vm.disk_path(name), os.O_RDONLY) for name in disks}
    before = {name: os.fstat(fd) for name, fd in fds.items()}
    for name, st in before.items():
        if st.st_size != disks[name]:
            for fd in fds.values():
                os.close(fd)
            raise IntegrityError(
                f"disk {name!r} of {vm.name!r} is {st.st_size} bytes; its config says {disks[name]}"
            )
    rows: dict[str, list[list[Any]]] = {name: [] for name in disks}
    results: list[tuple[ChunkPlan, ChunkDigests, Any]] = []
    try:

        def work(plan: ChunkPlan) -> tuple[ChunkPlan, ChunkDigests, Any]:
            digests, result = writer.chunk(
                enc, fds[plan.disk], plan, known.get((plan.disk, plan.offset))
            )
            on_chunk(plan.length)
            return plan, digests, result

        for plan, digests, result in cancel.parallel(work, plans, max(1, concurrency), name="push"):
            rows[plan.disk].append([digests.udigest, [[d, z] for d, z in digests.frames]])
            results.append((plan, digests, result))
        for name, fd in fds.items():
            if _changed(before[name], os.fstat(fd)):
                raise UsageError(
                    f"disk {name!r} of {vm.name!r} changed while it was being pushed; "
                    "stop whatever writes it and push again"
                )
    finally:
        if not cancel.abandoned():  # a worker still running may read through them
            for fd in fds.values():
                os.close(fd)
    if regular is not None:
        key = FILE_STATE_KEY.format(kind=writer.digest_kind, chunk=regular, frame=writer.frame_size)
        _remember_digests(store, vm, key, rows, before)
    image = writer.finish(enc, results)
    for blob in image.blobs:
        data = blob.data
        sender.send(blob.descriptor, _bytes_at(data), enc.ends)
    digest = ""
    refs: list[str] = []
    for t in targets:
        tags: list[str | None] = [*t.tags] or [None]  # no tag: by digest only (for an index)
        for tag in tags:
            try:
                digest = t.end.put_manifest(image.manifest, OCI_MANIFEST, tag)
            except LayerLimitExceeded as e:
                raise writer.refused(t.end, e, image.layers) from None
            except RegistryResponseError as e:
                if not _refused_content(e):
                    raise
                types = sorted({d["mediaType"] for d in json.loads(image.manifest)["layers"]})
                raise UnsupportedError(
                    f"{t.end.label} refused the manifest ({e.message}); it carries layer "
                    f"media types {', '.join(types)} and dev.barge.* annotations",
                    hint="the registry may allow-list media types (Harbor, Artifactory and "
                    "Nexus can): allow these, or push elsewhere",
                ) from None
            refs.append(f"{t.end.label}:{tag}" if tag else f"{t.end.label}@{digest}")
    return digest, image, refs, enc.counts


def _bytes_at(data: bytes) -> OpenAt:
    def open_at(off: int) -> BinaryIO:
        f = io.BytesIO(data)
        f.seek(off)
        return f

    return open_at


def _refused_content(e: RegistryResponseError) -> bool:
    """A registry saying it will not take this kind of manifest (not a transient failure)."""
    return e.status in (400, 415, 422) or e.code in ("MANIFEST_INVALID", "UNSUPPORTED")
