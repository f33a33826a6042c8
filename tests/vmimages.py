"""Tart and Vetu images built by the tests, not by barge, for any test module to use.

Tart disk layers are Apple LZ4 streams (the real vectors in ``tests/testdata/apple-lz4``, written
by Apple's Compression framework, or stored ``bv4-`` blocks written by hand); Vetu disk layers
come from ``lz4.frame.compress``. An image goes to a real registry (stdlib HTTP,
``put_blob``/``put_manifest``) or into an OCI image layout directory (:class:`OCILayout`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import lz4.frame

from barge.formats import tart as tartfmt
from barge.formats import vetu as vetufmt
from barge.oci.layout import OCILayout
from clitest import sha
from registries import RunningRegistry
from seed import OCI_CONFIG, OCI_MANIFEST, put_blob, put_manifest

VECTORS = Path(__file__).parent / "testdata" / "apple-lz4"
KiB = 1024
MiB = 1 << 20

#: Where a test image goes: a registry (``repo`` names the repository) or a layout directory.
Sink = RunningRegistry | OCILayout


def _blob(sink: Sink, repo: str, data: bytes) -> str:
    if isinstance(sink, OCILayout):
        digest = sha(data)
        sink.write_blob(digest, len(data), io.BytesIO(data))
        return digest
    return put_blob(sink, repo, data)


def _put_image(
    sink: Sink,
    repo: str,
    tag: str,
    oci_cfg: bytes,
    layers: list[dict[str, Any]],
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Put the OCI config blob and an image manifest of ``layers``; returns the manifest."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": _blob(sink, repo, oci_cfg),
            "size": len(oci_cfg),
        },
        "layers": layers,
    }
    if annotations:
        doc["annotations"] = annotations
    data = json.dumps(doc).encode()
    if isinstance(sink, OCILayout):
        sink.put_manifest(data, OCI_MANIFEST, tag)
    else:
        put_manifest(sink, repo, tag, data)
    return doc


def sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(4 * MiB):
            h.update(piece)
    return "sha256:" + h.hexdigest()


def stored_stream(data: bytes) -> bytes:
    """An Apple LZ4 stream written by hand: one stored ``bv4-`` block per 64 KiB, ``bv4$``."""
    out = b""
    for i in range(0, len(data), 64 * KiB):
        block = data[i : i + 64 * KiB]
        out += b"bv4-" + struct.pack("<I", len(block)) + block
    return out + b"bv4$"


# -- Tart images built by hand ---------------------------------------------------------------


def tart_vm_config(os_name: str = "darwin") -> bytes:
    cfg: dict[str, Any] = {"version": 1, "os": os_name, "arch": "arm64"}
    if os_name == "darwin":
        cfg["ecid"] = "AAAAAAAAAAA="
        cfg["hardwareModel"] = "YmFyZ2UgdGVzdCBoYXJkd2FyZSBtb2RlbA=="
    cfg.update(
        {
            "cpuCountMin": 4,
            "cpuCount": 4,
            "memorySizeMin": 8 << 30,
            "memorySize": 8 << 30,
            "macAddress": "7a:65:8f:01:02:03",
            "display": {"width": 1024, "height": 768},
            "diskFormat": "raw",
        }
    )
    return json.dumps(cfg).encode()


class TartChunk:
    def __init__(self, compressed: bytes, plain: bytes) -> None:
        self.compressed = compressed
        self.plain = plain


def vector_chunks() -> list[TartChunk]:
    """Three disk chunks: Apple's pg2554 vector, 256 KiB of zeros (stored blocks), and
    Apple's hello-world vector. Their uncompressed bytes concatenated form the disk."""
    pg = TartChunk((VECTORS / "pg2554.txt.lz4").read_bytes(), (VECTORS / "pg2554.txt").read_bytes())
    zeros = TartChunk(stored_stream(bytes(256 * KiB)), bytes(256 * KiB))
    hello = TartChunk(
        (VECTORS / "hello-world.txt.lz4").read_bytes(), (VECTORS / "hello-world.txt").read_bytes()
    )
    return [pg, zeros, hello]


def push_tart(
    reg: Sink,
    repo: str,
    tag: str,
    chunks: list[TartChunk],
    *,
    order: list[int] | None = None,
    offsets: bool = False,
    media_type: str = tartfmt.DISK_V2_MEDIA_TYPE,
    udigests: list[str] | None = None,
    os_name: str = "darwin",
    nvram: bytes = b"NVRAM" * 100,
    vm_config: bytes | None = None,
    extra_layers: list[bytes] | None = None,
    extra_type: str = "application/vnd.example.unknown.v1",
) -> tuple[bytes, dict[str, Any]]:
    """Push a Tart-format image; returns (the disk it stands for, the manifest).
    ``extra_layers`` are blobs of media type ``extra_type`` put after the VM config layer."""
    oci_cfg = json.dumps(
        {
            "architecture": "arm64",
            "os": os_name,
            "config": {"Labels": {tartfmt.DISK_FORMAT_LABEL: "raw", "org.example.team": "ci"}},
        }
    ).encode()
    vm_cfg = vm_config if vm_config is not None else tart_vm_config(os_name)
    layers: list[dict[str, Any]] = [
        {
            "mediaType": tartfmt.CONFIG_MEDIA_TYPE,
            "digest": _blob(reg, repo, vm_cfg),
            "size": len(vm_cfg),
        }
    ]
    for extra in extra_layers or []:
        layers.append(
            {"mediaType": extra_type, "digest": _blob(reg, repo, extra), "size": len(extra)}
        )
    disk_layers = []
    off = 0
    for i, c in enumerate(chunks):
        ann = {
            tartfmt.UNCOMPRESSED_SIZE_ANNOTATION: str(len(c.plain)),
            tartfmt.UNCOMPRESSED_CONTENT_DIGEST_ANNOTATION: udigests[i]
            if udigests
            else sha(c.plain),
        }
        if offsets:
            ann[tartfmt.OFFSET_ANNOTATION] = str(off)
        off += len(c.plain)
        disk_layers.append(
            {
                "mediaType": media_type,
                "digest": _blob(reg, repo, c.compressed),
                "size": len(c.compressed),
                "annotations": ann,
            }
        )
    layers += [disk_layers[i] for i in (order or range(len(chunks)))]
    layers.append(
        {
            "mediaType": tartfmt.NVRAM_MEDIA_TYPE,
            "digest": _blob(reg, repo, nvram),
            "size": len(nvram),
        }
    )
    annotations = {
        tartfmt.UNCOMPRESSED_DISK_SIZE_ANNOTATION: str(off),
        tartfmt.UPLOAD_TIME_ANNOTATION: "2024-05-01T12:30:00Z",
    }
    doc = _put_image(reg, repo, tag, oci_cfg, layers, annotations)
    return b"".join(c.plain for c in chunks), doc


def push_vetu(
    reg: Sink,
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
    """Push a Vetu image of ``disks`` (name -> its chunks, in order); ``config`` updates the VM
    config (a None value removes the key: ``cmdline``, ``arch``…), ``extra_layers`` are blobs
    of an unknown media type put after the kernel; ``initramfs=None`` leaves that layer out."""
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
            "digest": _blob(reg, repo, vm_cfg),
            "size": len(vm_cfg),
        },
        {
            "mediaType": vetufmt.KERNEL_MEDIA_TYPE,
            "digest": _blob(reg, repo, kernel),
            "size": len(kernel),
        },
    ]
    if initramfs is not None:
        layers.append(
            {
                "mediaType": vetufmt.INITRAMFS_MEDIA_TYPE,
                "digest": _blob(reg, repo, initramfs),
                "size": len(initramfs),
            }
        )
    for extra in extra_layers or []:
        layers.append(
            {
                "mediaType": "application/vnd.cirruslabs.vetu.firmware.v9",
                "digest": _blob(reg, repo, extra),
                "size": len(extra),
            }
        )
    for name, parts in disks.items():
        for part in parts:
            comp = lz4.frame.compress(part)
            layers.append(
                {
                    "mediaType": vetufmt.DISK_MEDIA_TYPE,
                    "digest": _blob(reg, repo, comp),
                    "size": len(comp),
                    "annotations": {
                        vetufmt.NAME_ANNOTATION: name,
                        vetufmt.UNCOMPRESSED_SIZE_ANNOTATION: str(len(part)),
                        vetufmt.UNCOMPRESSED_DIGEST_ANNOTATION: sha(part),
                    },
                }
            )
    doc = _put_image(reg, repo, tag, oci_cfg, layers)
    return {"kernel": kernel, "initramfs": initramfs, "manifest": json.dumps(doc).encode()}


def vetu_disks() -> dict[str, list[bytes]]:
    text = (VECTORS / "pg2554.txt").read_bytes()
    return {
        "disk.img": [text[:700_000], bytes(300 * KiB), text[700_000:]],
        "data.img": [os.urandom(100 * KiB) + bytes(200 * KiB)],
    }
