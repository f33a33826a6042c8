"""The coverage ledger the pull's publish step checks (barge.disk.coverage), the zero regions
of a frame index, and the check refusing a pull that left bytes unaccounted for (issue 10)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from barge.disk.coverage import Coverage
from barge.disk.index import DiskIndex, FrameIndex
from barge.errors import ExitCode, IntegrityError
from barge.store import Store
from barge.transfer.pull import pull
from pullcases import Case, DiskSpec, Edit, Target, Version, build_disks, publish

KiB = 1024
MiB = 1 << 20


@pytest.fixture
def store(barge_home: Path) -> Store:
    return Store()


def one(size: int, *e: Edit) -> Version:
    return Version((DiskSpec("disk.img", size, e),), chunk_size=512 * KiB, frame_size=128 * KiB)


def test_coverage_gaps_and_check() -> None:
    cov = Coverage("disk.img", 100)
    for off, n in [(10, 5), (0, 10), (50, 60), (15, 5), (30, 0)]:
        cov.add(off, n)
    assert cov.gaps() == [(20, 30)]
    with pytest.raises(IntegrityError, match=r"30 bytes in 1 range\(s\), the first 20\.\.50"):
        cov.check()
    cov.add(20, 30)
    assert cov.gaps() == []
    cov.check()
    assert Coverage("empty", 0).gaps() == []


@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 700)), max_size=3000))
@settings(max_examples=60, deadline=None)
def test_coverage_matches_a_byte_map(ranges: list[tuple[int, int]]) -> None:
    """Whatever the order, overlaps and merges (past the compaction threshold too), the gaps
    are exactly the bytes no range covered."""
    cov = Coverage("d", 4096)
    seen = bytearray(4096)
    for off, n in ranges:
        cov.add(off, n)
        seen[off : off + n] = b"\1" * len(seen[off : off + n])
    want = []
    pos = 0
    while pos < 4096:
        if seen[pos]:
            pos += 1
            continue
        end = seen.find(b"\1", pos)
        end = 4096 if end < 0 else end
        want.append((pos, end - pos))
        pos = end
    assert cov.gaps() == want


def _frame_tiles(d: DiskIndex) -> Iterator[tuple[int, int]]:
    for c in d.chunks:
        for f in c.frames:
            if not f.zero:
                yield c.offset + f.uoffset, f.usize
    yield from d.zero_ranges()


def test_zero_ranges_and_data_frames_tile_the_disk(store: Store, tmp_path: Path) -> None:
    """``DiskIndex.zero_ranges`` and the non-zero frames tile [0, size) exactly once."""
    v = one(
        3 * MiB + 512,
        Edit("random", 200 * KiB, 50 * KiB),  # frame 1 of chunk 0: frames 0, 2, 3 are zero frames
        Edit("zeros", 1 * MiB, 200 * KiB),  # written zeros: chunks 1..3 are not in the index
        Edit("random", 2 * MiB + 10, 50 * KiB),  # frame 0 of chunk 4
    )
    case = Case(v, v)
    files, _ = build_disks(case, tmp_path / "d")
    ref = publish(v, files, Target(layout_dir=tmp_path / "layout"), "v1", store)
    res = pull(store, ref)
    index = FrameIndex.from_bytes((res.path / "index.json").read_bytes())
    for d in index.disks:
        tiles = sorted(_frame_tiles(d))
        pos = 0
        for off, n in tiles:
            assert off == pos and n > 0
            pos += n
        assert pos == d.size
        assert list(d.zero_ranges()) == [
            (0, 128 * KiB),
            (256 * KiB, 2 * MiB - 256 * KiB),
            (2 * MiB + 128 * KiB, d.size - 2 * MiB - 128 * KiB),
        ]


def test_publish_check_refuses_a_pull_that_skips_the_zero_regions(
    store: Store, tmp_path: Path
) -> None:
    """A pull that leaves any range unsettled (here: the clearing of the index's zero regions
    taken out, the bug of issue 10) is refused by the publish check, fresh or incremental;
    nothing is cached; the next pull, unhindered, resumes and is right."""
    v1 = one(4 * MiB, Edit("random", 0, 3 * MiB, seed=1))
    v2 = one(4 * MiB, Edit("hole", 1 * MiB, 1 * MiB))
    f1, f2 = build_disks(Case(v1, v2), tmp_path / "d")
    want = f2["disk.img"].read_bytes()
    target = Target(layout_dir=tmp_path / "layout")
    ref1 = publish(v1, f1, target, "v1", Store(tmp_path / "src"))
    ref2 = publish(v2, f2, target, "v2", Store(tmp_path / "src"))
    for base in (False, True):
        s = Store(tmp_path / f"home-{base}")
        if base:
            pull(s, ref1)
        with (
            mock.patch.object(DiskIndex, "zero_ranges", lambda self: iter(())),
            pytest.raises(IntegrityError, match="neither written from a verified frame") as e,
        ):
            pull(s, ref2)
        assert e.value.exit_code == ExitCode.INTEGRITY
        assert len(s.cached_images()) == (1 if base else 0)
        res = pull(s, ref2)
        assert (res.path / "disk.img").read_bytes() == want


def test_decode_into_a_writer_over_garbage_settles_every_byte(tmp_path: Path) -> None:
    """Decoded into a DiskWriter, a chunk overwrites whatever the file held (its zero frames
    and the zero blocks of its data frames included); with the index's zero regions cleared
    the disk is the source, and the ledger has no gap."""
    import io
    import os

    from barge.disk.chunker import encode_chunk, plan_chunks
    from barge.disk.codec import parse_codec
    from barge.disk.decoder import DiskWriter, decode_chunk

    fs = 64 * KiB
    size = 1 * MiB + 512
    src = tmp_path / "src"
    with open(src, "wb") as f:
        f.truncate(size)
        f.seek(70 * KiB)
        f.write(os.urandom(100 * KiB) + bytes(8 * KiB) + b"text " * 9000)
    metas, blobs = [], {}
    fd = os.open(src, os.O_RDONLY)
    try:
        for plan in plan_chunks("d", size, 256 * KiB, frame_size=fs):
            out = io.BytesIO()
            enc = encode_chunk(fd, plan, fs, parse_codec("zstd"), out)
            if not enc.all_zero:
                metas.append(enc.meta)
                blobs[enc.meta.digest] = out.getvalue()
    finally:
        os.close(fd)
    index = FrameIndex.build({"d": size}, metas, frame_size=fs)
    dst = tmp_path / "dst"
    dst.write_bytes(os.urandom(size + 5000))  # garbage everywhere, and past the end
    w = DiskWriter(dst, size)
    try:
        for m in metas:
            decode_chunk(io.BytesIO(blobs[m.digest]), w, m)
        assert w.coverage.gaps() != []  # the chunks alone do not settle the disk
        for off, n in index.disk("d").zero_ranges():
            w.clear(off, n)
    finally:
        w.close()
    assert w.coverage.gaps() == []
    assert dst.read_bytes() == src.read_bytes()
