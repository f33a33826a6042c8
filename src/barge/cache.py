"""The image cache's contents: pulled images by manifest digest, looked up through the
catalog (list, get, delete). Pulling into it is :mod:`barge.transfer.pull`."""

from __future__ import annotations

from typing import Any

from barge.disk.sparse import allocated_bytes
from barge.errors import NotFoundError
from barge.reference import cached_spelling, parse_location
from barge.store import Store, VMConfig
from barge.store.catalog import ImageRow


def cached_image_info(store: Store, img: ImageRow) -> list[dict[str, Any]]:
    """One row per reference that points at a cached image (or one row if none does)."""
    path = store.cache_dir / img.dirname
    try:
        cfg = VMConfig.from_bytes((path / "config.json").read_bytes())
    except (OSError, ValueError, Exception):
        return []
    refs = store.catalog.refs(img.digest)
    names = [cached_spelling(r.registry, r.repository, r.tag, r.digest) for r in refs] or [
        img.digest
    ]
    rows = []
    for name in names:
        rows.append(
            {
                "name": name,
                "reference": name,
                "source": "oci",
                "digest": img.digest,
                "format": img.format,
                "os": cfg.os,
                "arch": cfg.arch,
                "platform": cfg.platform,
                "cpus": cfg.cpus,
                "memory": cfg.memory,
                "macAddress": cfg.mac_address,
                "disks": [{"name": d.name, "size": d.size} for d in cfg.disks],
                "sizeOnDisk": img.size_on_disk,
                "lastUsed": img.last_used,
                "state": "",
            }
        )
    return rows


def cached_info(store: Store, ref_text: str) -> dict[str, Any]:
    """The ``get`` view of one cached image."""
    rows = find_cached(store, ref_text)
    if not rows:
        raise NotFoundError(f"no cached image {ref_text!r}", hint="pull it first: `barge pull`")
    img = store.catalog.get_image(rows[0][3])
    if img is None:
        raise NotFoundError(f"no cached image {ref_text!r}")
    want = cached_spelling(*rows[0])
    for info in cached_image_info(store, img):
        if info["reference"] == want:
            info["disks"] = [
                dict(d, allocated=allocated_bytes(store.cache_dir / img.dirname / d["name"]))
                for d in info["disks"]
            ]
            return info
    raise NotFoundError(f"cached image {ref_text!r} is damaged; pull it again")


def list_cached(store: Store) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for img in store.cached_images():
        rows += cached_image_info(store, img)
    rows.sort(key=lambda r: str(r["name"]))
    return rows


def find_cached(store: Store, ref_text: str) -> list[tuple[str, str, str, str]]:
    """(registry, repository, tag, digest) rows of the cache matching a reference: a registry
    reference or an OCI layout location (``oci:PATH[:tag]``, ``oci-archive:FILE[:tag]``, the
    path as typed or in the absolute form ``list`` shows)."""
    ref = parse_location(ref_text)
    registry, repository, tag = ref.cache_key()
    digest = ref.digest
    rows = []
    for r in store.catalog.refs():
        if r.registry != registry or r.repository != repository:
            continue
        if digest and r.digest != digest:
            continue
        if tag and r.tag != tag:
            continue
        if not tag and not digest and r.tag not in ("", "latest"):
            continue
        rows.append((r.registry, r.repository, r.tag, r.digest))
    return rows


def delete_cached(store: Store, ref_text: str) -> list[str]:
    """Forget a cached reference; images no reference points at any more are removed
    (unless an operation holds them under a lease). Returns the references removed."""
    rows = find_cached(store, ref_text)
    if not rows:
        raise NotFoundError(f"no cached image {ref_text!r}", hint="see `barge list --source oci`")
    for registry, repository, tag, digest in rows:
        store.catalog.remove_ref(registry, repository, tag, digest)
    digests = {r[3] for r in rows}
    still = {r.digest for r in store.catalog.refs()}
    orphans = digests - still
    if orphans:
        store.gc(only=orphans, clean_tmp=False)  # resumable work in tmp/ stays
    return [cached_spelling(*r) for r in rows]
