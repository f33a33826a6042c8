"""Tart's VM image format on OCI registries (``shared/FORMAT.md`` §1): read and write.

Facts taken from Tart's public source (``Sources/tart/OCI/Manifest.swift``,
``OCI/Layerizer/DiskV2.swift``, ``VMDirectory+OCI.swift``, ``VMConfig.swift``,
``Platform/Darwin.swift``, ``OCI/Registry.swift``):

- Layer order as Tart pushes it: the VM config layer, then the disk chunks in disk order, then
  the NVRAM layer. The manifest ``config`` is a stub OCI config
  ``{"architecture", "os", "config": {"Labels": {"org.cirruslabs.tart.disk.format": ...}}}``.
- Disk chunks are 512 MiB of the raw disk (the last shorter), each compressed on its own as an
  Apple LZ4 stream (:mod:`barge.disk.applelz4`), with layer annotations
  ``org.cirruslabs.tart.uncompressed-size`` and ``...uncompressed-content-digest``.
  Tart's pull places chunk *i* at the sum of the uncompressed sizes of chunks ``0..i-1``.
- Manifest annotations: ``org.cirruslabs.tart.uncompressed-disk-size`` and
  ``org.cirruslabs.tart.upload-time``.
- Tart's pull needs exactly one VM config layer, exactly one NVRAM layer and at least one
  ``disk.v2`` layer, and refuses the legacy ``disk.v1`` media type; it selects layers by media
  type and ignores any other layer (so does this reader). Recent Tart versions also know
  stacked ASIF overlay images (``application/vnd.cirruslabs.tart.disk.asif.overlay.v1``);
  barge refuses those.
- Tart's pull asks for (``Accept``) and decodes only an OCI image manifest: a tag holding an
  image index is not pullable by Tart.
- In the VM config, a missing ``os``/``arch``/``diskFormat`` is ``darwin``/``arm64``/``raw``,
  and a ``diskFormat`` Tart does not know is read as ``raw``. A macOS config's ``ecid`` and
  ``hardwareModel`` are base64 (of ``VZMacMachineIdentifier``/``VZMacHardwareModel``).
- The NVRAM layer is the raw file of Apple's ``VZEFIVariableStore`` (created by
  ``VZEFIVariableStore(creatingVariableStoreAt:)``, an undocumented Apple format).

Offsets: barge's writer adds ``dev.barge.disk.offset`` to each disk layer. When *every* disk
layer of an image carries it, the reader uses those offsets (so an image whose layers were
reordered by a registry copy still lands correctly) and checks that the chunks tile the disk
with no gap and no overlap. Otherwise offsets come from layer order, as in Tart, which cannot
detect a reordering; the uncompressed digests catch nothing either, because they are per chunk.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from barge.errors import IntegrityError, UnsupportedError
from barge.formats import (
    BARGE_OFFSET_ANNOTATION,
    CONFIG_MEDIA_TYPES,
    MAX_DISK_SIZE,
    OCI_CONFIG_MEDIA_TYPE,
    OCI_MANIFEST_MEDIA_TYPE,
    check_int,
    manifest_annotations,
    manifest_layers,
    parse_decimal,
    validate_digest,
    validate_sha256,
)
from barge.oci.types import Descriptor
from barge.untrusted import load_json

# Layer media types
CONFIG_MEDIA_TYPE = "application/vnd.cirruslabs.tart.config.v1"
DISK_V2_MEDIA_TYPE = "application/vnd.cirruslabs.tart.disk.v2"
LEGACY_DISK_V1_MEDIA_TYPE = "application/vnd.cirruslabs.tart.disk.v1"
ASIF_OVERLAY_MEDIA_TYPE = "application/vnd.cirruslabs.tart.disk.asif.overlay.v1"
NVRAM_MEDIA_TYPE = "application/vnd.cirruslabs.tart.nvram.v1"

# Manifest annotations
UNCOMPRESSED_DISK_SIZE_ANNOTATION = "org.cirruslabs.tart.uncompressed-disk-size"
UPLOAD_TIME_ANNOTATION = "org.cirruslabs.tart.upload-time"
DISK_BLOCK_SIZE_ANNOTATION = "org.cirruslabs.tart.disk.block-size"
# Label in the stub OCI config
DISK_FORMAT_LABEL = "org.cirruslabs.tart.disk.format"
# Layer annotations
UNCOMPRESSED_SIZE_ANNOTATION = "org.cirruslabs.tart.uncompressed-size"
UNCOMPRESSED_CONTENT_DIGEST_ANNOTATION = "org.cirruslabs.tart.uncompressed-content-digest"
OFFSET_ANNOTATION = BARGE_OFFSET_ANNOTATION

#: Tart's disk chunk size (DiskV2 ``layerLimitBytes``).
CHUNK_SIZE = 512 * 1024 * 1024
#: Largest VM config blob accepted.
MAX_VM_CONFIG_SIZE = 1024 * 1024
#: Size of the placeholder NVRAM file :func:`placeholder_nvram` produces.
NVRAM_PLACEHOLDER_SIZE = 128 * 1024

LEGACY_DISK_V1_MESSAGE = (
    "this image uses Tart's legacy disk.v1 format; re-push it with a current Tart"
)

OSName = Literal["darwin", "linux"]
_OSES = ("darwin", "linux")
_ARCHES = ("arm64", "amd64")
_DISK_FORMATS = ("raw", "asif")
_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")

__all__ = [
    "CONFIG_MEDIA_TYPE",
    "DISK_V2_MEDIA_TYPE",
    "LEGACY_DISK_V1_MEDIA_TYPE",
    "NVRAM_MEDIA_TYPE",
    "REORDERED_MESSAGE",
    "DiskChunk",
    "TartImage",
    "build_tart_manifest",
    "build_tart_oci_config",
    "build_tart_vm_config",
    "check_macos_identity",
    "parse_tart_manifest",
    "placeholder_nvram",
    "tart_vm_info",
]


class DiskChunk(NamedTuple):
    """One disk layer: its (compressed) blob, where it goes and what it decodes to."""

    descriptor: Descriptor
    offset: int  # uncompressed byte offset in the disk
    size: int  # uncompressed size
    digest: str  # sha256 of the uncompressed bytes


@dataclass(frozen=True)
class TartImage:
    config: Descriptor  # the stub OCI config
    vm_config: Descriptor  # Tart's config.json
    nvram: Descriptor
    disk_chunks: tuple[DiskChunk, ...]  # sorted by offset, tiling 0..disk_size
    disk_size: int
    upload_time: str | None
    #: "annotation" when every disk layer carried dev.barge.disk.offset, else "order"
    offsets_from: Literal["annotation", "order"]
    #: True when the annotated offsets differ from the layer order (the layers were reordered):
    #: barge places the chunks by offset, Tart by order, so Tart builds a different disk
    reordered: bool
    #: media types of the layers Tart (and so barge) ignores, in layer order
    ignored: tuple[str, ...] = ()


#: Why an image whose offsets disagree with its layer order is refused by ``verify``.
REORDERED_MESSAGE = (
    f"the disk layers are not in the order of their {BARGE_OFFSET_ANNOTATION} annotations: "
    "barge places chunks by offset, Tart places them by layer order, so `tart pull` of this "
    "image builds a scrambled disk"
)


# --------------------------------------------------------------------------------------------
# Reader


def parse_tart_manifest(manifest: Mapping[str, Any]) -> TartImage:
    """Validate a Tart image manifest and locate its parts. Raises :class:`IntegrityError`
    for malformed or hostile content and :class:`UnsupportedError` for what barge refuses."""
    what = "Tart manifest"
    config, layers = manifest_layers(manifest, what)
    if config.media_type not in CONFIG_MEDIA_TYPES:
        raise UnsupportedError(f"{what}: unknown config media type {config.media_type!r}")
    vm_configs: list[Descriptor] = []
    nvrams: list[Descriptor] = []
    disks: list[tuple[int, Descriptor]] = []
    ignored: list[str] = []
    for i, layer in enumerate(layers):
        mt = layer.media_type
        if mt == CONFIG_MEDIA_TYPE:
            vm_configs.append(layer)
        elif mt == DISK_V2_MEDIA_TYPE:
            disks.append((i, layer))
        elif mt == NVRAM_MEDIA_TYPE:
            nvrams.append(layer)
        elif mt == LEGACY_DISK_V1_MEDIA_TYPE:
            raise UnsupportedError(LEGACY_DISK_V1_MESSAGE)
        elif mt == ASIF_OVERLAY_MEDIA_TYPE:
            raise UnsupportedError(
                f"this image is a stacked Tart image (layer media type {mt}); barge supports "
                "only flat Tart disks"
            )
        else:
            ignored.append(mt)  # Tart selects layers by media type; the rest it never reads
    if not disks:
        raise IntegrityError(f"{what}: no {DISK_V2_MEDIA_TYPE} layer (Tart needs at least one)")
    if len(vm_configs) != 1:
        raise IntegrityError(
            f"{what}: expected exactly one {CONFIG_MEDIA_TYPE} layer, found {len(vm_configs)}"
        )
    if len(nvrams) != 1:
        raise IntegrityError(
            f"{what}: expected exactly one {NVRAM_MEDIA_TYPE} layer, found {len(nvrams)}"
        )

    chunks: list[DiskChunk] = []
    order_offset = 0
    annotated: list[int | None] = []
    for i, layer in disks:
        ann = layer.annotations or {}
        lw = f"{what}: disk layer {i}"
        if UNCOMPRESSED_SIZE_ANNOTATION not in ann:
            raise IntegrityError(f"{lw} has no {UNCOMPRESSED_SIZE_ANNOTATION} annotation")
        if UNCOMPRESSED_CONTENT_DIGEST_ANNOTATION not in ann:
            raise IntegrityError(f"{lw} has no {UNCOMPRESSED_CONTENT_DIGEST_ANNOTATION} annotation")
        size = parse_decimal(
            ann[UNCOMPRESSED_SIZE_ANNOTATION], f"{lw} {UNCOMPRESSED_SIZE_ANNOTATION}"
        )
        if size == 0:
            raise IntegrityError(f"{lw} has an uncompressed size of 0")
        digest = validate_sha256(
            ann[UNCOMPRESSED_CONTENT_DIGEST_ANNOTATION],
            f"{lw} {UNCOMPRESSED_CONTENT_DIGEST_ANNOTATION}",
        )
        if OFFSET_ANNOTATION in ann:
            annotated.append(parse_decimal(ann[OFFSET_ANNOTATION], f"{lw} {OFFSET_ANNOTATION}"))
        else:
            annotated.append(None)
        chunks.append(DiskChunk(layer, order_offset, size, digest))
        order_offset += size
        if order_offset > MAX_DISK_SIZE:
            raise IntegrityError(f"{what}: disk layers add up to more than {MAX_DISK_SIZE} bytes")
    total = order_offset

    offsets_from: Literal["annotation", "order"] = "order"
    reordered = False
    have = [a for a in annotated if a is not None]
    if have and len(have) != len(annotated):
        raise IntegrityError(
            f"{what}: {len(have)} of {len(annotated)} disk layers carry {OFFSET_ANNOTATION}; "
            "either all or none must"
        )
    if have:
        offsets_from = "annotation"
        placed = [c._replace(offset=a) for c, a in zip(chunks, have, strict=True)]
        reordered = any(p.offset != c.offset for p, c in zip(placed, chunks, strict=True))
        placed.sort(key=lambda c: c.offset)
        expect = 0
        for c in placed:
            if c.offset != expect:
                kind = "a gap" if c.offset > expect else "an overlap"
                raise IntegrityError(
                    f"{what}: disk chunk {c.descriptor.digest} at offset {c.offset} leaves {kind} "
                    f"(the previous chunks end at {expect})"
                )
            expect = c.offset + c.size
        chunks = placed

    annotations = manifest_annotations(manifest, what)
    if UNCOMPRESSED_DISK_SIZE_ANNOTATION in annotations:
        disk_size = parse_decimal(
            annotations[UNCOMPRESSED_DISK_SIZE_ANNOTATION],
            f"{what} {UNCOMPRESSED_DISK_SIZE_ANNOTATION}",
        )
        if disk_size != total:
            raise IntegrityError(
                f"{what}: disk layers add up to {total} bytes but "
                f"{UNCOMPRESSED_DISK_SIZE_ANNOTATION} says {disk_size}"
            )
    else:
        disk_size = total
    upload_time = annotations.get(UPLOAD_TIME_ANNOTATION)
    if upload_time is not None and len(upload_time) > 64:
        raise IntegrityError(f"{what}: {UPLOAD_TIME_ANNOTATION} is too long")
    return TartImage(
        config=config,
        vm_config=vm_configs[0],
        nvram=nvrams[0],
        disk_chunks=tuple(chunks),
        disk_size=disk_size,
        upload_time=upload_time,
        offsets_from=offsets_from,
        reordered=reordered,
        ignored=tuple(ignored),
    )


def tart_vm_info(config_json: bytes) -> dict[str, Any]:
    """Validate Tart's VM config (``config.json``, the ``tart.config.v1`` layer) and return
    ``os, arch, cpuCount, memorySize, macAddress, diskFormat`` (plus ``cpuCountMin``,
    ``memorySizeMin``, ``display`` when present). Missing ``os``/``arch``/``diskFormat`` take
    Tart's defaults (``darwin``, ``arm64``, ``raw``); a ``diskFormat`` string Tart does not know
    is ``raw`` too, as in Tart, and the original is kept as ``diskFormatUnknown``."""
    what = "Tart VM config"
    if len(config_json) > MAX_VM_CONFIG_SIZE:
        raise IntegrityError(f"{what} is {len(config_json)} bytes, over {MAX_VM_CONFIG_SIZE}")
    obj = load_json(config_json, what, max_size=MAX_VM_CONFIG_SIZE)
    if not isinstance(obj, dict):
        raise IntegrityError(f"{what} is not a JSON object")
    check_int(obj.get("version"), f"{what} version", maximum=1000)
    os_ = obj.get("os", "darwin")
    if os_ not in _OSES:
        raise IntegrityError(f"{what}: unknown os {os_!r}")
    arch = obj.get("arch", "arm64")
    if arch not in _ARCHES:
        raise IntegrityError(f"{what}: unknown arch {arch!r}")
    info: dict[str, Any] = {"os": os_, "arch": arch}
    info["cpuCount"] = check_int(obj.get("cpuCount"), f"{what} cpuCount", minimum=1, maximum=4096)
    info["memorySize"] = check_int(
        obj.get("memorySize"), f"{what} memorySize", minimum=1, maximum=1 << 50
    )
    mac = obj.get("macAddress")
    if not isinstance(mac, str) or not _MAC_RE.fullmatch(mac):
        raise IntegrityError(f"{what}: invalid macAddress {mac!r}")
    info["macAddress"] = mac.lower()
    disk_format = obj.get("diskFormat", "raw")
    if not isinstance(disk_format, str):
        raise IntegrityError(f"{what}: diskFormat must be a string, got {disk_format!r:.80}")
    if disk_format not in _DISK_FORMATS:
        info["diskFormatUnknown"] = disk_format  # DiskImageFormat(rawValue:) ?? .raw
        disk_format = "raw"
    info["diskFormat"] = disk_format
    if "cpuCountMin" in obj:
        info["cpuCountMin"] = check_int(obj["cpuCountMin"], f"{what} cpuCountMin", maximum=4096)
    if "memorySizeMin" in obj:
        info["memorySizeMin"] = check_int(
            obj["memorySizeMin"], f"{what} memorySizeMin", maximum=1 << 50
        )
    display = obj.get("display")
    if isinstance(display, dict):
        info["display"] = {
            "width": check_int(display.get("width"), f"{what} display width", maximum=1 << 16),
            "height": check_int(display.get("height"), f"{what} display height", maximum=1 << 16),
        }
    return info


def check_macos_identity(ecid: object, hardware_model: object, what: str = "macOS config") -> None:
    """Raise :class:`IntegrityError` unless ``ecid`` and ``hardware_model`` are non-empty
    strict base64, which Tart decodes with ``Data(base64Encoded:)`` before handing them to
    Virtualization.framework (``Platform/Darwin.swift``)."""
    for key, value in (("ecid", ecid), ("hardwareModel", hardware_model)):
        if not isinstance(value, str) or not value:
            raise IntegrityError(f"{what}: {key} is missing (a macOS VM needs it)")
        try:  # Foundation wants the padding: a length that is a multiple of 4
            decoded = base64.b64decode(value.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            decoded = b""
        if len(value) % 4:
            decoded = b""
        if not decoded:
            raise IntegrityError(
                f"{what}: {key} {value[:40]!r} is not base64 (Tart could not decode it)"
            )


# --------------------------------------------------------------------------------------------
# Writer


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def build_tart_vm_config(
    os: OSName,
    arch: str,
    cpus: int,
    memory: int,
    mac: str,
    disk_format: str = "raw",
    *,
    ecid: str | None = None,
    hardware_model: str | None = None,
    display: tuple[int, int] = (1024, 768),
) -> bytes:
    """Tart's ``config.json`` with the fields in the order Tart writes them.

    ``cpuCountMin``/``memorySizeMin`` are set to ``cpus``/``memory`` (Tart enforces the minimums
    only for macOS). macOS configs need ``ecid`` and ``hardware_model`` (base64, from Apple's
    ``VZMacMachineIdentifier``/``VZMacHardwareModel``); barge cannot create those.
    """
    if os not in _OSES:
        raise ValueError(f"os must be one of {_OSES}")
    if arch not in _ARCHES:
        raise ValueError(f"arch must be one of {_ARCHES}")
    if disk_format not in _DISK_FORMATS:
        raise ValueError(f"disk_format must be one of {_DISK_FORMATS}")
    if cpus < 1 or memory < 1:
        raise ValueError("cpus and memory must be positive")
    if not _MAC_RE.fullmatch(mac):
        raise ValueError(f"invalid MAC address {mac!r}")
    cfg: dict[str, Any] = {"version": 1, "os": os, "arch": arch}
    if os == "darwin":
        if ecid is None or hardware_model is None:
            raise UnsupportedError("a macOS Tart config needs an ECID and a hardware model")
        check_macos_identity(ecid, hardware_model, "macOS Tart config")
        cfg["ecid"] = ecid
        cfg["hardwareModel"] = hardware_model
    cfg.update(
        {
            "cpuCountMin": cpus,
            "cpuCount": cpus,
            "memorySizeMin": memory,
            "memorySize": memory,
            "macAddress": mac.lower(),
            "display": {"width": display[0], "height": display[1]},
            "diskFormat": disk_format,
        }
    )
    return _dumps(cfg)


def build_tart_oci_config(
    os: OSName,
    arch: str = "arm64",
    disk_format: str = "raw",
    labels: Mapping[str, str] | None = None,
) -> bytes:
    """The stub OCI config Tart puts in the manifest's ``config``."""
    all_labels = dict(labels or {})
    all_labels[DISK_FORMAT_LABEL] = disk_format
    return _dumps({"architecture": arch, "os": os, "config": {"Labels": all_labels}})


def placeholder_nvram(size: int = NVRAM_PLACEHOLDER_SIZE) -> bytes:
    """A zero-filled stand-in for the NVRAM layer Tart requires.

    Tart creates the real file with Apple's ``VZEFIVariableStore(creatingVariableStoreAt:)``,
    whose format is undocumented and cannot be produced off macOS. This placeholder satisfies
    Tart's pull (exactly one NVRAM layer); whether Virtualization.framework boots a Linux VM
    from it is not verified. When re-pushing an image pulled from Tart, carry its NVRAM instead.
    """
    return bytes(size)


def format_upload_time(when: _dt.datetime) -> str:
    """ISO 8601 in UTC with a ``Z``, second precision (as Foundation's ISO8601DateFormatter)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.UTC)
    return when.astimezone(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_tart_manifest(
    config_desc: Descriptor,
    vm_config_desc: Descriptor,
    disk_layers: Sequence[DiskChunk | tuple[Descriptor, int, int, str]],
    nvram_desc: Descriptor,
    disk_size: int,
    upload_time: _dt.datetime | str,
) -> bytes:
    """Serialize a Tart manifest: VM config layer, disk layers in disk order, NVRAM last.

    Media types are set here (whatever the given descriptors say). Every disk layer gets Tart's
    two annotations and barge's ``dev.barge.disk.offset``. ``disk_layers`` must be in offset
    order and tile ``0..disk_size`` exactly (Tart derives offsets from order).
    """
    layers: list[dict[str, Any]] = [
        {
            "mediaType": CONFIG_MEDIA_TYPE,
            "digest": validate_digest(vm_config_desc.digest, "VM config"),
            "size": vm_config_desc.size,
        }
    ]
    expect = 0
    for i, item in enumerate(disk_layers):
        desc, offset, size, udigest = item
        validate_digest(desc.digest, f"disk layer {i}")
        validate_sha256(udigest, f"disk layer {i} uncompressed digest")
        if offset != expect:
            raise ValueError(f"disk layer {i} is at offset {offset}; expected {expect} (order)")
        if size <= 0:
            raise ValueError(f"disk layer {i} has size {size}")
        expect = offset + size
        layers.append(
            {
                "mediaType": DISK_V2_MEDIA_TYPE,
                "digest": desc.digest,
                "size": desc.size,
                "annotations": {
                    UNCOMPRESSED_SIZE_ANNOTATION: str(size),
                    UNCOMPRESSED_CONTENT_DIGEST_ANNOTATION: udigest,
                    OFFSET_ANNOTATION: str(offset),
                },
            }
        )
    if expect != disk_size:
        raise ValueError(f"disk layers cover {expect} bytes but disk_size is {disk_size}")
    layers.append(
        {
            "mediaType": NVRAM_MEDIA_TYPE,
            "digest": validate_digest(nvram_desc.digest, "NVRAM"),
            "size": nvram_desc.size,
        }
    )
    when = upload_time if isinstance(upload_time, str) else format_upload_time(upload_time)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST_MEDIA_TYPE,
        "config": {
            "mediaType": OCI_CONFIG_MEDIA_TYPE,
            "digest": validate_digest(config_desc.digest, "config"),
            "size": config_desc.size,
        },
        "layers": layers,
        "annotations": {
            UNCOMPRESSED_DISK_SIZE_ANNOTATION: str(disk_size),
            UPLOAD_TIME_ANNOTATION: when,
        },
    }
    return _dumps(manifest)
