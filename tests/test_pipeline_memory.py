"""The pipeline's rules over in-memory ends (barge.transfer.memory), without a process: blob
reuse (present, mounted, sent once), the order manifests are stored in, resuming an
interrupted copy or pull, and platform selection. The same compositions run against real
registries in test_push_pull, test_copy_registry, test_index and test_upload_resume; here
every call an end gets is recorded, so the rules are checked call by call."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from barge.errors import NotFoundError, RegistryError, UnsupportedError, UsageError
from barge.image import CHUNK_MEDIA_TYPE as CHUNK
from barge.local import create_vm
from barge.oci.types import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
    sha256_digest,
)
from barge.progress import NullReporter
from barge.store import Store
from barge.transfer.end import Target
from barge.transfer.memory import MemoryEnd, MemoryRegistry
from barge.transfer.open import host_platform, select_platform
from barge.transfer.pipeline import ImageCopy, Sender
from barge.transfer.pull import PullOptions, PullResult, pull_from
from barge.transfer.push import Pushing, PushOptions, PushResult

MiB = 1 << 20
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
SMALL = PushOptions(chunk_size=4 * MiB, frame_size=1 * MiB)
DISK_SIZE = 20 * MiB + 4096


def _write_disk(path: Path, seed: int, changes: tuple[tuple[int, bytes], ...] = ()) -> None:
    """A sparse disk: data in three places, holes elsewhere; then ``changes`` written."""
    rnd = hashlib.sha256(str(seed).encode()).digest()
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.truncate(DISK_SIZE)
        f.seek(1 * MiB + 123)
        f.write((b"memory pipeline test %d\n" % seed) * 20000)
        f.seek(9 * MiB)
        f.write(rnd * (2 * MiB // len(rnd)))
        f.seek(DISK_SIZE - 5000)
        f.write(rnd * 100)
        for off, data in changes:
            f.seek(off)
            f.write(data)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(MiB):
            h.update(piece)
    return h.hexdigest()


@pytest.fixture
def store(barge_home: Path, tmp_path: Path) -> Store:
    s = Store()
    disk = tmp_path / "vm.raw"
    _write_disk(disk, 1)
    create_vm(s, "vm", from_disk=disk)
    return s


def push_to(store: Store, targets: list[Target], opts: PushOptions = SMALL) -> PushResult:
    """What ``barge push vm ...`` does once its destinations are open."""
    with Pushing(store, opts) as run:
        return run.push("vm", targets)


def pull_mem(store: Store, end: MemoryEnd, tag: str, platform: str | None = None) -> PullResult:
    """What ``barge pull host/repo:tag`` does once its source is open."""
    manifest = select_platform(end, end.get_manifest(tag), platform)
    key = (end.ref.registry if end.ref else "", end.name, tag)
    return pull_from(
        store, end, manifest, key, f"{end.label}:{tag}", PullOptions(concurrency=1),
        NullReporter(), [],
    )  # fmt: skip


def _layers(end: MemoryEnd, digest: str) -> list[Descriptor]:
    data, media_type = end.manifests[digest]
    m = Manifest(data=data, media_type=media_type, digest=digest)
    return [m.image().config, *m.image().layers]


def _media_types(end: MemoryEnd) -> dict[str, str]:
    return {d.digest: d.media_type for m in end.manifests for d in _layers(end, m)}


def _vm_disk(store: Store) -> Path:
    return store.vm_path("vm") / "disk.img"


# -- reuse -------------------------------------------------------------------------------------


def test_push_then_pull_is_bit_exact_and_the_manifest_comes_last(store: Store) -> None:
    reg = MemoryRegistry()
    a = reg.repo("team/vm")
    res = push_to(store, [Target(a, ["v1"])])
    assert a.tags == {"v1": res.digest}
    blobs = _layers(a, res.digest)
    assert all(d.digest in a.blobs for d in blobs)
    # every blob was asked about once, then sent once; the manifest only after all of them
    sent = [d for w, d in a.calls if w in ("put_stream", "put_blob")]
    assert sorted(sent) == sorted({d.digest for d in blobs if d.size})
    assert a.calls[-1] == ("put_manifest", "v1")
    pulled = pull_mem(store, a, "v1")
    assert pulled.digest == res.digest and not pulled.up_to_date
    assert _sha(pulled.path / "disk.img") == _sha(_vm_disk(store))
    again = pull_mem(store, a, "v1")
    assert again.up_to_date and again.stats.fetched_bytes == 0


def test_a_second_push_sends_nothing(store: Store) -> None:
    a = MemoryRegistry().repo("team/vm")
    first = push_to(store, [Target(a, ["v1"])])
    a.calls.clear()
    second = push_to(store, [Target(a, ["v2"])])
    assert second.digest == first.digest
    assert a.count("put_stream") == a.count("put_blob") == 0
    assert second.stats.uploaded_blobs == 0 and second.stats.existing_blobs > 0


def test_two_repositories_of_one_registry_get_one_upload_and_mounts(store: Store) -> None:
    reg = MemoryRegistry()
    a, b = reg.repo("team/a"), reg.repo("team/b")
    res = push_to(store, [Target(a, ["v1"]), Target(b, ["v1"])])
    assert b.count("put_stream") == b.count("put_blob") == 0
    assert b.count("mount") == len({d.digest for d in _layers(b, res.digest) if d.size})
    assert res.stats.mounted_blobs == b.count("mount")


def test_a_known_location_is_mounted_from_and_no_mount_means_upload(store: Store) -> None:
    reg = MemoryRegistry()
    a = reg.repo("team/a")
    push_to(store, [Target(a, ["v1"])])
    b = reg.repo("team/b")
    res = push_to(store, [Target(b, ["v1"])])
    assert b.count("put_stream") == b.count("put_blob") == 0 and b.count("mount") > 0
    reg.mounts_allowed = False
    c = reg.repo("team/c")
    res_c = push_to(store, [Target(c, ["v1"])])
    assert res_c.digest == res.digest
    assert c.count("mount") == 0 and c.count("put_stream") + c.count("put_blob") > 0


def test_a_tag_mounts_and_never_uploads() -> None:
    """``barge tag``'s Sender (allow_upload=False): a mount, or a clear refusal."""
    src_reg, other_reg = MemoryRegistry("one.test"), MemoryRegistry("two.test")
    src = src_reg.repo("team/a")
    manifest = _image(src, b"layer of the tag test")
    same = src_reg.repo("team/b")
    ImageCopy(src, same, Sender(src, allow_upload=False), NullReporter()).copy(manifest, "t")
    assert same.tags["t"] == manifest.digest and same.count("put_blob") == 0
    far = other_reg.repo("team/a")
    with pytest.raises(UnsupportedError, match="would not mount"):
        ImageCopy(src, far, Sender(src, allow_upload=False), NullReporter()).copy(manifest, "t")
    assert far.manifests == {} and far.count("put_blob") == 0


# -- order and resume --------------------------------------------------------------------------


def _image(end: MemoryEnd, *layers: bytes, arch: str = "amd64", tag: str | None = None) -> Manifest:
    config = json.dumps({"architecture": arch, "os": "linux"}).encode()
    cdesc = end.add_blob(config)
    ldescs = [end.add_blob(layer) for layer in layers]
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cdesc.digest, "size": cdesc.size},
        "layers": [{"mediaType": OCI_LAYER, "digest": d.digest, "size": d.size} for d in ldescs],
    }
    return end.add_manifest(json.dumps(doc).encode(), OCI_MANIFEST, tag)


def _index(end: MemoryEnd, tag: str = "multi") -> tuple[Manifest, dict[str, Manifest]]:
    """An index of two images (linux/amd64, linux/arm64) sharing one layer."""
    shared = os.urandom(3000)
    images = {
        "amd64": _image(end, shared, os.urandom(5000), arch="amd64"),
        "arm64": _image(end, shared, os.urandom(7000), arch="arm64"),
    }
    descs = [
        Descriptor(OCI_MANIFEST, m.digest, m.size, platform=Platform(arch, "linux"))
        for arch, m in images.items()
    ]
    data = Index(descs, media_type=OCI_INDEX).to_bytes()
    return end.add_manifest(data, OCI_INDEX, tag), images


def _position(calls: list[tuple[str, str]], what: str, key: str) -> int:
    return calls.index((what, key))


def test_an_index_is_stored_after_its_images_and_they_after_their_blobs() -> None:
    src, dst = MemoryEnd("src"), MemoryEnd("dst")
    index, images = _index(src)
    walk = ImageCopy(src, dst, Sender(src), NullReporter(), concurrency=3)
    assert walk.copy(index, "multi") == index.digest
    calls = dst.calls
    for m in images.values():
        child = _position(calls, "put_child_manifest", m.digest)
        for d in _layers(src, m.digest):
            assert d.digest in dst.blobs
            assert _position(calls, "try_reusing_blob", d.digest) < child
        assert child < _position(calls, "put_manifest", "multi")
    # the shared layer is sent once; every blob is sent once
    sent = [d for w, d in calls if w == "put_blob"]
    assert sorted(sent) == sorted(set(sent)) == sorted(src.blobs)
    assert dst.tags == {"multi": index.digest}


def test_an_interrupted_copy_names_nothing_missing_and_resumes_without_resending() -> None:
    src, dst = MemoryEnd("src"), MemoryEnd("dst")
    index, _ = _index(src)
    dst.fail_after_puts = 2
    with pytest.raises(RegistryError, match="injected"):
        ImageCopy(src, dst, Sender(src), NullReporter(), concurrency=1).copy(index, "multi")
    kept = set(dst.blobs)
    assert len(kept) == 2 and dst.manifests == {} and dst.tags == {}
    dst.fail_after_puts = None
    dst.calls.clear()
    ImageCopy(src, dst, Sender(src), NullReporter(), concurrency=1).copy(index, "multi")
    resent = {d for w, d in dst.calls if w == "put_blob"}
    assert resent == set(src.blobs) - kept
    assert dst.tags == {"multi": index.digest} and set(dst.blobs) == set(src.blobs)


def test_a_destination_refuses_a_manifest_naming_what_it_lacks() -> None:
    """The memory end checks what a registry checks: the order rule is not vacuous here."""
    src, dst = MemoryEnd("src"), MemoryEnd("dst")
    m = _image(src, b"a layer")
    with pytest.raises(Exception, match="not here"):
        dst.put_manifest(m.data, m.media_type, "v1")


def test_an_interrupted_pull_resumes_without_refetching_what_it_kept(store: Store) -> None:
    a = MemoryRegistry().repo("team/vm")
    res = push_to(store, [Target(a, ["v1"])])
    layers = [d for d in _layers(a, res.digest) if d.media_type != OCI_CONFIG]
    a.calls.clear()
    a.fail_after_opens = 3
    with pytest.raises(RegistryError, match="injected"):
        pull_mem(store, a, "v1")
    first = [d for w, d in a.calls if w == "open_blob"]
    assert 0 < len(first) < len(layers) + 2
    a.fail_after_opens = None
    a.calls.clear()
    pulled = pull_mem(store, a, "v1")
    second = [d for w, d in a.calls if w == "open_blob"]
    whole = {d.digest for d in layers}
    # the layers the first run read completely (all but the one it was reading) are not read
    assert len(set(second) & whole) < len(whole)
    assert pulled.stats.reused_bytes > 0
    assert _sha(pulled.path / "disk.img") == _sha(_vm_disk(store))


def test_an_incremental_pull_fetches_what_changed_and_equals_a_fresh_pull(
    store: Store, tmp_path: Path
) -> None:
    a = MemoryRegistry().repo("team/vm")
    v1 = push_to(store, [Target(a, ["v1"])])
    pull_mem(store, a, "v1")
    change = ((13 * MiB + 77, os.urandom(300_000)),)
    _write_disk(_vm_disk(store), 1, change)
    v2 = push_to(store, [Target(a, ["v2"])])
    chunks = {d.digest: d.size for d in _layers(a, v2.digest) if CHUNK in d.media_type}
    for d in _layers(a, v1.digest):
        chunks.pop(d.digest, None)
    assert len(chunks) == 1  # the change is inside one chunk
    a.calls.clear()
    incremental = pull_mem(store, a, "v2")
    assert incremental.base is not None and incremental.stats.reused_bytes > 0
    # of the disk's chunks, only the one v1 did not have is read
    read = {d for w, d in a.calls if w == "open_blob"}
    assert {d for d in read if CHUNK in _media_types(a)[d]} == set(chunks)
    assert 0 < incremental.stats.fetched_bytes <= sum(chunks.values())
    fresh = pull_mem(Store(tmp_path / "other-home"), a, "v2")
    assert fresh.base is None and fresh.stats.fetched_bytes > incremental.stats.fetched_bytes
    assert _sha(incremental.path / "disk.img") == _sha(fresh.path / "disk.img")
    assert _sha(fresh.path / "disk.img") == _sha(_vm_disk(store))


# -- platforms ---------------------------------------------------------------------------------


def test_platform_selection() -> None:
    end = MemoryEnd("multi")
    index, images = _index(end)
    for arch in ("amd64", "arm64"):
        got = select_platform(end, index, f"linux/{arch}")
        assert got.digest == images[arch].digest
    here = host_platform().split("/")[1]
    if here in images:  # no --platform: this host's
        assert select_platform(end, index, None).digest == images[here].digest
    single = images["amd64"]
    assert select_platform(end, single, "linux/arm64") is single  # an image is not an index
    with pytest.raises(NotFoundError) as e:
        select_platform(end, index, "linux/s390x")
    assert "linux/amd64, linux/arm64" in (e.value.hint or "")
    with pytest.raises(UsageError, match="OS/ARCH"):
        select_platform(end, index, "amd64")


def test_the_memory_end_checks_what_it_is_given() -> None:
    """A blob whose bytes are not its digest is refused (as a registry refuses it)."""
    end = MemoryEnd("x")
    good = b"some bytes"
    desc = Descriptor(OCI_LAYER, sha256_digest(good), len(good))
    with pytest.raises(Exception, match="other bytes"):
        end.put_blob(desc, lambda off: io.BytesIO(b"other bytes!"), None)
    assert desc.digest not in end.blobs


# -- generated: an incremental pull equals a fresh one --------------------------------------------

_change = st.tuples(
    st.integers(0, DISK_SIZE - 1),  # where
    st.integers(1, 2 * MiB),  # how many bytes
    st.sampled_from(["random", "zeros", "text"]),
)


@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.lists(_change, min_size=1, max_size=4))
def test_generated_incremental_pulls_equal_the_disk(
    tmp_path_factory: pytest.TempPathFactory, changes: list[tuple[int, int, str]]
) -> None:
    """Over memory ends: v1 pushed and pulled, the disk changed at generated places, v2
    pushed; the pull of v2 onto v1 (reusing what it can) and a fresh pull of v2 both give the
    disk bit for bit."""
    tmp = tmp_path_factory.mktemp("gen")
    store = Store(tmp / "home")
    disk = tmp / "vm.raw"
    _write_disk(disk, 7)
    create_vm(store, "vm", from_disk=disk)
    a = MemoryRegistry().repo("gen/vm")
    push_to(store, [Target(a, ["v1"])])
    pull_mem(store, a, "v1")
    data = {
        "random": lambda n: os.urandom(n),
        "zeros": lambda n: bytes(n),
        "text": lambda n: (b"changed " * (n // 8 + 1))[:n],
    }
    _write_disk(
        _vm_disk(store),
        7,
        tuple((off, data[kind](min(n, DISK_SIZE - off))) for off, n, kind in changes),
    )
    push_to(store, [Target(a, ["v2"])])
    incremental = pull_mem(store, a, "v2")
    fresh = pull_mem(Store(tmp / "fresh"), a, "v2")
    want = _sha(_vm_disk(store))
    assert _sha(incremental.path / "disk.img") == want
    assert _sha(fresh.path / "disk.img") == want
