"""Wire formats of VM images on OCI registries: pure functions, no network, no files.

- :mod:`barge.formats.tart`: Tart's format (read and write), ``shared/FORMAT.md`` §1.
- :mod:`barge.formats.vetu`: Vetu's format (read), §2.
- this module: format detection and the validation helpers the readers share (§4).

Manifests are handled as parsed JSON (``dict``); descriptors become :class:`barge.oci.types.Descriptor` (:func:`descriptor`).
Everything taken from a manifest is validated here before it is used: digests, sizes (integers,
non-negative, bounded), media types (unknown ones are refused by name).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from barge.errors import IntegrityError
from barge.oci.types import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    IMAGE_TYPES,
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
)

FormatName = Literal["barge", "tart", "vetu", "other"]

# the OCI/Docker media types, under the names the format modules use (defined in barge.oci.types)
OCI_MANIFEST_MEDIA_TYPE = OCI_MANIFEST
DOCKER_MANIFEST_MEDIA_TYPE = DOCKER_MANIFEST
OCI_CONFIG_MEDIA_TYPE = OCI_CONFIG
DOCKER_CONFIG_MEDIA_TYPE = DOCKER_CONFIG
IMAGE_MANIFEST_MEDIA_TYPES = IMAGE_TYPES
CONFIG_MEDIA_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

# barge's own format (FORMAT.md §3); the authoritative definitions live with its codec.
BARGE_ARTIFACT_TYPE = "application/vnd.barge.vm.v1"
BARGE_CHUNK_MEDIA_TYPE_PREFIX = "application/vnd.barge.disk.chunk.v1"
# an image of an all-zero disk has no chunk layer, but always its VM config and frame index
BARGE_METADATA_MEDIA_TYPES = frozenset(
    {"application/vnd.barge.vm.config.v1+json", "application/vnd.barge.disk.index.v1+json"}
)
#: barge adds this to each Tart disk layer it writes so that it can read them order-independently.
BARGE_OFFSET_ANNOTATION = "dev.barge.disk.offset"

#: Largest disk (and so chunk, offset) size accepted from a manifest: 256 TiB.
MAX_DISK_SIZE = 1 << 48
#: Largest blob size accepted in a descriptor: 256 TiB.
MAX_BLOB_SIZE = 1 << 48
#: Most layers accepted in one manifest (registries cap far lower; this only bounds work).
MAX_LAYERS = 10_000

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")
_SHA256_RE = re.compile(r"sha256:[0-9a-f]{64}")
_DECIMAL_RE = re.compile(r"[0-9]{1,20}")

__all__ = [
    "descriptor",
    "FormatName",
    "detect_format",
    "parse_decimal",
    "validate_digest",
    "validate_sha256",
]


def validate_digest(value: object, what: str) -> str:
    """Return ``value`` if it is ``sha256:<64 hex>`` or ``sha512:<128 hex>`` (lowercase)."""
    if not isinstance(value, str) or not _DIGEST_RE.fullmatch(value):
        raise IntegrityError(f"{what}: invalid digest {_show(value)}")
    return value


def validate_sha256(value: object, what: str) -> str:
    """Return ``value`` if it is ``sha256:<64 lowercase hex>``."""
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise IntegrityError(f"{what}: invalid sha256 digest {_show(value)}")
    return value


def parse_decimal(value: object, what: str, *, maximum: int = MAX_DISK_SIZE) -> int:
    """Parse an annotation holding a non-negative decimal integer (no sign, no spaces),
    at most ``maximum``."""
    if not isinstance(value, str) or not _DECIMAL_RE.fullmatch(value):
        raise IntegrityError(f"{what}: expected a non-negative decimal integer, got {_show(value)}")
    n = int(value)
    if n > maximum:
        raise IntegrityError(f"{what}: {n} exceeds the limit of {maximum}")
    return n


def check_int(value: object, what: str, *, maximum: int = MAX_BLOB_SIZE, minimum: int = 0) -> int:
    """Return ``value`` if it is a JSON integer (not a bool) in ``minimum..maximum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise IntegrityError(f"{what}: expected an integer, got {_show(value)}")
    if not minimum <= value <= maximum:
        raise IntegrityError(f"{what}: {value} is out of range {minimum}..{maximum}")
    return value


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def descriptor(obj: object, what: str) -> Descriptor:
    """A content descriptor from an image's manifest, validated strictly (an
    :class:`~barge.errors.IntegrityError` naming ``what`` otherwise): the one descriptor type,
    :class:`barge.oci.types.Descriptor`, with its annotations always a dict."""
    if not isinstance(obj, Mapping):
        raise IntegrityError(f"{what}: expected a descriptor object, got {_show(obj)}")
    media_type = obj.get("mediaType")
    if not isinstance(media_type, str) or not media_type or len(media_type) > 255:
        raise IntegrityError(f"{what}: invalid mediaType {_show(media_type)}")
    digest = validate_digest(obj.get("digest"), what)
    size = check_int(obj.get("size"), f"{what} size")
    raw_ann = obj.get("annotations")
    annotations: dict[str, str] = {}
    if raw_ann is not None:
        if not isinstance(raw_ann, Mapping):
            raise IntegrityError(f"{what}: annotations must be an object")
        for k, v in raw_ann.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise IntegrityError(f"{what}: annotation {_show(k)} is not a string")
            annotations[k] = v
    return Descriptor(media_type, digest, size, annotations)


def manifest_layers(manifest: Mapping[str, Any], what: str) -> tuple[Descriptor, list[Descriptor]]:
    """Validate the envelope of an image manifest; return its config and layer descriptors."""
    if not isinstance(manifest, Mapping):
        raise IntegrityError(f"{what}: manifest is not a JSON object")
    if manifest.get("schemaVersion") != 2:
        raise IntegrityError(
            f"{what}: unsupported schemaVersion {_show(manifest.get('schemaVersion'))}"
        )
    mt = manifest.get("mediaType")
    if mt is not None and mt not in IMAGE_MANIFEST_MEDIA_TYPES:
        raise IntegrityError(f"{what}: not an image manifest (mediaType {_show(mt)})")
    config = descriptor(manifest.get("config"), f"{what} config")
    layers = manifest.get("layers")
    if not isinstance(layers, list):
        raise IntegrityError(f"{what}: 'layers' must be a list")
    if len(layers) > MAX_LAYERS:
        raise IntegrityError(f"{what}: {len(layers)} layers exceed the limit of {MAX_LAYERS}")
    return config, [descriptor(x, f"{what} layer {i}") for i, x in enumerate(layers)]


def manifest_annotations(manifest: Mapping[str, Any], what: str) -> dict[str, str]:
    raw = manifest.get("annotations")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise IntegrityError(f"{what}: manifest annotations must map strings to strings")
    return dict(raw)


def detect_format(manifest: Mapping[str, Any]) -> FormatName:
    """Tell which VM image format an image manifest carries, from media types only.

    ``barge``: a layer of ``application/vnd.barge.disk.chunk.v1*``, barge's VM config or frame
    index layer, or an ``artifactType`` /
    config media type ``application/vnd.barge.vm.v1``. ``tart``: any
    ``application/vnd.cirruslabs.tart.*`` layer. ``vetu``: any
    ``application/vnd.cirruslabs.vetu.*`` layer. Anything else (including non-objects) is
    ``other``. Nothing is validated here; the format's parser does that.
    """
    if not isinstance(manifest, Mapping):
        return "other"
    layers = manifest.get("layers")
    types: list[str] = []
    if isinstance(layers, list):
        for layer in layers:
            if isinstance(layer, Mapping) and isinstance(layer.get("mediaType"), str):
                types.append(layer["mediaType"])
    config = manifest.get("config")
    config_type = config.get("mediaType") if isinstance(config, Mapping) else None
    if (
        manifest.get("artifactType") == BARGE_ARTIFACT_TYPE
        or config_type == BARGE_ARTIFACT_TYPE
        or any(t.startswith(BARGE_CHUNK_MEDIA_TYPE_PREFIX) for t in types)
        or any(t in BARGE_METADATA_MEDIA_TYPES for t in types)
    ):
        return "barge"
    if any(t.startswith("application/vnd.cirruslabs.tart.") for t in types):
        return "tart"
    if any(t.startswith("application/vnd.cirruslabs.vetu.") for t in types):
        return "vetu"
    return "other"
