"""Tart format: manifest build/parse round trip, offsets, refusals, hostile manifests."""

from __future__ import annotations

import copy
import datetime as dt
import json
import random
from typing import Any

import pytest

from barge.errors import IntegrityError, UnsupportedError
from barge.formats import detect_format, tart
from barge.formats.tart import DiskChunk
from barge.oci.types import Descriptor
from clitest import sha


def desc(name: str, size: int = 100) -> Descriptor:
    return Descriptor("application/octet-stream", sha(name.encode()), size)


SIZES = [512 * 1024 * 1024, 512 * 1024 * 1024, 12345]
DISK_SIZE = sum(SIZES)


def chunks() -> list[DiskChunk]:
    out = []
    off = 0
    for i, s in enumerate(SIZES):
        out.append(DiskChunk(desc(f"chunk{i}", 1000 + i), off, s, sha(f"plain{i}".encode())))
        off += s
    return out


def build(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "config_desc": desc("config"),
        "vm_config_desc": desc("vmconfig"),
        "disk_layers": chunks(),
        "nvram_desc": desc("nvram"),
        "disk_size": DISK_SIZE,
        "upload_time": dt.datetime(2024, 5, 1, 12, 30, 0, tzinfo=dt.UTC),
    }
    args.update(kw)
    result: dict[str, Any] = json.loads(tart.build_tart_manifest(**args))
    return result


def strip_offsets(m: dict[str, Any]) -> dict[str, Any]:
    m = copy.deepcopy(m)
    for layer in m["layers"]:
        layer.get("annotations", {}).pop(tart.OFFSET_ANNOTATION, None)
    return m


def test_built_manifest_matches_tart_layout() -> None:
    m = build()
    assert m["schemaVersion"] == 2
    assert m["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert m["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    types = [layer["mediaType"] for layer in m["layers"]]
    assert types == [
        "application/vnd.cirruslabs.tart.config.v1",
        *["application/vnd.cirruslabs.tart.disk.v2"] * 3,
        "application/vnd.cirruslabs.tart.nvram.v1",
    ]
    ann = m["layers"][2]["annotations"]
    assert ann == {
        "org.cirruslabs.tart.uncompressed-size": str(SIZES[1]),
        "org.cirruslabs.tart.uncompressed-content-digest": sha(b"plain1"),
        "dev.barge.disk.offset": str(SIZES[0]),
    }
    assert m["annotations"] == {
        "org.cirruslabs.tart.uncompressed-disk-size": str(DISK_SIZE),
        "org.cirruslabs.tart.upload-time": "2024-05-01T12:30:00Z",
    }
    assert detect_format(m) == "tart"


def test_round_trip() -> None:
    img = tart.parse_tart_manifest(build())
    assert img.disk_size == DISK_SIZE
    assert img.offsets_from == "annotation" and not img.reordered
    assert [
        (c.descriptor.media_type, c.descriptor.digest, c.descriptor.size) for c in img.disk_chunks
    ] == [(tart.DISK_V2_MEDIA_TYPE, c.descriptor.digest, c.descriptor.size) for c in chunks()]
    assert [(c.offset, c.size, c.digest) for c in img.disk_chunks] == [
        (c.offset, c.size, c.digest) for c in chunks()
    ]
    assert img.vm_config.digest == sha(b"vmconfig")
    assert img.nvram.digest == sha(b"nvram")
    assert img.config.digest == sha(b"config")
    assert img.upload_time == "2024-05-01T12:30:00Z"


def test_reordered_layers_with_offsets_parse_to_same_offsets() -> None:
    m = build()
    expected = tart.parse_tart_manifest(m).disk_chunks
    for seed in range(5):
        m2 = copy.deepcopy(m)
        random.Random(seed).shuffle(m2["layers"])
        img = tart.parse_tart_manifest(m2)
        assert img.disk_chunks == expected
    m2 = copy.deepcopy(m)
    m2["layers"][1], m2["layers"][3] = m2["layers"][3], m2["layers"][1]
    assert tart.parse_tart_manifest(m2).reordered


def test_without_offset_annotation_order_is_used() -> None:
    """A plain Tart image: offsets come from layer order (Tart's own rule), so a reordered
    image silently places chunks elsewhere; nothing in the format can tell."""
    m = strip_offsets(build())
    img = tart.parse_tart_manifest(m)
    assert img.offsets_from == "order"
    assert [(c.offset, c.digest) for c in img.disk_chunks] == [
        (c.offset, c.digest) for c in chunks()
    ]
    m["layers"][1], m["layers"][3] = m["layers"][3], m["layers"][1]
    img = tart.parse_tart_manifest(m)
    assert img.disk_chunks[0].digest == sha(b"plain2") and img.disk_chunks[0].offset == 0


def test_tart_manifest_without_disk_size_annotation() -> None:
    m = strip_offsets(build())
    del m["annotations"]
    assert tart.parse_tart_manifest(m).disk_size == DISK_SIZE


def test_legacy_disk_v1_refused() -> None:
    m = build()
    m["layers"][1]["mediaType"] = "application/vnd.cirruslabs.tart.disk.v1"
    with pytest.raises(
        UnsupportedError, match="legacy disk.v1 format; re-push it with a current Tart"
    ):
        tart.parse_tart_manifest(m)


def test_unknown_layer_types_ignored_as_tart_does_stacked_refused() -> None:
    # Tart's pull picks its layers by media type (VMDirectory+OCI.swift) and never reads others
    m = build()
    surprise = {"mediaType": "application/x-surprise", "digest": sha(b"x"), "size": 1}
    m["layers"].insert(2, surprise)
    img = tart.parse_tart_manifest(m)
    assert img.ignored == ("application/x-surprise",)
    assert img.disk_chunks == tart.parse_tart_manifest(build()).disk_chunks
    # ...but it needs at least one disk.v2 layer (OCIError.ShouldBeAtLeastOneLayer)
    m = build()
    for layer in m["layers"]:
        if layer["mediaType"] == tart.DISK_V2_MEDIA_TYPE:
            layer["mediaType"] = "application/vnd.cirruslabs.tart.disk.v3"
    del m["annotations"]
    with pytest.raises(IntegrityError, match="at least one"):
        tart.parse_tart_manifest(m)
    m = build()
    m["layers"][1]["mediaType"] = tart.ASIF_OVERLAY_MEDIA_TYPE
    with pytest.raises(UnsupportedError, match="stacked"):
        tart.parse_tart_manifest(m)


@pytest.mark.parametrize("media_type", [tart.NVRAM_MEDIA_TYPE, tart.CONFIG_MEDIA_TYPE])
def test_exactly_one_nvram_and_vm_config(media_type: str) -> None:
    m = build()
    m["layers"] = [x for x in m["layers"] if x["mediaType"] != media_type]
    with pytest.raises(IntegrityError, match=f"exactly one {media_type} layer, found 0"):
        tart.parse_tart_manifest(m)
    m = build()
    m["layers"] += [x for x in m["layers"] if x["mediaType"] == media_type]
    with pytest.raises(IntegrityError, match="found 2"):
        tart.parse_tart_manifest(m)


SIZE_KEY = "org.cirruslabs.tart.uncompressed-size"
DIGEST_KEY = "org.cirruslabs.tart.uncompressed-content-digest"


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        (SIZE_KEY, "-1", "non-negative decimal"),
        (SIZE_KEY, "1e9", "non-negative decimal"),
        (SIZE_KEY, " 5", "non-negative decimal"),
        (SIZE_KEY, "9" * 30, "non-negative decimal"),
        (SIZE_KEY, str(1 << 60), "exceeds the limit"),
        (SIZE_KEY, "0", "size of 0"),
        (DIGEST_KEY, "sha256:xyz", "invalid sha256"),
        (DIGEST_KEY, "md5:" + "0" * 32, "invalid sha256"),
        (DIGEST_KEY, "sha256:" + "A" * 64, "invalid sha256"),
        (tart.OFFSET_ANNOTATION, "-5", "non-negative decimal"),
    ],
)
def test_hostile_disk_annotations(key: str, value: str, match: str) -> None:
    m = build()
    m["layers"][2]["annotations"][key] = value
    with pytest.raises(IntegrityError, match=match):
        tart.parse_tart_manifest(m)


def test_missing_disk_annotations() -> None:
    for key in (SIZE_KEY, DIGEST_KEY):
        m = build()
        del m["layers"][1]["annotations"][key]
        with pytest.raises(IntegrityError, match=f"no {key} annotation"):
            tart.parse_tart_manifest(m)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("size", -1, "out of range"),
        ("size", 1 << 60, "out of range"),
        ("size", "100", "expected an integer"),
        ("size", True, "expected an integer"),
        ("digest", "sha256:" + "0" * 63, "invalid digest"),
        ("digest", "sha256:../../etc/passwd", "invalid digest"),
        ("digest", None, "invalid digest"),
    ],
)
def test_hostile_descriptors(field: str, value: object, match: str) -> None:
    for index in (0, 2, 4):
        m = build()
        m["layers"][index][field] = value
        with pytest.raises(IntegrityError, match=match):
            tart.parse_tart_manifest(m)
    m = build()
    m["config"][field] = value
    with pytest.raises(IntegrityError, match=match):
        tart.parse_tart_manifest(m)


def test_disk_size_annotation_must_match() -> None:
    m = build()
    m["annotations"]["org.cirruslabs.tart.uncompressed-disk-size"] = str(DISK_SIZE + 1)
    with pytest.raises(IntegrityError, match="add up to"):
        tart.parse_tart_manifest(m)
    m["annotations"]["org.cirruslabs.tart.uncompressed-disk-size"] = "-1"
    with pytest.raises(IntegrityError, match="non-negative"):
        tart.parse_tart_manifest(m)


def test_offset_annotations_gap_overlap_and_partial() -> None:
    m = build()
    m["layers"][2]["annotations"][tart.OFFSET_ANNOTATION] = str(SIZES[0] + 1)
    with pytest.raises(IntegrityError, match="gap"):
        tart.parse_tart_manifest(m)
    m = build()
    m["layers"][2]["annotations"][tart.OFFSET_ANNOTATION] = "0"
    with pytest.raises(IntegrityError, match="overlap"):
        tart.parse_tart_manifest(m)
    m = build()
    del m["layers"][2]["annotations"][tart.OFFSET_ANNOTATION]
    with pytest.raises(IntegrityError, match="2 of 3 disk layers"):
        tart.parse_tart_manifest(m)
    m = build()  # a deduplicating copy dropped a chunk
    del m["layers"][2]
    with pytest.raises(IntegrityError, match="gap"):
        tart.parse_tart_manifest(m)


def test_identical_chunks_share_a_digest() -> None:
    """Two all-zero chunks have the same blob and content digest: both must be kept."""
    zero = DiskChunk(desc("zero"), 0, 1024, sha(bytes(1024)))
    layers = [zero, zero._replace(offset=1024)]
    m = build(disk_layers=layers, disk_size=2048)
    img = tart.parse_tart_manifest(m)
    assert [c.offset for c in img.disk_chunks] == [0, 1024]


def test_hostile_manifest_envelopes() -> None:
    for bad in (
        [],
        {"schemaVersion": 1},
        {**build(), "layers": {}},
        {**build(), "schemaVersion": "2"},
    ):
        with pytest.raises(IntegrityError):
            tart.parse_tart_manifest(bad)  # type: ignore[arg-type]
    m = build()
    m["mediaType"] = "application/vnd.oci.image.index.v1+json"
    with pytest.raises(IntegrityError, match="not an image manifest"):
        tart.parse_tart_manifest(m)
    m = build()
    m["layers"][1]["annotations"][SIZE_KEY] = 5
    with pytest.raises(IntegrityError, match="not a string"):
        tart.parse_tart_manifest(m)
    m = build()
    m["layers"] = m["layers"] * 4000
    with pytest.raises(IntegrityError, match="exceed the limit"):
        tart.parse_tart_manifest(m)


def test_builder_rejects_inconsistent_input() -> None:
    with pytest.raises(ValueError, match="disk_size"):
        build(disk_size=DISK_SIZE + 1)
    with pytest.raises(ValueError, match="offset"):
        build(disk_layers=list(reversed(chunks())))
    with pytest.raises(IntegrityError):
        build(disk_layers=[DiskChunk(desc("a"), 0, 10, "sha256:nope")], disk_size=10)


# --------------------------------------------------------------------------------------------
# VM config and OCI config


def test_vm_config_build_and_info() -> None:
    raw = tart.build_tart_vm_config("linux", "arm64", 4, 8 << 30, "7A:11:22:33:44:55")
    obj = json.loads(raw)
    assert list(obj) == [
        "version", "os", "arch", "cpuCountMin", "cpuCount", "memorySizeMin", "memorySize",
        "macAddress", "display", "diskFormat",
    ]  # fmt: skip
    info = tart.tart_vm_info(raw)
    assert info["os"] == "linux" and info["arch"] == "arm64"
    assert info["cpuCount"] == 4 and info["memorySize"] == 8 << 30
    assert info["macAddress"] == "7a:11:22:33:44:55" and info["diskFormat"] == "raw"
    with pytest.raises(UnsupportedError):
        tart.build_tart_vm_config("darwin", "arm64", 4, 8 << 30, "7a:11:22:33:44:55")
    mac_cfg = json.loads(
        tart.build_tart_vm_config(
            "darwin", "arm64", 4, 8 << 30, "7a:11:22:33:44:55", ecid="AAAA", hardware_model="BBBB"
        )
    )
    assert mac_cfg["ecid"] == "AAAA" and mac_cfg["hardwareModel"] == "BBBB"


def test_vm_info_real_tart_shape_and_defaults() -> None:
    cfg = {
        "version": 1,
        "os": "darwin",
        "arch": "arm64",
        "ecid": "AAAA",
        "hardwareModel": "BBBB",
        "cpuCountMin": 4,
        "cpuCount": 4,
        "memorySizeMin": 8589934592,
        "memorySize": 8589934592,
        "macAddress": "ae:38:bc:4d:02:cd",
        "display": {"width": 1024, "height": 768},
    }
    info = tart.tart_vm_info(json.dumps(cfg).encode())
    assert info["diskFormat"] == "raw" and info["display"] == {"width": 1024, "height": 768}
    del cfg["os"], cfg["arch"]
    info = tart.tart_vm_info(json.dumps(cfg).encode())
    assert info["os"] == "darwin" and info["arch"] == "arm64"


@pytest.mark.parametrize(
    "patch",
    [
        {"cpuCount": -1},
        {"cpuCount": 0},
        {"cpuCount": "4"},
        {"memorySize": 1 << 60},
        {"macAddress": "not-a-mac"},
        {"os": "windows"},
        {"diskFormat": 7},
        {"version": None},
    ],
)
def test_vm_info_hostile(patch: dict[str, Any]) -> None:
    cfg = json.loads(tart.build_tart_vm_config("linux", "arm64", 2, 1 << 30, "7a:11:22:33:44:55"))
    cfg.update(patch)
    with pytest.raises(IntegrityError):
        tart.tart_vm_info(json.dumps(cfg).encode())


def test_vm_info_unknown_disk_format_is_raw_as_in_tart() -> None:
    # VMConfig.swift: DiskImageFormat(rawValue: diskFormatString) ?? .raw
    cfg = json.loads(tart.build_tart_vm_config("linux", "arm64", 2, 1 << 30, "7a:11:22:33:44:55"))
    cfg["diskFormat"] = "qcow2"
    info = tart.tart_vm_info(json.dumps(cfg).encode())
    assert info["diskFormat"] == "raw" and info["diskFormatUnknown"] == "qcow2"


@pytest.mark.parametrize(
    ("ecid", "model"),
    [("", "BBBB"), ("AAAA", ""), ("not base64!", "BBBB"), ("AAAA", "QUJD="), ("AAA", "BBBB")],
)
def test_macos_config_identity_must_be_base64(ecid: str, model: str) -> None:
    # Platform/Darwin.swift decodes both with Data(base64Encoded:) and fails otherwise
    with pytest.raises(IntegrityError, match="base64|missing"):
        tart.build_tart_vm_config(
            "darwin", "arm64", 4, 8 << 30, "7a:11:22:33:44:55", ecid=ecid, hardware_model=model
        )


def test_vm_info_not_json() -> None:
    for raw in (b"\xff\xfe", b"[1]", b"{", b" " * (2 << 20)):
        with pytest.raises(IntegrityError):
            tart.tart_vm_info(raw)


def test_oci_config_stub_and_nvram() -> None:
    obj = json.loads(tart.build_tart_oci_config("linux", labels={"a": "b"}))
    assert obj == {
        "architecture": "arm64",
        "os": "linux",
        "config": {"Labels": {"a": "b", "org.cirruslabs.tart.disk.format": "raw"}},
    }
    nv = tart.placeholder_nvram()
    assert len(nv) == tart.NVRAM_PLACEHOLDER_SIZE and not any(nv)
