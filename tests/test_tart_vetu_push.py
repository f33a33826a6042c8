"""``barge push --format tart``: checked by an independent reader, re-push reuse, conversion.

The reader here is written from ``shared/FORMAT.md`` §1 alone (markers walked by hand,
``lz4.block.decompress`` with the previous block as dictionary, layers placed by order); it
shares no code with :mod:`barge.disk.applelz4`.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from barge.errors import ExitCode
from barge.local import create_vm
from barge.progress import NullReporter
from barge.store import Store
from barge.transfer.clone import clone_image
from barge.transfer.pull import pull
from barge.transfer.push import PushOptions, push
from clitest import barge, independent_apple_lz4_decode, sha
from faultproxy import FaultProxy
from registries import RunningRegistry
from vmimages import push_tart, vector_chunks

MiB = 1 << 20
TART_DISK = "application/vnd.cirruslabs.tart.disk.v2"
TART_CONFIG = "application/vnd.cirruslabs.tart.config.v1"
TART_NVRAM = "application/vnd.cirruslabs.tart.nvram.v1"


def get(reg: RunningRegistry, path: str, accept: str | None = None) -> bytes:
    req = urllib.request.Request(f"{reg.url}/v2/{path}", headers={"Accept": accept or "*/*"})
    with urllib.request.urlopen(req, timeout=30) as r:
        data: bytes = r.read()
    return data


def fetch_manifest(reg: RunningRegistry, repo: str, ref: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        get(reg, f"{repo}/manifests/{ref}", "application/vnd.oci.image.manifest.v1+json")
    )
    return doc


def blob(reg: RunningRegistry, repo: str, digest: str) -> bytes:
    data = get(reg, f"{repo}/blobs/{digest}")
    assert sha(data) == digest
    return data


def tart_disk_by_order(reg: RunningRegistry, repo: str, doc: dict[str, Any]) -> bytes:
    """What Tart's pull writes: disk layers decoded and concatenated in manifest order, each
    checked against its annotations."""
    disk = bytearray()
    for layer in doc["layers"]:
        if layer["mediaType"] != TART_DISK:
            continue
        plain = independent_apple_lz4_decode(blob(reg, repo, layer["digest"]))
        ann = layer["annotations"]
        assert int(ann["org.cirruslabs.tart.uncompressed-size"]) == len(plain)
        assert ann["org.cirruslabs.tart.uncompressed-content-digest"] == sha(plain)
        assert int(ann["dev.barge.disk.offset"]) == len(disk)
        disk += plain
    return bytes(disk)


# -- fixtures ---------------------------------------------------------------------------------


def make_disk(path: Path, size: int) -> bytes:
    """Text, random data, explicit zeros and holes; returns the disk's bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(100_000)
        f.write(b"barge tart push test\n" * 30000)
        f.seek(3 * MiB + 5)
        f.write(os.urandom(MiB // 2))
        f.seek(4 * MiB)
        f.write(bytes(MiB))  # written zeros: an all-zero chunk that still must be a layer
        f.seek(size - 777)
        f.write(b"end of disk" * 70)
    return path.read_bytes()


@pytest.fixture
def vm(barge_home: Path, tmp_path: Path) -> tuple[Store, bytes]:
    disk = make_disk(tmp_path / "src.raw", 6 * MiB + 4096)
    store = Store()
    create_vm(store, "vm", from_disk=tmp_path / "src.raw", arch="aarch64", cpus=3)
    return store, disk


TART_1M = PushOptions(chunk_size=1 * MiB, format="tart", placeholder_nvram=True)


def test_push_tart_read_by_independent_reader(
    vm: tuple[Store, bytes], registry: RunningRegistry
) -> None:
    store, disk = vm
    reporter = NullReporter()
    res = push(store, "vm", [f"{registry.host}/t/vm:v1"], TART_1M, reporter)
    assert any("placeholder NVRAM" in n for n in reporter.notes)
    assert any("Tart VM config was built" in n for n in reporter.notes)
    doc = fetch_manifest(registry, "t/vm", "v1")
    assert res.digest.startswith("sha256:")
    types = [layer["mediaType"] for layer in doc["layers"]]
    assert types[0] == TART_CONFIG and types[-1] == TART_NVRAM
    assert types.count(TART_NVRAM) == 1 and types.count(TART_CONFIG) == 1
    # every 1 MiB region is a layer, the all-zero ones too (Tart places by order)
    assert types.count(TART_DISK) == 7 == -(-len(disk) // MiB)
    assert res.stats.zero_chunks >= 1
    assert doc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert doc["annotations"]["org.cirruslabs.tart.uncompressed-disk-size"] == str(len(disk))
    assert doc["annotations"]["org.cirruslabs.tart.upload-time"].endswith("Z")
    assert tart_disk_by_order(registry, "t/vm", doc) == disk
    oci_cfg = json.loads(blob(registry, "t/vm", doc["config"]["digest"]))
    assert oci_cfg["os"] == "linux" and oci_cfg["architecture"] == "arm64"
    assert oci_cfg["config"]["Labels"]["org.cirruslabs.tart.disk.format"] == "raw"
    vm_cfg = json.loads(blob(registry, "t/vm", doc["layers"][0]["digest"]))
    assert (vm_cfg["os"], vm_cfg["arch"], vm_cfg["cpuCount"]) == ("linux", "arm64", 3)
    nvram = blob(registry, "t/vm", doc["layers"][-1]["digest"])
    assert nvram == bytes(len(nvram)) and len(nvram) > 0
    # barge reads it back (by its offset annotations), bit for bit
    pulled = pull(Store(store.home.parent / "h2"), f"{registry.host}/t/vm:v1")
    assert pulled.format == "tart"
    assert (pulled.path / "disk.img").read_bytes() == disk
    # the CLI spelling; nothing is compressed again (the chunk index knows every chunk)
    out = barge(
        "push", "vm", f"{registry.host}/t/vm:v2", "--format", "tart", "--chunk-size", "1M",
        "--format", "json", "--placeholder-nvram",
    )  # fmt: skip
    again = json.loads(out)
    assert again["compressedChunks"] == 0 and again["uploadedBytes"] == 0
    # a changed chunk is the only one compressed and uploaded
    with open(store.vm_path("vm") / "disk.img", "r+b") as f:
        f.seek(2 * MiB + 10)
        f.write(b"changed")
    third = push(store, "vm", [f"{registry.host}/t/vm:v3"], TART_1M)
    assert third.stats.compressed_chunks == 1 and third.stats.uploaded_blobs == 1


def test_format_option_conflicts_and_multi_disk_refused(
    vm: tuple[Store, bytes], registry: RunningRegistry
) -> None:
    store, _ = vm
    err = barge(
        "push", "vm", f"{registry.host}/t/vm:x", "--format", "tart", "--format", "barge",
        code=ExitCode.USAGE,
    )  # fmt: skip
    assert "conflicting" in err
    cfg = json.loads((store.vm_path("vm") / "config.json").read_bytes())
    cfg["disks"].append({"name": "data.img", "size": 4096, "format": "raw"})
    (store.vm_path("vm") / "config.json").write_text(json.dumps(cfg))
    with open(store.vm_path("vm") / "data.img", "wb") as f:
        f.truncate(4096)
    err = barge("push", "vm", f"{registry.host}/t/vm:x", "--format", "tart", code=11)
    assert "exactly one disk" in err


def test_repush_of_pulled_tart_image_sends_nothing(
    barge_home: Path, registry: RunningRegistry, make_proxy: Callable[..., FaultProxy]
) -> None:
    store = Store()
    disk, original = push_tart(registry, "tart/macos", "sonoma", vector_chunks())
    clone_image(store, f"{registry.host}/tart/macos:sonoma", "mac")
    proxy = make_proxy(registry)
    res = push(
        store,
        "mac",
        [f"{proxy.host}/tart/macos:sonoma-copy", f"{proxy.host}/tart/other:v1"],
        PushOptions(format="tart"),
    )
    assert res.stats.compressed_chunks == 0
    assert res.stats.uploaded_blobs == 0 and res.stats.uploaded_bytes == 0
    # no upload is ever fed or completed; the other repository got every blob by mounting
    assert proxy.count("PUT", "/blobs/") == 0 and proxy.count("PATCH") == 0
    assert proxy.request_bytes("POST") == 0
    assert res.stats.mounted_blobs == 6 and res.stats.existing_blobs == 6
    doc = fetch_manifest(registry, "tart/macos", "sonoma-copy")
    # every layer and the config are the original blobs, in the original order
    assert [x["digest"] for x in doc["layers"]] == [x["digest"] for x in original["layers"]]
    assert doc["config"]["digest"] == original["config"]["digest"]
    assert tart_disk_by_order(registry, "tart/macos", doc) == disk


def test_tart_origin_vm_converted_to_barge_format(
    barge_home: Path, registry: RunningRegistry
) -> None:
    store = Store()
    disk, _ = push_tart(registry, "tart/macos", "sonoma", vector_chunks())
    clone_image(store, f"{registry.host}/tart/macos:sonoma", "mac")
    reporter = NullReporter()
    res = push(store, "mac", [f"{registry.host}/barge/macos:v1"], PushOptions(), reporter)
    assert any(
        "converting a Tart image to barge's format: new layers with offsets and a frame index" in n
        for n in reporter.notes
    )
    assert res.stats.compressed_chunks > 0
    doc = fetch_manifest(registry, "barge/macos", "v1")
    files = sorted(
        x["annotations"]["dev.barge.file.name"]
        for x in doc["layers"]
        if x["mediaType"] == "application/vnd.barge.vm.file.v1"
    )
    assert files == ["nvram.bin", "oci-config.json", "tart-config.json"]
    other = Store(store.home.parent / "h3")
    pulled = pull(other, f"{registry.host}/barge/macos:v1")
    assert pulled.format == "barge"
    assert (pulled.path / "disk.img").read_bytes() == disk
    cfg = json.loads((pulled.path / "config.json").read_bytes())
    assert (cfg["os"], cfg["arch"]) == ("darwin", "aarch64")
    # and back to Tart's format from the converted copy: the Tart files come along
    clone_image(other, f"{registry.host}/barge/macos:v1", "mac2")
    back = push(other, "mac2", [f"{registry.host}/tart/back:v1"], PushOptions(format="tart"))
    assert back.layers == 3  # one 512 MiB chunk: the cut of the barge image is not Tart's
    doc2 = fetch_manifest(registry, "tart/back", "v1")
    assert tart_disk_by_order(registry, "tart/back", doc2) == disk


def test_tart_push_after_barge_push_of_an_unchanged_disk(
    vm: tuple[Store, bytes], registry: RunningRegistry
) -> None:
    """The unchanged-disk cache remembers barge's hash-list chunk digests; a Tart push of the
    same disk must not take them for Tart's plain content digests."""
    import time

    store, disk = vm
    time.sleep(2.1)  # older than the "racy clean" window: the push records the disk's state
    push(
        store,
        "vm",
        [f"{registry.host}/mix/vm:barge"],
        PushOptions(chunk_size=1 * MiB, frame_size=1 * MiB),
    )
    push(store, "vm", [f"{registry.host}/mix/vm:tart"], TART_1M)
    doc = fetch_manifest(registry, "mix/vm", "tart")
    for layer in doc["layers"]:
        if layer["mediaType"] == TART_DISK:
            data = independent_apple_lz4_decode(blob(registry, "mix/vm", layer["digest"]))
            ann = layer["annotations"]["org.cirruslabs.tart.uncompressed-content-digest"]
            assert ann == sha(data)
    pulled = pull(Store(store.home.parent / "mix-home"), f"{registry.host}/mix/vm:tart")
    assert (pulled.path / "disk.img").read_bytes() == disk


def test_grown_tart_vm_still_fits_the_layer_cap(
    barge_home: Path, registry: RunningRegistry
) -> None:
    """A VM from a Tart image is cut where that image was, unless the chunks its disk grew by
    would push the layer count over the registry's cap: then it is cut afresh to fit."""
    from barge.local import set_vm

    store = Store()
    push_tart(registry, "tart/macos", "sonoma", vector_chunks())
    clone_image(store, f"{registry.host}/tart/macos:sonoma", "mac")
    set_vm(store, "mac", disk_size=8 * MiB)
    res = push(
        store, "mac", [f"{registry.host}/tart/grown:v1"], PushOptions(format="tart", max_layers=5)
    )
    assert res.layers <= 5
    doc = fetch_manifest(registry, "tart/grown", "v1")
    assert len(doc["layers"]) <= 5
    pulled = pull(Store(store.home.parent / "grown-home"), f"{registry.host}/tart/grown:v1")
    with open(store.vm_path("mac") / "disk.img", "rb") as f:
        assert (pulled.path / "disk.img").read_bytes() == f.read()
