"""Inspect: what an image is, from its manifest and config (``barge inspect``, ``barge tags``).

Read-only: the manifest (or index) as served, its config, platform, sizes and layer table.
Nothing here prints; the CLI shows the description this returns.
"""

from __future__ import annotations

from typing import Any

from barge.errors import IntegrityError
from barge.oci.types import Descriptor, Manifest
from barge.store import Store
from barge.transfer.end import End
from barge.transfer.open import Ends
from barge.untrusted import load_json

__all__ = ["describe", "inspect", "list_tags", "raw_manifest"]

#: Annotations that state a layer's uncompressed size (barge's, Tart's, Vetu's).
SIZE_ANNOTATIONS = (
    "dev.barge.disk.length",
    "org.cirruslabs.tart.uncompressed-size",
    "org.cirruslabs.vetu.uncompressed-size",
)
MAX_CONFIG = 4 << 20


def _uncompressed(desc: Descriptor) -> int | None:
    for key in SIZE_ANNOTATIONS:
        v = (desc.annotations or {}).get(key)
        if v and v.isdigit():
            return int(v)
    return None


def _platform_of(config: Any) -> str | None:
    if not isinstance(config, dict):
        return None
    os_ = config.get("os")
    arch = config.get("architecture") or config.get("arch")
    variant = config.get("variant")
    parts = [str(p) for p in (os_, arch, variant) if p]
    return "/".join(parts) or None


def describe(end: End, m: Manifest) -> dict[str, Any]:
    """The manifest ``m`` (read from ``end``) as ``barge inspect --format json`` shows it."""
    out: dict[str, Any] = {"digest": m.digest, "mediaType": m.media_type, "size": m.size}
    if m.is_index:
        idx = m.index()
        out["manifests"] = [
            {
                "digest": d.digest,
                "mediaType": d.media_type,
                "size": d.size,
                "platform": str(d.platform) if d.platform else None,
            }
            for d in idx.manifests
        ]
        out["annotations"] = idx.annotations or {}
        return out
    img = m.image()
    config_doc: Any = None
    if img.config.size <= MAX_CONFIG:  # a huge config is not shown; the manifest still is
        try:
            config_doc = load_json(
                end.read_blob(img.config.digest, MAX_CONFIG),
                f"config {img.config.digest}",
                max_size=MAX_CONFIG,
            )
        except ValueError:
            config_doc = None
    layers = []
    unc_total: int | None = 0
    for d in img.layers:
        u = _uncompressed(d)
        if u is None:
            unc_total = None
        elif unc_total is not None:
            unc_total += u
        layers.append(
            {"digest": d.digest, "mediaType": d.media_type, "size": d.size, "uncompressedSize": u}
        )
    manifest_level = _uncompressed(Descriptor("", img.config.digest, 0, img.annotations))
    if manifest_level is not None:
        unc_total = manifest_level
    if not img.layers and manifest_level is None:
        unc_total = None
    out.update(
        {
            "artifactType": img.artifact_type,
            "config": {
                "digest": img.config.digest,
                "mediaType": img.config.media_type,
                "size": img.config.size,
                "content": config_doc,
            },
            "platform": _platform_of(config_doc),
            "compressedSize": sum(d.size for d in img.layers),
            "uncompressedSize": unc_total,
            "annotations": img.annotations or {},
            "layers": layers,
        }
    )
    return out


def raw_manifest(store: Store, reference: str, *, insecure: bool = False) -> bytes:
    """The manifest (or index) ``reference`` names, exactly as served."""
    with Ends(store, insecure=insecure) as ends:
        src = ends.open(reference, "source", "inspect")
        return src.manifest().data


def inspect(store: Store, reference: str, *, insecure: bool = False) -> dict[str, Any]:
    """What ``reference`` (a registry reference or an OCI layout) is: its reference, and
    :func:`describe` of its manifest."""
    with Ends(store, insecure=insecure) as ends:
        src = ends.open(reference, "source", "inspect")
        m = src.manifest()
        try:
            described = describe(src.end, m)
        except ValueError as e:  # a malformed manifest (or index) from the registry
            raise IntegrityError(f"{src.given}: invalid manifest {m.digest}: {e}") from None
        return {"reference": str(src.given), **described}


def list_tags(store: Store, repository: str, *, insecure: bool = False) -> tuple[str, list[str]]:
    """(the repository's full name, its tags)."""
    with Ends(store, insecure=insecure) as ends:
        end = ends.open_repository(repository)
        assert end.ref is not None
        return end.ref.name, end.list_tags()
