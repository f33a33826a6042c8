"""The image cache: pulled images by manifest digest, looked up through the catalog."""

from __future__ import annotations

from typing import Any

from barge.store import Store, VMConfig
from barge.store.catalog import ImageRow


def _ref_string(registry: str, repository: str, tag: str, digest: str) -> str:
    return f"{registry}/{repository}:{tag}" if tag else f"{registry}/{repository}@{digest}"


def cached_image_info(store: Store, img: ImageRow) -> list[dict[str, Any]]:
    """One row per reference that points at a cached image (or one row if none does)."""
    path = store.cache_dir / img.dirname
    try:
        cfg = VMConfig.from_bytes((path / "config.json").read_bytes())
    except (OSError, ValueError, Exception):
        return []
    refs = store.catalog.refs(img.digest)
    names = [_ref_string(r.registry, r.repository, r.tag, r.digest) for r in refs] or [img.digest]
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


def list_cached(store: Store) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for img in store.cached_images():
        rows += cached_image_info(store, img)
    rows.sort(key=lambda r: str(r["name"]))
    return rows
