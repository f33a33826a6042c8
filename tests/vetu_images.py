"""Vetu-format images built by the tests with stdlib HTTP, not by barge (fixture module).

Layers as Vetu writes them (``shared/FORMAT.md`` §2): one VM config (``arch``, ``cmdline``,
``disks``, ``cpuCount``, ``memorySize``, ``macAddress``), one kernel, at most one initramfs,
and disk chunks as LZ4 *frames* annotated with the disk's name, uncompressed size and digest.
"""

from __future__ import annotations

import json
from typing import Any

import lz4.frame

from barge.formats import vetu as vetufmt
from clitest import sha
from registry_fixtures import RunningRegistry, blob_layer, put_oci_image


def push_vetu(
    reg: RunningRegistry,
    repo: str,
    tag: str,
    disks: dict[str, list[bytes]],
    *,
    config_disks: list[str] | None = None,
    config: dict[str, Any] | None = None,
    extra_layers: list[bytes] | None = None,
    kernel: bytes = b"\x7fELF kernel" * 1000,
    initramfs: bytes | None = b"070701 initramfs" * 500,
) -> dict[str, Any]:
    """Push a Vetu image of ``disks`` (name -> its chunks, in order). ``config`` updates the VM
    config (a None value removes the key: ``cmdline``, ``arch``…), ``extra_layers`` are blobs
    of an unknown media type put after the kernel. Returns what it pushed."""
    cfg: dict[str, Any] = {
        "version": 1,
        "arch": "arm64",
        "disks": [{"name": n} for n in (config_disks if config_disks is not None else disks)],
        "cpuCount": 2,
        "memorySize": 2 << 30,
        "macAddress": "52:54:00:AA:BB:CC",
    }
    cfg.update(config or {})
    vm_cfg = json.dumps({k: v for k, v in cfg.items() if v is not None}).encode()
    arch = cfg.get("arch") if isinstance(cfg.get("arch"), str) else "arm64"
    oci_cfg = json.dumps({"architecture": arch, "os": "linux"}, separators=(",", ":")).encode()
    layers = [
        blob_layer(reg, repo, vetufmt.CONFIG_MEDIA_TYPE, vm_cfg),
        blob_layer(reg, repo, vetufmt.KERNEL_MEDIA_TYPE, kernel),
    ]
    if initramfs is not None:
        layers.append(blob_layer(reg, repo, vetufmt.INITRAMFS_MEDIA_TYPE, initramfs))
    for extra in extra_layers or []:
        layers.append(blob_layer(reg, repo, "application/vnd.cirruslabs.vetu.firmware.v9", extra))
    for name, parts in disks.items():
        for part in parts:
            ann = {
                vetufmt.NAME_ANNOTATION: name,
                vetufmt.UNCOMPRESSED_SIZE_ANNOTATION: str(len(part)),
                vetufmt.UNCOMPRESSED_DIGEST_ANNOTATION: sha(part),
            }
            layers.append(
                blob_layer(reg, repo, vetufmt.DISK_MEDIA_TYPE, lz4.frame.compress(part), ann)
            )
    doc = put_oci_image(reg, repo, tag, oci_cfg, layers)
    return {"kernel": kernel, "initramfs": initramfs, "manifest": json.dumps(doc).encode()}
