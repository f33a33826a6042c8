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
from registry_fixtures import OCI_CONFIG, OCI_MANIFEST, RunningRegistry, put_blob, put_manifest


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
        {
            "mediaType": vetufmt.CONFIG_MEDIA_TYPE,
            "digest": put_blob(reg, repo, vm_cfg),
            "size": len(vm_cfg),
        },
        {
            "mediaType": vetufmt.KERNEL_MEDIA_TYPE,
            "digest": put_blob(reg, repo, kernel),
            "size": len(kernel),
        },
    ]
    if initramfs is not None:
        layers.append(
            {
                "mediaType": vetufmt.INITRAMFS_MEDIA_TYPE,
                "digest": put_blob(reg, repo, initramfs),
                "size": len(initramfs),
            }
        )
    for extra in extra_layers or []:
        layers.append(
            {
                "mediaType": "application/vnd.cirruslabs.vetu.firmware.v9",
                "digest": put_blob(reg, repo, extra),
                "size": len(extra),
            }
        )
    for name, parts in disks.items():
        for part in parts:
            comp = lz4.frame.compress(part)
            layers.append(
                {
                    "mediaType": vetufmt.DISK_MEDIA_TYPE,
                    "digest": put_blob(reg, repo, comp),
                    "size": len(comp),
                    "annotations": {
                        vetufmt.NAME_ANNOTATION: name,
                        vetufmt.UNCOMPRESSED_SIZE_ANNOTATION: str(len(part)),
                        vetufmt.UNCOMPRESSED_DIGEST_ANNOTATION: sha(part),
                    },
                }
            )
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": put_blob(reg, repo, oci_cfg),
            "size": len(oci_cfg),
        },
        "layers": layers,
    }
    put_manifest(reg, repo, tag, json.dumps(doc).encode())
    return {"kernel": kernel, "initramfs": initramfs, "manifest": json.dumps(doc).encode()}
