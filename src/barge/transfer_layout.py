"""Export and import: a local VM or a registry image to an OCI image layout, and back.

``export`` of a local VM is the push pipeline with a layout end as the destination (a directory,
or an archive whose members are added one at a time from the push spool, so a 20 GiB sparse VM
needs no 20 GiB of temporary space); ``export`` of a reference is a copy registry -> layout.
``import`` is a pull with a layout as the source, then a clone into a local VM.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from barge.copy import ArchiveWriteEnd, CopyOptions, copy
from barge.endpoints import End, LayoutEnd, parse_location
from barge.errors import BargeError, UsageError
from barge.progress import Reporter
from barge.store import Store


def layout_location(path: str) -> str:
    """``oci:DIR[:tag]`` / ``oci-archive:FILE[:tag]`` as given; a bare path ending in ``.tar``
    is an archive, any other bare path a directory."""
    if path.startswith(("oci:", "oci-archive:")):
        return path
    if not path:
        raise UsageError("give a path for the OCI layout")
    return f"oci-archive:{path}" if path.endswith(".tar") else f"oci:{path}"


@dataclass
class ExportOptions:
    platform: str | None = None
    codec: str | None = None
    chunk_size: int | None = None
    frame_size: int | None = None
    concurrency: int = 4
    insecure: bool = False


def export_image(
    store: Store,
    source: str,
    path: str,
    opts: ExportOptions | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Write ``source`` (a local VM name or an image reference) as an OCI layout at ``path``."""
    opts = opts or ExportOptions()
    dest = layout_location(path)
    src = parse_location(source)
    if src.kind != "vm":
        res = copy(
            store,
            source,
            dest,
            CopyOptions(
                concurrency=opts.concurrency, insecure=opts.insecure, platform=opts.platform
            ),
            reporter,
        )
        img = res.images[0]
        return {
            "source": source,
            "destination": img.destination.rsplit("@", 1)[0],
            "digest": img.digest,
            "copiedBlobs": res.stats.copied_blobs,
            "copiedBytes": res.stats.copied_bytes,
        }
    from barge.disk.codec import DEFAULT_CODEC
    from barge.disk.sizing import DEFAULT_FRAME_SIZE
    from barge.push import Pusher, PushOptions

    popts = PushOptions(
        codec=opts.codec or DEFAULT_CODEC,
        chunk_size=opts.chunk_size,
        frame_size=opts.frame_size or DEFAULT_FRAME_SIZE,
        concurrency=opts.concurrency,
    )
    loc = parse_location(dest, allow_vm=False)
    assert loc.path is not None
    tag = loc.tag or "latest"
    end: End
    if loc.kind == "oci":
        end = LayoutEnd(loc.path, tag, create=True)
    else:
        if loc.path.is_dir():
            raise UsageError(f"cannot write the archive {loc.path}: it is a directory")
        end = ArchiveWriteEnd(loc.path, tag)
    pusher = Pusher(store, popts, reporter)
    try:
        pres = pusher.push_to_ends(src.name, [(end, [tag])])
        if isinstance(end, ArchiveWriteEnd):
            end.finish()
    finally:
        if isinstance(end, ArchiveWriteEnd):
            end.abort()
        pusher.close()
    return {
        "source": source,
        "destination": f"{loc.kind}:{loc.path}:{tag}",
        "digest": pres.digest,
        "layers": pres.layers,
        "chunkSize": pres.chunk_size,
    }


def import_image(
    store: Store,
    path: str,
    name: str,
    platform: str | None = None,
    concurrency: int = 4,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Make local VM ``name`` from the OCI layout at ``path`` (verified while decoded)."""
    from barge.cache import clone_image
    from barge.pull import PullOptions

    text = layout_location(path)
    loc = parse_location(text, allow_vm=False)
    assert loc.path is not None
    if not Path(loc.path).exists():
        from barge.errors import NotFoundError

        raise NotFoundError(f"no OCI layout at {loc.path}")
    cat = store.catalog
    _, where, _ = loc.cache_key()
    ok = False
    try:
        res, _cloned = clone_image(
            store, text, name, PullOptions(concurrency=concurrency, platform=platform), reporter
        )
        ok = True
    finally:
        # the pull was only the way in: keep no cache reference to the layout, also when the
        # clone failed (an image that was cached before stays, under its own references)
        dropped: set[str] = set()
        for r in cat.refs():
            if r.registry == loc.kind and r.repository == where:
                cat.remove_ref(r.registry, r.repository, r.tag, r.digest)
                dropped.add(r.digest)
        if ok and res.up_to_date:
            dropped.discard(res.digest)
        elif ok:
            dropped.add(res.digest)
        orphans = {d for d in dropped if not cat.refs(d)}
        if orphans:  # resumable work of other pulls in tmp/ stays (only prune removes it)
            if ok:
                store.gc(only=orphans, clean_tmp=False)
            else:  # the clone's error is the one to report
                with contextlib.suppress(BargeError, OSError):
                    store.gc(only=orphans, clean_tmp=False)
    return {"source": text, "digest": res.digest, "format": res.format, "name": name}
