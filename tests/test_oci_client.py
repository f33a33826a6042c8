"""barge.oci.RegistryClient against a real registry (anonymous, plain HTTP on loopback)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from barge.errors import IntegrityError, NotFoundError
from barge.oci import (
    OCI_INDEX,
    OCI_MANIFEST,
    BlobUnknown,
    CredentialStore,
    DigestMismatch,
    ManifestUnknown,
    NameUnknown,
    RegistryClient,
    RegistryUnreachable,
)
from barge.oci.types import Descriptor, ImageManifest, Index
from clitest import at, opener, sha
from registries import RunningRegistry
from seed import push_image, put_blob


@pytest.fixture
def client(registry: RunningRegistry, barge_home: Path) -> RegistryClient:
    c = RegistryClient(registry.host, home=barge_home, credentials=CredentialStore.anonymous())
    c.retry.base = 0.01
    yield c
    c.close()


def test_registry_fixture_starts_fast(tmp_path: Path) -> None:
    from registries import start_registry

    t = time.monotonic()
    reg = start_registry(tmp_path / "r")
    try:
        assert time.monotonic() - t < 2.0
        assert reg.pid is not None
    finally:
        reg.stop()
    assert reg.process is None


def test_ping_and_blob_roundtrip(client: RegistryClient) -> None:
    client.ping()
    data = os.urandom(300_000)
    d = sha(data)
    assert client.blob_exists(at(client, "a/b"), d) is None
    client.upload_blob(at(client, "a/b"), d, len(data), opener(data))
    assert client.blob_exists(at(client, "a/b"), d) == len(data)
    with client.open_blob(at(client, "a/b"), d) as r:
        got = r.read()
    assert got == data
    assert client.read_blob(at(client, "a/b"), d, max_size=len(data)) == data
    with client.open_blob(at(client, "a/b"), d, offset=1000, length=5000) as r:
        assert r.read() == data[1000:6000]
    with client.open_blob(at(client, "a/b"), d, offset=299_990) as r:
        assert r.read() == data[299_990:]


def test_readinto_streams(client: RegistryClient) -> None:
    data = os.urandom(3 << 20)
    d = sha(data)
    client.upload_blob(at(client, "x/y"), d, len(data), opener(data))
    buf = bytearray(1 << 16)
    out = bytearray()
    with client.open_blob(at(client, "x/y"), d) as r:
        while n := r.readinto(buf):
            out += buf[:n]
    assert out == data


def test_read_blob_limit(client: RegistryClient) -> None:
    data = b"x" * 1000
    d = sha(data)
    client.upload_blob(at(client, "x/y"), d, len(data), opener(data))
    from barge.errors import LimitError

    with pytest.raises(LimitError):
        client.read_blob(at(client, "x/y"), d, max_size=10)


def test_missing_things(client: RegistryClient) -> None:
    d = sha(b"nope")
    with pytest.raises(BlobUnknown) as ei:
        client.read_blob(at(client, "a/b"), d, max_size=100)
    assert isinstance(ei.value, NotFoundError)
    with pytest.raises(ManifestUnknown):
        client.get_manifest(at(client, "a/b", "latest"))
    assert client.head_manifest(at(client, "a/b", "latest")) is None
    with pytest.raises(NameUnknown):
        client.list_tags(at(client, "never/pushed"))


def test_chunked_upload(client: RegistryClient, registry: RunningRegistry) -> None:
    data = os.urandom(1_000_003)
    d = sha(data)
    seen: list[int] = []
    client.upload_blob(
        at(client, "c/d"), d, len(data), opener(data), chunk_size=256 * 1024, progress=seen.append
    )
    assert sum(seen) == len(data)
    assert client.read_blob(at(client, "c/d"), d, max_size=len(data)) == data


def test_empty_blob(client: RegistryClient) -> None:
    d = sha(b"")
    client.upload_blob(at(client, "e/f"), d, 0, opener(b""))
    client.upload_blob(at(client, "e/g"), d, 0, opener(b""), chunk_size=1024)
    assert client.blob_exists(at(client, "e/f"), d) == 0
    assert client.read_blob(at(client, "e/g"), d, max_size=10) == b""


def test_wrong_digest_upload_rejected(client: RegistryClient) -> None:
    data = b"hello world"
    with pytest.raises(IntegrityError):
        client.upload_blob(at(client, "a/b"), sha(b"other"), len(data), opener(data))


def test_manifests_and_tags(client: RegistryClient, registry: RunningRegistry) -> None:
    digest, raw = push_image(registry, "img/one", "v1")
    m = client.get_manifest(at(client, "img/one", "v1"))
    assert m.data == raw and m.digest == digest and m.media_type == OCI_MANIFEST
    img = m.image()
    assert len(img.layers) == 2
    assert client.get_manifest(at(client, "img/one", digest)).data == raw
    desc = client.head_manifest(at(client, "img/one", "v1"))
    assert desc == Descriptor(OCI_MANIFEST, digest, len(raw))
    # push the same bytes under more tags + an index
    for t in ("v2", "v3"):
        assert client.put_manifest(at(client, "img/one", t), raw, OCI_MANIFEST) == digest
    idx = Index([Descriptor(OCI_MANIFEST, digest, len(raw))]).to_bytes()
    idig = client.put_manifest(at(client, "img/one", "multi"), idx, OCI_INDEX)
    got = client.get_manifest(at(client, "img/one", "multi"))
    assert got.digest == idig and got.is_index and got.index().manifests[0].digest == digest
    assert sorted(client.list_tags(at(client, "img/one"))) == ["multi", "v1", "v2", "v3"]
    client.delete_manifest(at(client, "img/one", idig))
    assert client.head_manifest(at(client, "img/one", idig)) is None
    assert ImageManifest.from_json(json.loads(raw)).to_json()["layers"] == json.loads(raw)["layers"]


def test_tags_pagination(
    registry: RunningRegistry, barge_home: Path, make_proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # distribution 2.8 ignores ?n= on tags/list; the proxy paginates like 3.x / Docker Hub do
    digest, raw = push_image(registry, "many/tags", "t000")
    proxy = make_proxy(registry)
    proxy.add(method="GET", path=r"/tags/list$", action="paginate", times=None)
    c = RegistryClient(proxy.host, home=barge_home)
    for i in range(1, 25):
        c.put_manifest(at(c, "many/tags", f"t{i:03d}"), raw, OCI_MANIFEST)
    orig = c._request

    def first_page_small(method, path, **kw):  # type: ignore[no-untyped-def]
        if path.endswith("/tags/list"):
            path += "?n=5"
        return orig(method, path, **kw)

    monkeypatch.setattr(c, "_request", first_page_small)
    tags = c.list_tags(at(c, "many/tags"))
    assert tags == [f"t{i:03d}" for i in range(25)]
    assert proxy.count("GET", r"/tags/list$") == 5


def test_mount(client: RegistryClient, registry: RunningRegistry) -> None:
    data = os.urandom(1000)
    d = put_blob(registry, "src/repo", data)
    assert client.mount_blob(at(client, "dst/repo"), d, at(client, "src/repo")) is True
    assert client.blob_exists(at(client, "dst/repo"), d) == 1000
    assert (
        client.mount_blob(at(client, "dst/other"), sha(b"missing"), at(client, "src/repo")) is False
    )


def test_referrers_unsupported(client: RegistryClient, registry: RunningRegistry) -> None:
    digest, _ = push_image(registry, "ref/a", "v1")
    assert client.referrers(at(client, "ref/a", digest)) is None


def test_corrupted_blob_raises_digest_mismatch(
    client: RegistryClient, registry: RunningRegistry
) -> None:
    data = os.urandom(200_000)
    d = put_blob(registry, "bad/blob", data)
    path = registry.blob_path(d)
    corrupted = bytearray(data)
    corrupted[100_000] ^= 0xFF
    path.write_bytes(bytes(corrupted))
    with pytest.raises(DigestMismatch) as ei:
        client.read_blob(at(client, "bad/blob"), d, max_size=len(data))
    assert d in str(ei.value) and isinstance(ei.value, IntegrityError)
    with pytest.raises(DigestMismatch), client.open_blob(at(client, "bad/blob"), d) as r:
        while r.read(65536):
            pass
    # a caller that reads exactly the known size (never asking for EOF) is protected too
    buf = bytearray(len(data))
    with pytest.raises(DigestMismatch), client.open_blob(at(client, "bad/blob"), d) as r:
        got = 0
        while got < len(data):
            got += r.readinto(memoryview(buf)[got:])


def test_connection_refused_message(barge_home: Path) -> None:
    from registries import free_port

    port = free_port()
    c = RegistryClient(f"127.0.0.1:{port}", home=barge_home)
    c.retry.attempts = 2
    c.retry.base = 0.01
    with pytest.raises(RegistryUnreachable) as ei:
        c.ping()
    assert str(ei.value).startswith(f"cannot reach registry 127.0.0.1:{port}")
    assert "refused" in str(ei.value)


def test_threads_share_client(client: RegistryClient) -> None:
    from concurrent.futures import ThreadPoolExecutor

    blobs = [os.urandom(50_000 + i) for i in range(16)]

    def work(data: bytes) -> bool:
        d = sha(data)
        client.upload_blob(at(client, "t/par"), d, len(data), opener(data), chunk_size=20_000)
        return client.read_blob(at(client, "t/par"), d, max_size=len(data)) == data

    with ThreadPoolExecutor(6) as ex:
        assert all(ex.map(work, blobs))
