"""Tests for barge.oci.layout: OCI image layout directories and archives, and skopeo interop."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from barge.errors import (
    ConflictError,
    IntegrityError,
    NotFoundError,
    UnsupportedError,
    UsageError,
)
from barge.oci.layout import (
    CHUNK_SIZE,
    REF_NAME_ANNOTATION,
    OCIArchiveReader,
    OCIArchiveWriter,
    OCILayout,
    write_archive,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
SKOPEO = shutil.which("skopeo") or ("/usr/bin/skopeo" if Path("/usr/bin/skopeo").exists() else None)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def leftovers(root: Path) -> list[str]:
    """Temporary files left anywhere under root."""
    return [str(p) for p in root.rglob("*") if p.name.startswith(".")]


class ShortReads(io.RawIOBase):
    """A stream that returns at most `piece` bytes per read and records the largest request."""

    def __init__(self, data: bytes, piece: int = 7000) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._piece = piece
        self.max_request = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        self.max_request = max(self.max_request, n)
        if n < 0:
            n = len(self._data)
        n = min(n, self._piece)
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += len(out)
        return out


class WriteOnly:
    """A non-seekable sink (like a pipe) that only counts what it receives."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()

    def write(self, b: bytes) -> int:
        return self.buf.write(b)

    def flush(self) -> None:
        pass


def tiny_image(layout: OCILayout | OCIArchiveWriter) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Write a small valid OCI image's config and gzip layer; return (manifest bytes, blobs)."""
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        ti = tarfile.TarInfo("hello.txt")
        ti.size = 6
        t.addfile(ti, io.BytesIO(b"hello\n"))
    layer = gzip.compress(raw.getvalue(), mtime=0)
    blobs = []
    for data in (config, layer):
        if isinstance(layout, OCILayout):
            layout.write_blob_bytes(data)
        else:
            layout.add_blob_bytes(data)
        blobs.append((sha256(data), data))
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": sha256(layer), "size": len(layer)}],
        }
    ).encode()
    return manifest, blobs


# ---------------------------------------------------------------------------------------------
# directory layout


def test_create_layout_files(tmp_path: Path) -> None:
    d = tmp_path / "lay"
    OCILayout(d, create=True)
    assert json.loads((d / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((d / "index.json").read_text())
    assert index["schemaVersion"] == 2
    assert index["manifests"] == []
    assert (d / "blobs").is_dir()
    # opening again (with or without create) keeps it
    OCILayout(d, create=True)
    assert OCILayout(d).manifests() == []


def test_open_missing_or_foreign(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="is not an OCI image layout"):
        OCILayout(tmp_path / "nope")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "file.txt").write_text("x")
    with pytest.raises(ConflictError, match="not an OCI image layout"):
        OCILayout(tmp_path / "foreign", create=True)
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "oci-layout").write_text('{"imageLayoutVersion":"2.0.0"}')
    with pytest.raises(UnsupportedError, match="unsupported OCI layout version"):
        OCILayout(tmp_path / "v2")


def test_blob_round_trip(tmp_path: Path) -> None:
    lay = OCILayout(tmp_path / "l", create=True)
    data = os.urandom(3 * CHUNK_SIZE + 123)
    digest = sha256(data)
    assert lay.has_blob(digest) is None
    stream = ShortReads(data)
    lay.write_blob(digest, len(data), stream)
    assert stream.max_request <= CHUNK_SIZE + 1
    assert lay.has_blob(digest) == len(data)
    with lay.open_blob(digest) as f:
        assert f.read() == data
    assert (tmp_path / "l" / "blobs" / "sha256" / digest.split(":")[1]).read_bytes() == data
    # writing it again does not read the stream
    lay.write_blob(digest, len(data), io.BytesIO(b""))
    assert lay.write_blob_bytes(b"abc") == sha256(b"abc")
    assert lay.blobs() == sorted([digest, sha256(b"abc")])
    assert leftovers(tmp_path) == []


def test_sha512_blob(tmp_path: Path) -> None:
    lay = OCILayout(tmp_path / "l", create=True)
    data = b"sha512 content"
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    lay.write_blob(digest, len(data), io.BytesIO(data))
    with lay.open_blob(digest) as f:
        assert f.read() == data


@pytest.mark.parametrize(
    ("payload", "size", "reason"),
    [
        (b"other bytes", 11, "digest mismatch"),
        (b"short", 100, "has 5 bytes, 100 were declared"),
        (b"right content plus", 13, "more than the 13 bytes declared"),
    ],
)
def test_write_blob_mismatch_leaves_nothing(
    tmp_path: Path, payload: bytes, size: int, reason: str
) -> None:
    lay = OCILayout(tmp_path / "l", create=True)
    digest = sha256(b"right content")
    with pytest.raises(IntegrityError, match=reason):
        lay.write_blob(digest, size, io.BytesIO(payload))
    assert lay.has_blob(digest) is None
    assert list((tmp_path / "l" / "blobs").rglob("*")) in ([], [tmp_path / "l/blobs/sha256"])
    assert leftovers(tmp_path) == []


def test_manifest_round_trip(tmp_path: Path) -> None:
    lay = OCILayout(tmp_path / "l", create=True)
    manifest, _ = tiny_image(lay)
    platform = {"architecture": "arm64", "os": "linux"}
    digest = lay.put_manifest(manifest, OCI_MANIFEST, "v1", platform)
    assert digest == sha256(manifest)
    assert lay.get_manifest("v1") == (manifest, OCI_MANIFEST, digest)
    assert lay.get_manifest(None) == (manifest, OCI_MANIFEST, digest)
    assert lay.tags() == ["v1"]
    (desc,) = lay.manifests()
    assert desc == {
        "mediaType": OCI_MANIFEST,
        "digest": digest,
        "size": len(manifest),
        "platform": platform,
        "annotations": {REF_NAME_ANNOTATION: "v1"},
    }
    # a second tag, then re-tag v1 to another manifest: the old v1 entry is replaced
    lay.put_manifest(manifest, OCI_MANIFEST, "v2")
    other = manifest.replace(b'"schemaVersion": 2', b'"schemaVersion":2')
    d2 = lay.put_manifest(other, OCI_MANIFEST, "v1")
    assert sorted(lay.tags()) == ["v1", "v2"]
    assert lay.get_manifest("v1") == (other, OCI_MANIFEST, d2)
    assert lay.get_manifest("v2")[2] == digest
    with pytest.raises(UsageError, match="holds 2 images; name one"):
        lay.get_manifest(None)
    with pytest.raises(NotFoundError, match='no image tagged "v3"'):
        lay.get_manifest("v3")
    # untagged manifests are not duplicated
    lay.put_manifest(b"{}", OCI_MANIFEST, None)
    lay.put_manifest(b"{}", OCI_MANIFEST, None)
    assert len(lay.manifests()) == 3
    # reopened, all is still there; index.json written atomically (no temp files)
    again = OCILayout(tmp_path / "l")
    assert again.get_manifest("v2")[0] == manifest
    assert leftovers(tmp_path) == []


def test_concurrent_put_manifest_keeps_every_tag(tmp_path: Path) -> None:
    import threading

    OCILayout(tmp_path / "l", create=True)

    def put(i: int) -> None:
        lay = OCILayout(tmp_path / "l")
        lay.put_manifest(b'{"n":%d}' % i, OCI_MANIFEST, f"t{i}")

    threads = [threading.Thread(target=put, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(OCILayout(tmp_path / "l").tags()) == sorted(f"t{i}" for i in range(12))


def test_put_manifest_rejects_bad_tag(tmp_path: Path) -> None:
    lay = OCILayout(tmp_path / "l", create=True)
    with pytest.raises(UsageError, match="invalid tag"):
        lay.put_manifest(b"{}", OCI_MANIFEST, "../evil")


def test_empty_layout_get_manifest(tmp_path: Path) -> None:
    lay = OCILayout(tmp_path / "l", create=True)
    with pytest.raises(NotFoundError, match="holds no image"):
        lay.get_manifest(None)


BAD_DIGESTS = [
    "sha256:../../../etc/passwd",
    "sha256:" + "A" * 64,
    "sha256:" + "a" * 63,
    "sha256:" + "a" * 64 + "/",
    "md5:" + "a" * 32,
    "../sha256/" + "a" * 64,
    "",
]


@pytest.mark.parametrize("digest", BAD_DIGESTS)
def test_bad_digest_never_becomes_a_path(tmp_path: Path, digest: str) -> None:
    lay = OCILayout(tmp_path / "l", create=True)
    with pytest.raises(IntegrityError, match="invalid digest"):
        lay.has_blob(digest)
    with pytest.raises(IntegrityError, match="invalid digest"):
        lay.open_blob(digest)
    with pytest.raises(IntegrityError, match="invalid digest"):
        lay.write_blob(digest, 1, io.BytesIO(b"x"))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["blobs", "index.json", "l", "oci-layout"]


def _write_index(d: Path, manifests: Any) -> None:
    (d / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))


@pytest.mark.parametrize(
    ("manifests", "reason"),
    [
        ([{"mediaType": OCI_MANIFEST, "digest": "sha256:../../x", "size": 2}], "invalid digest"),
        ([{"mediaType": OCI_MANIFEST, "digest": sha256(b"{}"), "size": -1}], "invalid size"),
        ([{"mediaType": OCI_MANIFEST, "digest": sha256(b"{}"), "size": "2"}], "invalid size"),
        ([{"digest": sha256(b"{}"), "size": 2}], "no mediaType"),
        (["not an object"], "is not an object"),
        ({"a": 1}, "'manifests' is not a list"),
        (
            [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": sha256(b"{}"),
                    "size": 2,
                    "annotations": {REF_NAME_ANNOTATION: 5},
                }
            ],
            "invalid annotations",
        ),
    ],
)
def test_hostile_index_rejected(tmp_path: Path, manifests: Any, reason: str) -> None:
    d = tmp_path / "l"
    lay = OCILayout(d, create=True)
    lay.write_blob_bytes(b"{}")
    _write_index(d, manifests)
    with pytest.raises(IntegrityError, match=reason):
        lay.manifests()
    with pytest.raises(IntegrityError, match=reason):
        lay.get_manifest(None)


def test_index_not_json_and_too_big_manifest(tmp_path: Path) -> None:
    d = tmp_path / "l"
    lay = OCILayout(d, create=True)
    (d / "index.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        lay.tags()
    _write_index(d, [{"mediaType": OCI_MANIFEST, "digest": sha256(b"x"), "size": 1 << 40}])
    with pytest.raises(IntegrityError, match="byte limit"):
        lay.get_manifest(None)


def test_corrupt_manifest_and_blob_detected(tmp_path: Path) -> None:
    d = tmp_path / "l"
    lay = OCILayout(d, create=True)
    manifest, blobs = tiny_image(lay)
    digest = lay.put_manifest(manifest, OCI_MANIFEST, "t")
    # same size, different bytes
    (d / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(b" " * len(manifest))
    with pytest.raises(IntegrityError, match="digest mismatch"):
        lay.get_manifest("t")
    # size differs from the descriptor
    (d / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(manifest + b" ")
    with pytest.raises(IntegrityError, match="larger than the"):
        lay.get_manifest("t")
    # a blob read through open_blob is verified at EOF
    layer_digest = blobs[1][0]
    (d / "blobs" / "sha256" / layer_digest.split(":")[1]).write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match="digest mismatch"), lay.open_blob(layer_digest) as f:
        f.read()


def test_symlinked_blob_refused(tmp_path: Path) -> None:
    d = tmp_path / "l"
    lay = OCILayout(d, create=True)
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    (d / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (d / "blobs" / "sha256" / sha256(b"secret").split(":")[1]).symlink_to(secret)
    assert lay.has_blob(sha256(b"secret")) is None
    with pytest.raises(IntegrityError, match="symlink"):
        lay.open_blob(sha256(b"secret"))


def test_open_missing_blob(tmp_path: Path) -> None:
    lay = OCILayout(tmp_path / "l", create=True)
    with pytest.raises(NotFoundError, match="is not in oci:"):
        lay.open_blob(sha256(b"nothing"))


# ---------------------------------------------------------------------------------------------
# archives


def test_archive_round_trip_streamed(tmp_path: Path) -> None:
    sink = WriteOnly()  # not seekable: the writer must stream
    w = OCIArchiveWriter(sink)  # type: ignore[arg-type]
    manifest, blobs = tiny_image(w)
    big = os.urandom(2 * CHUNK_SIZE + 17)
    src = ShortReads(big, piece=50_000)
    w.add_blob(sha256(big), len(big), src)
    assert src.max_request <= CHUNK_SIZE  # read in pieces, never the whole blob at once
    w.add_blob(sha256(big), len(big), io.BytesIO(b""))  # duplicate: skipped, not read
    digest = w.add_manifest(manifest, OCI_MANIFEST, "v1", {"architecture": "amd64", "os": "linux"})
    w.finish()
    path = tmp_path / "a.tar"
    path.write_bytes(sink.buf.getvalue())
    with OCIArchiveReader(path) as r:
        assert r.tags() == ["v1"]
        assert r.get_manifest("v1") == (manifest, OCI_MANIFEST, digest)
        assert r.get_manifest(None)[2] == digest
        assert r.has_blob(sha256(big)) == len(big)
        with r.open_blob(sha256(big)) as f:
            assert f.read() == big
        for d, data in blobs:
            assert r.has_blob(d) == len(data)
        assert r.has_blob(sha256(b"absent")) is None
        with pytest.raises(NotFoundError):
            r.open_blob(sha256(b"absent"))
        assert r.manifests()[0]["platform"] == {"architecture": "amd64", "os": "linux"}
    with tarfile.open(path) as t:
        names = t.getnames()
    assert names[-2:] == ["oci-layout", "index.json"]


def test_archive_writer_mismatch(tmp_path: Path) -> None:
    w = OCIArchiveWriter(io.BytesIO())
    with pytest.raises(IntegrityError, match="digest mismatch"):
        w.add_blob(sha256(b"good"), 4, io.BytesIO(b"evil"))
    w = OCIArchiveWriter(io.BytesIO())
    with pytest.raises(IntegrityError, match="has 2 bytes, 4 were declared"):
        w.add_blob(sha256(b"good"), 4, io.BytesIO(b"go"))
    w = OCIArchiveWriter(io.BytesIO())
    with pytest.raises(IntegrityError, match="more than the 4 bytes"):
        w.add_blob(sha256(b"good"), 4, io.BytesIO(b"good!"))
    w = OCIArchiveWriter(io.BytesIO())
    with pytest.raises(IntegrityError, match="invalid digest"):
        w.add_blob("sha256:../../etc", 4, io.BytesIO(b"good"))
    w = OCIArchiveWriter(io.BytesIO())
    index = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha256(b"x"), "size": 1}],
    }
    with pytest.raises(IntegrityError, match="which was not added"):
        w.finish(json.dumps(index).encode())


def test_write_archive_from_directory(tmp_path: Path) -> None:
    lay = OCILayout(tmp_path / "l", create=True)
    manifest, blobs = tiny_image(lay)
    digest = lay.put_manifest(manifest, OCI_MANIFEST, "t")
    with open(tmp_path / "a.tar", "wb") as f:
        write_archive(tmp_path / "l", f)
    with OCIArchiveReader(tmp_path / "a.tar") as r:
        assert r.get_manifest("t") == (manifest, OCI_MANIFEST, digest)
        assert r.manifests() == lay.manifests()
        for d, data in blobs:
            with r.open_blob(d) as b:
                assert b.read() == data


def _tar_with(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))


LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
EMPTY_INDEX = b'{"schemaVersion":2,"manifests":[]}'


@pytest.mark.parametrize(
    "evil", ["../escape", "/etc/passwd", "blobs/../../x", "./blobs/sha256/../../../y"]
)
def test_archive_hostile_member_names(tmp_path: Path, evil: str) -> None:
    p = tmp_path / "evil.tar"
    _tar_with(p, [("oci-layout", LAYOUT), ("index.json", EMPTY_INDEX), (evil, b"x")])
    with pytest.raises(IntegrityError, match="refusing tar member"):
        OCIArchiveReader(p)


def test_archive_other_problems(tmp_path: Path) -> None:
    p = tmp_path / "dup.tar"
    _tar_with(p, [("oci-layout", LAYOUT), ("index.json", EMPTY_INDEX), ("./index.json", b"{}")])
    with pytest.raises(IntegrityError, match="appears twice"):
        OCIArchiveReader(p)
    p = tmp_path / "nolayout.tar"
    _tar_with(p, [("index.json", EMPTY_INDEX)])
    with pytest.raises(NotFoundError, match="not an OCI layout archive"):
        OCIArchiveReader(p)
    p = tmp_path / "notar.tar"
    p.write_bytes(b"this is not a tar file at all" * 100)
    with pytest.raises(IntegrityError, match="not a tar archive"):
        OCIArchiveReader(p)
    with pytest.raises(NotFoundError, match="no such archive"):
        OCIArchiveReader(tmp_path / "missing.tar")
    p = tmp_path / "badidx.tar"
    idx = {
        "schemaVersion": 2,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": "sha256:..", "size": 1}],
    }
    _tar_with(p, [("./oci-layout", LAYOUT), ("./index.json", json.dumps(idx).encode())])
    with OCIArchiveReader(p) as r, pytest.raises(IntegrityError, match="invalid digest"):
        r.get_manifest(None)


# ---------------------------------------------------------------------------------------------
# interop with the real skopeo

needs_skopeo = pytest.mark.skipif(SKOPEO is None, reason="skopeo is not installed")


def skopeo(tmp_path: Path, *args: str) -> bytes:
    assert SKOPEO is not None
    policy = tmp_path / "policy.json"
    if not policy.exists():
        policy.write_text('{"default":[{"type":"insecureAcceptAnything"}]}')
    env = {**os.environ, "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    res = subprocess.run(
        [SKOPEO, "--policy", str(policy), *args],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr.decode()
    return res.stdout


@needs_skopeo
def test_skopeo_reads_barge_layout(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    lay = OCILayout(d, create=True)
    manifest, _ = tiny_image(lay)
    digest = lay.put_manifest(manifest, OCI_MANIFEST, "t")
    assert skopeo(tmp_path, "inspect", "--raw", f"oci:{d}:t") == manifest
    skopeo(tmp_path, "copy", "-q", f"oci:{d}:t", f"oci:{tmp_path / 'dir2'}:t")
    copied = OCILayout(tmp_path / "dir2")
    assert copied.get_manifest("t") == (manifest, OCI_MANIFEST, digest)


@needs_skopeo
def test_barge_reads_skopeo_layout_and_archive(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    lay = OCILayout(d, create=True)
    manifest, blobs = tiny_image(lay)
    lay.put_manifest(manifest, OCI_MANIFEST, "t")
    skopeo(tmp_path, "copy", "-q", f"oci:{d}:t", f"oci:{tmp_path / 'dir3'}:t")
    skopeo(tmp_path, "copy", "-q", f"oci:{d}:t", f"oci-archive:{tmp_path / 'a.tar'}:t")
    raw = skopeo(tmp_path, "inspect", "--raw", f"oci:{tmp_path / 'dir3'}:t")
    d3 = OCILayout(tmp_path / "dir3")
    data, media_type, digest = d3.get_manifest("t")
    assert data == raw == manifest
    assert media_type == OCI_MANIFEST
    assert digest == sha256(raw)
    assert d3.tags() == ["t"]
    for bd, bdata in blobs:
        with d3.open_blob(bd) as f:
            assert f.read() == bdata
    with OCIArchiveReader(tmp_path / "a.tar") as r:
        assert r.get_manifest("t") == (data, media_type, digest)
        for bd, bdata in blobs:
            with r.open_blob(bd) as f:
                assert f.read() == bdata


@needs_skopeo
def test_skopeo_reads_barge_archive(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    with open(path, "wb") as f, OCIArchiveWriter(f) as w:
        manifest, _ = tiny_image(w)
        w.add_manifest(manifest, OCI_MANIFEST, "t")
    assert skopeo(tmp_path, "inspect", "--raw", f"oci-archive:{path}:t") == manifest
    skopeo(tmp_path, "copy", "-q", f"oci-archive:{path}:t", f"oci:{tmp_path / 'out'}:t")
    assert OCILayout(tmp_path / "out").get_manifest("t")[0] == manifest


def test_archive_blobs_read_concurrently(tmp_path: Path) -> None:
    """Several threads read different blobs of one archive at once (a pull decodes chunks in
    parallel): each stream must see only its own member's bytes."""
    import threading

    from barge.oci.layout import OCIArchiveReader, OCIArchiveWriter

    blobs = [os.urandom(3 << 20) for _ in range(6)]
    archive = tmp_path / "a.tar"
    with open(archive, "wb") as f:
        w = OCIArchiveWriter(f)
        digests = [w.add_blob_bytes(b) for b in blobs]
        cfg = w.add_blob_bytes(b"{}")
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": cfg,
                    "size": 2,
                },
                "layers": [],
            }
        ).encode()
        w.add_manifest(manifest, "application/vnd.oci.image.manifest.v1+json", "t")
        w.finish()
    reader = OCIArchiveReader(archive)
    errors: list[str] = []

    def read(i: int) -> None:
        for _ in range(3):
            with reader.open_blob(digests[i]) as s:
                got = bytearray()
                while piece := s.read(4096 + i):
                    got += piece
            if bytes(got) != blobs[i]:
                errors.append(f"blob {i} came back wrong")

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(blobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    reader.close()
    assert not errors
