"""Every kind of corrupt or hostile input raises IntegrityError with a useful message."""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import pytest

from barge.disk import ChunkMeta, FrameInfo, decode_chunk, decode_frame, validate_layout
from barge.disk.codec import parse_codec
from barge.disk.index import zero_digest
from barge.errors import IntegrityError
from diskfiles import FS, encode_file, make_disk


@pytest.fixture
def encoded(tmp_path: Path) -> tuple[Path, ChunkMeta, bytes]:
    src = tmp_path / "d"
    make_disk(src, FS * 6, [(0, os.urandom(FS)), (FS * 2, b"ab" * FS), (FS * 5, b"end")])
    metas, blobs = encode_file(src, "d", FS * 6)
    (meta,) = metas
    assert [f.zero for f in meta.frames] == [False, True, False, False, True, False]
    return tmp_path / "out", meta, blobs[meta.digest]


def decode(out: Path, meta: ChunkMeta, blob: bytes, **kw: object) -> None:
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, FS * 6)
        decode_chunk(io.BytesIO(blob), fd, meta, **kw)  # type: ignore[arg-type]
    finally:
        os.close(fd)


def with_frame(meta: ChunkMeta, i: int, **changes: object) -> ChunkMeta:
    frames = list(meta.frames)
    frames[i] = dataclasses.replace(frames[i], **changes)  # type: ignore[arg-type]
    return dataclasses.replace(meta, frames=tuple(frames))


def test_good_decodes(encoded: tuple[Path, ChunkMeta, bytes]) -> None:
    out, meta, blob = encoded
    decode(out, meta, blob)


def test_flipped_byte_in_compressed_data(encoded: tuple[Path, ChunkMeta, bytes]) -> None:
    out, meta, blob = encoded
    f2 = meta.frames[2]
    for pos in (f2.coffset + 3, f2.coffset + f2.csize // 2, f2.coffset + f2.csize - 2):
        bad = bytearray(blob)
        bad[pos] ^= 0x20
        with pytest.raises(IntegrityError, match=rf"layer {meta.digest}.*frame 2"):
            decode(out, meta, bytes(bad), verify_layer=False)
        with pytest.raises(IntegrityError, match=meta.digest):
            decode(out, meta, bytes(bad))


def test_wrong_frame_digest(encoded: tuple[Path, ChunkMeta, bytes]) -> None:
    out, meta, blob = encoded
    bad = with_frame(meta, 3, digest="sha256:" + "0" * 64)
    with pytest.raises(IntegrityError, match=r"frame 3 .*decodes to sha256:"):
        decode(out, bad, blob)


def test_wrong_chunk_digest(encoded: tuple[Path, ChunkMeta, bytes]) -> None:
    out, meta, blob = encoded
    bad = dataclasses.replace(meta, udigest="sha256:" + "1" * 64)
    with pytest.raises(IntegrityError, match="the chunk.s frames hash to"):
        decode(out, bad, blob)


def test_wrong_layer_digest(encoded: tuple[Path, ChunkMeta, bytes]) -> None:
    out, meta, blob = encoded
    bad = dataclasses.replace(meta, digest="sha256:" + "2" * 64)
    with pytest.raises(IntegrityError, match="compressed stream hashes to"):
        decode(out, bad, blob)
    decode(out, bad, blob, verify_layer=False)


def test_truncated_stream(encoded: tuple[Path, ChunkMeta, bytes]) -> None:
    out, meta, blob = encoded
    for cut in (0, 1, meta.frames[2].coffset + 5, len(blob) - 1):
        with pytest.raises(IntegrityError, match=r"stream ends in frame \d"):
            decode(out, meta, blob[:cut])


def test_trailing_data(encoded: tuple[Path, ChunkMeta, bytes]) -> None:
    out, meta, blob = encoded
    with pytest.raises(IntegrityError, match="more data than"):
        decode(out, meta, blob + b"x")


def test_codec_mismatch(encoded: tuple[Path, ChunkMeta, bytes]) -> None:
    out, meta, blob = encoded
    with pytest.raises(IntegrityError, match="codec"):
        decode(out, meta, blob, codec=parse_codec("lz4"))


def test_decode_frame_errors(encoded: tuple[Path, ChunkMeta, bytes]) -> None:
    _, meta, blob = encoded
    codec = parse_codec(meta.codec)
    f = meta.frames[0]
    data = blob[f.coffset : f.coffset + f.csize]
    assert len(decode_frame(data, f, codec)) == FS
    with pytest.raises(IntegrityError, match="compressed bytes"):
        decode_frame(data[:-1], f, codec)
    with pytest.raises(IntegrityError, match="decodes to"):
        decode_frame(data, dataclasses.replace(f, digest="sha256:" + "3" * 64), codec)
    with pytest.raises(IntegrityError, match="zero frame"):
        decode_frame(b"x", meta.frames[1], codec)


# ---------------------------------------------------------------------- validate_layout


def layout_error(meta: ChunkMeta, disks: dict[str, int] | None = None) -> str:
    with pytest.raises(IntegrityError) as ei:
        validate_layout(disks or {"d": FS * 6}, [meta])
    return str(ei.value)


def test_layout_accepts_good(encoded: tuple[Path, ChunkMeta, bytes]) -> None:
    validate_layout({"d": FS * 6}, [encoded[1]])


def test_layout_errors(encoded: tuple[Path, ChunkMeta, bytes]) -> None:
    _, m, _ = encoded
    r = dataclasses.replace
    assert "past the end" in layout_error(m, {"d": FS * 5})
    assert "does not declare" in layout_error(r(m, disk="other"))
    assert "bad offset" in layout_error(r(m, offset=-FS))
    assert "frames listed" in layout_error(r(m, frames=m.frames[:-1]))
    assert "frames listed" in layout_error(r(m, length=FS * 5))
    assert "multiple of the frame size" in layout_error(r(m, offset=100), {"d": FS * 7})
    assert "tile" in layout_error(with_frame(m, 2, uoffset=0))
    assert "tile" in layout_error(with_frame(m, 3, coffset=1))
    assert "add up to" in layout_error(r(m, size=m.size + 1))
    assert "claims" in layout_error(with_frame(m, 1, csize=5))  # zero frame with bytes
    big = m.frames[0].csize + 10 * FS
    assert "allowed 1.." in layout_error(with_frame(m, 0, csize=big))
    assert "non-zero digest" in layout_error(with_frame(m, 1, digest="sha256:" + "a" * 64))
    assert "malformed" in layout_error(with_frame(m, 0, digest="md5:abc"))
    assert "frame size" in layout_error(r(m, frame_size=1000))
    assert "unknown codec" in layout_error(r(m, codec="gzip"))
    assert "not allowed" in layout_error(r(m, disk="../etc"), {"../etc": FS * 6})


def test_layout_overlap_and_digests(encoded: tuple[Path, ChunkMeta, bytes]) -> None:
    _, m, _ = encoded
    frames = (FrameInfo(0, FS, 0, 0, zero_digest(FS), True),)
    other = ChunkMeta("d", FS * 5, FS, "sha256:" + "4" * 64, 0, m.udigest, FS, "zstd", frames)
    with pytest.raises(IntegrityError, match="overlaps"):
        validate_layout({"d": FS * 6}, [m, other])
    validate_layout({"d": FS * 7}, [m, dataclasses.replace(other, offset=FS * 6)])
    with pytest.raises(IntegrityError, match="not sha256"):
        validate_layout({"d": FS * 6}, [dataclasses.replace(m, digest="sha256:ABC")])
    with pytest.raises(IntegrityError, match="invalid size"):
        validate_layout({"d": -1}, [])
