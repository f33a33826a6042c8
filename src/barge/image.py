"""barge's own image format: the manifest, the OCI config and the VM config layer.

An image is an OCI image manifest whose layers are: the VM config
(``application/vnd.barge.vm.config.v1+json``), the frame index
(``application/vnd.barge.disk.index.v1+json``), any extra VM files (NVRAM) and one layer per
non-zero disk chunk (``application/vnd.barge.disk.chunk.v1+zstd`` …) carrying its disk name,
offset, length and uncompressed digest as annotations. The manifest holds no timestamps, so
pushing the same VM twice yields the same manifest digest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from barge.disk.index import (
    CHUNK_MEDIA_TYPE,
    INDEX_MEDIA_TYPE,
    ChunkMeta,
    FrameIndex,
    chunk_annotations,
    parse_chunk_annotations,
)
from barge.errors import IntegrityError, UnsupportedError
from barge.oci.types import OCI_CONFIG, OCI_MANIFEST, Descriptor, sha256_digest
from barge.store.vmconfig import OCI_ARCH, VMConfig, validate_disk_name

VM_CONFIG_MEDIA_TYPE = "application/vnd.barge.vm.config.v1+json"
FILE_MEDIA_TYPE = "application/vnd.barge.vm.file.v1"
FILE_NAME_ANNOTATION = "dev.barge.file.name"
FORMAT_ANNOTATION = "dev.barge.format"
FORMAT_VERSION = "1"
MAX_SMALL_BLOB = 64 << 20  # configs, index, NVRAM: read whole into memory, bounded


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Blob:
    """A small blob held in memory (configs, index, NVRAM)."""

    media_type: str
    data: bytes
    annotations: dict[str, str] | None = None

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    @property
    def descriptor(self) -> Descriptor:
        return Descriptor(self.media_type, self.digest, len(self.data), self.annotations)


def oci_config(config: VMConfig, labels: dict[str, str] | None = None) -> Blob:
    doc: dict[str, Any] = {
        "architecture": OCI_ARCH.get(config.arch, config.arch),
        "os": config.os,
        "config": {"Labels": dict(sorted((labels or {}).items()))} if labels else {},
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    return Blob(OCI_CONFIG, canonical_json(doc))


def build_manifest(
    config_blob: Blob,
    vm_config: Blob,
    index: Blob,
    files: list[Blob],
    chunks: list[ChunkMeta],
) -> bytes:
    layers = [vm_config.descriptor.to_json(), index.descriptor.to_json()]
    layers += [f.descriptor.to_json() for f in files]
    for c in sorted(chunks, key=lambda c: (c.disk, c.offset)):
        layers.append(Descriptor(c.media_type, c.digest, c.size, chunk_annotations(c)).to_json())
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_blob.descriptor.to_json(),
        "layers": layers,
        "annotations": {FORMAT_ANNOTATION: FORMAT_VERSION},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(frozen=True)
class BargeImage:
    """A parsed barge manifest: which layer is what. Blob contents are fetched separately."""

    config: Descriptor
    vm_config: Descriptor
    index: Descriptor
    files: list[tuple[str, Descriptor]]
    chunks: list[Descriptor]

    def check_index(self, index: FrameIndex) -> None:
        """Every chunk layer must be in the index at the offset its annotations name, and every
        indexed chunk must be a layer: layer order is irrelevant, content is not."""
        by_digest: dict[tuple[str, str, int], ChunkMeta] = {
            (c.digest, c.disk, c.offset): c for c in index.chunks
        }
        seen = set()
        for d in self.chunks:
            name, offset, length, udigest = parse_chunk_annotations(d.annotations or {})
            key = (d.digest, name, offset)
            meta = by_digest.get(key)
            if meta is None or meta.length != length or meta.udigest != udigest:
                raise IntegrityError(
                    f"layer {d.digest} claims {name}@{offset}+{length}, which the disk index "
                    "does not list"
                )
            if meta.size != d.size:
                raise IntegrityError(
                    f"layer {d.digest} is {d.size} bytes but the disk index says {meta.size}"
                )
            seen.add(key)
        missing = set(by_digest) - seen
        if missing:
            dig, name, off = sorted(missing)[0]
            raise IntegrityError(f"the disk index lists chunk {name}@{off} ({dig}) with no layer")


def parse_barge_manifest(doc: dict[str, Any]) -> BargeImage:
    if not isinstance(doc, dict):  # whatever JSON a registry or layout handed over
        raise IntegrityError(f"invalid manifest: a JSON {type(doc).__name__}, not an object")
    try:
        config = Descriptor.from_json(doc.get("config"))
        layers = [Descriptor.from_json(x) for x in doc.get("layers") or []]
    except ValueError as e:
        raise IntegrityError(f"invalid manifest: {e}") from None
    vm_cfg = [d for d in layers if d.media_type == VM_CONFIG_MEDIA_TYPE]
    idx = [d for d in layers if d.media_type == INDEX_MEDIA_TYPE]
    if len(vm_cfg) != 1 or len(idx) != 1:
        raise IntegrityError("a barge image needs exactly one VM config and one disk index layer")
    files: list[tuple[str, Descriptor]] = []
    chunks: list[Descriptor] = []
    for d in layers:
        if d.media_type in (VM_CONFIG_MEDIA_TYPE, INDEX_MEDIA_TYPE):
            continue
        if d.media_type == FILE_MEDIA_TYPE:
            name = (d.annotations or {}).get(FILE_NAME_ANNOTATION, "")
            validate_disk_name(name)
            files.append((name, d))
        elif d.media_type.startswith(CHUNK_MEDIA_TYPE):
            chunks.append(d)
        else:
            raise UnsupportedError(f"unknown layer media type {d.media_type!r} in a barge image")
    for d in (vm_cfg[0], idx[0], *(f for _, f in files)):
        if d.size > MAX_SMALL_BLOB:
            raise IntegrityError(f"layer {d.digest} ({d.media_type}) is too large: {d.size} bytes")
    return BargeImage(config, vm_cfg[0], idx[0], files, chunks)
