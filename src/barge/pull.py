"""Pull: copy an image from a registry (or an OCI layout) into the local cache.

The copy pipeline reversed: the disk codec decodes at the edge. A pulled image is an immutable,
verified VM directory under ``cache/<manifest hex>``; the catalog maps the exact reference the
user typed (registry incl. port, repository, tag) to its digest.

* Order-independent: every barge chunk is written at the offset its annotation and the
  (digest-verified) frame index name; the manifest's layer order is never used. Tart and Vetu
  images carry no offsets, so for them layer order is the only information there is (unless a
  Tart image carries barge's ``dev.barge.disk.offset`` annotations).
* Verified: every compressed blob digest, every frame and chunk uncompressed digest.
* Proven before publishing: every byte of every disk is written from a verified frame, cleared
  (zeros by the index, including regions no chunk covers), or proven already right in place;
  the writers' coverage ledgers must cover each disk (see docs/pipeline.md, "the publish
  check"), or nothing is published.
* Sparse: zero frames and zero 4 KiB blocks become holes.
* Resumable and leased: work happens in ``tmp/pull-<hex>`` under a lease, is renamed into
  place only when complete; a re-run re-verifies what is already on disk and fetches the rest.
  One process pulls an image at a time (a per-image lock); the others wait and find it cached.
* Incremental: a cached image sharing frames (an earlier version of the repository) is cloned
  as the base, and only frames that differ are fetched, with coalesced HTTP Range requests.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform as _platform
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from barge import cancel
from barge.disk import applelz4, lz4frame
from barge.disk.codec import Codec
from barge.disk.coverage import Coverage
from barge.disk.decoder import (
    DecodeBuffers,
    DiskWriter,
    decode_chunk,
    decode_frame,
    write_zero_aware,
)
from barge.disk.index import ChunkMeta, FrameIndex
from barge.disk.sparse import allocated_bytes, can_reflink, clone_file, data_extents
from barge.endpoints import End, LayoutEnd, RegistryEnd, parse_location
from barge.errors import (
    BusyError,
    IntegrityError,
    Interrupted,
    NoSpaceError,
    NotFoundError,
    UnsupportedError,
    UsageError,
)
from barge.formats import detect_format
from barge.formats import tart as tartfmt
from barge.formats import vetu as vetufmt
from barge.image import MAX_SMALL_BLOB, parse_barge_manifest
from barge.oci.client import RegistryClient, labelled
from barge.oci.types import INDEX_TYPES, Manifest
from barge.progress import NullReporter, Reporter
from barge.store import Disk, Store, VMConfig
from barge.store.catalog import ChunkRow
from barge.store.space import NotEnoughSpace, is_no_space
from barge.store.store import VMLock, fsync_tree
from barge.store.vmconfig import FROM_OCI_ARCH, random_mac
from barge.units import format_size
from barge.untrusted import load_json

MAX_INDEX_BLOB = 256 << 20
METADATA_ROOM = 1 << 20  # what a pull writes besides disks (configs, index, manifest), at most
RANGE_GAP = 0  # frames are merged into one Range request only when adjacent


def host_platform() -> str:
    m = _platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(m, m)
    return f"linux/{arch}"


@dataclass
class PullOptions:
    concurrency: int = 2
    insecure: bool = False
    platform: str | None = None


@dataclass
class PullStats:
    fetched_bytes: int = 0  # compressed bytes downloaded for disks
    reused_bytes: int = 0  # uncompressed disk bytes taken from local data (base or resume)
    written_bytes: int = 0
    range_requests: int = 0
    whole_layers: int = 0


@dataclass
class PullResult:
    reference: str
    digest: str
    format: str
    path: Path
    up_to_date: bool
    stats: PullStats = field(default_factory=PullStats)
    base: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "digest": self.digest,
            "format": self.format,
            "upToDate": self.up_to_date,
            "fetchedBytes": self.stats.fetched_bytes,
            "reusedBytes": self.stats.reused_bytes,
            "writtenBytes": self.stats.written_bytes,
            "rangeRequests": self.stats.range_requests,
            "wholeLayers": self.stats.whole_layers,
            "base": self.base,
            "notes": self.notes,
        }


def select_platform(end: End, manifest: Manifest, want: str | None) -> Manifest:
    """Resolve an index to the manifest for ``want`` (default: this host's platform)."""
    if manifest.media_type not in INDEX_TYPES:
        return manifest
    index = manifest.index()
    target = want or host_platform()
    parts = target.split("/")
    if len(parts) < 2:
        raise UsageError(f"invalid --platform {target!r}: expected OS/ARCH, e.g. linux/amd64")
    os_name, arch = parts[0], parts[1]
    variant = parts[2] if len(parts) > 2 else None
    available = []
    for d in index.manifests:
        p = d.platform
        if p is None:
            continue
        available.append(str(p))
        if p.os == os_name and p.architecture == arch and (variant is None or p.variant == variant):
            return end.get_manifest(d.digest)
    raise NotFoundError(
        f"the image index has no manifest for {target}",
        hint=f"available: {', '.join(available) or 'none'}; choose one with --platform",
    )


class Puller:
    def __init__(self, store: Store, opts: PullOptions, reporter: Reporter | None = None) -> None:
        self.store = store
        self.opts = opts
        self.reporter = reporter or NullReporter()
        self.stats = PullStats()
        self.notes: list[str] = []
        self._lock = threading.Lock()
        self._client: RegistryClient | None = None
        self._shown = ""
        self._then_clone = False  # the image is to be copied into a VM after the pull
        self._need: int | None = None  # bytes the space check asked for
        self._task: Any = None  # progress of the fetch (its .done: verified bytes written)
        self._kept_at_start = 0  # verified frame bytes the staging held before fetching
        self._starts_over = False  # a re-run would not resume this pull's staging directory
        self._resumed = False  # this run resumes a staging directory an earlier one left
        self._base_lease: str | None = None  # the base image's lease, held to the end
        self._base_lock: VMLock | None = None  # and its image lock (shared, as a clone's)

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self.reporter.note(msg)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._base_lock is not None:
            self._base_lock.release()
        if self._base_lease is not None:
            self.store.catalog.release_lease(self._base_lease)

    def _count(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    # -- entry -----------------------------------------------------------------------------
    def open_source(self, text: str) -> tuple[End, str, str, str, str]:
        """(end, registry, repository, tag, manifest reference) for a source location."""
        loc = parse_location(text, allow_vm=False)
        if loc.kind == "registry":
            assert loc.ref is not None
            ref = loc.ref
            if ref.tag is None and ref.digest is None:
                ref = ref.with_tag("latest")
                self.note(f"no tag given: pulling {ref}")
            self._client = RegistryClient(
                ref.registry, insecure=self.opts.insecure, home=self.store.home
            )
            end: End = RegistryEnd(self.store, self._client, ref)
            return end, ref.registry, ref.repository, ref.tag or "", ref.ref
        if loc.kind in ("oci", "oci-archive"):
            assert loc.path is not None
            lend = LayoutEnd(loc.path, loc.tag, archive=loc.kind == "oci-archive")
            kind, where, tag = loc.cache_key()  # absolute, normalised: one name everywhere
            return lend, kind, where, tag, loc.tag or "latest"
        raise UsageError(f"cannot pull {text!r}")

    def pull(self, text: str, *, hold: str | None = None, then_clone: bool = False) -> PullResult:
        """Pull ``text``. ``hold``: a caller's lease that must keep the image once the pull
        returns (a clone from it), added before the image is looked at. ``then_clone``: the
        free-space check counts a copy of the image into a VM too (where it cannot be
        cloned copy-on-write)."""
        self._shown = text
        self._then_clone = then_clone
        end, registry, repository, tag, reference = self.open_source(text)
        top = end.get_manifest(reference)
        manifest = select_platform(end, top, self.opts.platform)
        digest = manifest.digest
        shown = text
        cat = self.store.catalog
        path = self.store.image_path(digest)
        hexd = path.name
        if hold is not None:
            cat.lease_add(hold, "image", [digest])
        with self.store.lease("pull") as lease_id:
            cat.lease_add(lease_id, "image", [digest])
            lock = self.store.image_lock(digest, wait=True)
            try:
                row = cat.get_image(digest)
                if row is not None and path.is_dir():
                    cat.set_ref(registry, repository, tag, digest)
                    cat.touch_image(digest)
                    return PullResult(
                        shown, digest, row.format, path, True, self.stats, None, self.notes
                    )
                staging = self.store.tmp_dir / f"pull-{hexd}"
                cat.lease_add(lease_id, "path", [staging.name])
                staging.mkdir(exist_ok=True)
                try:
                    fmt, staged = self._materialise(
                        end, manifest, staging, registry, repository, digest
                    )
                    (staging / "manifest.json").write_bytes(manifest.data)
                    _check_staged(staging, staged)  # the publish check: every byte accounted for
                    fsync_tree(staging)
                except Exception as e:
                    self._failed(e, staging)
                    raise
                if path.exists():  # a crashed earlier run got this far; the catalog says not
                    shutil.rmtree(path)
                os.rename(staging, path)
                cat.add_image(digest, hexd, fmt, _dir_allocated(path))
                cat.set_ref(registry, repository, tag, digest)
                if isinstance(end, RegistryEnd):
                    im = manifest.image()
                    layers = [d.digest for d in im.layers] + [im.config.digest]
                    cat.add_blob_locations(layers, registry, repository)
            finally:
                lock.release()
        return PullResult(shown, digest, fmt, path, False, self.stats, staged.base, self.notes)

    def _failed(self, e: Exception, staging: Path) -> None:
        """An interrupted pull keeps its staging directory (the next run re-verifies and
        resumes it) and says how much verified data it holds; a pull that ran out of space
        removes it (giving the space back) before anything else touches the disk or the
        catalog, and says what to free. Other errors are left as they are."""
        if isinstance(e, Interrupted) or cancel.requested():
            kept = self._kept_at_start + (self._task.done if self._task is not None else 0)
            if self._starts_over:  # Tart and Vetu pulls rewrite their disks from the start
                shutil.rmtree(staging, ignore_errors=True)
                raise Interrupted("interrupted: this pull starts over when run again") from e
            what = f"kept {format_size(kept)} of verified frames" if kept else "kept"
            raise Interrupted(
                f"interrupted: {what} in the staging area (tmp/{staging.name}); run the same "
                "command to resume (`barge prune` discards it)"
            ) from e
        if isinstance(e, NotEnoughSpace):  # refused before writing: a resumable pull stays
            if not self._resumed:
                shutil.rmtree(staging, ignore_errors=True)
            return
        if is_no_space(e, self.store.home):
            shutil.rmtree(staging, ignore_errors=True)
            free = self.store.free_bytes()
            need = self._need
            said = f"; it needs about {format_size(need)}" if need else ""
            raise NoSpaceError(
                f"no space left on the filesystem of {self.store.home} while pulling "
                f"{self._shown}{said}, and {format_size(free)} is free now that the partial "
                "pull was removed",
                hint=self.store.space_hint(need - free if need and need > free else None),
            ) from e

    def _require_space(self, need: int, *, image: int, reflink: bool) -> None:
        """Refuse (exit 9) before writing when ``need`` more bytes do not fit, counting the copy
        of the ``image`` bytes a clone makes afterwards where it cannot clone copy-on-write."""
        what = f"pull {self._shown}"
        if self._then_clone:
            what = f"pull and clone {self._shown}"
            if not reflink:
                need += image
        self._need = need + METADATA_ROOM
        self.store.require_space(self._need, what)

    def _check_space_barge(
        self,
        index: FrameIndex,
        staging: Path,
        resumed: set[str],
        base_dir: Path | None,
        base_index: FrameIndex | None,
    ) -> tuple[Path | None, FrameIndex | None]:
        """Refuse (exit 9) unless the disks fit: every non-zero frame's bytes (an upper bound:
        zero 4 KiB blocks inside a frame stay holes), less what the staging directory already
        holds (a resumed pull) or what a base shares copy-on-write. A base that must be copied
        costs its allocated bytes first: when that is what does not fit, the pull goes on
        without the base. Returns the base to use."""
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
            if copied > final and need + METADATA_ROOM > self.store.free_bytes():
                self.note("not enough space to copy the cached base: pulling without it")
                base_dir, base_index, need = None, None, final
        else:
            need = final
        self._require_space(max(0, need), image=final, reflink=reflink)
        return base_dir, base_index

    def _materialise(
        self,
        end: End,
        manifest: Manifest,
        staging: Path,
        registry: str,
        repository: str,
        digest: str,
    ) -> tuple[str, _Staged]:
        doc = load_json(manifest.data, f"manifest {digest}")
        fmt = detect_format(doc)
        self._starts_over = fmt in ("tart", "vetu")
        source = {"registry": registry, "repository": repository, "digest": digest, "format": fmt}
        if fmt == "barge":
            return fmt, self._pull_barge(end, doc, staging, source)
        if fmt == "tart":
            return fmt, self._pull_tart(end, doc, staging, source)
        if fmt == "vetu":
            return fmt, self._pull_vetu(end, doc, staging, source)
        raise UnsupportedError(
            f"{registry}/{repository}@{digest} is not a VM image (no barge, Tart or Vetu layers)",
            hint="barge copy moves any image between registries",
        )

    # -- barge format ----------------------------------------------------------------------
    def _pull_barge(
        self, end: End, doc: dict[str, Any], staging: Path, source: dict[str, Any]
    ) -> _Staged:
        img = parse_barge_manifest(doc)
        index_data = _read_small(end, img.index.digest, MAX_INDEX_BLOB)
        index = FrameIndex.from_bytes(index_data)
        img.check_index(index)
        cfg = VMConfig.from_bytes(_read_small(end, img.vm_config.digest, MAX_SMALL_BLOB))
        disks = {d.name: d.size for d in cfg.disks}
        if disks != {d.name: d.size for d in index.disks}:
            raise IntegrityError("the VM config and the disk index disagree on disks and sizes")
        _reset_staging(staging, keep=set(disks))
        for name, desc in img.files:
            if name in disks or name in ("config.json", "manifest.json", "index.json"):
                raise IntegrityError(f"file layer {name!r} collides with a disk or metadata file")
            (staging / name).write_bytes(_read_small(end, desc.digest, MAX_SMALL_BLOB))
        (staging / "index.json").write_bytes(index_data)

        resumed = {n for n in disks if (staging / n).exists()}
        self._resumed = bool(resumed)
        base_dir, base_index = (None, None) if resumed else self._find_base(index, source)
        base_dir, base_index = self._check_space_barge(
            index, staging, resumed, base_dir, base_index
        )
        base_label = None
        if base_dir is not None and base_index is not None:
            base_label = base_dir.name
            for name in disks:
                try:
                    base_index.disk(name)
                except KeyError:
                    continue
                clone_file(base_dir / name, staging / name)
            self.note(f"using cached image sha256:{base_dir.name[:12]}… as a base")
        for name in disks:
            with open(staging / name, "ab"):
                pass

        # Every byte of every disk is settled below, and recorded in its writer's coverage
        # ledger, which the publish step checks: non-zero frames already right in place
        # (kept), regions the index says are zeros (cleared), the other frames (fetched or
        # copied from the base, verified, written).
        writers: dict[str, DiskWriter] = {}
        local = (
            _LocalFrames(base_dir, base_index)
            if base_dir is not None and base_index is not None
            else None
        )
        tls = threading.local()
        # "chunk 3/40 of disk.img" in a network error's message
        nth = {(c.disk, c.offset): i for i, c in enumerate(index.chunks, 1)}
        try:
            for name, size in disks.items():
                writers[name] = DiskWriter(staging / name, size)
            kept = self._frames_kept(index, writers, base_index, resumed)
            for d in index.disks:
                for off, length in d.zero_ranges():
                    writers[d.name].clear(off, length)
            self._kept_at_start = self.stats.reused_bytes
            work = self._plan_fetch(index, kept)
            total = sum(sum(m.frames[i].usize for i in need) for m, need, _ in work)
            # every frame's progress is a cancellation check, and counts what an interrupt keeps
            task = self._task = cancel.checked(self.reporter.task("pulling", total))

            def run(item: tuple[ChunkMeta, list[int], bool]) -> None:
                meta, frames, whole = item
                bufs = getattr(tls, "bufs", None)
                if bufs is None or not bufs.fits(meta.frame_size):
                    bufs = tls.bufs = DecodeBuffers(meta.frame_size)
                label = f"chunk {nth.get((meta.disk, meta.offset))}/{len(nth)} of {meta.disk}"
                with labelled(label):
                    self._fetch_chunk(
                        end, writers[meta.disk], meta, frames, whole, bufs, local, task
                    )

            cancel.parallel(run, work, max(1, self.opts.concurrency), name="pull")
            for w in writers.values():
                w.fsync()
        finally:
            if not cancel.abandoned():  # a worker still running may write through them
                for w in writers.values():
                    w.close()
        src = dict(source)
        cfg.source = src
        (staging / "config.json").write_bytes(cfg.to_bytes())
        self._index_chunks(index)
        return _Staged(base_label, [w.coverage for w in writers.values()])

    def _find_base(
        self, index: FrameIndex, source: dict[str, Any]
    ) -> tuple[Path | None, FrameIndex | None]:
        """The cached image sharing the most non-zero frame bytes at the same offsets."""
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
            for r in self.store.catalog.refs()
            if r.registry == source["registry"] and r.repository == source["repository"]
        }
        for img in self.store.cached_images():
            p = self.store.cache_dir / img.dirname
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
        cat = self.store.catalog
        if self._base_lease is None:
            self._base_lease = cat.create_lease("pull-base")
        cat.lease_add(self._base_lease, "image", [digest])
        try:
            lock = self.store.image_lock(digest, shared=True)
        except BusyError:
            return False
        if cat.get_image(digest) is None or not (path / "index.json").is_file():
            lock.release()
            return False
        self._base_lock = lock
        return True

    def _frames_kept(
        self,
        index: FrameIndex,
        writers: dict[str, DiskWriter],
        base: FrameIndex | None,
        resumed: set[str],
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
            w = writers[d.name]
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
                        self._count(reused_bytes=f.usize)
        return kept

    @staticmethod
    def _plan_fetch(
        index: FrameIndex, kept: set[tuple[str, int]]
    ) -> list[tuple[ChunkMeta, list[int], bool]]:
        """Per chunk: the numbers of its non-zero frames still needed, and whether that is all
        of them (then one streaming GET of the whole layer decodes it)."""
        work = []
        for d in index.disks:
            for c in d.chunks:
                data = [i for i, f in enumerate(c.frames) if not f.zero]
                need = [i for i in data if (d.name, c.offset + c.frames[i].uoffset) not in kept]
                if not need:
                    continue
                work.append((c, need, len(need) == len(data)))
        # big layers first keeps the workers busy to the end
        work.sort(key=lambda w: -w[0].size)
        return work

    def _fetch_chunk(
        self,
        end: End,
        out: DiskWriter,
        meta: ChunkMeta,
        need: list[int],
        whole: bool,
        bufs: DecodeBuffers,
        local: _LocalFrames | None,
        task: Any,
    ) -> None:
        if whole:
            with end.open_blob(meta.digest) as src:
                decode_chunk(
                    src,
                    out,
                    meta,
                    buffers=bufs,
                    verify_layer=not isinstance(end, RegistryEnd),
                    progress=task.advance,
                )
            self._count(fetched_bytes=meta.size, whole_layers=1)
            return
        codec = Codec(meta.codec)
        remote: list[int] = []
        for i in need:
            f = meta.frames[i]
            off = meta.offset + f.uoffset
            data = local.read(f.digest, f.usize) if local is not None else None
            if data is not None:
                out.write_frame(off, data, f.usize)
                self._count(reused_bytes=f.usize)
                task.advance(f.usize)
                continue
            remote.append(i)
        for run in _runs(meta, remote):
            first, last = meta.frames[run[0]], meta.frames[run[-1]]
            length = last.coffset + last.csize - first.coffset
            self._count(range_requests=1, fetched_bytes=length)
            with end.open_blob(meta.digest, first.coffset) as src:
                for i in run:
                    f = meta.frames[i]
                    cv = memoryview(bufs.cbuf)[: f.csize]
                    _read_exact(src, cv, meta.digest)
                    data = decode_frame(cv, f, codec)
                    out.write_frame(meta.offset + f.uoffset, data, f.usize)
                    task.advance(f.usize)

    def _index_chunks(self, index: FrameIndex) -> None:
        """Fill the chunk index so a push of a clone of this image uploads nothing."""
        cat = self.store.catalog
        for c in index.chunks:
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

    # -- Tart and Vetu ---------------------------------------------------------------------
    def _pull_tart(
        self, end: End, doc: dict[str, Any], staging: Path, source: dict[str, Any]
    ) -> _Staged:
        img = tartfmt.parse_tart_manifest(doc)
        _reset_staging(staging, keep=set())  # Tart disks are decoded whole, into a new file
        if img.offsets_from == "order":
            self.note(
                "Tart image without offsets: disk chunks placed by layer order (as Tart does)"
            )
        elif img.reordered:
            self.note(f"warning: {tartfmt.REORDERED_MESSAGE}; `barge verify` fails it")
        if img.ignored:
            self.note(
                "Tart image: ignored layers of unknown types (as Tart does): "
                f"{', '.join(sorted(set(img.ignored)))}"
            )
        vm_json = _read_small(end, img.vm_config.digest, tartfmt.MAX_VM_CONFIG_SIZE)
        info = tartfmt.tart_vm_info(vm_json)
        if "diskFormatUnknown" in info:
            self.note(
                f"Tart VM config: unknown diskFormat {info['diskFormatUnknown'][:40]!r} read as "
                "raw (as Tart does)"
            )
        nvram = _read_small(end, img.nvram.digest, MAX_SMALL_BLOB)
        oci_cfg = _read_small(end, img.config.digest, MAX_SMALL_BLOB)
        (staging / "tart-config.json").write_bytes(vm_json)
        (staging / "nvram.bin").write_bytes(nvram)
        (staging / "oci-config.json").write_bytes(oci_cfg)
        # the layers say nothing about zeros: their compressed size is what the disk takes at
        # least (all-zero blocks become holes, data is rarely smaller than its compression)
        least = sum(c.descriptor.size for c in img.disk_chunks)
        self._require_space(least, image=least, reflink=can_reflink(staging))
        disk = staging / "disk.img"
        coverage = self._decode_streams(
            end,
            disk,
            img.disk_size,
            [
                (c.descriptor.digest, c.descriptor.size, c.offset, c.size, c.digest)
                for c in img.disk_chunks
            ],
            applelz4.decode_stream,
        )
        if info["diskFormat"] != "raw":
            self.note(
                f"Tart disk format {info['diskFormat']!r}: disk.img holds that format as is "
                "(kept for re-pushing; it is not a raw disk)"
            )
        cfg = VMConfig.new(
            os_name=str(info["os"]),
            arch=FROM_OCI_ARCH.get(str(info["arch"]), str(info["arch"])),
            cpus=int(info["cpuCount"]),
            memory=int(info["memorySize"]),
            disks=[Disk("disk.img", img.disk_size, str(info["diskFormat"]))],
            mac=str(info.get("macAddress") or random_mac()),
        )
        # the chunk boundaries, so that a Tart-format re-push cuts the disk the same way
        cfg.source = {**source, "chunkSizes": [c.size for c in img.disk_chunks]}
        (staging / "config.json").write_bytes(cfg.to_bytes())
        # every chunk is verified: a re-push of a clone reuses these layers as they are
        for c in img.disk_chunks:
            self.store.catalog.put_chunk(
                ChunkRow(
                    c.digest,
                    TART_CHUNK_CODEC,
                    0,
                    tartfmt.DISK_V2_MEDIA_TYPE,
                    c.descriptor.digest,
                    c.descriptor.size,
                    [],
                )
            )
        return _Staged(None, [coverage])

    def _pull_vetu(
        self, end: End, doc: dict[str, Any], staging: Path, source: dict[str, Any]
    ) -> _Staged:
        img = vetufmt.parse_vetu_manifest(doc)
        _reset_staging(staging, keep=set())  # Vetu disks are decoded whole, into new files
        if img.ignored:
            self.note(
                f"Vetu image: ignored layers of unknown types (as Vetu does): "
                f"{', '.join(sorted(set(img.ignored)))}"
            )
        vm_json = _read_small(end, img.vm_config.digest, MAX_SMALL_BLOB)
        vm = vetufmt.vetu_vm_info(vm_json)
        vetufmt.check_disks_listed(img, vm)
        if not img.disks:
            raise IntegrityError("Vetu image has no disk layers")
        (staging / "vetu-config.json").write_bytes(vm_json)
        (staging / "kernel").write_bytes(_read_small(end, img.kernel.digest, MAX_SMALL_BLOB * 4))
        if img.initramfs is not None:
            (staging / "initramfs").write_bytes(
                _read_small(end, img.initramfs.digest, MAX_SMALL_BLOB * 8)
            )
        least = sum(c.descriptor.size for d in img.disks for c in d.chunks)
        self._require_space(least, image=least, reflink=can_reflink(staging))
        disks = []
        coverage = []
        for d in img.disks:
            cov = self._decode_streams(
                end,
                staging / d.name,
                d.size,
                [
                    (c.descriptor.digest, c.descriptor.size, c.offset, c.size, c.digest)
                    for c in d.chunks
                ],
                lz4frame.decode_stream,
            )
            coverage.append(cov)
            disks.append(Disk(d.name, d.size))
        for name in vm.disks:
            if name not in {d.name for d in img.disks}:
                self.note(f"Vetu VM config lists disk {name!r} but the image has no layer for it")
        if vm.arch not in FROM_OCI_ARCH:
            raise UnsupportedError(f"Vetu VM config: unknown arch {vm.arch[:40]!r}")
        cfg = VMConfig.new(
            os_name="linux",
            arch=FROM_OCI_ARCH[vm.arch],
            cpus=vm.cpus or 1,
            memory=vm.memory or 1 << 30,
            disks=disks,
            boot="kernel",
            mac=vm.mac,
        )
        # Vetu boots the kernel directly with the config's command line: so does `barge run`
        cfg.set_kernel_boot(
            "kernel", "initramfs" if img.initramfs is not None else None, vm.cmdline
        )
        cfg.source = source
        (staging / "config.json").write_bytes(cfg.to_bytes())
        return _Staged(None, coverage)

    def _decode_streams(
        self,
        end: End,
        path: Path,
        size: int,
        chunks: list[tuple[str, int, int, int, str]],
        decoder: Callable[..., Iterator[bytes]],
    ) -> Coverage:
        """Decode whole-stream chunks (Tart's Apple LZ4, Vetu's LZ4 frames) at their offsets
        into a new file, verifying each compressed digest (by the reader) and each uncompressed
        digest; a chunk's range is recorded in the ledger once its digest matched."""
        with open(path, "wb"):
            pass
        total = sum(c[3] for c in chunks)
        task = cancel.checked(self.reporter.task(f"pulling {path.name}", total))
        out = DiskWriter(path, size)
        try:

            def run(c: tuple[str, int, int, int, str]) -> None:
                digest, csize, offset, usize, udigest = c
                h = hashlib.sha256()
                out.zero(offset, usize)
                pos = offset
                with end.open_blob(digest) as raw:
                    # a registry's BlobReader checks the digest itself at EOF; other ends
                    # (OCI layouts) are hashed here. The size is bounded for both.
                    src = _CheckedBlob(raw, digest, csize, hash=not isinstance(end, RegistryEnd))
                    for piece in decoder(src, expected_size=usize):
                        h.update(piece)
                        write_zero_aware(out, pos, piece)
                        pos += len(piece)
                        task.advance(len(piece))
                    src.finish()
                if pos - offset != usize:
                    raise IntegrityError(
                        f"layer {digest} decodes to {pos - offset} bytes, its annotation "
                        f"says {usize}"
                    )
                if "sha256:" + h.hexdigest() != udigest:
                    raise IntegrityError(
                        f"layer {digest} decodes to sha256:{h.hexdigest()}, its annotation "
                        f"says {udigest}"
                    )
                out.record(offset, usize)
                self._count(fetched_bytes=csize, whole_layers=1)

            cancel.parallel(run, chunks, max(1, self.opts.concurrency), name="pull")
            out.fsync()
        finally:
            if not cancel.abandoned():  # a worker still running may write through it
                out.close()
        return out.coverage


@dataclass
class _Staged:
    """What materialising an image into its staging directory produced: the base image used
    (if any) and the coverage ledger of every disk written."""

    base: str | None
    coverage: list[Coverage]


def _check_staged(staging: Path, staged: _Staged) -> None:
    """The publish check. Every disk the staged VM config lists must have been written by this
    pull, be its size, and have every byte accounted for in its coverage ledger (written from a
    verified frame, cleared, or proven already right); else :class:`IntegrityError` and
    nothing is published."""
    cfg = VMConfig.from_bytes((staging / "config.json").read_bytes())
    ledgers = {c.name: c for c in staged.coverage}
    for d in cfg.disks:
        cov = ledgers.get(d.name)
        if cov is None or cov.size != d.size:
            raise IntegrityError(f"disk {d.name!r} was not written by this pull; not published")
        size = os.stat(staging / d.name).st_size
        if size != d.size:
            raise IntegrityError(
                f"disk {d.name!r} is {size} bytes, its image says {d.size}; not published"
            )
        cov.check()


#: The chunk-index codec name of a Tart disk layer (one Apple LZ4 stream, no frames).
TART_CHUNK_CODEC = "applelz4"


class _CheckedBlob(io.RawIOBase):
    """A compressed blob read through a decoder: never more than the descriptor's size, and
    (with ``hash``) the digest checked when :meth:`finish` is called after the decoder."""

    def __init__(self, src: BinaryIO, digest: str, size: int, *, hash: bool) -> None:
        super().__init__()
        self.src = src
        self.digest = digest
        self.size = size
        self.got = 0
        self.h = hashlib.sha256() if hash and digest.startswith("sha256:") else None

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size + 1 - self.got
        data = self.src.read(max(0, min(n, self.size + 1 - self.got)))
        self.got += len(data)
        if self.got > self.size:
            raise IntegrityError(
                f"layer {self.digest} is larger than the {self.size} bytes its descriptor says"
            )
        if self.h is not None:
            self.h.update(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def finish(self) -> None:
        """Read to the end (the decoder stopped at its end marker) and check size and digest."""
        for _ in range(2):
            if not self.read(1 << 16):
                break
        if self.got != self.size:
            raise IntegrityError(
                f"layer {self.digest} is {self.got} bytes; its descriptor says {self.size}"
            )
        if self.h is not None and "sha256:" + self.h.hexdigest() != self.digest:
            raise IntegrityError(
                f"layer {self.digest} has digest sha256:{self.h.hexdigest()} (corrupt blob)"
            )


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


def _reset_staging(staging: Path, keep: set[str]) -> None:
    """Remove whatever an earlier run (or anyone) left in a staging directory except the
    regular files named in ``keep`` (disks, re-verified frame by frame): every other file of
    the image is written again, so nothing stray reaches the cache or a clone."""
    for entry in os.scandir(staging):
        if entry.name in keep and entry.is_file(follow_symlinks=False):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.unlink(entry.path)


def _read_small(end: End, digest: str, max_size: int) -> bytes:
    reader = getattr(end, "read_blob", None)
    if reader is None:
        raise UsageError(f"{end.label} cannot read blobs")
    data: bytes = reader(digest, max_size)
    return data


def _dir_allocated(path: Path) -> int:
    return sum(allocated_bytes(p) for p in path.iterdir() if p.is_file())


def pull(
    store: Store,
    text: str,
    opts: PullOptions | None = None,
    reporter: Reporter | None = None,
    *,
    hold: str | None = None,
    then_clone: bool = False,
) -> PullResult:
    puller = Puller(store, opts or PullOptions(), reporter)
    try:
        return puller.pull(text, hold=hold, then_clone=then_clone)
    finally:
        puller.close()
