"""Decoding barge images into the cache: frames placed by the frame index, fetched only when
no local copy is right.

* Order-independent: every chunk is written at the offset its annotation and the
  (digest-verified) frame index name; the manifest's layer order is never used.
* Verified: every compressed blob digest (by the source's reader, or here), every frame's and
  chunk's uncompressed digest.
* Sparse: zero frames and zero 4 KiB blocks become holes.
* Resumable: a staging directory an interrupted pull left is re-verified frame by frame (data
  extents only are read) and only the rest is fetched.
* Incremental: a cached image sharing frames (an earlier version of the repository) is cloned
  as the base; only frames that differ are fetched, partial chunks with HTTP Range requests,
  adjacent frames coalesced into one range.

Every byte of every disk is settled here and recorded in its writer's coverage ledger: non-zero
frames already right in place (kept), regions the index says are zeros (cleared), the other
frames (fetched or copied from the base, verified, written). See docs/pipeline.md, "the publish
check".
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from barge import cancel
from barge.disk.clone import clone_file
from barge.disk.codec import Codec
from barge.disk.coverage import Coverage
from barge.disk.decoder import DecodeBuffers, DiskWriter, decode_chunk, decode_frame
from barge.disk.index import ChunkMeta, FrameIndex
from barge.disk.sparse import allocated_bytes, can_reflink, data_extents
from barge.errors import BusyError, IntegrityError, UnsupportedError
from barge.image import MAX_SMALL_BLOB, parse_barge_manifest
from barge.store import VMConfig
from barge.store.catalog import ChunkRow
from barge.store.store import VMLock
from barge.transfer.decode import Staging, reset_staging
from barge.transfer.end import OpenAt
from barge.transfer.registry import labelled_transfer

__all__ = ["MAX_INDEX_BLOB", "METADATA_ROOM", "BargeDecoding"]

MAX_INDEX_BLOB = 256 << 20
METADATA_ROOM = 1 << 20  # what a pull writes besides disks (configs, index, manifest), at most
RANGE_GAP = 0  # frames are merged into one Range request only when adjacent

#: One piece of fetch work: a chunk, the numbers of its non-zero frames still needed, and
#: whether that is all of them (then one streaming GET of the whole layer decodes it).
Work = tuple[ChunkMeta, list[int], bool]


class BargeDecoding:
    format = "barge"
    starts_over = False

    def __init__(self, st: Staging, doc: dict[str, Any]) -> None:
        self.st = st
        self.base: str | None = None
        self.writers: dict[str, DiskWriter] = {}
        self._base_lease: str | None = None  # the base image's lease, held to the end
        self._base_lock: VMLock | None = None  # and its image lock (shared, as a clone's)
        self._tls = threading.local()
        try:
            self._open(doc)
        except BaseException:
            self.close()
            raise

    def _open(self, doc: dict[str, Any]) -> None:
        st = self.st
        img = parse_barge_manifest(doc)
        index_data = st.read_small(img.index.digest, MAX_INDEX_BLOB)
        index = FrameIndex.from_bytes(index_data)
        img.check_index(index)
        cfg = VMConfig.from_bytes(st.read_small(img.vm_config.digest, MAX_SMALL_BLOB))
        disks = {d.name: d.size for d in cfg.disks}
        if disks != {d.name: d.size for d in index.disks}:
            raise IntegrityError("the VM config and the disk index disagree on disks and sizes")
        self.index, self.cfg, self.disks = index, cfg, disks
        staging = st.path
        reset_staging(staging, keep=set(disks))
        for name, desc in img.files:
            if name in disks or name in ("config.json", "manifest.json", "index.json"):
                raise IntegrityError(f"file layer {name!r} collides with a disk or metadata file")
            (staging / name).write_bytes(st.read_small(desc.digest, MAX_SMALL_BLOB))
        (staging / "index.json").write_bytes(index_data)

        resumed = {n for n in disks if (staging / n).exists()}
        st.resumed = bool(resumed)
        base_dir, base_index = (None, None) if resumed else self._find_base(index)
        base_dir, base_index = self._check_space(index, resumed, base_dir, base_index)
        if base_dir is not None and base_index is not None:
            self.base = base_dir.name
            for name in disks:
                try:
                    base_index.disk(name)
                except KeyError:
                    continue
                clone_file(base_dir / name, staging / name)
            st.note(f"using cached image sha256:{base_dir.name[:12]}… as a base")
        for name in disks:
            with open(staging / name, "ab"):
                pass
        self.local = (
            _LocalFrames(base_dir, base_index)
            if base_dir is not None and base_index is not None
            else None
        )
        # "chunk 3/40 of disk.img" in a network error's message
        self._nth = {(c.disk, c.offset): i for i, c in enumerate(index.chunks, 1)}
        for name, size in disks.items():
            self.writers[name] = DiskWriter(staging / name, size)
        kept = self._frames_kept(index, base_index, resumed)
        for d in index.disks:
            for off, length in d.zero_ranges():
                self.writers[d.name].clear(off, length)
        st.kept_at_start = st.stats.reused_bytes
        self.work: dict[str, list[Work]] = {}
        total = 0
        for item in _plan_fetch(index, kept):
            self.work.setdefault(item[0].digest, []).append(item)
            total += sum(item[0].frames[i].usize for i in item[1])
        # every frame's progress is a cancellation check, and counts what an interrupt keeps
        st.task = cancel.checked(st.reporter.task("pulling", total))

    # -- what to fetch ---------------------------------------------------------------------
    def _find_base(self, index: FrameIndex) -> tuple[Path | None, FrameIndex | None]:
        """The cached image sharing the most non-zero frame bytes at the same offsets."""
        store = self.st.store
        registry, repository, _ = self.st.key
        want: dict[tuple[str, int], str] = {}
        for d in index.disks:
            for c in d.chunks:
                for f in c.frames:
                    if not f.zero:
                        want[(d.name, c.offset + f.uoffset)] = f.digest
        if not want:
            return None, None
        ranked: list[tuple[int, str, Path, FrameIndex]] = []
        same_repo = {
            r.digest
            for r in store.catalog.refs()
            if r.registry == registry and r.repository == repository
        }
        for img in store.cached_images():
            p = store.cache_dir / img.dirname
            try:
                other = FrameIndex.from_bytes((p / "index.json").read_bytes())
            except (OSError, IntegrityError, UnsupportedError):
                continue
            score = 0
            for d in other.disks:
                for c in d.chunks:
                    for f in c.frames:
                        if not f.zero and want.get((d.name, c.offset + f.uoffset)) == f.digest:
                            score += f.usize
            if score == 0:
                continue
            ranked.append((score + (1 if img.digest in same_repo else 0), img.digest, p, other))
        ranked.sort(key=lambda r: -r[0])
        for _key, digest, p, other in ranked:
            if self._hold_base(digest, p):
                return p, other
        return None, None

    def _hold_base(self, digest: str, path: Path) -> bool:
        """Keep the cached image ``digest`` from GC until this pull ends: a lease, then its
        image lock, shared (GC removes an image only under its exclusive lock, after checking
        the leases). False when it is gone or being removed right now."""
        cat = self.st.store.catalog
        if self._base_lease is None:
            self._base_lease = cat.create_lease("pull-base")
        cat.lease_add(self._base_lease, "image", [digest])
        try:
            lock = self.st.store.image_lock(digest, shared=True)
        except BusyError:
            return False
        if cat.get_image(digest) is None or not (path / "index.json").is_file():
            lock.release()
            return False
        self._base_lock = lock
        return True

    def _check_space(
        self,
        index: FrameIndex,
        resumed: set[str],
        base_dir: Path | None,
        base_index: FrameIndex | None,
    ) -> tuple[Path | None, FrameIndex | None]:
        """Refuse (exit 9) unless the disks fit: every non-zero frame's bytes (an upper bound:
        zero 4 KiB blocks inside a frame stay holes), less what the staging directory already
        holds (a resumed pull) or what a base shares copy-on-write. A base that must be copied
        costs its allocated bytes first: when that is what does not fit, the pull goes on
        without the base. Returns the base to use."""
        staging = self.st.path
        final = sum(fr.usize for d in index.disks for fr in d.iter_frames() if not fr.zero)
        reflink = can_reflink(staging)
        if resumed:
            need = final - sum(allocated_bytes(staging / n) for n in resumed)
        elif base_dir is not None and base_index is not None and reflink:
            data = {
                (d.name, fr.offset): fr.digest
                for d in index.disks
                for fr in d.iter_frames()
                if not fr.zero
            }
            shared = sum(
                fr.usize
                for d in base_index.disks
                for fr in d.iter_frames()
                if not fr.zero and data.get((d.name, fr.offset)) == fr.digest
            )
            need = final - shared
        elif base_dir is not None and base_index is not None:
            names = {d.name for d in index.disks}
            copied = sum(
                allocated_bytes(base_dir / d.name) for d in base_index.disks if d.name in names
            )
            need = max(final, copied)
            if copied > final and need + METADATA_ROOM > self.st.store.free_bytes():
                self.st.note("not enough space to copy the cached base: pulling without it")
                base_dir, base_index, need = None, None, final
        else:
            need = final
        self.st.require_space(max(0, need), image=final, reflink=reflink)
        return base_dir, base_index

    def _frames_kept(
        self, index: FrameIndex, base: FrameIndex | None, resumed: set[str]
    ) -> set[tuple[str, int]]:
        """(disk, offset) of the non-zero frames already right in the staging disks, each
        recorded in its writer's ledger: the cloned base has a frame with the same digest at
        the same offset (a verified cached image, trusted without re-reading), or, in a disk
        an interrupted run left, the bytes on disk hash to the frame's digest."""
        base_frames: dict[tuple[str, int], str] = {}
        if base is not None:
            base_frames = {
                (d.name, c.offset + f.uoffset): f.digest
                for d in base.disks
                for c in d.chunks
                for f in c.frames
                if not f.zero
            }
        kept: set[tuple[str, int]] = set()
        for d in index.disks:
            w = self.writers[d.name]
            for c in d.chunks:
                for f in c.frames:
                    cancel.check()
                    if f.zero:
                        continue
                    off = c.offset + f.uoffset
                    if base_frames.get((d.name, off)) == f.digest or (
                        d.name in resumed and _frame_matches(w.fd, off, f.usize, f.digest)
                    ):
                        w.record(off, f.usize)
                        kept.add((d.name, off))
                        self.st.count(reused_bytes=f.usize)
        return kept

    # -- fetching --------------------------------------------------------------------------
    def needs(self, digest: str) -> bool:
        return digest in self.work

    def put(self, digest: str, open_at: OpenAt) -> None:
        bufs = getattr(self._tls, "bufs", None)
        for meta, frames, whole in self.work.get(digest, []):
            if bufs is None or not bufs.fits(meta.frame_size):
                bufs = self._tls.bufs = DecodeBuffers(meta.frame_size)
            label = (
                f"chunk {self._nth.get((meta.disk, meta.offset))}/{len(self._nth)} of {meta.disk}"
            )
            with labelled_transfer(label):
                self._fetch_chunk(open_at, self.writers[meta.disk], meta, frames, whole, bufs)

    def _fetch_chunk(
        self,
        open_at: OpenAt,
        out: DiskWriter,
        meta: ChunkMeta,
        need: list[int],
        whole: bool,
        bufs: DecodeBuffers,
    ) -> None:
        st = self.st
        task = st.task
        assert task is not None
        if whole:
            with open_at(0) as src:
                decode_chunk(
                    src,
                    out,
                    meta,
                    buffers=bufs,
                    verify_layer=not st.source.verifies_reads,
                    progress=task.advance,
                )
            st.count(fetched_bytes=meta.size, whole_layers=1)
            return
        codec = Codec(meta.codec)
        remote: list[int] = []
        for i in need:
            f = meta.frames[i]
            off = meta.offset + f.uoffset
            data = self.local.read(f.digest, f.usize) if self.local is not None else None
            if data is not None:
                out.write_frame(off, data, f.usize)
                st.count(reused_bytes=f.usize)
                task.advance(f.usize)
                continue
            remote.append(i)
        for run in _runs(meta, remote):
            first, last = meta.frames[run[0]], meta.frames[run[-1]]
            length = last.coffset + last.csize - first.coffset
            st.count(range_requests=1, fetched_bytes=length)
            with open_at(first.coffset) as src:
                for i in run:
                    f = meta.frames[i]
                    cv = memoryview(bufs.cbuf)[: f.csize]
                    _read_exact(src, cv, meta.digest)
                    data = decode_frame(cv, f, codec)
                    out.write_frame(meta.offset + f.uoffset, data, f.usize)
                    task.advance(f.usize)

    # -- the end ---------------------------------------------------------------------------
    def finish(self) -> list[Coverage]:
        for w in self.writers.values():
            w.fsync()
        self.close()
        cfg = self.cfg
        cfg.source = {**self.st.origin, "format": self.format}
        (self.st.path / "config.json").write_bytes(cfg.to_bytes())
        self._index_chunks()
        return [w.coverage for w in self.writers.values()]

    def close(self) -> None:
        if not cancel.abandoned():  # a worker still running may write through them
            for w in self.writers.values():
                w.close()
        if self._base_lock is not None:
            self._base_lock.release()
            self._base_lock = None
        if self._base_lease is not None:
            self.st.store.catalog.release_lease(self._base_lease)
            self._base_lease = None

    def _index_chunks(self) -> None:
        """Fill the chunk index so a push of a clone of this image uploads nothing."""
        cat = self.st.store.catalog
        for c in self.index.chunks:
            cat.put_chunk(
                ChunkRow(
                    c.udigest,
                    c.codec,
                    c.frame_size,
                    c.media_type,
                    c.digest,
                    c.size,
                    [[f.csize, f.digest.removeprefix("sha256:")] for f in c.frames],
                )
            )


def _plan_fetch(index: FrameIndex, kept: set[tuple[str, int]]) -> list[Work]:
    """Per chunk: the numbers of its non-zero frames still needed, and whether that is all of
    them (then one streaming GET of the whole layer decodes it)."""
    work = []
    for d in index.disks:
        for c in d.chunks:
            data = [i for i, f in enumerate(c.frames) if not f.zero]
            need = [i for i in data if (d.name, c.offset + c.frames[i].uoffset) not in kept]
            if not need:
                continue
            work.append((c, need, len(need) == len(data)))
    return work


class _LocalFrames:
    """Frames of a base image found by digest at any offset (for moved data)."""

    def __init__(self, base_dir: Path, index: FrameIndex) -> None:
        self.dir = base_dir
        self.where: dict[str, tuple[str, int]] = {}
        for d in index.disks:
            for c in d.chunks:
                for f in c.frames:
                    if not f.zero:
                        self.where.setdefault(f.digest, (d.name, c.offset + f.uoffset))

    def read(self, digest: str, usize: int) -> bytes | None:
        loc = self.where.get(digest)
        if loc is None:
            return None
        with open(self.dir / loc[0], "rb") as f:
            data = os.pread(f.fileno(), usize, loc[1])
        if len(data) != usize or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            return None
        return data


def _runs(meta: ChunkMeta, frames: list[int]) -> Iterator[list[int]]:
    """Group frame numbers into runs that are contiguous in the compressed layer."""
    run: list[int] = []
    for i in frames:
        if run:
            prev = meta.frames[run[-1]]
            if prev.coffset + prev.csize + RANGE_GAP < meta.frames[i].coffset:
                yield run
                run = []
        run.append(i)
    if run:
        yield run


def _read_exact(src: BinaryIO, view: memoryview, digest: str) -> None:
    got = 0
    while got < len(view):
        n = src.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            raise IntegrityError(f"layer {digest}: range ended after {got} of {len(view)} bytes")
        got += n


def _frame_matches(fd: int, off: int, usize: int, digest: str) -> bool:
    """Whether the ``usize`` bytes at ``off`` hash to ``digest`` (holes are never read: a
    non-zero frame cannot be in one)."""
    if not any(True for _ in data_extents(fd, off, off + usize)):
        return False
    data = os.pread(fd, usize, off)
    return len(data) == usize and "sha256:" + hashlib.sha256(data).hexdigest() == digest
