"""Vetu format: manifest parsing (several disks, hostile names and sizes) and the LZ4 frame
decoder its disk layers need; plus format detection."""

from __future__ import annotations

import copy
import hashlib
import io
import json
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
     "x" * 300, "config.json", "kernel", "disk.", "a+b", "disk\n", "vetu-config.json"],
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


@pytest.mark.parametrize("name", ["-disk", "_disk", "a..b", "d-1_x.img", "x" * 255, "9"])
def test_vetu_simplename_disk_names_accepted(name: str) -> None:
    # internal/name/simplename: [A-Za-z0-9-_], and '.' only in the middle
    m = manifest()
    m["layers"][3]["annotations"][vetu.NAME_ANNOTATION] = name
    assert name in [d.name for d in vetu.parse_vetu_manifest(m).disks]


def test_unknown_media_type_ignored_as_vetu_does() -> None:
    m = manifest()
    m["layers"].insert(1, layer("application/vnd.cirruslabs.vetu.firmware.v9", "fw"))
    img = vetu.parse_vetu_manifest(m)
    assert img.ignored == ("application/vnd.cirruslabs.vetu.firmware.v9",)
    assert img.disks == vetu.parse_vetu_manifest(manifest()).disks


def test_zero_length_chunk_of_an_empty_disk() -> None:
    # internal/chunker: Close() emits one chunk even when nothing was written (an empty disk)
    m = manifest()
    m["layers"].append(disk("empty.img", 0, 0))
    img = vetu.parse_vetu_manifest(m)
    empty = [d for d in img.disks if d.name == "empty.img"][0]
    assert empty.size == 0 and [(c.offset, c.size) for c in empty.chunks] == [(0, 0)]


def vm_config(**kw: Any) -> bytes:
    cfg: dict[str, Any] = {"version": 1, "arch": "arm64", "disks": [{"name": "disk.img"}]}
    cfg.update(kw)
    return json.dumps({k: v for k, v in cfg.items() if v is not None}).encode()


def test_vetu_vm_config_rules() -> None:
    vm = vetu.vetu_vm_info(
        vm_config(cpuCount=2, memorySize=1 << 30, macAddress="52:54:00:AA:BB:CC")
    )
    assert (vm.arch, vm.disks, vm.cpus, vm.memory, vm.mac) == (
        "arm64", ("disk.img",), 2, 1 << 30, "52:54:00:aa:bb:cc"
    )  # fmt: skip
    # vmconfig.NewFromJSON: an empty arch and any version but 1 are refused
    for bad in (vm_config(arch=None), vm_config(arch="")):
        with pytest.raises(IntegrityError, match="no arch"):
            vetu.vetu_vm_info(bad)
    for version in (None, 2):
        with pytest.raises(UnsupportedError, match="version"):
            vetu.vetu_vm_info(vm_config(version=version))
    with pytest.raises(IntegrityError, match="disk name"):
        vetu.vetu_vm_info(vm_config(disks=[{"name": ".x"}]))
    with pytest.raises(IntegrityError, match="twice"):
        vetu.vetu_vm_info(vm_config(disks=[{"name": "a"}, {"name": "a"}]))


def test_disk_layers_need_the_config_to_list_them() -> None:
    img = vetu.parse_vetu_manifest(manifest())
    vetu.check_disks_listed(
        img, vetu.vetu_vm_info(vm_config(disks=[{"name": "disk.img"}, {"name": "data.img"}]))
    )
    # diskpuller: a config without "disks" lists nothing, so every disk layer is refused
    for cfg in (vm_config(disks=None), vm_config(disks=[{"name": "disk.img"}])):
        with pytest.raises(IntegrityError, match="does not list"):
            vetu.check_disks_listed(img, vetu.vetu_vm_info(cfg))


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
