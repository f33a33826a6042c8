"""Push: copy a local VM to one or more registry references (or an OCI layout).

This is the copy pipeline with a local VM as the source: the disk codec encodes at the edge,
and every blob goes through one rule, *never send a byte the destination has*:

1. hash the chunk (cheap, holes unread) — or skip even that when the disk file is unchanged
   since the last push (device, inode, size, mtime, ctime, as git's index knows);
2. look the uncompressed digest up in the chunk index: a known chunk's compressed blob is asked
   for at the destination (HEAD), then mounted from a repository of the same registry known to
   hold it; only if both fail is it compressed and uploaded.

The chunk size is decided before any upload, from the registry's layer cap.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from barge import cancel
from barge.disk.chunker import (
    ChunkDigests,
    ChunkPlan,
    EncodedChunk,
    EncodeStream,
    encode_chunk,
    hash_chunk,
    iter_encoded_chunk,
    plan_chunks,
)
from barge.disk.codec import DEFAULT_CODEC, Codec, parse_codec
from barge.disk.index import (
    INDEX_MEDIA_TYPE,
    ChunkMeta,
    FrameIndex,
    FrameInfo,
    chunk_digest,
    chunk_media_type,
    zero_digest,
)
from barge.disk.sizing import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_FRAME_SIZE,
    choose_chunk_size,
)
from barge.disk.sparse import data_extents
from barge.endpoints import End, LayoutEnd, RegistryEnd, parse_location
from barge.errors import Interrupted, LimitError, NoSpaceError, UnsupportedError, UsageError
from barge.image import (
    FILE_MEDIA_TYPE,
    FILE_NAME_ANNOTATION,
    VM_CONFIG_MEDIA_TYPE,
    Blob,
    build_manifest,
    oci_config,
)
from barge.oci.client import RegistryClient, labelled
from barge.oci.errors import LayerLimitExceeded, RegistryResponseError
from barge.oci.types import OCI_MANIFEST
from barge.progress import NullReporter, Reporter
from barge.store import VM, Store
from barge.store.catalog import ChunkRow
from barge.store.space import is_no_space
from barge.units import format_size

# what the file-state cache remembers per disk: chunk digests of one kind ("list": barge's
# hash-list digests; "content": plain sha256 of the chunk, as Tart's format needs)
FILE_STATE_KEY = "chunks:v2:{kind}:{chunk}:{frame}"
FRAME_WORKERS = 2  # threads compressing the frames of one chunk (the codecs release the GIL)


@dataclass
class PushOptions:
    codec: str = DEFAULT_CODEC
    chunk_size: int | None = None
    frame_size: int = DEFAULT_FRAME_SIZE
    max_layers: int | None = None
    upload_chunk_size: int | None = None  # None: the per-host default
    monolithic: bool = False  # force monolithic uploads whatever the host table says
    concurrency: int = 2
    labels: dict[str, str] = field(default_factory=dict)
    insecure: bool = False
    format: str = "barge"  # "barge" or "tart" (barge.tartpush)
    #: Tart format only: push a zero-filled NVRAM when the VM has no nvram.bin (see tartpush)
    placeholder_nvram: bool = False


@dataclass
class PushStats:
    chunks: int = 0
    zero_chunks: int = 0
    uploaded_blobs: int = 0
    uploaded_bytes: int = 0
    existing_blobs: int = 0
    mounted_blobs: int = 0
    compressed_chunks: int = 0
    hashed_bytes: int = 0
    unchanged_disks: int = 0


@dataclass
class PushResult:
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


@dataclass
class _Target:
    end: End
    tags: list[str]


class Pusher:
    def __init__(self, store: Store, opts: PushOptions, reporter: Reporter | None = None) -> None:
        self.store = store
        self.opts = opts
        self.reporter = reporter or NullReporter()
        self.codec: Codec = parse_codec(opts.codec)
        self.stats = PushStats()
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self._clients: dict[str, RegistryClient] = {}
        self._lease_id = ""
        self._chunks_done = 0  # chunks the destinations hold (what an interrupt keeps)
        self._bytes_done = 0
        self._chunks_total = 0

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self.reporter.note(msg)

    def close(self) -> None:
        for c in self._clients.values():
            c.close()

    # -- targets ---------------------------------------------------------------------------
    def _client(self, registry: str) -> RegistryClient:
        if registry not in self._clients:
            self._clients[registry] = RegistryClient(
                registry, insecure=self.opts.insecure, home=self.store.home
            )
        return self._clients[registry]

    def targets(self, texts: list[str]) -> list[_Target]:
        if not texts:
            raise UsageError("give at least one destination reference")
        by_end: dict[str, _Target] = {}
        for text in texts:
            loc = parse_location(text, allow_vm=False)
            if loc.kind == "registry":
                assert loc.ref is not None
                ref = loc.ref
                if ref.digest:
                    raise UsageError(
                        f"cannot push to {text!r}: a digest names existing content; give a tag"
                    )
                if ref.tag is None:
                    ref = ref.with_tag("latest")
                    self.note(f"no tag given in {text!r}: pushing {ref}")
                key = f"{ref.registry}/{ref.repository}"
                if key not in by_end:
                    upload_chunk = self.opts.upload_chunk_size
                    if upload_chunk is None and not self.opts.monolithic:
                        upload_chunk = self._client(ref.registry).settings.upload_chunk_size
                    end = RegistryEnd(
                        self.store,
                        self._client(ref.registry),
                        ref,
                        upload_chunk_size=upload_chunk,
                    )
                    by_end[key] = _Target(end, [])
                assert ref.tag is not None
                if ref.tag not in by_end[key].tags:
                    by_end[key].tags.append(ref.tag)
            elif loc.kind == "oci":
                assert loc.path is not None
                key = f"oci:{loc.path}"
                if key not in by_end:
                    by_end[key] = _Target(LayoutEnd(loc.path, loc.tag, create=True), [])
                by_end[key].tags.append(loc.tag or "latest")
            else:
                raise UsageError(f"cannot push to {text!r}: use a registry reference or oci:PATH")
        # ends on one registry next to each other: the first uploads, the others mount
        return sorted(by_end.values(), key=lambda t: t.end.label)

    def layer_cap(self, targets: list[_Target]) -> tuple[int | None, str]:
        if self.opts.max_layers is not None:
            return self.opts.max_layers, "--max-layers"
        caps = []
        for t in targets:
            if isinstance(t.end, RegistryEnd):
                cap = t.end.client.settings.layer_limit
                if cap is not None:
                    caps.append((cap, t.end.registry))
        if not caps:
            return None, ""
        cap, host = min(caps)
        return cap, f"the known cap of {host}"

    # -- the pipeline ----------------------------------------------------------------------
    def push(self, vm_name: str, destinations: list[str]) -> PushResult:
        targets = self.targets(destinations)
        with self.store.lock_vm(vm_name, shared=True), self.store.lease("push") as lease_id:
            vm = self.store.get_vm(vm_name)
            return self._push(vm, targets, lease_id)

    def push_to_ends(self, vm_name: str, ends: list[tuple[End, list[str]]]) -> PushResult:
        """Push to ends the caller opened (e.g. an OCI archive being written). An end with no
        tags gets the manifest by digest only (an image index names it)."""
        targets = [_Target(end, list(tags)) for end, tags in ends]
        with self.store.lock_vm(vm_name, shared=True), self.store.lease("push") as lease_id:
            vm = self.store.get_vm(vm_name)
            return self._push(vm, targets, lease_id)

    def push_untagged(self, vm_name: str, destination: str) -> PushResult:
        """Push one VM to ``destination``'s repository, its manifest by digest only (no tag):
        the building block of a multi-platform image index."""
        return self.push_to_ends(vm_name, [(t.end, []) for t in self.targets([destination])])

    def _push(self, vm: VM, targets: list[_Target], lease_id: str) -> PushResult:
        try:
            if self.opts.format == "tart":
                from barge.tartpush import push_tart

                return push_tart(self, vm, targets, lease_id)
            return self._push_barge(vm, targets, lease_id)
        except Exception as e:
            if isinstance(e, Interrupted) or cancel.requested():
                raise Interrupted(self.kept_message(targets)) from e
            raise

    def chunk_done(self, length: int) -> None:
        """One chunk is at every destination (uploaded, found or mounted)."""
        with self._lock:
            self._chunks_done += 1
            self._bytes_done += length

    def kept_message(self, targets: list[_Target]) -> str:
        """What an interrupted push leaves for the next run."""
        kinds = {type(t.end) for t in targets}
        if not kinds <= {RegistryEnd, LayoutEnd}:  # an archive being written is removed
            return "interrupted: nothing was kept; run the same command to start again"
        if not self._chunks_done:
            return "interrupted: no chunk was complete yet; run the same command to push again"
        where = "in the registry" if kinds == {RegistryEnd} else "at the destination"
        return (
            f"interrupted: {self._chunks_done} of {self._chunks_total} chunks "
            f"({format_size(self._bytes_done)} of disk) are {where} and in the chunk index; "
            "run the same command to resume (they are not sent again)"
        )

    def _push_barge(self, vm: VM, targets: list[_Target], lease_id: str) -> PushResult:
        cfg = vm.config
        if self.opts.format != "barge":
            raise UsageError(f"unknown image format {self.opts.format!r}: use barge or tart")
        origin = (cfg.source or {}).get("format")
        if origin in ("tart", "vetu"):
            self.note(
                f"converting a {origin.capitalize()} image to barge's format: new layers with "
                "offsets and a frame index"
            )
        disks = {d.name: d.size for d in cfg.disks}
        files = self._extra_files(vm)
        other_layers = 2 + len(files)
        cap, cap_source = self.layer_cap(targets)
        fs = self.opts.frame_size
        decision = choose_chunk_size(
            disks,
            default_chunk=self.opts.chunk_size or DEFAULT_CHUNK_SIZE,
            frame_size=fs,
            max_layers=cap,
            other_layers=other_layers,
        )
        if decision.reason:
            self.note(f"{decision.reason} ({cap_source})")
        chunk_size = decision.chunk_size
        plans = [
            p
            for name, size in disks.items()
            for p in plan_chunks(name, size, chunk_size, frame_size=fs)
        ]
        self.stats.chunks = self._chunks_total = len(plans)
        total = sum(p.length for p in plans)
        # every frame's progress is a cancellation check
        task = cancel.checked(self.reporter.task(f"pushing {vm.name}", total))
        known = self._known_digests(vm, chunk_size, fs)
        prehash = self._worth_prehashing()
        spool = self.store.tmp_dir
        self._lease_id = lease_id

        fds = {name: os.open(vm.disk_path(name), os.O_RDONLY) for name in disks}
        stats_before = {name: os.fstat(fd) for name, fd in fds.items()}
        metas: list[ChunkMeta] = []
        digests_by_disk: dict[str, list[list[Any]]] = {name: [] for name in disks}
        # "chunk 3/40 of disk.img" in a network error's message
        nth = {(p.disk, p.offset): i for i, p in enumerate(plans, 1)}
        try:

            def work(plan: ChunkPlan) -> tuple[ChunkPlan, ChunkDigests, ChunkMeta | None]:
                with labelled(f"chunk {nth[(plan.disk, plan.offset)]}/{len(nth)} of {plan.disk}"):
                    done = one(plan)
                self.chunk_done(plan.length)
                return done

            def one(plan: ChunkPlan) -> tuple[ChunkPlan, ChunkDigests, ChunkMeta | None]:
                fd = fds[plan.disk]
                kd = known.get((plan.disk, plan.offset))
                if kd is None and not prehash and not _has_data(fd, plan):
                    kd = _zero_digests(plan, fs)  # holes only: nothing to read or hash
                if kd is None and not prehash:
                    # nothing is known yet, so no lookup can hit: encode and upload in one
                    # pass instead of hashing first
                    meta, digests = self._stream_chunk(fd, plan, targets, spool, task)
                    with self._lock:
                        self.stats.hashed_bytes += plan.length
                    return plan, digests, meta
                digests = kd if kd is not None else hash_chunk(fd, plan, fs)
                if kd is None:
                    with self._lock:
                        self.stats.hashed_bytes += plan.length
                if digests.all_zero:
                    with self._lock:
                        self.stats.zero_chunks += 1
                    task.advance(plan.length)
                    return plan, digests, None
                meta = self._ensure_chunk(fd, plan, digests, targets, spool, task)
                return plan, digests, meta

            workers = max(1, self.opts.concurrency)
            for plan, digests, meta in cancel.parallel(work, plans, workers, name="push"):
                digests_by_disk[plan.disk].append(
                    [digests.udigest, [[d, z] for d, z in digests.frames]]
                )
                if meta is not None:
                    metas.append(meta)
            for name, fd in fds.items():
                if _changed(stats_before[name], os.fstat(fd)):
                    raise UsageError(
                        f"disk {name!r} of {vm.name!r} changed while it was being pushed; "
                        "stop whatever writes it and push again"
                    )
        finally:
            if not cancel.abandoned():  # a worker still running may read through them
                for fd in fds.values():
                    os.close(fd)
        self._remember_digests(vm, chunk_size, fs, digests_by_disk, stats_before)

        index = FrameIndex.build(disks, metas, frame_size=fs)
        index_blob = Blob(INDEX_MEDIA_TYPE, index.to_bytes())
        vm_blob = Blob(VM_CONFIG_MEDIA_TYPE, cfg.to_bytes())
        config_blob = oci_config(cfg, self.opts.labels)
        manifest = build_manifest(config_blob, vm_blob, index_blob, files, metas)
        layers = len(metas) + other_layers
        for blob in (config_blob, vm_blob, index_blob, *files):
            for t in targets:
                self._ensure_small(t.end, blob)
        digest = ""
        refs: list[str] = []
        for t in targets:
            tags: list[str | None] = list(t.tags) or [None]
            for tag in tags:
                try:
                    digest = t.end.put_manifest(manifest, OCI_MANIFEST, tag)
                except LayerLimitExceeded as e:
                    limit = f" (its limit: {e.limit})" if e.limit else ""
                    suggestion = e.limit if e.limit else max(1, layers - 1)
                    raise LimitError(
                        f"{t.end.label} refused the manifest: {layers} layers is over its "
                        f"layer limit{limit}",
                        hint=f"push again with --max-layers {suggestion} (barge then picks a "
                        "larger chunk size before uploading)",
                    ) from None
                except RegistryResponseError as e:
                    if not _refused_content(e):
                        raise
                    types = sorted({d["mediaType"] for d in json.loads(manifest)["layers"]})
                    raise UnsupportedError(
                        f"{t.end.label} refused the manifest ({e.message}); it carries layer "
                        f"media types {', '.join(types)} and dev.barge.* annotations",
                        hint="the registry may allow-list media types (Harbor, Artifactory and "
                        "Nexus can): allow these, or push elsewhere",
                    ) from None
                refs.append(f"{t.end.label}:{tag}" if tag else f"{t.end.label}@{digest}")
        return PushResult(digest, len(manifest), refs, chunk_size, layers, self.stats, self.notes)

    # -- blobs -----------------------------------------------------------------------------
    def _ensure(
        self,
        end: End,
        digest: str,
        size: int,
        open_at: Callable[[int], BinaryIO] | None,
        progress: Callable[[int], None] | None = None,
    ) -> bool:
        """Make ``end`` hold the blob. False when it needs bytes and ``open_at`` is None."""
        if end.has_blob(digest) is not None:
            with self._lock:
                self.stats.existing_blobs += 1
            return True
        if end.try_mount(digest, size):
            with self._lock:
                self.stats.mounted_blobs += 1
            return True
        if open_at is None:
            return False
        end.put_blob(digest, size, open_at, _checking(progress))
        with self._lock:
            self.stats.uploaded_blobs += 1
            self.stats.uploaded_bytes += size
        return True

    def _ensure_small(self, end: End, blob: Blob) -> None:
        data = blob.data

        def open_at(off: int) -> BinaryIO:
            f = io.BytesIO(data)
            f.seek(off)
            return f

        self._ensure(end, blob.digest, len(data), open_at)

    def _ensure_chunk(
        self,
        fd: int,
        plan: ChunkPlan,
        digests: ChunkDigests,
        targets: list[_Target],
        spool_dir: Path,
        task: Any,
    ) -> ChunkMeta:
        media_type = chunk_media_type(self.codec.name)
        cat = self.store.catalog
        row = cat.find_chunk(digests.udigest, self.codec.name, self.opts.frame_size, media_type)
        if row is not None and len(row.frames) == len(digests.frames):
            meta = _meta_from_row(plan, row, digests)
            if all(self._ensure(t.end, meta.digest, meta.size, None) for t in targets):
                task.advance(plan.length)
                return meta
        return self._encode_and_send(fd, plan, digests, targets, spool_dir, task)[0]

    def _stream_chunk(
        self, fd: int, plan: ChunkPlan, targets: list[_Target], spool_dir: Path, task: Any
    ) -> tuple[ChunkMeta | None, ChunkDigests]:
        meta, enc = self._encode_and_send(fd, plan, None, targets, spool_dir, task)
        digests = ChunkDigests(enc.udigest, tuple((f.digest, f.zero) for f in enc.frames))
        if enc.all_zero:
            with self._lock:
                self.stats.zero_chunks += 1
            return None, digests
        return meta, digests

    def _encode_and_send(
        self,
        fd: int,
        plan: ChunkPlan,
        digests: ChunkDigests | None,
        targets: list[_Target],
        spool_dir: Path,
        task: Any,
    ) -> tuple[ChunkMeta, EncodedChunk]:
        """Compress a chunk and send it where it is missing. With one registry as the
        destination the compressed frames stream straight into the upload (compression and
        sending overlap, nothing is spooled); otherwise they are spooled to a temp file once
        and uploaded from it to each destination."""
        media_type = chunk_media_type(self.codec.name)
        fs = self.opts.frame_size
        first = targets[0].end
        streaming = isinstance(first, RegistryEnd) and all(
            isinstance(t.end, RegistryEnd) and t.end.registry == first.registry for t in targets
        )
        if streaming:
            assert isinstance(first, RegistryEnd)
            streams: list[EncodeStream] = []
            advanced = [0]  # progress of this chunk, undone if the upload restarts

            def on_frame(n: int) -> None:
                advanced[0] += n
                task.advance(n)

            def produce() -> EncodeStream:
                if advanced[0]:
                    task.advance(-advanced[0])
                    advanced[0] = 0
                # the upload hashes the layer: the encoder need not
                st = iter_encoded_chunk(
                    fd,
                    plan,
                    fs,
                    self.codec,
                    known=digests,
                    workers=FRAME_WORKERS,
                    progress=on_frame,
                    hash_layer=False,
                )
                streams.append(st)
                return st

            def result(digest: str) -> EncodedChunk:
                return dataclasses.replace(streams[-1].result, cdigest=digest)

            def record(digest: str, size: int) -> None:  # before the blob exists
                self._remember_chunk(result(digest), media_type)

            # the same disk file, unchanged, and the same encoding yield the same bytes: a
            # later push may continue this upload where the registry says it stands
            st = os.fstat(fd)
            key = (
                f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:"
                f"{plan.offset}+{plan.length}:{self.codec.name}:{self.codec.level}:{fs}"
            )
            digest, size = first.put_stream(produce, before_commit=record, resume_key=key)
            enc = result(digest)
            if size != enc.csize:  # pragma: no cover - a bug guard
                raise UsageError(f"encoder and upload disagree on chunk at {plan.offset}")
            with self._lock:
                self.stats.compressed_chunks += 1
                if not enc.all_zero:
                    self.stats.uploaded_blobs += 1
                    self.stats.uploaded_bytes += size
            for t in targets[1:]:  # same registry: mounts, or streamed again if refused
                if not self._ensure(t.end, enc.cdigest, enc.csize, None):
                    assert isinstance(t.end, RegistryEnd)
                    again, _ = t.end.put_stream(produce)
                    if again != enc.cdigest:  # pragma: no cover - the encoder is deterministic
                        raise UsageError(f"chunk at {plan.offset} encoded differently twice")
                    with self._lock:
                        self.stats.uploaded_blobs += 1
                        self.stats.uploaded_bytes += enc.csize
            return enc.meta, enc
        # compress into a spool file (bounded memory), then upload from it
        spool = spool_dir / f"push-{os.getpid()}-{threading.get_ident()}-{plan.offset}.layer"
        self.store.catalog.lease_add(self._lease_id, "path", [spool.name])
        try:
            try:
                with open(spool, "wb+") as out:
                    enc = encode_chunk(
                        fd,
                        plan,
                        fs,
                        self.codec,
                        out,
                        known=digests,
                        workers=FRAME_WORKERS,
                        progress=task.advance,
                    )
            except OSError as e:
                if not is_no_space(e):
                    raise
                spool.unlink(missing_ok=True)
                raise NoSpaceError(
                    f"no space left in {spool_dir} for the compressed chunk at offset "
                    f"{plan.offset} of disk {plan.disk!r}: a push to several registries "
                    "compresses each chunk once into tmp/ (up to one chunk per --concurrency)",
                    hint=self.store.space_hint(None) + "; or push to one registry at a time "
                    "(then nothing is spooled)",
                ) from e
            with self._lock:
                self.stats.compressed_chunks += 1
            self._remember_chunk(enc, media_type)

            def open_at(off: int) -> BinaryIO:
                f = open(spool, "rb")  # noqa: SIM115 - the uploader closes it
                f.seek(off)
                return f

            if not enc.all_zero:
                for t in targets:
                    self._ensure(t.end, enc.cdigest, enc.csize, open_at)
            return enc.meta, enc
        finally:
            spool.unlink(missing_ok=True)

    def _remember_chunk(self, enc: EncodedChunk, media_type: str) -> None:
        if enc.all_zero:
            return
        meta = enc.meta
        self.store.catalog.put_chunk(
            ChunkRow(
                meta.udigest,
                self.codec.name,
                self.opts.frame_size,
                media_type,
                meta.digest,
                meta.size,
                [[f.csize, f.digest.removeprefix("sha256:")] for f in meta.frames],
            )
        )

    def _worth_prehashing(self) -> bool:
        """Hash a chunk before compressing it only when the lookup can hit: when the chunk index
        knows any chunk at all. On a store that never pushed or pulled anything, every chunk is
        encoded and uploaded in one streaming pass (the frame digests come out of it)."""
        return bool(self.store.catalog.query("SELECT 1 FROM chunks LIMIT 1"))

    # -- unchanged-disk fast path ----------------------------------------------------------
    def _known_digests(
        self, vm: VM, chunk_size: int, frame_size: int, kind: str = "list"
    ) -> dict[tuple[str, int], ChunkDigests]:
        out: dict[tuple[str, int], ChunkDigests] = {}
        key = FILE_STATE_KEY.format(kind=kind, chunk=chunk_size, frame=frame_size)
        for d in vm.config.disks:
            value = self.store.catalog.get_file_state(str(vm.disk_path(d.name)), key)
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
            self.stats.unchanged_disks += 1
        return out

    def _remember_digests(
        self,
        vm: VM,
        chunk_size: int,
        frame_size: int,
        digests: dict[str, list[list[Any]]],
        stats: dict[str, os.stat_result],
        kind: str = "list",
    ) -> None:
        key = FILE_STATE_KEY.format(kind=kind, chunk=chunk_size, frame=frame_size)
        for name, rows in digests.items():
            self.store.catalog.put_file_state(
                str(vm.disk_path(name)), key, json.dumps(rows, separators=(",", ":")), stats[name]
            )

    def _extra_files(self, vm: VM) -> list[Blob]:
        """Non-disk files of the VM (an NVRAM store) travel as small file layers."""
        disks = {d.name for d in vm.config.disks}
        blobs = []
        for name in sorted(os.listdir(vm.path)):
            p = vm.path / name
            if name in disks or name == "config.json" or name.startswith(".") or not p.is_file():
                continue
            if name in ("manifest.json", "index.json"):  # a cached image's metadata (clones)
                continue
            blobs.append(Blob(FILE_MEDIA_TYPE, p.read_bytes(), {FILE_NAME_ANNOTATION: name}))
        return blobs


def _checking(progress: Callable[[int], None] | None) -> Callable[[int], None]:
    """A progress callback that is also a cancellation check (uploads report every read)."""

    def report(n: int) -> None:
        cancel.check()
        if progress is not None:
            progress(n)

    return report


def _refused_content(e: RegistryResponseError) -> bool:
    """A registry saying it will not take this kind of manifest (not a transient failure)."""
    return e.status in (400, 415, 422) or e.code in (
        "MANIFEST_INVALID",
        "UNSUPPORTED",
    )


def _has_data(fd: int, plan: ChunkPlan) -> bool:
    return any(True for _ in data_extents(fd, plan.offset, plan.end))


def _zero_digests(plan: ChunkPlan, frame_size: int) -> ChunkDigests:
    frames = []
    for off in range(0, plan.length, frame_size):
        frames.append((zero_digest(min(frame_size, plan.length - off)), True))
    return ChunkDigests(chunk_digest(d for d, _ in frames), tuple(frames))


def _changed(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ctime_ns) != (b.st_size, b.st_mtime_ns, b.st_ctime_ns)


def _meta_from_row(plan: ChunkPlan, row: ChunkRow, digests: ChunkDigests) -> ChunkMeta:
    frames = []
    coff = 0
    fs = row.frame_size
    for i, ((dig, zero), rec) in enumerate(zip(digests.frames, row.frames, strict=True)):
        usize = min(fs, plan.length - i * fs)
        csize = 0 if zero else int(rec[0])
        frames.append(FrameInfo(i * fs, usize, coff, csize, dig, zero))
        coff += csize
    return ChunkMeta(
        disk=plan.disk,
        offset=plan.offset,
        length=plan.length,
        digest=row.cdigest,
        size=row.csize,
        udigest=row.udigest,
        frame_size=fs,
        codec=row.codec,
        frames=tuple(frames),
    )


def push(
    store: Store,
    vm_name: str,
    destinations: list[str],
    opts: PushOptions | None = None,
    reporter: Reporter | None = None,
) -> PushResult:
    """Push local VM ``vm_name`` to every destination (registry references or ``oci:PATH``)."""
    pusher = Pusher(store, opts or PushOptions(), reporter)
    try:
        return pusher.push(vm_name, destinations)
    finally:
        pusher.close()


__all__ = ["PushOptions", "PushResult", "Pusher", "push"]
