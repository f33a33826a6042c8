"""barge verify: registry images (barge, Tart, Vetu, plain), cache entries, local VMs, layouts;
corruption in the registry's storage or in a cached disk is found and named (exit 6)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from barge.errors import ExitCode
from barge.oci.client import RegistryClient
from barge.store import Store
from barge.transfer.pull import pull
from barge.transfer.push import push
from barge.verify import verify
from clitest import at, barge, sha
from localvms import SMALL, make_vm
from registries import RunningRegistry
from seed import push_image
from vmimages import push_tart, push_vetu, vector_chunks, vetu_disks

MiB = 1 << 20


@pytest.fixture
def store(barge_home: Path, tmp_path: Path) -> Store:
    s = Store()
    make_vm(s, tmp_path)
    return s


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _chunk_layers(registry: RunningRegistry, repo: str, tag: str) -> list[dict[str, object]]:
    with RegistryClient(registry.host) as c:
        doc = json.loads(c.get_manifest(at(c, repo, tag)).data)
    return [d for d in doc["layers"] if "disk.chunk" in d["mediaType"]]


def test_verify_registry_image_ok_then_corrupt_blob_named(
    store: Store, registry: RunningRegistry
) -> None:
    ref = f"{registry.host}/team/vm:v1"
    pushed = push(store, "vm", [ref], SMALL)
    out = barge("verify", ref)
    assert out.startswith("OK: ") and "blobs" in out
    doc = json.loads(barge("verify", ref, "--deep", "--format", "json"))
    assert doc["ok"] and doc["deep"] and doc["frames"] > 0 and doc["formats"] == ["barge"]
    assert doc["digest"] == pushed.digest
    # flip one byte of a chunk layer in the registry's storage: the layer is named
    layer = _chunk_layers(registry, "team/vm", "v1")[-1]
    digest = str(layer["digest"])
    _flip(registry.blob_path(digest), int(str(layer["size"])) // 2)
    err = barge("verify", ref, code=ExitCode.INTEGRITY)
    assert f"FAILED: blob {digest}" in err
    err = barge("verify", ref, "--deep", code=ExitCode.INTEGRITY)
    assert f"FAILED: blob {digest}" in err


def test_verify_cache_entry_and_local_vm(store: Store, registry: RunningRegistry) -> None:
    ref = f"{registry.host}/team/vm:v1"
    push(store, "vm", [ref], SMALL)
    res = pull(store, ref)
    rep = verify(store, ref)
    assert rep.kind == "cache" and rep.ok and rep.frames > 0, rep.faults
    assert barge("verify", "vm").startswith("OK: ")
    # a corrupted cached disk: the disk and the frame's offset are named
    disk = res.path / "disk.img"
    os.chmod(disk, 0o644)
    _flip(disk, 9 * MiB + 100)
    err = barge("verify", ref, code=ExitCode.INTEGRITY)
    assert "FAILED: disk disk.img: frame at offset 9437184" in err
    # --remote checks the registry's copy, which is fine
    assert barge("verify", ref, "--remote").startswith("OK: ")
    # a local VM whose disk lost its size
    os.truncate(store.vm_path("vm") / "disk.img", 1 * MiB)
    err = barge("verify", "vm", code=ExitCode.INTEGRITY)
    assert "FAILED: disk disk.img: 1048576 bytes, the config declares" in err


def test_verify_tart_vetu_and_plain_images(barge_home: Path, registry: RunningRegistry) -> None:
    store = Store()
    host = registry.host
    push_tart(registry, "tart/vm", "good", vector_chunks())
    rep = verify(store, f"{host}/tart/vm:good", deep=True)
    assert rep.ok and rep.formats == ["tart"] and rep.frames == 3, rep.faults
    chunks = vector_chunks()
    bad = [sha(c.plain) for c in chunks]
    bad[2] = sha(b"something else")
    push_tart(registry, "tart/vm", "bad", chunks, udigests=bad)
    assert verify(store, f"{host}/tart/vm:bad").ok  # every blob is what its digest says
    rep = verify(store, f"{host}/tart/vm:bad", deep=True)  # but one decodes to the wrong bytes
    assert not rep.ok and "annotation says" in rep.faults[0].message
    push_vetu(registry, "vetu/vm", "v1", vetu_disks())
    rep = verify(store, f"{host}/vetu/vm:v1", deep=True)
    assert rep.ok and rep.formats == ["vetu"] and rep.frames == 4, rep.faults
    push_image(registry, "lib/app", "v1")
    rep = verify(store, f"{host}/lib/app:v1", deep=True)
    assert rep.ok and rep.blobs == 3 and rep.formats == ["other"]


def test_verify_oci_layout(store: Store, tmp_path: Path) -> None:
    out = tmp_path / "layout"
    barge("export", "vm", f"oci:{out}", "--chunk-size", "8M")
    doc = json.loads(barge("verify", f"oci:{out}", "--deep", "--format", "json"))
    assert doc["ok"] and doc["kind"] == "oci" and doc["frames"] > 0
    blobs = sorted((out / "blobs" / "sha256").iterdir(), key=lambda p: -p.stat().st_size)
    biggest = blobs[0]
    os.chmod(biggest, 0o644)
    _flip(biggest, 10)
    err = barge("verify", f"oci:{out}", code=ExitCode.INTEGRITY)
    assert f"FAILED: blob sha256:{biggest.name}" in err


def test_verify_cache_entry_without_manifest_or_frame_index_fails(
    store: Store, registry: RunningRegistry
) -> None:
    """verify promises manifest.json hashes to the digest and every frame is checked against
    index.json: a cache entry missing either is damaged, not OK."""
    ref = f"{registry.host}/team/vm:v1"
    push(store, "vm", [ref], SMALL)
    res = pull(store, ref)
    assert verify(store, ref).ok
    os.chmod(res.path, 0o755)
    (res.path / "index.json").unlink()
    rep = verify(store, ref)
    assert not rep.ok and rep.faults[0].what == "index.json", rep.faults
    (res.path / "manifest.json").unlink()
    err = barge("verify", ref, code=ExitCode.INTEGRITY)
    assert "manifest.json is missing" in err
