"""Multi-platform images: push --index, pull/copy by platform, and the "reduced platform" copy
sequence that broke nerdctl (copy a subset, use it, delete the temporary, GC concurrently)."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import pytest

from barge.cache import delete_cached
from barge.errors import ExitCode, NotFoundError
from barge.local import delete_vm
from barge.oci.client import RegistryClient
from barge.store import Store
from barge.transfer.clone import clone_image
from barge.transfer.copy import CopyOptions, copy
from barge.transfer.open import host_platform
from barge.transfer.pull import PullOptions, pull
from barge.transfer.push import push
from barge.verify import verify
from clitest import at, barge, sha256_file, skopeo_digest
from localvms import SMALL, make_vm
from registries import RunningRegistry


@pytest.fixture
def vms(barge_home: Path, tmp_path: Path) -> tuple[Store, dict[str, Path]]:
    store = Store()
    disks = {
        "linux/amd64": make_vm(store, tmp_path, "amd", seed=1, arch="x86_64"),
        "linux/arm64": make_vm(store, tmp_path, "arm", seed=2, arch="aarch64"),
        "darwin/arm64": make_vm(store, tmp_path, "mac", seed=3, arch="aarch64", os_name="darwin"),
    }
    return store, disks


def test_push_index_pull_and_copy_by_platform(
    vms: tuple[Store, dict[str, Path]], registry: RunningRegistry, registry2: RunningRegistry
) -> None:
    store, disks = vms
    ref = f"{registry.host}/team/multi:v1"
    doc = json.loads(
        barge("push", "amd", "arm", "mac", "--index", ref, "--chunk-size", "8M", "--format", "json")
    )
    assert [m["platform"] for m in doc["manifests"]] == list(disks)
    assert skopeo_digest(ref) == doc["digest"]
    with RegistryClient(registry.host) as c:
        idx = c.get_manifest(at(c, "team/multi", "v1"))
    assert idx.is_index
    plats = {str(d.platform): d.digest for d in idx.index().manifests}
    assert set(plats) == set(disks)
    # pull picks this host's platform, or --platform
    mine = pull(store, ref)
    assert sha256_file(mine.path / "disk.img") == sha256_file(disks[host_platform()])
    arm = pull(store, ref, PullOptions(platform="linux/arm64"))
    assert arm.digest == plats["linux/arm64"]
    assert sha256_file(arm.path / "disk.img") == sha256_file(disks["linux/arm64"])
    # the whole index copies with its digest; --platform copies one manifest
    res = copy(store, ref, f"{registry2.host}/mirror/multi:v1")
    assert res.images[0].digest == idx.digest and res.stats.manifests == 4
    assert verify(store, f"{registry2.host}/mirror/multi:v1", remote=True, deep=True).ok
    one = copy(store, ref, f"{registry2.host}/one/mac:v1", CopyOptions(platform="darwin/arm64"))
    assert one.images[0].digest == plats["darwin/arm64"] and one.stats.manifests == 1
    err = barge("copy", ref, f"{registry2.host}/x:y", "--platform", "linux/s390x", code=3)
    assert "available:" in err
    # one image per platform
    err = barge("push", "amd", "amd", "--index", f"{registry.host}/bad:v1", code=ExitCode.USAGE)
    assert "named twice" in err


def test_reduced_platform_copy_loop_keeps_content(
    vms: tuple[Store, dict[str, Path]], registry: RunningRegistry, registry2: RunningRegistry
) -> None:
    """nerdctl's failing sequence, five times over, with GC running all along: copy a subset
    of an index to a temporary tag, pull + clone it, delete the temporary (tag in the registry,
    entry in the cache), push the clone onward. Nothing needed may be lost."""
    store, disks = vms
    index_ref = f"{registry.host}/team/multi:v1"
    push(store, "amd", [f"{registry.host}/seed:x"], SMALL)  # warm the chunk index
    barge("push", "amd", "arm", "--index", index_ref, "--chunk-size", "8M", "-q")
    stop = threading.Event()
    gc_errors: list[BaseException] = []

    def gc_loop() -> None:
        gc_store = Store(store.home)
        for _ in range(10_000):
            if stop.is_set():
                return
            try:
                gc_store.gc()
            except BaseException as e:  # noqa: BLE001 - reported by the test
                gc_errors.append(e)
                return
            stop.wait(0.01)

    t = threading.Thread(target=gc_loop, daemon=True)
    t.start()
    try:
        for i in range(5):
            tmp_repo = f"tmp/reduced-{i}"  # a manifest deleted and put again in one repository
            tmp_ref = f"{registry.host}/{tmp_repo}:it{i}"  # trips docker-registry's cache
            copy(store, index_ref, tmp_ref, CopyOptions(platform="linux/arm64"))
            clone_image(store, tmp_ref, f"arm-clone-{i}")
            delete_cached(store, tmp_ref)
            with RegistryClient(registry.host) as c:
                desc = c.head_manifest(at(c, tmp_repo, f"it{i}"))
                assert desc is not None
                with contextlib.suppress(NotFoundError):  # see the note in docs/copy.md
                    c.delete_manifest(at(c, tmp_repo, desc.digest))
                assert c.head_manifest(at(c, tmp_repo, f"it{i}")) is None
            push(store, f"arm-clone-{i}", [f"{registry2.host}/final/arm:it{i}"], SMALL)
            copy(store, f"{registry2.host}/final/arm:it{i}", f"{registry2.host}/final/copy:it{i}")
            delete_vm(store, f"arm-clone-{i}")
    finally:
        stop.set()
        t.join(30)
    assert not gc_errors
    fresh = Store(store.home.parent / "fresh-home")
    want = sha256_file(disks["linux/arm64"])
    for i in range(5):
        for repo in ("final/arm", "final/copy"):
            ref = f"{registry2.host}/{repo}:it{i}"
            rep = verify(fresh, ref, deep=True)
            assert rep.ok, rep.faults
            assert sha256_file(pull(fresh, ref).path / "disk.img") == want
