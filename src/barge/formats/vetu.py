"""Vetu's VM image format on OCI registries (``shared/FORMAT.md`` §2): read.

Facts from Vetu's public source (``internal/oci/annotations``, ``internal/oci/pull/vetu``,
``internal/oci/diskpuller``): exactly one VM config layer, exactly one kernel layer, at most
one initramfs layer, and disk layers (LZ4 *frames*, :mod:`barge.disk.lz4frame`) each annotated
with the disk's file name, its uncompressed size and uncompressed digest. A disk's chunks are
placed in layer order *within one disk name*: chunk *i* of disk ``d`` goes at the sum of the
uncompressed sizes of the earlier chunks of ``d``. Vetu joins the name to the VM directory
after checking only that the VM config lists it; barge validates it as a safe file name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from barge.errors import IntegrityError, UnsupportedError
from barge.formats import (
    CONFIG_MEDIA_TYPES,
    MAX_DISK_SIZE,
    BlobDescriptor,
    manifest_layers,
    parse_decimal,
    validate_sha256,
)
from barge.formats.tart import DiskChunk

CONFIG_MEDIA_TYPE = "application/vnd.cirruslabs.vetu.config.v1"
KERNEL_MEDIA_TYPE = "application/vnd.cirruslabs.vetu.kernel.v1"
INITRAMFS_MEDIA_TYPE = "application/vnd.cirruslabs.vetu.initramfs.v1"
DISK_MEDIA_TYPE = "application/vnd.cirruslabs.vetu.disk.v1"

NAME_ANNOTATION = "org.cirruslabs.vetu.name"
UNCOMPRESSED_SIZE_ANNOTATION = "org.cirruslabs.vetu.uncompressed-size"
UNCOMPRESSED_DIGEST_ANNOTATION = "org.cirruslabs.vetu.uncompressed-digest"

#: Vetu's target disk chunk size (``targetDiskLayerSizeBytes``, 500 MB).
CHUNK_SIZE = 500 * 1000 * 1000
#: Most disks accepted in one image.
MAX_DISKS = 64

#: A disk name: starts with a letter or digit (so never ``.``, ``..`` or hidden), then letters,
#: digits, ``.``, ``_``, ``-``, ``+``; at most 255 bytes. No ``/``, ``\\``, NUL or spaces.
_DISK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")
#: Names of the other files in a VM directory (Vetu's and barge's), never usable for a disk.
RESERVED_NAMES = frozenset({"config.json", "kernel", "initramfs", "nvram.bin", "manifest.json"})

__all__ = [
    "DISK_MEDIA_TYPE",
    "VetuDisk",
    "VetuImage",
    "parse_vetu_manifest",
    "validate_disk_name",
]


@dataclass(frozen=True)
class VetuDisk:
    name: str  # validated safe file name
    size: int  # uncompressed size: the sum of its chunks
    chunks: tuple[DiskChunk, ...]  # in offset order


@dataclass(frozen=True)
class VetuImage:
    config: BlobDescriptor  # the manifest's OCI config
    vm_config: BlobDescriptor
    kernel: BlobDescriptor
    initramfs: BlobDescriptor | None
    disks: tuple[VetuDisk, ...]  # in order of first appearance


def validate_disk_name(name: object, what: str = "disk name") -> str:
    """Return ``name`` if it is safe to use as a file name inside a VM directory."""
    if not isinstance(name, str) or not name:
        raise IntegrityError(f"{what}: empty or missing disk name")
    if not _DISK_NAME_RE.fullmatch(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise IntegrityError(
            f"{what}: unsafe disk name {shown!r} (allowed: letters, digits, '.', '_', '-', '+', "
            "starting with a letter or digit, at most 255 characters)"
        )
    if name in RESERVED_NAMES:
        raise IntegrityError(f"{what}: disk name {name!r} is reserved")
    return name


def parse_vetu_manifest(manifest: Mapping[str, Any]) -> VetuImage:
    """Validate a Vetu image manifest and locate its parts; disks grouped by name."""
    what = "Vetu manifest"
    config, layers = manifest_layers(manifest, what)
    if config.media_type not in CONFIG_MEDIA_TYPES:
        raise UnsupportedError(f"{what}: unknown config media type {config.media_type!r}")
    vm_configs: list[BlobDescriptor] = []
    kernels: list[BlobDescriptor] = []
    initramfses: list[BlobDescriptor] = []
    by_name: dict[str, list[DiskChunk]] = {}
    for i, layer in enumerate(layers):
        mt = layer.media_type
        if mt == CONFIG_MEDIA_TYPE:
            vm_configs.append(layer)
        elif mt == KERNEL_MEDIA_TYPE:
            kernels.append(layer)
        elif mt == INITRAMFS_MEDIA_TYPE:
            initramfses.append(layer)
        elif mt == DISK_MEDIA_TYPE:
            lw = f"{what}: disk layer {i}"
            ann = layer.annotations
            for key in (
                NAME_ANNOTATION,
                UNCOMPRESSED_SIZE_ANNOTATION,
                UNCOMPRESSED_DIGEST_ANNOTATION,
            ):
                if key not in ann:
                    raise IntegrityError(f"{lw} has no {key} annotation")
            name = validate_disk_name(ann[NAME_ANNOTATION], lw)
            size = parse_decimal(
                ann[UNCOMPRESSED_SIZE_ANNOTATION], f"{lw} {UNCOMPRESSED_SIZE_ANNOTATION}"
            )
            if size == 0:
                raise IntegrityError(f"{lw} has an uncompressed size of 0")
            digest = validate_sha256(
                ann[UNCOMPRESSED_DIGEST_ANNOTATION], f"{lw} {UNCOMPRESSED_DIGEST_ANNOTATION}"
            )
            chunks = by_name.get(name)
            if chunks is None:
                if len(by_name) >= MAX_DISKS:
                    raise IntegrityError(f"{what}: more than {MAX_DISKS} disks")
                chunks = by_name[name] = []
            offset = chunks[-1].offset + chunks[-1].size if chunks else 0
            if offset + size > MAX_DISK_SIZE:
                raise IntegrityError(f"{what}: disk {name!r} exceeds {MAX_DISK_SIZE} bytes")
            chunks.append(DiskChunk(layer, offset, size, digest))
        else:
            raise UnsupportedError(f"{what}: layer {i} has unknown media type {mt!r}")
    for mt, found in ((CONFIG_MEDIA_TYPE, vm_configs), (KERNEL_MEDIA_TYPE, kernels)):
        if len(found) != 1:
            raise IntegrityError(f"{what}: expected exactly one {mt} layer, found {len(found)}")
    if len(initramfses) > 1:
        raise IntegrityError(
            f"{what}: expected at most one {INITRAMFS_MEDIA_TYPE} layer, found {len(initramfses)}"
        )
    disks = tuple(
        VetuDisk(name, chunks[-1].offset + chunks[-1].size, tuple(chunks))
        for name, chunks in by_name.items()
    )
    return VetuImage(
        config=config,
        vm_config=vm_configs[0],
        kernel=kernels[0],
        initramfs=initramfses[0] if initramfses else None,
        disks=disks,
    )
