"""Interop with the real peer, skopeo: it copies barge images unchanged (digests kept, custom
layer media types never recompressed); barge pulls what skopeo wrote, and skopeo reads what
barge wrote. Findings are documented in docs/copy.md."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from barge.store import Store
from barge.transfer.copy import copy
from barge.transfer.pull import pull
from barge.transfer.push import push
from clitest import barge, sha256_file, skopeo_digest
from localvms import SMALL, make_vm
from registries import RunningRegistry
from vmimages import push_tart, vector_chunks

pytestmark = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed")

NO_TLS = ["--src-tls-verify=false", "--dest-tls-verify=false"]


def skopeo(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture
def pushed(
    barge_home: Path, tmp_path: Path, registry: RunningRegistry
) -> tuple[Store, Path, str, str]:
    store = Store()
    disk = make_vm(store, tmp_path)
    ref = f"{registry.host}/team/vm:v1"
    res = push(store, "vm", [ref], SMALL)
    return store, disk, ref, res.digest


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--format", "oci"],
        ["--preserve-digests"],
        # asked to recompress, skopeo leaves layers of unknown media types as they are
        ["--dest-compress", "--dest-compress-format", "gzip"],
    ],
    ids=["default", "format-oci", "preserve-digests", "dest-compress-gzip"],
)
def test_skopeo_copy_keeps_barge_images_intact(
    pushed: tuple[Store, Path, str, str], registry2: RunningRegistry, flags: list[str]
) -> None:
    store, disk, ref, digest = pushed
    dst = f"{registry2.host}/skopeo/vm:v1"
    skopeo("copy", *NO_TLS, *flags, f"docker://{ref}", f"docker://{dst}")
    assert skopeo_digest(dst) == digest
    fresh = Store(store.home.parent / "fresh")
    pulled = pull(fresh, dst)
    assert pulled.digest == digest
    assert sha256_file(pulled.path / "disk.img") == sha256_file(disk)
    # barge copy of the same source lands on the same digest skopeo reports
    res = copy(store, ref, f"{registry2.host}/barge/vm:v1")
    assert res.images[0].digest == skopeo_digest(f"{registry2.host}/barge/vm:v1") == digest


def test_skopeo_refuses_docker_v2s2_conversion(
    pushed: tuple[Store, Path, str, str], registry2: RunningRegistry
) -> None:
    """The only change skopeo would make (converting to a Docker v2s2 manifest) it refuses,
    so no altered barge image can come out of it."""
    _store, _disk, ref, _digest = pushed
    r = skopeo(
        "copy",
        *NO_TLS,
        "--format",
        "v2s2",
        f"docker://{ref}",
        f"docker://{registry2.host}/x/vm:v1",
        check=False,
    )
    assert r.returncode != 0 and "application/vnd.barge.vm.config.v1+json" in r.stderr


def test_skopeo_layout_to_barge_import(
    pushed: tuple[Store, Path, str, str], tmp_path: Path
) -> None:
    store, disk, ref, digest = pushed
    layout = tmp_path / "from-skopeo"
    skopeo("copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}")
    out = barge("import", str(layout), "imported")
    assert digest in out
    assert sha256_file(store.vm_path("imported") / "disk.img") == sha256_file(disk)
    # the import left no cache entry behind
    assert json.loads(barge("list", "--source", "oci", "--format", "json")) == []
    archive = tmp_path / "from-skopeo.tar"
    skopeo("copy", "--src-tls-verify=false", f"docker://{ref}", f"oci-archive:{archive}:v1")
    barge("import", f"oci-archive:{archive}:v1", "imported2")
    assert sha256_file(store.vm_path("imported2") / "disk.img") == sha256_file(disk)


def test_barge_export_to_skopeo_then_pull(
    pushed: tuple[Store, Path, str, str], tmp_path: Path, registry2: RunningRegistry
) -> None:
    store, disk, _ref, _digest = pushed
    for i, path in enumerate([tmp_path / "exported", tmp_path / "exported.tar"]):
        out = barge("export", "vm", str(path), "--chunk-size", "8M")
        digest = out.strip().rsplit("@", 1)[1]
        kind = "oci-archive" if path.suffix == ".tar" else "oci"
        dst = f"{registry2.host}/from-layout/vm:{i}"
        skopeo("copy", "--dest-tls-verify=false", f"{kind}:{path}", f"docker://{dst}")
        assert skopeo_digest(dst) == digest
        fresh = Store(store.home.parent / f"fresh{i}")
        assert sha256_file(pull(fresh, dst).path / "disk.img") == sha256_file(disk)


def test_tart_image_through_skopeo(
    barge_home: Path, tmp_path: Path, registry: RunningRegistry, registry2: RunningRegistry
) -> None:
    disk, _doc = push_tart(registry, "tart/vm", "v1", vector_chunks())
    skopeo(
        "copy",
        *NO_TLS,
        f"docker://{registry.host}/tart/vm:v1",
        f"docker://{registry2.host}/tart/vm:v1",
    )
    layout = tmp_path / "tart-layout"
    skopeo(
        "copy", "--src-tls-verify=false", f"docker://{registry.host}/tart/vm:v1", f"oci:{layout}"
    )
    store = Store()
    pulled = pull(store, f"{registry2.host}/tart/vm:v1")
    assert (pulled.path / "disk.img").read_bytes() == disk
    barge("import", f"oci:{layout}", "tartvm")
    assert (store.vm_path("tartvm") / "disk.img").read_bytes() == disk
