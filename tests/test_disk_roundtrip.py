"""Encode -> index -> decode round trips of sparse disks with holes, zero frames and data."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from barge.disk import (
    FrameIndex,
    decode_frame,
    encode_chunk,
    hash_chunk,
    iter_encoded_chunk,
    parse_codec,
    plan_chunks,
    write_zero_aware,
)
from diskfiles import FS, decode_file, encode_file, make_disk

KiB = 1 << 10
MiB = 1 << 20


def holes_supported(tmp_path: Path) -> bool:
    p = tmp_path / "probe"
    make_disk(p, 4 * MiB, [(2 * MiB, b"x")])
    fd = os.open(p, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_DATA) > 0
    except OSError:
        return False
    finally:
        os.close(fd)
        p.unlink()


CASES = {
    "empty-ish odd size": (FS * 3 + 17, []),
    "data everywhere": (FS * 5 + 4095, [(0, os.urandom(FS * 5 + 4095))]),
    "holes and data": (
        FS * 40 + 123,
        [
            (FS * 2 + 100, os.urandom(3000)),
            (FS * 7, b"barge" * 40000),
            (FS * 20 - 10, os.urandom(20)),  # straddles a frame boundary
            (FS * 40 + 100, b"tail!!"[:23]),
        ],
    ),
    "written zeros": (FS * 6, [(0, bytes(FS * 3)), (FS * 4, b"\1")]),
}


@pytest.mark.parametrize("spec", ["zstd:1", "lz4", "none"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk_frames", [1, 4, 64])
def test_round_trip(tmp_path: Path, spec: str, case: str, chunk_frames: int) -> None:
    size, writes = CASES[case]
    src = tmp_path / "disk.img"
    make_disk(src, size, writes)
    metas, blobs = encode_file(src, "disk.img", FS * chunk_frames, codec=parse_codec(spec))
    index = FrameIndex.build({"disk.img": size}, metas, frame_size=FS)
    again = FrameIndex.from_bytes(index.to_bytes())
    assert again == index
    dst = tmp_path / "out.img"
    decode_file(dst, size, list(again.chunks), blobs)
    assert dst.read_bytes() == src.read_bytes()
    # frames cover the disk exactly; zero frames have no bytes
    refs = list(again.disk("disk.img").iter_frames())
    assert sum(r.usize for r in refs) == size
    assert all(r.chunk is None or not r.zero or r.chunk.frames[r.index].csize == 0 for r in refs)


def test_all_zero_chunks_are_omitted(tmp_path: Path) -> None:
    src = tmp_path / "d"
    make_disk(src, FS * 16, [(FS * 9 + 5, b"x")])
    metas, _ = encode_file(src, "d", FS * 4)
    assert [(m.offset, m.length) for m in metas] == [(FS * 8, FS * 4)]
    assert [f.zero for f in metas[0].frames] == [True, False, True, True]


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_workers_give_identical_layers(tmp_path: Path, workers: int) -> None:
    src = tmp_path / "d"
    make_disk(src, FS * 30 + 1, [(FS, os.urandom(FS * 10)), (FS * 20, b"ab" * FS)])
    base = encode_file(src, "d", FS * 8, workers=1)
    assert encode_file(src, "d", FS * 8, workers=workers) == base


def test_known_digests_and_streaming(tmp_path: Path) -> None:
    src = tmp_path / "d"
    make_disk(src, FS * 10 + 3, [(FS * 3, os.urandom(FS * 2)), (FS * 9, b"q" * 99)])
    codec = parse_codec("zstd:1")
    fd = os.open(src, os.O_RDONLY)
    try:
        for plan in plan_chunks("d", FS * 10 + 3, FS * 8, frame_size=FS):
            known = hash_chunk(fd, plan, FS)
            out = io.BytesIO()
            enc = encode_chunk(fd, plan, FS, codec, out)
            assert known.udigest == enc.udigest
            assert [(f.digest, f.zero) for f in enc.frames] == list(known.frames)
            out2 = io.BytesIO()
            assert encode_chunk(fd, plan, FS, codec, out2, known=known) == enc
            stream = iter_encoded_chunk(fd, plan, FS, codec)
            with pytest.raises(RuntimeError):
                _ = stream.result
            assert b"".join(stream) == out.getvalue() == out2.getvalue()
            assert stream.result == enc
    finally:
        os.close(fd)


def test_decode_frame_range_fetch(tmp_path: Path) -> None:
    src = tmp_path / "d"
    payload = os.urandom(FS * 3)
    make_disk(src, FS * 4, [(FS, payload)])
    metas, blobs = encode_file(src, "d", FS * 4)
    (m,) = metas
    codec = parse_codec(m.codec)
    blob = blobs[m.digest]
    whole = bytearray()
    for f in m.frames:
        whole += decode_frame(blob[f.coffset : f.coffset + f.csize], f, codec)
    assert bytes(whole) == src.read_bytes()


def test_hole_skipping_and_sparse_output(tmp_path: Path) -> None:
    if not holes_supported(tmp_path):
        pytest.skip("filesystem does not report holes")
    size = 1 << 30
    data = os.urandom(4 * MiB) + b"compressible " * (4 * MiB // 13)
    src = tmp_path / "big.img"
    make_disk(src, size, [(300 * MiB + 12 * KiB, data)])
    read = 0
    real = os.preadv

    def counting(fd: int, bufs: list[memoryview], off: int) -> int:
        nonlocal read
        n = real(fd, bufs, off)
        read += n
        return n

    fs = 4 * MiB
    t = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "preadv", counting)
        metas, blobs = encode_file(src, "big.img", 64 * MiB, frame_size=fs)
    elapsed = time.perf_counter() - t
    assert read <= len(data) + 2 * fs  # only the data extents (block-rounded) were read
    assert len(metas) == 1 and elapsed < 10
    dst = tmp_path / "out.img"
    decode_file(dst, size, metas, blobs)
    assert os.path.getsize(dst) == size
    allocated = os.stat(dst).st_blocks * 512
    assert allocated <= len(data) + 64 * KiB, allocated
    with open(dst, "rb") as f:
        f.seek(300 * MiB + 12 * KiB)
        assert f.read(len(data)) == data


def test_write_zero_aware(tmp_path: Path) -> None:
    p = tmp_path / "w"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 1 * MiB)
        buf = bytearray(256 * KiB)
        buf[5000:5010] = b"0123456789"
        buf[200 * KiB] = 7
        n = write_zero_aware(fd, 64 * KiB, memoryview(buf))
        assert n == 2 * 4096
        assert write_zero_aware(fd, 0, bytes(10000)) == 0
        assert write_zero_aware(fd, 512 * KiB, b"\0" * 4096 + b"z" * 10) == 10
    finally:
        os.close(fd)
    content = p.read_bytes()
    assert content[64 * KiB + 5000 : 64 * KiB + 5010] == b"0123456789"
    assert content[64 * KiB + 200 * KiB] == 7
    assert content[512 * KiB + 4096 : 512 * KiB + 4106] == b"z" * 10
    assert content.count(0) == len(content) - 21


def test_disk_writer_direct_and_buffered_agree(tmp_path: Path) -> None:
    """DiskWriter sends aligned whole blocks through O_DIRECT and everything else through the
    page cache; the file reads back the same either way, and stays sparse."""
    import os

    from barge.disk.decoder import DecodeBuffers, DiskWriter, write_zero_aware

    path = tmp_path / "d.img"
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    bufs = DecodeBuffers(1 << 20)
    view = memoryview(bufs.ubuf)[bufs.ubase : bufs.ubase + (1 << 20)]
    view[:] = os.urandom(1 << 20)
    w = DiskWriter(path)
    try:
        assert w.pwrite(view, 4 << 20) == 1 << 20  # aligned: direct where the fs allows
        assert w.pwrite(memoryview(b"tail!"), (16 << 20) - 5) == 5  # unaligned: buffered
        write_zero_aware(w, 8 << 20, bytes(4096) + b"x" * 4096)  # zero block stays a hole
        w.fsync()
    finally:
        w.close()
    with open(path, "rb") as f:
        f.seek(4 << 20)
        assert f.read(1 << 20) == bytes(view)
        f.seek(8 << 20)
        assert f.read(8192) == bytes(4096) + b"x" * 4096
        f.seek((16 << 20) - 5)
        assert f.read() == b"tail!"
    assert path.stat().st_blocks * 512 <= (1 << 20) + 3 * 4096 + 8192
