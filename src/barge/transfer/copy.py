"""Copy and tag: an image between two stored ends (registries, OCI layouts), as it is.

``copy`` is the pipeline with a stored image as the source: the manifest bytes are copied
exactly, so the digest at the destination is the source's (for an index: every child manifest
and its blobs first, then the index bytes). Blobs stream source -> destination without
touching the local disk, and each goes through the one reuse rule (the destination has it, or
mounts it: from the source repository when both are on one registry, else from any
repository of that registry the catalog knows holds it), so a re-run resumes where an
interrupted copy stopped. Nothing here knows a VM image format: barge, Tart, Vetu and plain
container images copy alike. ``copy --verify`` is this, then :func:`barge.verify.verify` of
each destination, composed by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from barge import cancel
from barge.errors import Interrupted, UsageError
from barge.progress import NullReporter, Reporter
from barge.reference import Reference, ReferenceError, validate_tag
from barge.store import Store
from barge.transfer.layout import ArchiveWriteEnd
from barge.transfer.open import Ends, Opened
from barge.transfer.pipeline import ImageCopy, Sender
from barge.transfer.registry import RegistryEnd
from barge.units import format_size

__all__ = [
    "CopiedImage",
    "CopyOptions",
    "CopyResult",
    "CopyStats",
    "TagResult",
    "copy",
    "tag",
]


@dataclass
class CopyOptions:
    """Options of :func:`copy`."""

    concurrency: int = 4
    """Blobs copied at once."""
    insecure: bool = False
    """Allow plain HTTP and unverified TLS."""
    platform: str | None = None
    """``OS/ARCH``: copy only this platform's image of an index (default: the whole index)."""
    all_tags: bool = False
    """Copy every tag of the source repository."""
    mirrors: bool = True
    """Read a registry source through its configured mirrors (False: ``--no-mirrors``); the
    destination is always written as named."""


@dataclass
class CopyStats:
    """Manifests and blobs a copy (or tag) settled, and how: sent, found, mounted."""

    manifests: int = 0
    blobs: int = 0
    copied_blobs: int = 0
    copied_bytes: int = 0
    existing_blobs: int = 0
    mounted_blobs: int = 0

    @classmethod
    def of(cls, sender: Sender, walks: list[ImageCopy]) -> CopyStats:
        c = sender.counts
        return cls(
            manifests=sum(w.manifests for w in walks),
            blobs=sum(w.blobs for w in walks),
            copied_blobs=c.sent_blobs,
            copied_bytes=c.sent_bytes,
            existing_blobs=c.present,
            mounted_blobs=c.mounted,
        )

    def to_json(self) -> dict[str, int]:
        return {
            "manifests": self.manifests,
            "blobs": self.blobs,
            "copiedBlobs": self.copied_blobs,
            "copiedBytes": self.copied_bytes,
            "existingBlobs": self.existing_blobs,
            "mountedBlobs": self.mounted_blobs,
        }


@dataclass
class CopiedImage:
    """One image a copy put at its destination."""

    source: str
    destination: str
    """Where it is now, with tag (if any) and digest: ``host/repo:tag@sha256:…``."""
    digest: str
    media_type: str
    size: int
    reference: Reference
    """:attr:`destination` as a reference (pinned to the digest)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "digest": self.digest,
            "mediaType": self.media_type,
            "size": self.size,
        }


@dataclass
class CopyResult:
    """What :func:`copy` did: the images copied, what it took, the notes it made."""

    images: list[CopiedImage]
    stats: CopyStats
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "images": [i.to_json() for i in self.images],
            **self.stats.to_json(),
            "notes": self.notes,
        }


class _Copy:
    def __init__(self, store: Store, opts: CopyOptions, reporter: Reporter | None) -> None:
        self.store = store
        self.opts = opts
        self.reporter = reporter or NullReporter()
        self.notes: list[str] = []
        self.ends = Ends(store, insecure=opts.insecure, note=self.note, mirrors=opts.mirrors)
        self.walk: ImageCopy | None = None
        self.dst: Opened | None = None

    def note(self, msg: str) -> None:
        self.notes.append(msg)
        self.reporter.note(msg)

    def run(self, source: str, destination: str) -> CopyResult:
        try:
            with self.store.lease("copy"):
                if self.opts.all_tags:
                    src, dst, tags = self.ends.open_all_tags(source, destination)
                    self.dst = dst
                    if not tags:
                        self.note(f"{src.end.label} has no tags")
                    images = [
                        self._one(
                            replace(src, ref=src.ref.with_tag(t), given=src.ref.with_tag(t)), dst
                        )
                        for t in tags
                    ]
                else:
                    src = self.ends.open(source, "source", "copy")
                    self.dst = dst = self.ends.open(destination, "destination", "copy")
                    images = [self._one(src, dst)]
                dst.end.commit()
                walks = [self.walk] if self.walk is not None else []
                sender = self.walk.sender if self.walk is not None else Sender()
                return CopyResult(images, CopyStats.of(sender, walks), self.notes)
        except Exception as e:
            if isinstance(e, Interrupted) or cancel.requested():
                raise Interrupted(self.kept_message()) from e
            raise
        finally:
            self.ends.close()

    def _one(self, src: Opened, dst: Opened) -> CopiedImage:
        if self.walk is None:
            self.walk = ImageCopy(
                src.end,
                dst.end,
                Sender(src.end),
                self.reporter,
                concurrency=self.opts.concurrency,
                task_label=f"copying to {dst.end.label}",
            )
        chosen = src.manifest(self.opts.platform)
        tag = dst.ref.tag or src.tag
        digest = self.walk.copy(chosen, tag)
        where = replace(dst.ref, tag=tag, digest=digest)
        return CopiedImage(
            str(src.given), str(where), digest, chosen.media_type, chosen.size, where
        )

    def kept_message(self) -> str:
        """What an interrupted copy leaves for the next run."""
        if self.dst is not None and isinstance(self.dst.end, ArchiveWriteEnd):
            return "interrupted: the partial archive was removed"
        walk = self.walk
        if walk is None or not walk.blobs_held:
            return "interrupted: no blob was complete yet; run the same command to copy again"
        return (
            f"interrupted: {walk.blobs_held} of {walk.blobs_total} blobs "
            f"({format_size(walk.bytes_held)}) are at the destination; run the same command "
            "to resume (they are not copied again)"
        )


def copy(
    store: Store,
    source: str,
    destination: str,
    opts: CopyOptions | None = None,
    reporter: Reporter | None = None,
) -> CopyResult:
    """Copy the image ``source`` names to ``destination`` (registries, ``oci:``,
    ``oci-archive:``), keeping its digest."""
    return _Copy(store, opts or CopyOptions(), reporter).run(source, destination)


# ---------------------------------------------------------------------------------------------
# tags


@dataclass
class TagResult:
    """The tags :func:`tag` added (as references) to the image ``digest``."""

    digest: str
    references: list[str]
    stats: CopyStats

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "references": self.references, **self.stats.to_json()}


def _is_bare_tag(text: str) -> bool:
    if "/" in text or ":" in text or "@" in text:
        return False
    try:
        validate_tag(text)
    except ReferenceError:
        return False
    return True


def tag(
    store: Store,
    source: str,
    new_tags: list[str],
    *,
    insecure: bool = False,
    reporter: Reporter | None = None,
) -> TagResult:
    """Add tags to an image in a registry by re-putting its exact manifest bytes. A bare tag
    means the source's repository; a full reference must be on the same registry (its blobs
    are mounted there, never uploaded)."""
    if not new_tags:
        raise UsageError("give at least one new tag")
    rep = reporter or NullReporter()
    with Ends(store, insecure=insecure) as ends:
        src = ends.open(source, "source", "tag")
        assert isinstance(src.end, RegistryEnd)
        top = src.manifest()
        sender = Sender(src.end, allow_upload=False)
        walks: list[ImageCopy] = []
        refs: list[str] = []
        for text in new_tags:
            if _is_bare_tag(text):
                src.end.put_manifest(top.data, top.media_type, text)
                refs.append(f"{src.end.label}:{text}")
                continue
            dst = ends.open(text, "destination", "tag")
            if not isinstance(dst.end, RegistryEnd) or dst.end.registry != src.end.registry:
                raise UsageError(
                    f"cannot tag {text!r}: a new tag must be in the same registry "
                    f"({src.end.registry})",
                    hint="use `barge copy` to copy between registries",
                )
            assert dst.tag is not None
            walk = ImageCopy(src.end, dst.end, sender, rep)
            walk.copy(top, dst.tag)
            walks.append(walk)
            refs.append(f"{dst.end.label}:{dst.tag}")
        return TagResult(top.digest, refs, CopyStats.of(sender, walks))
