"""barge's image writer: a VM's disks as chunks of independently compressed frames.

One of the two :class:`~barge.transfer.local.ImageWriter` s (the other is Tart's). A chunk goes
through the pipeline's one rule, *never send a byte the destination has*:

1. hash the chunk (cheap, holes unread) — or skip even that when the disk file is unchanged
   since the last push, or when the store's chunk index is empty (nothing can be found: the
   chunk is encoded and uploaded in one pass and its digests come out of it);
2. look its uncompressed digest up in the chunk index: a known chunk's compressed blob is
   asked for at every destination (has it? mounts it?); only if one cannot take it so is it
   compressed and sent there.

A chunk that is compressed streams straight into the upload when every destination is on one
registry (compression and sending overlap, nothing is spooled); otherwise it is spooled to a
file in the store's ``tmp/`` once and sent from there to each destination. The chunk size is
decided before any upload, from the destinations' layer cap.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from barge.disk.codec import Codec
from barge.disk.index import (
    INDEX_MEDIA_TYPE,
    ChunkMeta,
    FrameIndex,
    FrameInfo,
    chunk_digest,
    chunk_media_type,
    zero_digest,
)
from barge.disk.sizing import DEFAULT_CHUNK_SIZE, choose_chunk_size
from barge.disk.sparse import data_extents
from barge.errors import LimitError, NoSpaceError, UsageError
from barge.image import (
    FILE_MEDIA_TYPE,
    FILE_NAME_ANNOTATION,
    VM_CONFIG_MEDIA_TYPE,
    Blob,
    build_manifest,
    oci_config,
)
from barge.oci.errors import LayerLimitExceeded
from barge.oci.types import Descriptor
from barge.store import VM
from barge.store.catalog import ChunkRow
from barge.store.space import is_no_space
from barge.transfer.end import End
from barge.transfer.local import Encoded, Encoding, LayerCap, extra_files
from barge.transfer.pipeline import open_file_at, spool_path
from barge.transfer.registry import labelled_transfer

__all__ = ["FRAME_WORKERS", "BargeWriter"]

FRAME_WORKERS = 2  # threads compressing the frames of one chunk (the codecs release the GIL)


class BargeWriter:
    """Writes barge's format (``docs/format.md``)."""

    format = "barge"
    digest_kind = "list"

    def __init__(
        self,
        codec: Codec,
        *,
        chunk_size: int | None,
        frame_size: int,
        labels: dict[str, str],
    ) -> None:
        self.codec = codec
        self.requested_chunk = chunk_size
        self.frame_size = frame_size
        self.labels = labels
        self.chunk_size = 0
        self.files: list[Blob] = []
        self._vm_name = ""
        self._nth: dict[tuple[str, int], int] = {}
        self._prehash = True

    @property
    def task_label(self) -> str:
        return f"pushing {self._vm_name}"

    @property
    def media_type(self) -> str:
        return chunk_media_type(self.codec.name)

    def regular(self) -> int | None:
        return self.chunk_size

    # -- sizing ----------------------------------------------------------------------------
    def plan(self, vm: VM, cap: LayerCap, note: Callable[[str], None]) -> list[ChunkPlan]:
        cfg = vm.config
        self._vm_name = vm.name
        origin = (cfg.source or {}).get("format")
        if origin in ("tart", "vetu"):
            note(
                f"converting a {origin.capitalize()} image to barge's format: new layers with "
                "offsets and a frame index"
            )
        disks = {d.name: d.size for d in cfg.disks}
        self.files = [
            Blob(FILE_MEDIA_TYPE, (vm.path / name).read_bytes(), {FILE_NAME_ANNOTATION: name})
            for name in extra_files(vm)
        ]
        fs = self.frame_size
        decision = choose_chunk_size(
            disks,
            default_chunk=self.requested_chunk or DEFAULT_CHUNK_SIZE,
            frame_size=fs,
            max_layers=cap.limit,
            other_layers=self.other_layers,
        )
        if decision.reason:
            note(f"{decision.reason} ({cap.source})")
        self.chunk_size = decision.chunk_size
        plans = [
            p
            for name, size in disks.items()
            for p in plan_chunks(name, size, self.chunk_size, frame_size=fs)
        ]
        # "chunk 3/40 of disk.img" in a network error's message
        self._nth = {(p.disk, p.offset): i for i, p in enumerate(plans, 1)}
        return plans

    @property
    def other_layers(self) -> int:
        """The non-disk layers: the VM config, the frame index and the VM's extra files."""
        return 2 + len(self.files)

    def start(self, enc: Encoding) -> None:
        """Hash a chunk before compressing it only when the lookup can hit: when the chunk
        index knows any chunk at all. On a store that never pushed or pulled anything, every
        chunk is encoded and uploaded in one streaming pass (the frame digests come out of it)."""
        self._prehash = bool(enc.store.catalog.query("SELECT 1 FROM chunks LIMIT 1"))

    # -- one chunk -------------------------------------------------------------------------
    def chunk(
        self, enc: Encoding, fd: int, plan: ChunkPlan, known: ChunkDigests | None
    ) -> tuple[ChunkDigests, ChunkMeta | None]:
        nth = self._nth[(plan.disk, plan.offset)]
        with labelled_transfer(f"chunk {nth}/{len(self._nth)} of {plan.disk}"):
            return self._chunk(enc, fd, plan, known)

    def _chunk(
        self, enc: Encoding, fd: int, plan: ChunkPlan, known: ChunkDigests | None
    ) -> tuple[ChunkDigests, ChunkMeta | None]:
        prehash = self._prehash
        fs = self.frame_size
        if known is None and not prehash and not _has_data(fd, plan):
            known = _zero_digests(plan, fs)  # holes only: nothing to read or hash
        if known is None and not prehash:
            # nothing is known yet, so no lookup can hit: encode and upload in one pass
            meta, digests = self._stream_chunk(enc, fd, plan)
            enc.count(hashed_bytes=plan.length)
            return digests, meta
        digests = known if known is not None else hash_chunk(fd, plan, fs)
        if known is None:
            enc.count(hashed_bytes=plan.length)
        if digests.all_zero:
            enc.count(zero_chunks=1)
            enc.task.advance(plan.length)
            return digests, None
        return digests, self._ensure_chunk(enc, fd, plan, digests)

    def _ensure_chunk(
        self, enc: Encoding, fd: int, plan: ChunkPlan, digests: ChunkDigests
    ) -> ChunkMeta:
        row = enc.store.catalog.find_chunk(
            digests.udigest, self.codec.name, self.frame_size, self.media_type
        )
        if row is not None and len(row.frames) == len(digests.frames):
            meta = _meta_from_row(plan, row, digests)
            known = Descriptor(self.media_type, meta.digest, meta.size)
            first = enc.sender.first_missing(known, enc.ends)
            if first is None:
                enc.task.advance(plan.length)
                return meta
            return self._encode_and_send(enc, fd, plan, digests, (meta.digest, first))[0]
        return self._encode_and_send(enc, fd, plan, digests, None)[0]

    def _stream_chunk(
        self, enc: Encoding, fd: int, plan: ChunkPlan
    ) -> tuple[ChunkMeta | None, ChunkDigests]:
        meta, done = self._encode_and_send(enc, fd, plan, None, None)
        digests = ChunkDigests(done.udigest, tuple((f.digest, f.zero) for f in done.frames))
        if done.all_zero:
            enc.count(zero_chunks=1)
            return None, digests
        return meta, digests

    def _encode_and_send(
        self,
        enc: Encoding,
        fd: int,
        plan: ChunkPlan,
        digests: ChunkDigests | None,
        asked: tuple[str, int] | None,
    ) -> tuple[ChunkMeta, EncodedChunk]:
        """Compress a chunk and send it where it is missing. ``asked``: the digest of its
        known blob and the first destination that could not take it (those before it could;
        those after it were not asked); None: nothing was asked."""
        ends = enc.ends
        first = ends[0]
        if first.registry is not None and all(e.registry == first.registry for e in ends):
            return self._stream(enc, fd, plan, digests, asked)
        # compress into a spool file (bounded memory), then send from it
        spool = spool_path(enc.store.tmp_dir, "push", plan.offset)
        enc.store.catalog.lease_add(enc.lease_id, "path", [spool.name])
        try:
            done = self._spool(enc, fd, plan, digests, spool)
            enc.count(compressed_chunks=1)
            self._remember_chunk(enc, done)
            if not done.all_zero:
                blob = Descriptor(self.media_type, done.cdigest, done.csize)
                open_at = open_file_at(spool)
                if asked is not None and asked[0] == done.cdigest:
                    i = asked[1]  # asked already, and missing it; the rest: not yet
                    enc.sender.upload(ends[i], blob, open_at)
                    enc.sender.send(blob, open_at, ends[i + 1 :])
                else:
                    enc.sender.send(blob, open_at, ends)
            return done.meta, done
        finally:
            spool.unlink(missing_ok=True)

    def _spool(
        self, enc: Encoding, fd: int, plan: ChunkPlan, digests: ChunkDigests | None, spool: Path
    ) -> EncodedChunk:
        try:
            with open(spool, "wb+") as out:
                return encode_chunk(
                    fd,
                    plan,
                    self.frame_size,
                    self.codec,
                    out,
                    known=digests,
                    workers=FRAME_WORKERS,
                    progress=enc.task.advance,
                )
        except OSError as e:
            if not is_no_space(e):
                raise
            spool.unlink(missing_ok=True)
            raise NoSpaceError(
                f"no space left in {spool.parent} for the compressed chunk at offset "
                f"{plan.offset} of disk {plan.disk!r}: a push to several registries "
                "compresses each chunk once into tmp/ (up to one chunk per --concurrency)",
                hint=enc.store.space_hint(None) + "; or push to one registry at a time "
                "(then nothing is spooled)",
            ) from e

    def _stream(
        self,
        enc: Encoding,
        fd: int,
        plan: ChunkPlan,
        digests: ChunkDigests | None,
        asked: tuple[str, int] | None,
    ) -> tuple[ChunkMeta, EncodedChunk]:
        """Every destination is on one registry: the compressed frames stream straight into
        the upload to the first that needs them; the others mount it, or get it streamed too."""
        streams: list[EncodeStream] = []
        advanced = [0]  # progress of this chunk, undone if the upload restarts

        def on_frame(n: int) -> None:
            advanced[0] += n
            enc.task.advance(n)

        def produce() -> EncodeStream:
            if advanced[0]:
                enc.task.advance(-advanced[0])
                advanced[0] = 0
            # the upload hashes the layer: the encoder need not
            st = iter_encoded_chunk(
                fd,
                plan,
                self.frame_size,
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
            self._remember_chunk(enc, result(digest))

        # the same disk file, unchanged, and the same encoding yield the same bytes: a later
        # push may continue this upload where the registry says it stands
        st = os.fstat(fd)
        key = (
            f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:"
            f"{plan.offset}+{plan.length}:{self.codec.name}:{self.codec.level}:{self.frame_size}"
        )
        ends = enc.ends
        i = asked[1] if asked is not None else 0
        digest, size = enc.sender.stream(ends[i], produce, before_commit=record, resume_key=key)
        done = result(digest)
        if size != done.csize:  # pragma: no cover - a bug guard
            raise UsageError(f"encoder and upload disagree on chunk at {plan.offset}")
        enc.count(compressed_chunks=1)
        # the known blob: those before had it, the rest are asked now; a new blob: all others
        known = asked is not None and asked[0] == digest
        rest = ends[i + 1 :] if known else ends[:i] + ends[i + 1 :]
        enc.sender.stream_to_rest(Descriptor(self.media_type, digest, size), produce, rest)
        return done.meta, done

    def _remember_chunk(self, enc: Encoding, done: EncodedChunk) -> None:
        if done.all_zero:
            return
        meta = done.meta
        enc.store.catalog.put_chunk(
            ChunkRow(
                meta.udigest,
                self.codec.name,
                self.frame_size,
                self.media_type,
                meta.digest,
                meta.size,
                [[f.csize, f.digest.removeprefix("sha256:")] for f in meta.frames],
            )
        )

    # -- the image -------------------------------------------------------------------------
    def finish(self, enc: Encoding, results: list[tuple[ChunkPlan, ChunkDigests, Any]]) -> Encoded:
        cfg = enc.vm.config
        disks = {d.name: d.size for d in cfg.disks}
        metas: list[ChunkMeta] = [meta for _, _, meta in results if meta is not None]
        index = FrameIndex.build(disks, metas, frame_size=self.frame_size)
        index_blob = Blob(INDEX_MEDIA_TYPE, index.to_bytes())
        vm_blob = Blob(VM_CONFIG_MEDIA_TYPE, cfg.to_bytes())
        config_blob = oci_config(cfg, self.labels)
        manifest = build_manifest(config_blob, vm_blob, index_blob, self.files, metas)
        return Encoded(
            [config_blob, vm_blob, index_blob, *self.files],
            manifest,
            len(metas) + self.other_layers,
            self.chunk_size,
        )

    def refused(self, end: End, e: LayerLimitExceeded, layers: int) -> LimitError:
        limit = f" (its limit: {e.limit})" if e.limit else ""
        suggestion = e.limit if e.limit else max(1, layers - 1)
        return LimitError(
            f"{end.label} refused the manifest: {layers} layers is over its layer limit{limit}",
            hint=f"push again with --max-layers {suggestion} (barge then picks a larger chunk "
            "size before uploading)",
        )


def _has_data(fd: int, plan: ChunkPlan) -> bool:
    return any(True for _ in data_extents(fd, plan.offset, plan.end))


def _zero_digests(plan: ChunkPlan, frame_size: int) -> ChunkDigests:
    frames = []
    for off in range(0, plan.length, frame_size):
        frames.append((zero_digest(min(frame_size, plan.length - off)), True))
    return ChunkDigests(chunk_digest(d for d, _ in frames), tuple(frames))


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
