"""Vetu's VM image format on OCI registries (``shared/FORMAT.md`` §2): read.

Facts from Vetu's public source (``internal/oci/annotations``, ``internal/oci/pull/vetu/vetu.go``,
``internal/oci/diskpuller/diskpuller.go``, ``internal/vmconfig/vmconfig.go``,
``internal/name/simplename/simplename.go``, ``internal/chunker/chunker.go``):

- exactly one VM config layer, exactly one kernel layer, at most one initramfs layer; layers of
  any other media type are *ignored* (Vetu picks layers by media type), and so they are here;
- disk layers (LZ4 *frames*, :mod:`barge.disk.lz4frame`) each annotated with the disk's file
  name, its uncompressed size and uncompressed digest. A disk's chunks are placed in layer order
  *within one disk name*: chunk *i* of disk ``d`` goes at the sum of the uncompressed sizes of
  the earlier chunks of ``d``. Vetu's chunker emits one zero-length chunk for an empty disk, so a
  chunk of size 0 is valid;
- Vetu joins a disk name to the VM directory after checking that the VM config lists it, and
  the config's names are ``simplename``s: ``[A-Za-z0-9_-]``, plus ``.`` except first or last.
  A config without a ``disks`` list lists nothing, so Vetu refuses every disk layer then;
- the VM config needs ``version`` 1 and a non-empty ``arch``.

Where barge is stricter, on purpose: the uncompressed-digest annotation is required (Vetu's
pull does not check it; it is barge's only proof of the decoded bytes), and a disk may not be
called like a file barge keeps next to it (``config.json``, ``kernel``…).
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
    manifest_layers,
    parse_decimal,
    validate_sha256,
)
from barge.formats.tart import DiskChunk
from barge.oci.types import Descriptor
from barge.untrusted import load_json

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

#: Largest Vetu VM config accepted.
MAX_VM_CONFIG_SIZE = 1 << 20
#: The only VM config version Vetu reads (``vmconfig.CurrentVersion``).
VM_CONFIG_VERSION = 1

#: A disk name, Vetu's ``simplename`` rule: letters, digits, ``_``, ``-``, and ``.`` except as
#: the first or last character (so never ``.``, ``..`` or hidden); at most 255 bytes (a file
#: name). No ``/``, ``\\``, NUL or spaces.
_DISK_NAME_RE = re.compile(r"[A-Za-z0-9_-](?:[A-Za-z0-9._-]{0,253}[A-Za-z0-9_-])?")
#: Names of the other files in a VM directory (Vetu's and barge's), never usable for a disk.
RESERVED_NAMES = frozenset(
    {
        "config.json",
        "kernel",
        "initramfs",
        "nvram.bin",
        "manifest.json",
        "index.json",
        "vetu-config.json",
    }
)
_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(?::[0-9a-fA-F]{2}){5}")

__all__ = [
    "DISK_MEDIA_TYPE",
    "VetuDisk",
    "VetuImage",
    "VetuVM",
    "check_disks_listed",
    "parse_vetu_manifest",
    "validate_disk_name",
    "vetu_vm_info",
]


@dataclass(frozen=True)
class VetuDisk:
    name: str  # validated safe file name
    size: int  # uncompressed size: the sum of its chunks
    chunks: tuple[DiskChunk, ...]  # in offset order


@dataclass(frozen=True)
class VetuImage:
    config: Descriptor  # the manifest's OCI config
    vm_config: Descriptor
    kernel: Descriptor
    initramfs: Descriptor | None
    disks: tuple[VetuDisk, ...]  # in order of first appearance
    #: media types of the layers Vetu (and so barge) ignores, in layer order
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True)
class VetuVM:
    """What barge takes from Vetu's VM config (``vmconfig.VMConfig``)."""

    arch: str  # Go's GOARCH: amd64, arm64
    disks: tuple[str, ...]  # the names it lists (empty when it has no "disks")
    cpus: int | None
    memory: int | None
    mac: str | None
    cmdline: str = ""  # the kernel command line Vetu boots with


def validate_disk_name(name: object, what: str = "disk name") -> str:
    """Return ``name`` if it is safe to use as a file name inside a VM directory."""
    if not isinstance(name, str) or not name:
        raise IntegrityError(f"{what}: empty or missing disk name")
    if not _DISK_NAME_RE.fullmatch(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise IntegrityError(
            f"{what}: unsafe disk name {shown!r} (allowed, as in Vetu: letters, digits, '_', '-', "
            "and '.' except first or last; at most 255 characters)"
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
    vm_configs: list[Descriptor] = []
    kernels: list[Descriptor] = []
    initramfses: list[Descriptor] = []
    by_name: dict[str, list[DiskChunk]] = {}
    ignored: list[str] = []
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
            ann = layer.annotations or {}
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
            ignored.append(mt)  # Vetu selects layers by media type; the rest it never reads
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
        ignored=tuple(ignored),
    )


def vetu_vm_info(config_json: bytes) -> VetuVM:
    """Validate Vetu's VM config as Vetu's ``vmconfig.NewFromJSON`` does (version 1, a
    non-empty ``arch``, every listed disk name a ``simplename``) and return what barge uses."""
    what = "Vetu VM config"
    vm = load_json(config_json, what, max_size=MAX_VM_CONFIG_SIZE)
    if not isinstance(vm, dict):
        raise IntegrityError(f"{what} is not a JSON object")
    version = vm.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise IntegrityError(f"{what}: version must be an integer")
    if version != VM_CONFIG_VERSION:
        raise UnsupportedError(
            f"{what}: version {version} (Vetu reads only version {VM_CONFIG_VERSION})"
        )
    arch = vm.get("arch")
    if not isinstance(arch, str) or not arch:
        raise IntegrityError(f"{what} has no arch (Vetu refuses such a config too)")
    raw = vm.get("disks")
    names: list[str] = []
    if raw is not None:
        if not isinstance(raw, list) or not all(
            isinstance(d, dict) and isinstance(d.get("name"), str) for d in raw
        ):
            raise IntegrityError(f"{what}: 'disks' must be a list of {{\"name\": ...}} objects")
        names = [validate_disk_name(d["name"], f"{what} disks") for d in raw]
        if len(set(names)) != len(names):
            raise IntegrityError(f"{what} lists a disk name twice")
    cpus = vm.get("cpuCount")
    mem = vm.get("memorySize")
    mac = vm.get("macAddress")
    cmdline = vm.get("cmdline", "")
    if not isinstance(cmdline, str):  # Go's json.Unmarshal into a string refuses it too
        raise IntegrityError(f"{what}: 'cmdline' must be a string")
    return VetuVM(
        arch=arch,
        disks=tuple(names),
        cpus=cpus if isinstance(cpus, int) and not isinstance(cpus, bool) and cpus > 0 else None,
        memory=mem if isinstance(mem, int) and not isinstance(mem, bool) and mem > 0 else None,
        mac=mac.lower() if isinstance(mac, str) and _MAC_RE.fullmatch(mac) else None,
        cmdline=cmdline,
    )


def check_disks_listed(image: VetuImage, vm: VetuVM) -> None:
    """Vetu's pull refuses a disk layer whose name its VM config does not list (and a config
    without ``disks`` lists none): so does barge."""
    for d in image.disks:
        if d.name not in vm.disks:
            listed = ", ".join(vm.disks) if vm.disks else "none: it has no 'disks' list"
            raise IntegrityError(
                f"Vetu image has disk layers named {d.name!r}, which its VM config does not "
                f"list (it lists {listed}); Vetu's own pull refuses such an image"
            )
