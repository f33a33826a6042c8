"""Vetu format: manifest parsing (several disks, hostile names and sizes) and the LZ4 frame
decoder its disk layers need; plus format detection."""

from __future__ import annotations

import copy
import hashlib
import io
import os
import tracemalloc
from typing import Any

import lz4.frame
import pytest

from barge.disk import lz4frame
from barge.errors import IntegrityError, UnsupportedError
from barge.formats import detect_format, vetu
from clitest import sha


def layer(media_type: str, name: str, size: int = 10, **ann: str) -> dict[str, Any]:
    out: dict[str, Any] = {"mediaType": media_type, "digest": sha(name.encode()), "size": size}
    if ann:
        out["annotations"] = ann
    return out


def disk(disk_name: str, i: int, usize: int) -> dict[str, Any]:
    return layer(
        vetu.DISK_MEDIA_TYPE,
        f"{disk_name}-{i}",
        **{
            vetu.NAME_ANNOTATION: disk_name,
            vetu.UNCOMPRESSED_SIZE_ANNOTATION: str(usize),
            vetu.UNCOMPRESSED_DIGEST_ANNOTATION: sha(f"plain-{disk_name}-{i}".encode()),
        },
    )


def manifest(initramfs: bool = True) -> dict[str, Any]:
    layers = [
        layer(vetu.CONFIG_MEDIA_TYPE, "config"),
        layer(vetu.KERNEL_MEDIA_TYPE, "kernel"),
    ]
    if initramfs:
        layers.append(layer(vetu.INITRAMFS_MEDIA_TYPE, "initramfs"))
    layers += [
        disk("disk.img", 0, 500_000_000),
        disk("data.img", 0, 1000),
        disk("disk.img", 1, 500_000_000),
        disk("disk.img", 2, 77),
    ]
    return {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": layer("application/vnd.oci.image.config.v1+json", "oci-config"),
        "layers": layers,
    }


def test_parse_two_disks() -> None:
    img = vetu.parse_vetu_manifest(manifest())
    assert img.vm_config.digest == sha(b"config")
    assert img.kernel.digest == sha(b"kernel")
    assert img.initramfs is not None and img.initramfs.digest == sha(b"initramfs")
    assert [d.name for d in img.disks] == ["disk.img", "data.img"]
    main, data = img.disks
    assert [(c.offset, c.size) for c in main.chunks] == [
        (0, 500_000_000),
        (500_000_000, 500_000_000),
        (1_000_000_000, 77),
    ]
    assert main.size == 1_000_000_077
    assert [c.digest for c in main.chunks] == [
        sha(f"plain-disk.img-{i}".encode()) for i in range(3)
    ]
    assert data.size == 1000 and data.chunks[0].offset == 0
    assert detect_format(manifest()) == "vetu"


def test_initramfs_optional_kernel_required() -> None:
    assert vetu.parse_vetu_manifest(manifest(initramfs=False)).initramfs is None
    m = manifest()
    m["layers"] = [x for x in m["layers"] if x["mediaType"] != vetu.KERNEL_MEDIA_TYPE]
    with pytest.raises(IntegrityError, match="exactly one .*kernel"):
        vetu.parse_vetu_manifest(m)
    m = manifest()
    m["layers"].append(layer(vetu.INITRAMFS_MEDIA_TYPE, "again"))
    with pytest.raises(IntegrityError, match="at most one"):
        vetu.parse_vetu_manifest(m)


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "../disk.img", "a/b", "/etc/passwd", ".hidden", "a\\b", "a\x00b", "a b",
     "x" * 300, "config.json", "kernel"],
)  # fmt: skip
def test_unsafe_disk_names_rejected(name: str) -> None:
    m = manifest()
    m["layers"][3]["annotations"][vetu.NAME_ANNOTATION] = name
    with pytest.raises(IntegrityError, match="disk name"):
        vetu.parse_vetu_manifest(m)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        (vetu.UNCOMPRESSED_SIZE_ANNOTATION, "-1", "non-negative"),
        (vetu.UNCOMPRESSED_SIZE_ANNOTATION, "0x10", "non-negative"),
        (vetu.UNCOMPRESSED_SIZE_ANNOTATION, str(1 << 62), "exceeds"),
        (vetu.UNCOMPRESSED_DIGEST_ANNOTATION, "sha256:1234", "invalid sha256"),
    ],
)
def test_hostile_disk_annotations(key: str, value: str, match: str) -> None:
    m = manifest()
    m["layers"][3]["annotations"][key] = value
    with pytest.raises(IntegrityError, match=match):
        vetu.parse_vetu_manifest(m)


def test_missing_annotations_and_bad_descriptors() -> None:
    for key in (vetu.NAME_ANNOTATION, vetu.UNCOMPRESSED_SIZE_ANNOTATION):
        m = manifest()
        del m["layers"][4]["annotations"][key]
        with pytest.raises(IntegrityError, match=f"no {key}"):
            vetu.parse_vetu_manifest(m)
    m = manifest()
    m["layers"][4]["size"] = -5
    with pytest.raises(IntegrityError, match="out of range"):
        vetu.parse_vetu_manifest(m)
    m = manifest()
    m["layers"][1]["digest"] = "sha256:" + "g" * 64
    with pytest.raises(IntegrityError, match="invalid digest"):
        vetu.parse_vetu_manifest(m)


def test_disk_total_bounded() -> None:
    m = manifest()
    big = str((1 << 48) - 10)
    m["layers"][3]["annotations"][vetu.UNCOMPRESSED_SIZE_ANNOTATION] = big
    with pytest.raises(IntegrityError, match="exceeds"):
        vetu.parse_vetu_manifest(m)


def test_unknown_media_type_refused() -> None:
    m = manifest()
    m["layers"].append(layer("application/vnd.cirruslabs.vetu.firmware.v9", "fw"))
    with pytest.raises(UnsupportedError, match="vetu.firmware.v9"):
        vetu.parse_vetu_manifest(m)


# --------------------------------------------------------------------------------------------
# detect_format


def test_detect_format() -> None:
    assert (
        detect_format({"layers": [{"mediaType": "application/vnd.barge.disk.chunk.v1+zstd"}]})
        == "barge"
    )
    assert detect_format({"artifactType": "application/vnd.barge.vm.v1", "layers": []}) == "barge"
    assert detect_format({"config": {"mediaType": "application/vnd.barge.vm.v1"}}) == "barge"
    assert (
        detect_format({"layers": [{"mediaType": "application/vnd.cirruslabs.tart.disk.v1"}]})
        == "tart"
    )
    assert (
        detect_format({"layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"}]})
        == "other"
    )
    assert detect_format({}) == "other"
    assert detect_format([]) == "other"  # type: ignore[arg-type]
    assert detect_format({"layers": "nope", "config": 3}) == "other"
    m = copy.deepcopy(manifest())
    m["layers"].append({"mediaType": "application/vnd.barge.disk.chunk.v1+lz4"})
    assert detect_format(m) == "barge"


# --------------------------------------------------------------------------------------------
# LZ4 frame decoder (Vetu disk layers)


def test_lz4frame_round_trip_bounded_pieces() -> None:
    data = os.urandom(70_000) + bytes(3_000_000)
    comp = lz4.frame.compress(data, content_checksum=True)
    pieces = list(lz4frame.decode_stream(io.BytesIO(comp), read_size=4096, max_output=65536))
    assert max(len(p) for p in pieces) <= 65536
    assert b"".join(pieces) == data
    out = hashlib.sha256()
    assert lz4frame.decode_into(io.BytesIO(comp), out.update, expected_size=len(data)) == len(data)
    assert out.digest() == hashlib.sha256(data).digest()


def test_lz4frame_concatenated_frames() -> None:
    comp = lz4.frame.compress(b"abc" * 1000) + lz4.frame.compress(b"xyz")
    assert lz4frame.decode(comp) == b"abc" * 1000 + b"xyz"


def test_lz4frame_bomb_is_streamed() -> None:
    comp = lz4.frame.compress(bytes(64 << 20))
    assert len(comp) < 1 << 20
    tracemalloc.start()
    try:
        total = 0
        for piece in lz4frame.decode_stream(io.BytesIO(comp), max_output=1 << 20):
            total += len(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 64 << 20
    assert peak < 8 << 20
    with pytest.raises(IntegrityError, match="more than the expected"):
        for _ in lz4frame.decode_stream(io.BytesIO(comp), expected_size=1 << 20):
            pass


@pytest.mark.parametrize(
    ("mangle", "match"),
    [
        (lambda c: c[:-3], "truncated"),
        (lambda c: c[:7], "truncated"),
        (lambda c: b"", "empty"),
        (lambda c: c + b"junk-after-frame", "corrupt"),
        (lambda c: b"PK\x03\x04" + c, "corrupt"),
        (lambda c: c[:-2] + bytes([c[-2] ^ 1]) + c[-1:], "checksum|corrupt"),
    ],
)
def test_lz4frame_corruption(mangle: Any, match: str) -> None:
    comp = lz4.frame.compress(b"hello world " * 5000, content_checksum=True)
    with pytest.raises(IntegrityError, match=match):
        lz4frame.decode(mangle(comp))


def test_lz4frame_expected_size_short() -> None:
    comp = lz4.frame.compress(b"x" * 100)
    with pytest.raises(IntegrityError, match="decoded to 100 bytes; expected 101"):
        lz4frame.decode(comp, expected_size=101)
