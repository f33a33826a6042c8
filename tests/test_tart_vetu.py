"""Tart and Vetu images through real registries: pull, clone, hostile input (issue 7).

The images here are built by the tests (tests/vmimages.py) with stdlib HTTP, not by barge.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lz4.frame
import pytest

from barge.disk.sparse import data_extents
from barge.errors import ExitCode, IntegrityError
from barge.formats import tart as tartfmt
from barge.formats import vetu as vetufmt
from barge.store import Store
from barge.transfer.clone import clone_image
from barge.transfer.pull import pull
from clitest import barge, sha
from registries import RunningRegistry
from seed import OCI_CONFIG, OCI_MANIFEST, put_blob, put_manifest
from vmimages import (
    TartChunk,
    push_tart,
    push_vetu,
    sha_file,
    stored_stream,
    tart_vm_config,
    vector_chunks,
    vetu_disks,
)

KiB = 1024
MiB = 1 << 20


@pytest.fixture
def store(barge_home: Path) -> Store:
    return Store()


def test_tart_pull_bit_identical_sparse_listed_and_cloned(
    store: Store, registry: RunningRegistry
) -> None:
    chunks = vector_chunks()
    disk, doc = push_tart(registry, "tart/macos", "sonoma", chunks)
    ref = f"{registry.host}/tart/macos:sonoma"
    res = pull(store, ref)
    assert res.format == "tart"
    assert any("placed by layer order" in n for n in res.notes)
    out = res.path / "disk.img"
    assert out.stat().st_size == len(disk)
    assert sha_file(out) == sha(disk)
    # the 256 KiB zero chunk became a hole (whole 4 KiB blocks inside it hold no data)
    start = len(chunks[0].plain)
    a, b = -(-start // 4096) * 4096, (start + 256 * KiB) // 4096 * 4096
    fd = os.open(out, os.O_RDONLY)
    try:
        assert list(data_extents(fd, a, b)) == []
    finally:
        os.close(fd)
    # Tart's own files are kept for a bit-for-bit re-push
    assert (res.path / "nvram.bin").read_bytes() == b"NVRAM" * 100
    assert json.loads((res.path / "tart-config.json").read_bytes())["os"] == "darwin"
    labels = json.loads((res.path / "oci-config.json").read_bytes())["config"]["Labels"]
    assert labels["org.example.team"] == "ci"
    # every chunk went into the chunk index (uncompressed digest -> the original layer)
    for c, layer in zip(chunks, doc["layers"][1:-1], strict=True):
        row = store.catalog.find_chunk(sha(c.plain), "applelz4", 0, tartfmt.DISK_V2_MEDIA_TYPE)
        assert row is not None and row.cdigest == layer["digest"] and row.csize == layer["size"]
    # listed under its exact reference with the macOS platform
    rows = json.loads(barge("list", "--format", "json", "--source", "oci"))
    assert [(r["reference"], r["os"], r["arch"], r["format"]) for r in rows] == [
        (ref, "darwin", "aarch64", "tart")
    ]
    # clone carries the Tart files into the VM directory; get shows the platform
    barge("clone", ref, "mac")
    vm_dir = store.vm_path("mac")
    for name in ("nvram.bin", "tart-config.json", "oci-config.json"):
        assert (vm_dir / name).read_bytes() == (res.path / name).read_bytes()
    assert sha_file(vm_dir / "disk.img") == sha(disk)
    info = json.loads(barge("get", "mac", "--format", "json"))
    assert (info["os"], info["arch"], info["cpus"]) == ("darwin", "aarch64", 4)


def test_tart_reordered_layers_order_is_used_unless_offsets(
    store: Store, registry: RunningRegistry
) -> None:
    chunks = vector_chunks()
    disk, _ = push_tart(registry, "tart/re", "plain", chunks, order=[2, 1, 0])
    # Without offsets barge does what Tart does: layer i goes after layers 0..i-1. Each chunk
    # still matches its own digest, so the wrong disk is produced and nothing can notice.
    res = pull(store, f"{registry.host}/tart/re:plain")
    got = (res.path / "disk.img").read_bytes()
    assert got != disk
    assert got == chunks[2].plain + chunks[1].plain + chunks[0].plain
    # With barge's dev.barge.disk.offset annotation on each layer, order does not matter.
    disk2, _ = push_tart(registry, "tart/re", "offsets", chunks, order=[2, 0, 1], offsets=True)
    res2 = pull(store, f"{registry.host}/tart/re:offsets")
    assert sha_file(res2.path / "disk.img") == sha(disk2) == sha(disk)


def test_tart_linux_image(store: Store, registry: RunningRegistry) -> None:
    chunks = vector_chunks()[:1]
    disk, _ = push_tart(registry, "tart/linux", "v1", chunks, os_name="linux")
    res = pull(store, f"{registry.host}/tart/linux:v1")
    assert sha_file(res.path / "disk.img") == sha(disk)
    rows = json.loads(barge("list", "--format", "json", "--source", "oci"))
    assert [(r["os"], r["arch"]) for r in rows] == [("linux", "aarch64")]


def _nothing_cached(store: Store) -> None:
    assert store.cached_images() == []
    assert list(store.cache_dir.iterdir()) == []
    assert store.catalog.query("SELECT count(*) FROM chunks")[0][0] == 0


def test_tart_wrong_uncompressed_digest_names_the_layer(
    store: Store, registry: RunningRegistry
) -> None:
    chunks = vector_chunks()
    bad = [sha(c.plain) for c in chunks]
    bad[0] = sha(b"something else")
    _, doc = push_tart(registry, "tart/bad", "v1", chunks, udigests=bad)
    with pytest.raises(IntegrityError) as e:
        pull(store, f"{registry.host}/tart/bad:v1")
    assert doc["layers"][1]["digest"] in str(e.value)
    assert "annotation" in str(e.value)
    _nothing_cached(store)


def test_tart_truncated_apple_stream_is_a_clear_error(
    store: Store, registry: RunningRegistry
) -> None:
    chunks = vector_chunks()
    chunks[0] = TartChunk(chunks[0].compressed[: len(chunks[0].compressed) // 2], chunks[0].plain)
    push_tart(registry, "tart/trunc", "v1", chunks)
    err = barge("pull", f"{registry.host}/tart/trunc:v1", "-q", code=ExitCode.INTEGRITY)
    assert "Apple LZ4 stream" in err and "truncated" in err
    assert "Traceback" not in err
    _nothing_cached(store)


def test_tart_corrupt_compressed_blob_in_oci_layout(store: Store, tmp_path: Path) -> None:
    """A layout is not checked by a registry client: the pull itself hashes each layer."""
    from barge.oci.layout import OCILayout

    chunks = vector_chunks()
    layout = OCILayout(tmp_path / "layout", create=True)

    def blob(data: bytes) -> str:
        import io

        d = sha(data)
        layout.write_blob(d, len(data), io.BytesIO(data))
        return d

    vm_cfg = tart_vm_config()
    oci_cfg = b'{"architecture":"arm64","os":"darwin","config":{"Labels":{}}}'
    nvram = bytes(1000)
    layers = [{"mediaType": tartfmt.CONFIG_MEDIA_TYPE, "digest": blob(vm_cfg), "size": len(vm_cfg)}]
    for c in chunks:
        layers.append(
            {
                "mediaType": tartfmt.DISK_V2_MEDIA_TYPE,
                "digest": blob(c.compressed),
                "size": len(c.compressed),
                "annotations": {
                    tartfmt.UNCOMPRESSED_SIZE_ANNOTATION: str(len(c.plain)),
                    tartfmt.UNCOMPRESSED_CONTENT_DIGEST_ANNOTATION: sha(c.plain),
                },
            }
        )
    layers.append({"mediaType": tartfmt.NVRAM_MEDIA_TYPE, "digest": blob(nvram), "size": 1000})
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": blob(oci_cfg), "size": len(oci_cfg)},
        "layers": layers,
    }
    layout.put_manifest(json.dumps(doc).encode(), OCI_MANIFEST, "v1")
    ok = pull(store, f"oci:{tmp_path / 'layout'}:v1")
    assert sha_file(ok.path / "disk.img") == sha(b"".join(c.plain for c in chunks))
    # The pg2554 layer's file now holds another valid stream of the same content (stored
    # blocks) and its descriptor the matching size: it decodes to the annotated bytes, but it
    # is not the blob the manifest names.
    other = stored_stream(chunks[0].plain)
    layers[1]["size"] = len(other)
    path = tmp_path / "layout" / "blobs" / "sha256" / layers[1]["digest"].removeprefix("sha256:")
    path.write_bytes(other)
    layout.put_manifest(json.dumps(doc).encode(), OCI_MANIFEST, "v2")
    store2 = Store(store.home.parent / "h2")
    with pytest.raises(IntegrityError) as e:
        pull(store2, f"oci:{tmp_path / 'layout'}:v2")
    assert layers[1]["digest"] in str(e.value)
    _nothing_cached(store2)


def test_tart_legacy_disk_v1_refused_exit_11(store: Store, registry: RunningRegistry) -> None:
    push_tart(
        registry, "tart/old", "v1", vector_chunks(), media_type=tartfmt.LEGACY_DISK_V1_MEDIA_TYPE
    )
    err = barge("pull", f"{registry.host}/tart/old:v1", "-q", code=ExitCode.UNSUPPORTED)
    assert "legacy disk.v1" in err
    _nothing_cached(store)


# -- Vetu images ------------------------------------------------------------------------------


def test_vetu_pull_two_disks_kernel_initramfs_and_clone(
    store: Store, registry: RunningRegistry
) -> None:
    disks = vetu_disks()
    files = push_vetu(registry, "vetu/ubuntu", "22.04", disks)
    ref = f"{registry.host}/vetu/ubuntu:22.04"
    res = pull(store, ref)
    assert res.format == "vetu"
    for name, parts in disks.items():
        assert sha_file(res.path / name) == sha(b"".join(parts))
    assert (res.path / "kernel").read_bytes() == files["kernel"]
    assert (res.path / "initramfs").read_bytes() == files["initramfs"]
    cfg = json.loads((res.path / "config.json").read_bytes())
    assert cfg["boot"] == "kernel" and cfg["arch"] == "aarch64" and cfg["cpus"] == 2
    assert sorted(d["name"] for d in cfg["disks"]) == ["data.img", "disk.img"]
    rows = json.loads(barge("list", "--format", "json", "--source", "oci"))
    assert [(r["reference"], r["os"], r["arch"]) for r in rows] == [(ref, "linux", "aarch64")]
    _, cloned = clone_image(store, ref, "vetu-vm")
    for name in ("kernel", "initramfs", "vetu-config.json", "disk.img", "data.img"):
        assert (cloned.vm.path / name).read_bytes() == (res.path / name).read_bytes()


def test_vetu_disk_not_in_config_refused(store: Store, registry: RunningRegistry) -> None:
    push_vetu(registry, "vetu/bad", "v1", vetu_disks(), config_disks=["disk.img"])
    with pytest.raises(IntegrityError) as e:
        pull(store, f"{registry.host}/vetu/bad:v1")
    assert "'data.img'" in str(e.value) and "does not list" in str(e.value)
    assert store.cached_images() == []


def test_vetu_wrong_digest_refused(store: Store, registry: RunningRegistry) -> None:
    disks = vetu_disks()
    files = push_vetu(registry, "vetu/ok", "v1", disks)
    # same image, one chunk's content swapped (its annotation still names the original)
    ref = f"{registry.host}/vetu/ok:v1"
    doc = json.loads(files["manifest"])
    layer = doc["layers"][4]
    comp = lz4.frame.compress(
        b"x" * int(layer["annotations"][vetufmt.UNCOMPRESSED_SIZE_ANNOTATION])
    )
    layer["digest"], layer["size"] = put_blob(registry, "vetu/ok", comp), len(comp)
    put_manifest(registry, "vetu/ok", "v2", json.dumps(doc).encode())
    with pytest.raises(IntegrityError) as e:
        pull(store, ref.replace(":v1", ":v2"))
    assert layer["digest"] in str(e.value)
    assert store.cached_images() == []
