"""barge copy and barge tag against real registries: digests kept, blobs streamed, skipped,
mounted, resumed; all tags; no blob traffic for tags."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from barge.errors import ExitCode, RegistryError
from barge.oci.client import RegistryClient
from barge.store import Store
from barge.transfer.copy import CopyOptions, copy, tag
from barge.transfer.pull import pull
from barge.transfer.push import push
from barge.verify import verify
from clitest import at, barge, sha256_file, skopeo_digest
from faultproxy import FaultProxy
from localvms import SMALL, make_vm
from registries import RunningRegistry
from seed import push_image


@pytest.fixture
def vm(barge_home: Path, tmp_path: Path) -> tuple[Store, Path]:
    store = Store()
    return store, make_vm(store, tmp_path)


def test_copy_between_registries_keeps_digest_then_resumes(
    vm: tuple[Store, Path],
    registry: RunningRegistry,
    registry2: RunningRegistry,
    make_proxy: Callable[..., FaultProxy],
) -> None:
    store, disk = vm
    src = f"{registry.host}/team/vm:v1"
    pushed = push(store, "vm", [src], SMALL)
    proxy = make_proxy(registry2)
    dst = f"{proxy.host}/mirror/vm:v1"
    # the first attempt dies on the third blob upload: the rest is resumed by the re-run
    proxy.add(method="PUT", path=r"/blobs/uploads/", action="status", status=400, skip=2)
    with pytest.raises(RegistryError):
        copy(store, src, dst, CopyOptions(concurrency=1))
    proxy.clear()
    proxy.rules.clear()
    res = copy(store, src, dst, CopyOptions(concurrency=3))
    assert res.images[0].digest == pushed.digest
    assert res.stats.existing_blobs >= 2 and res.stats.copied_blobs >= 1
    assert res.stats.copied_blobs + res.stats.existing_blobs == res.stats.blobs
    assert skopeo_digest(f"{registry2.host}/mirror/vm:v1") == pushed.digest
    # a third run sends nothing
    proxy.clear()
    again = copy(store, src, dst)
    assert again.stats.copied_blobs == 0 and again.stats.existing_blobs == again.stats.blobs
    assert proxy.count("PATCH") == 0 and proxy.count("PUT", r"/blobs/") == 0
    # the copy pulls bit-identical from a fresh home
    other = Store(store.home.parent / "other-home")
    pulled = pull(other, f"{registry2.host}/mirror/vm:v1")
    assert pulled.digest == pushed.digest
    assert sha256_file(pulled.path / "disk.img") == sha256_file(disk)
    # the destination's blob locations are in the catalog (later pushes can mount)
    cfg_digest = json.loads(
        RegistryClient(proxy.host).get_manifest(at(proxy.host, "mirror/vm", "v1")).data
    )["config"]["digest"]
    assert "mirror/vm" in store.catalog.blob_repositories(cfg_digest, proxy.host)


def test_copy_plain_container_image_exact_bytes(
    barge_home: Path, tmp_path: Path, registry: RunningRegistry, registry2: RunningRegistry
) -> None:
    digest, data = push_image(registry, "library/app", "1.0", layers=[b"a" * 5000, b"bb" * 7000])
    out = barge(
        "copy",
        f"{registry.host}/library/app:1.0",
        f"{registry2.host}/other/app",
        "--format",
        "json",
    )
    doc = json.loads(out)
    assert doc["images"][0]["digest"] == digest
    assert doc["copiedBlobs"] == 3
    with RegistryClient(registry2.host) as c:
        m = c.get_manifest(at(c, "other/app", "1.0"))  # the source's tag is kept
    assert m.data == data and m.digest == digest
    # through an OCI archive and a layout directory and back, verified at the end
    archive, layout = tmp_path / "app.tar", tmp_path / "app-layout"
    barge("copy", f"{registry.host}/library/app:1.0", f"oci-archive:{archive}")
    barge("copy", f"oci-archive:{archive}", f"oci:{layout}:v2")
    out = barge("copy", "--verify", f"oci:{layout}:v2", f"{registry2.host}/back/app")
    assert out.splitlines() == [f"{registry2.host}/back/app:v2@{digest}", out.splitlines()[1]]
    assert out.splitlines()[1].startswith("OK: 3 blobs")


def test_same_registry_copy_mounts_and_uploads_nothing(
    vm: tuple[Store, Path], registry: RunningRegistry, make_proxy: Callable[..., FaultProxy]
) -> None:
    store, _ = vm
    pushed = push(store, "vm", [f"{registry.host}/a/vm:v1"], SMALL)
    proxy = make_proxy(registry)
    out = barge("copy", f"{proxy.host}/a/vm:v1", f"{proxy.host}/b/vm:copy", "--format", "json")
    doc = json.loads(out)
    assert doc["images"][0]["digest"] == pushed.digest
    assert doc["copiedBlobs"] == 0 and doc["mountedBlobs"] == doc["blobs"] > 0
    assert proxy.count("PATCH") == 0
    assert proxy.count("PUT", r"/blobs/") == 0
    assert proxy.count("GET", r"/blobs/") == 0
    assert proxy.count("POST", r"/blobs/uploads/") == doc["blobs"]


def test_copy_all_tags(
    barge_home: Path, registry: RunningRegistry, registry2: RunningRegistry
) -> None:
    d1, _ = push_image(registry, "lib/multi", "v1", layers=[b"one"])
    d2, _ = push_image(registry, "lib/multi", "v2", layers=[b"two"])
    d3, _ = push_image(registry, "lib/multi", "latest", layers=[b"two"])
    out = barge("copy", "--all-tags", f"{registry.host}/lib/multi", f"{registry2.host}/dst/multi")
    assert len(out.strip().splitlines()) == 3
    with RegistryClient(registry2.host) as c:
        assert sorted(c.list_tags(at(c, "dst/multi"))) == ["latest", "v1", "v2"]
        assert c.get_manifest(at(c, "dst/multi", "v1")).digest == d1
        assert c.get_manifest(at(c, "dst/multi", "v2")).digest == d2
        assert c.get_manifest(at(c, "dst/multi", "latest")).digest == d3
    err = barge(
        "copy", "--all-tags", f"{registry.host}/lib/multi:v1", f"{registry2.host}/x", code=2
    )
    assert "without a tag" in err


def test_copy_refusals(barge_home: Path, registry: RunningRegistry) -> None:
    d, _ = push_image(registry, "lib/app", "v1")
    err = barge("copy", f"{registry.host}/lib/app:v1", f"{registry.host}/x@{d}", code=2)
    assert "digest" in err
    err = barge("copy", f"{registry.host}/lib/app:nope", f"{registry.host}/x:v1", code=3)
    assert "nope" in err


def test_tag_adds_tags_with_no_blob_traffic(
    vm: tuple[Store, Path], registry: RunningRegistry, make_proxy: Callable[..., FaultProxy]
) -> None:
    store, _ = vm
    pushed = push(store, "vm", [f"{registry.host}/a/vm:v1"], SMALL)
    proxy = make_proxy(registry)
    out = barge("tag", f"{proxy.host}/a/vm:v1", "stable", "v1.0", f"{proxy.host}/b/vm:prod")
    assert out.strip().splitlines() == [
        f"{proxy.host}/a/vm:stable@{pushed.digest}",
        f"{proxy.host}/a/vm:v1.0@{pushed.digest}",
        f"{proxy.host}/b/vm:prod@{pushed.digest}",
    ]
    assert proxy.count("PATCH") == 0 and proxy.count("PUT", r"/blobs/") == 0
    assert proxy.count("GET", r"/blobs/") == 0
    with RegistryClient(registry.host) as c:
        assert sorted(c.list_tags(at(c, "a/vm"))) == ["stable", "v1", "v1.0"]
        assert c.get_manifest(at(c, "b/vm", "prod")).digest == pushed.digest
    assert skopeo_digest(f"{registry.host}/b/vm:prod") == pushed.digest
    # another registry is refused with a pointer to copy
    err = barge("tag", f"{registry.host}/a/vm:v1", "127.0.0.2:1/a/vm:x", code=ExitCode.USAGE)
    assert "barge copy" in err
    res = tag(store, f"{registry.host}/a/vm:v1", ["again"])
    assert res.digest == pushed.digest and res.stats.copied_blobs == 0


def _open_archives() -> list[str]:
    """The .tar files this process holds open."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith(".tar"):
            out.append(target)
    return out


def test_copy_from_archive_and_verify_archive_close_their_files(
    barge_home: Path, registry: RunningRegistry, tmp_path: Path
) -> None:
    """Reading an oci-archive (as a source, or to --verify one just written) leaks no fd."""
    push_image(registry, "r/x", "v1")
    store = Store()
    archive = tmp_path / "img.tar"
    src = f"{registry.host}/r/x:v1"
    copy(store, src, f"oci-archive:{archive}")

    def round_(i: int) -> None:
        copy(store, f"oci-archive:{archive}", f"oci:{tmp_path}/dir{i}")
        verify(store, f"oci-archive:{archive}")
        res = copy(store, src, f"oci-archive:{tmp_path}/w{i}.tar")  # then --verify's check
        assert verify(store, res.images[0].destination, remote=True).ok

    for i in range(2):
        round_(i)
    assert _open_archives() == []
