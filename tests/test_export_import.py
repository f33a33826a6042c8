"""barge export / barge import: OCI layouts (directories and archives) from local VMs and from
registry images (indexes too), streamed, verified, and back into local VMs."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest

from barge.errors import ExitCode, NoSpaceError
from barge.local import create_vm
from barge.store import Store
from barge.verify import verify
from clitest import barge, sha256_file
from localvms import make_vm
from registries import RunningRegistry

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def store(barge_home: Path) -> Store:
    return Store()


def test_export_sparse_vm_to_archive_streams_and_imports(store: Store, tmp_path: Path) -> None:
    """A 1 GiB sparse disk with a little data: the archive holds only the data, nothing big is
    ever written elsewhere, and import gives back the same disk (sparse)."""
    disk = tmp_path / "big.raw"
    with open(disk, "wb") as f:
        f.truncate(1 * GiB)
        f.seek(700 * MiB + 12345)
        f.write(os.urandom(MiB))
        f.seek(100 * MiB)
        f.write(b"sparse export test\n" * 10000)
    create_vm(store, "big", from_disk=disk)
    archive = tmp_path / "out" / "big.tar"
    archive.parent.mkdir()
    doc = json.loads(barge("export", "big", str(archive), "--chunk-size", "8M", "--format", "json"))
    assert doc["destination"].startswith("oci-archive:")
    assert archive.stat().st_size < 8 * MiB
    assert sorted(p.name for p in archive.parent.iterdir()) == ["big.tar"]  # no .partial left
    assert os.listdir(store.tmp_dir) == []
    with tarfile.open(archive) as t:
        names = t.getnames()
    assert "index.json" in names and "oci-layout" in names
    rep = verify(store, f"oci-archive:{archive}", deep=True)
    assert rep.ok and rep.digest == doc["digest"], rep.faults
    barge("import", str(archive), "big2")
    out = store.vm_path("big2") / "disk.img"
    assert out.stat().st_size == 1 * GiB and out.stat().st_blocks * 512 < 8 * MiB
    assert sha256_file(out) == sha256_file(store.vm_path("big") / "disk.img")
    assert json.loads(barge("list", "--source", "oci", "--format", "json")) == []
    barge("import", str(archive), "big3")  # the same image again: still no cache entry left
    assert json.loads(barge("list", "--source", "oci", "--format", "json")) == []


def test_export_reference_and_index_then_import_by_platform(
    store: Store, tmp_path: Path, registry: RunningRegistry
) -> None:
    amd = make_vm(store, tmp_path, "amd", seed=1, arch="x86_64")
    arm = make_vm(store, tmp_path, "arm", seed=2, arch="aarch64")
    ref = f"{registry.host}/team/multi:v1"
    barge("push", "amd", "arm", "--index", ref, "--chunk-size", "8M", "-q")
    layout = tmp_path / "multi"
    out = barge("export", ref, f"oci:{layout}")
    idx_digest = out.strip().rsplit("@", 1)[1]
    index = json.loads((layout / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [idx_digest]
    assert index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"] == "v1"
    assert (
        hashlib.sha256(
            (layout / "blobs" / "sha256" / idx_digest.split(":")[1]).read_bytes()
        ).hexdigest()
        == idx_digest.split(":")[1]
    )
    assert verify(store, f"oci:{layout}", deep=True).ok
    barge("import", f"oci:{layout}:v1", "arm-imported", "--platform", "linux/arm64")
    barge("import", str(layout), "amd-imported", "--platform", "linux/amd64")
    assert sha256_file(store.vm_path("arm-imported") / "disk.img") == sha256_file(arm)
    assert sha256_file(store.vm_path("amd-imported") / "disk.img") == sha256_file(amd)
    # one platform of the index into an archive
    archive = tmp_path / "arm.tar"
    barge("export", ref, f"oci-archive:{archive}", "--platform", "linux/arm64")
    barge("import", f"oci-archive:{archive}", "arm2")
    assert sha256_file(store.vm_path("arm2") / "disk.img") == sha256_file(arm)


def test_export_import_refusals(store: Store, tmp_path: Path) -> None:
    make_vm(store, tmp_path, "vm")
    busy = tmp_path / "not-a-layout"
    busy.mkdir()
    (busy / "file.txt").write_text("mine")
    err = barge("export", "vm", f"oci:{busy}", code=ExitCode.CONFLICT)
    assert "not an OCI image layout" in err
    err = barge("import", str(tmp_path / "missing"), "x", code=ExitCode.NOT_FOUND)
    assert "missing" in err
    layout = tmp_path / "ok"
    barge("export", "vm", f"oci:{layout}")
    err = barge("import", str(layout), "vm", code=ExitCode.CONFLICT)
    assert "already exists" in err
    err = barge("export", "nope", str(tmp_path / "x"), code=ExitCode.NOT_FOUND)
    assert "nope" in err


def test_failed_import_keeps_no_cache_reference_to_the_layout(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """import is a pull then a clone: when the clone fails, the layout's cache entry goes too."""
    make_vm(store, tmp_path)
    layout = tmp_path / "layout"
    barge("export", "vm", f"oci:{layout}", "--chunk-size", "8M")

    def no_space(*a: object, **k: object) -> None:
        raise NoSpaceError("no space left (simulated)")

    monkeypatch.setattr("barge.transfer.clone.clone_dir", no_space)
    barge("import", f"oci:{layout}", "vm2", code=ExitCode.NO_SPACE)
    assert json.loads(barge("list", "--source", "oci", "--format", "json")) == []
    assert not list(store.cache_dir.iterdir())
