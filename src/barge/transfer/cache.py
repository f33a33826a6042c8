"""The image cache as a destination: the decoding edge of the pipeline.

A pulled image is an immutable, verified VM directory under ``cache/<manifest hex>``; the
catalog maps the exact reference the user typed (registry incl. port, repository, tag) to its
digest. :class:`CacheEnd` takes an image through the pipeline like any destination:

* :meth:`~CacheEnd.begin` takes a lease and the image's lock (one process pulls an image at a
  time; the others wait and find it cached), and answers "already here" for a cached image.
  Otherwise work happens in ``tmp/pull-<hex>`` under the lease, by the format's decoder
  (:mod:`barge.transfer.decode_barge`, :mod:`barge.transfer.decode_streams`), which reads the
  small blobs and decides what each disk still needs;
* :meth:`~CacheEnd.try_reusing_blob` says a layer is settled when no byte of it is needed (a
  base image or an interrupted earlier pull already holds it: the cache's "mount");
* :meth:`~CacheEnd.put_blob` decodes a layer (whole, or the frames still needed, by range);
* :meth:`~CacheEnd.put_manifest` publishes: **the publish check** (every disk the VM config
  lists written by this pull, exactly its size, its coverage ledger covering ``[0, size)``;
  otherwise an integrity error and nothing is published), then fsync, an atomic rename into
  place and only then the catalog. A crash leaves nothing ``list`` shows.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from barge import cancel
from barge.disk.coverage import Coverage
from barge.disk.sparse import allocated_bytes
from barge.errors import IntegrityError, Interrupted, NoSpaceError, UnsupportedError
from barge.formats import detect_format
from barge.oci.types import Descriptor, Manifest
from barge.progress import Reporter
from barge.store import Store, VMConfig
from barge.store.space import NotEnoughSpace, is_no_space
from barge.store.store import fsync_tree
from barge.transfer.base import EndBase
from barge.transfer.decode import Decoding, PullStats, Staging
from barge.transfer.decode_barge import METADATA_ROOM, BargeDecoding
from barge.transfer.decode_streams import StreamDecoding
from barge.transfer.end import End, OpenAt, Progress, Reuse
from barge.units import format_size
from barge.untrusted import load_json

__all__ = ["CacheEnd"]


class CacheEnd(EndBase):
    """The image cache as the destination of one image pulled from ``shown`` (as typed),
    recorded under ``key`` (registry, repository, tag). ``hold``: a caller's lease that must
    keep the image once the pull returns (a clone from it), added before the image is looked
    at. ``then_clone``: the free-space check counts a copy of the image into a VM too (where
    it cannot be cloned copy-on-write)."""

    label = "the image cache"
    large_first = True

    def __init__(
        self,
        store: Store,
        key: tuple[str, str, str],
        shown: str,
        *,
        reporter: Reporter,
        note: Callable[[str], None],
        concurrency: int,
        hold: str | None = None,
        then_clone: bool = False,
    ) -> None:
        self.store = store
        self.key = key
        self.shown = shown
        self.reporter = reporter
        self.note = note
        self.concurrency = concurrency
        self.hold = hold
        self.then_clone = then_clone
        self.stats = PullStats()
        self.digest = ""
        self.format = ""
        self.path: Path | None = None
        self.up_to_date = False
        self.staging: Staging | None = None
        self.decoding: Decoding | None = None
        self.published = False
        self._need: int | None = None  # bytes the space check asked for
        self._stack = contextlib.ExitStack()

    @property
    def base(self) -> str | None:
        return self.decoding.base if self.decoding is not None else None

    # -- the pipeline ----------------------------------------------------------------------
    def begin(self, manifest: Manifest, source: End) -> bool:
        store, cat = self.store, self.store.catalog
        digest = self.digest = manifest.digest
        path = self.path = store.image_path(digest)
        if self.hold is not None:
            cat.lease_add(self.hold, "image", [digest])
        lease_id = self._stack.enter_context(store.lease("pull"))
        cat.lease_add(lease_id, "image", [digest])
        lock = store.image_lock(digest, wait=True)
        self._stack.callback(lock.release)
        row = cat.get_image(digest)
        if row is not None and path.is_dir():
            self.up_to_date = True
            self.format = row.format
            return True
        staging = store.tmp_dir / f"pull-{path.name}"
        cat.lease_add(lease_id, "path", [staging.name])
        staging.mkdir(exist_ok=True)
        st = self.staging = Staging(
            store,
            staging,
            source,
            self.key,
            digest,
            self.reporter,
            self.note,
            self._require_space,
            self.concurrency,
            stats=self.stats,
        )
        doc = load_json(manifest.data, f"manifest {digest}")
        fmt = self.format = detect_format(doc)
        if fmt == "barge":
            self.decoding = BargeDecoding(st, doc)
        elif fmt in ("tart", "vetu"):
            self.decoding = StreamDecoding(st, doc, fmt)
        else:
            registry, repository, _ = self.key
            raise UnsupportedError(
                f"{registry}/{repository}@{digest} is not a VM image (no barge, Tart or Vetu "
                "layers)",
                hint="barge copy moves any image between registries",
            )
        return False

    def try_reusing_blob(self, blob: Descriptor, source: End | None) -> Reuse | None:
        """A layer none of whose bytes are needed is settled (metadata read at the start; a
        disk layer a base image or an interrupted earlier pull already holds)."""
        assert self.decoding is not None
        return None if self.decoding.needs(blob.digest) else Reuse.PRESENT

    def put_blob(self, blob: Descriptor, open_at: OpenAt, progress: Progress | None) -> None:
        assert self.decoding is not None
        self.decoding.put(blob.digest, open_at)

    def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        cat = self.store.catalog
        registry, repository, ref_tag = self.key
        if self.up_to_date:
            cat.set_ref(registry, repository, ref_tag, self.digest)
            cat.touch_image(self.digest)
            return self.digest
        assert self.decoding is not None and self.staging is not None and self.path is not None
        staging = self.staging.path
        coverage = self.decoding.finish()
        (staging / "manifest.json").write_bytes(data)
        _check_staged(staging, coverage)  # the publish check: every byte accounted for
        fsync_tree(staging)
        self.published = True
        if self.path.exists():  # a crashed earlier run got this far; the catalog says not
            shutil.rmtree(self.path)
        os.rename(staging, self.path)
        cat.add_image(self.digest, self.path.name, self.format, _dir_allocated(self.path))
        cat.set_ref(registry, repository, ref_tag, self.digest)
        return self.digest

    def close(self) -> None:
        if self.decoding is not None:
            self.decoding.close()
        self._stack.close()

    # -- space and failures ----------------------------------------------------------------
    def _require_space(self, need: int, *, image: int, reflink: bool) -> None:
        """Refuse (exit 9) before writing when ``need`` more bytes do not fit, counting the copy
        of the ``image`` bytes a clone makes afterwards where it cannot clone copy-on-write."""
        what = f"pull {self.shown}"
        if self.then_clone:
            what = f"pull and clone {self.shown}"
            if not reflink:
                need += image
        self._need = need + METADATA_ROOM
        self.store.require_space(self._need, what)

    def failed(self, e: Exception) -> None:
        """An interrupted pull keeps its staging directory (the next run re-verifies and
        resumes it) and says how much verified data it holds; a pull that ran out of space
        removes it (giving the space back) before anything else touches the disk or the
        catalog, and says what to free. Other errors are left as they are."""
        st = self.staging
        if st is None or self.published:
            return
        staging = st.path
        if isinstance(e, Interrupted) or cancel.requested():
            kept = st.kept_at_start + (st.task.done if st.task is not None else 0)
            if self.format in ("tart", "vetu"):  # their pulls rewrite their disks from the start
                shutil.rmtree(staging, ignore_errors=True)
                raise Interrupted("interrupted: this pull starts over when run again") from e
            what = f"kept {format_size(kept)} of verified frames" if kept else "kept"
            raise Interrupted(
                f"interrupted: {what} in the staging area (tmp/{staging.name}); run the same "
                "command to resume (`barge prune` discards it)"
            ) from e
        if isinstance(e, NotEnoughSpace):  # refused before writing: a resumable pull stays
            if not st.resumed:
                shutil.rmtree(staging, ignore_errors=True)
            return
        if is_no_space(e, self.store.home):
            shutil.rmtree(staging, ignore_errors=True)
            free = self.store.free_bytes()
            need = self._need
            said = f"; it needs about {format_size(need)}" if need else ""
            raise NoSpaceError(
                f"no space left on the filesystem of {self.store.home} while pulling "
                f"{self.shown}{said}, and {format_size(free)} is free now that the partial "
                "pull was removed",
                hint=self.store.space_hint(need - free if need and need > free else None),
            ) from e


def _check_staged(staging: Path, coverage: list[Coverage]) -> None:
    """The publish check. Every disk the staged VM config lists must have been written by this
    pull, be its size, and have every byte accounted for in its coverage ledger (written from a
    verified frame, cleared, or proven already right); else :class:`IntegrityError` and
    nothing is published."""
    cfg = VMConfig.from_bytes((staging / "config.json").read_bytes())
    ledgers = {c.name: c for c in coverage}
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


def _dir_allocated(path: Path) -> int:
    return sum(allocated_bytes(p) for p in path.iterdir() if p.is_file())
