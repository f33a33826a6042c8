"""What the cache's decoders share: the staging directory they fill and the interface the cache
end drives them through (:mod:`barge.transfer.cache`).

A decoder (barge's frames: :mod:`barge.transfer.decode_barge`; Tart's and Vetu's streams:
:mod:`barge.transfer.decode_streams`) is made from an image manifest when the pipeline begins
the image. It reads the image's small blobs (configs, the frame index, NVRAM, kernels) at once,
decides what of each disk it still needs (a cached base image and an interrupted earlier pull
may hold much of it), then decodes each layer the pipeline hands it, and finally writes the
VM config. Every byte it settles enters a disk's coverage ledger, which the publish check reads.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from barge.cancel import CheckedTask
from barge.disk.coverage import Coverage
from barge.progress import Reporter
from barge.store import Store
from barge.transfer.end import End, OpenAt

__all__ = ["Decoding", "PullStats", "Staging", "reset_staging"]


@dataclass
class PullStats:
    """What a pull took: bytes fetched, reused from local data and written; requests."""

    fetched_bytes: int = 0  # compressed bytes downloaded for disks
    reused_bytes: int = 0  # uncompressed disk bytes taken from local data (base or resume)
    written_bytes: int = 0
    range_requests: int = 0
    whole_layers: int = 0


@dataclass
class Staging:
    """One pull's staging directory and what its decoder may use."""

    store: Store
    path: Path
    source: End
    key: tuple[str, str, str]  # (registry, repository, tag) the image is cached under
    digest: str  # the image manifest's
    reporter: Reporter
    note: Callable[[str], None]
    require_space: Callable[..., None]  # (need, *, image, reflink): refuse (exit 9) up front
    concurrency: int
    stats: PullStats = field(default_factory=PullStats)
    lock: threading.Lock = field(default_factory=threading.Lock)
    task: CheckedTask | None = None  # progress of the fetch (.done: verified bytes written)
    kept_at_start: int = 0  # verified frame bytes the staging held before fetching
    resumed: bool = False  # this run resumes a staging directory an earlier one left

    def count(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    @property
    def origin(self) -> dict[str, Any]:
        """The VM config's ``source``: where the image came from."""
        registry, repository, _ = self.key
        return {"registry": registry, "repository": repository, "digest": self.digest}

    def read_small(self, digest: str, max_size: int) -> bytes:
        return self.source.read_blob(digest, max_size)


class Decoding(Protocol):
    """One image format's decoder into a staging directory."""

    format: str
    starts_over: bool  # an interrupted pull of this format starts over (no resume of a disk)
    base: str | None  # the cached image used as a base, if any

    def needs(self, digest: str) -> bool:
        """Whether the layer ``digest`` has bytes still to fetch (else it is settled)."""
        ...

    def put(self, digest: str, open_at: OpenAt) -> None:
        """Fetch and decode what is needed of layer ``digest`` (called from worker threads)."""
        ...

    def finish(self) -> list[Coverage]:
        """Every layer was put: sync the disks, write the VM config; the disks' ledgers."""
        ...

    def close(self) -> None:
        """Release the disk files (also after a failure)."""
        ...


def reset_staging(staging: Path, keep: set[str]) -> None:
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
