"""Pull: an image from a registry (or an OCI layout) into the local cache.

The pipeline with the image cache as the destination (:class:`barge.transfer.cache.CacheEnd`,
the decoding edge): the source's image (an index resolved to this host's platform, or
``--platform``) goes through :class:`~barge.transfer.pipeline.ImageCopy` like any copy; the
cache decodes its disks as their layers arrive, verifies every byte and publishes only a
complete image. See docs/pipeline.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from barge.oci.types import Manifest
from barge.progress import NullReporter, Reporter
from barge.store import Store
from barge.transfer.cache import CacheEnd
from barge.transfer.decode import PullStats
from barge.transfer.end import End
from barge.transfer.open import Ends, Verb
from barge.transfer.pipeline import ImageCopy, Sender
from barge.transfer.registry import RegistryEnd

__all__ = ["PullOptions", "PullResult", "PullStats", "pull", "pull_from"]

#: layers fetched and decoded at once when neither the command nor the host's settings say
DEFAULT_CONCURRENCY = 2


@dataclass
class PullOptions:
    """Options of :func:`pull` (and of clone and import, which pull first)."""

    concurrency: int | None = None
    """Layers fetched and decoded at once (None: the registry host's configured
    ``concurrency``, else 2)."""
    insecure: bool = False
    """Allow plain HTTP and unverified TLS."""
    platform: str | None = None
    """``OS/ARCH`` to pick from a multi-platform index (default: this host's)."""
    mirrors: bool = True
    """Read a registry image through its configured mirrors (False: ``--no-mirrors``)."""


@dataclass
class PullResult:
    """The image a pull cached (its digest, format, directory), whether it was already
    there, what it took and which cached image it used as a base."""

    reference: str
    digest: str
    format: str
    path: Path
    up_to_date: bool
    stats: PullStats = field(default_factory=PullStats)
    base: str | None = None
    notes: list[str] = field(default_factory=list)
    source: str | None = None
    """Which source answered the manifest (``mirror HOST[/NS]`` or ``upstream HOST``) when
    the registry configuration has a table for the reference; else None."""

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
            "source": self.source,
        }


def pull(
    store: Store,
    text: str,
    opts: PullOptions | None = None,
    reporter: Reporter | None = None,
    *,
    hold: str | None = None,
    then_clone: bool = False,
    verb: Verb = "pull",
) -> PullResult:
    """Pull the image ``text`` names into the cache. ``hold``: a caller's lease that keeps the
    image once the pull returns; ``then_clone``: the space check counts a copy into a VM;
    ``verb``: the command pulling (``clone``, ``import``: their rules for ``text``)."""
    opts = opts or PullOptions()
    rep = reporter or NullReporter()
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        rep.note(msg)

    with Ends(store, insecure=opts.insecure, note=note, mirrors=opts.mirrors) as ends:
        src = ends.open(text, "source", verb)
        manifest = src.manifest(opts.platform, one_image=True)
        result = pull_from(
            store,
            src.end,
            manifest,
            src.ref.cache_key(),
            text,
            opts,
            rep,
            notes,
            hold=hold,
            then_clone=then_clone,
        )
        if isinstance(src.end, RegistryEnd):
            result.source = src.end.answered
        return result


def pull_from(
    store: Store,
    source: End,
    manifest: Manifest,
    key: tuple[str, str, str],
    text: str,
    opts: PullOptions,
    reporter: Reporter,
    notes: list[str],
    *,
    hold: str | None = None,
    then_clone: bool = False,
) -> PullResult:
    """The pipeline of a pull: ``manifest`` (one image) from ``source`` into the cache, under
    ``key`` (registry, repository, tag) as ``text`` names it."""

    def note(msg: str) -> None:
        notes.append(msg)
        reporter.note(msg)

    workers = opts.concurrency or DEFAULT_CONCURRENCY
    if opts.concurrency is None and isinstance(source, RegistryEnd):
        workers = source.client.settings.concurrency or DEFAULT_CONCURRENCY
    cache = CacheEnd(
        store,
        key,
        text,
        reporter=reporter,
        note=note,
        concurrency=workers,
        hold=hold,
        then_clone=then_clone,
    )
    try:
        walk = ImageCopy(source, cache, Sender(source), reporter, concurrency=workers)
        walk.copy(manifest, None)
    except Exception as e:
        cache.failed(e)
        raise
    finally:
        cache.close()
    assert cache.path is not None
    return PullResult(
        text,
        cache.digest,
        cache.format,
        cache.path,
        cache.up_to_date,
        cache.stats,
        cache.base,
        notes,
    )
