"""The frame index: canonical bytes, strict parsing, frame tiling (hypothesis)."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from barge.disk import (
    ChunkMeta,
    FrameIndex,
    FrameInfo,
    chunk_annotations,
    parse_chunk_annotations,
    validate_layout,
    zero_digest,
)
from barge.disk.chunker import plan_chunks
from barge.errors import IntegrityError, UnsupportedError, UsageError

FS = 64 << 10


def fake_chunk(disk: str, offset: int, length: int, fs: int = FS, zero_every: int = 3) -> ChunkMeta:
    frames = []
    coff = 0
    for i, uoff in enumerate(range(0, length, fs)):
        usize = min(fs, length - uoff)
        if i % zero_every == 1:
            frames.append(FrameInfo(uoff, usize, coff, 0, zero_digest(usize), True))
        else:
            d = "sha256:" + hashlib.sha256(f"{disk}{offset}{i}".encode()).hexdigest()
            cs = min(100 + i, usize)
            frames.append(FrameInfo(uoff, usize, coff, cs, d, False))
            coff += cs
    h = hashlib.sha256(f"{disk}{offset}".encode()).hexdigest()
    return ChunkMeta(
        disk, offset, length, "sha256:" + h, coff, "sha256:" + h[::-1], fs, "zstd", tuple(frames)
    )


def sample_index() -> FrameIndex:
    chunks = [
        fake_chunk("root.img", FS * 8, FS * 8),
        fake_chunk("root.img", 0, FS * 8),
        fake_chunk("data.img", FS * 4, FS * 2 + 5),
    ]
    return FrameIndex.build(
        {"root.img": FS * 20, "data.img": FS * 6 + 5, "empty": 10}, chunks, frame_size=FS
    )


def test_canonical_bytes_stable() -> None:
    a = sample_index().to_bytes()
    b = FrameIndex.from_bytes(a).to_bytes()
    assert a == b
    assert b" " not in a and a.startswith(b'{"disks":[{"chunks":')
    # same content given in another order gives the same bytes
    chunks = list(reversed(sample_index().chunks))
    c = FrameIndex.build(
        {"empty": 10, "data.img": FS * 6 + 5, "root.img": FS * 20}, chunks, frame_size=FS
    )
    assert c.to_bytes() == a
    obj = json.loads(a)
    assert [d["name"] for d in obj["disks"]] == ["data.img", "empty", "root.img"]
    assert obj["disks"][2]["chunks"][0]["frames"][1] == [0]


def test_iter_frames_covers_gaps() -> None:
    d = sample_index().disk("data.img")
    refs = list(d.iter_frames())
    assert [r.offset for r in refs] == [i * FS for i in range(7)]
    assert refs[-1].usize == 5
    assert [r.chunk is None for r in refs] == [True] * 4 + [False] * 3
    assert all(r.zero for r in refs[:4])


def mutate(fn) -> bytes:  # type: ignore[no-untyped-def]
    obj = json.loads(sample_index().to_bytes())
    fn(obj)
    return json.dumps(obj).encode()


BAD = {
    "not json": (b"{", "not valid JSON"),
    "float": (b'{"version":1.0,"disks":[]}', "non-integer"),
    "dup key": (b'{"version":1,"version":1,"disks":[]}', "duplicate"),
    "huge int": (b'{"version":1,"disks":[{"size":99999999999999999999999}]}', "out-of-range"),
    "extra field": (mutate(lambda o: o.update(x=1)), "unknown fields"),
    "missing field": (mutate(lambda o: o["disks"][0].pop("size")), "lacks"),
    "bool as int": (mutate(lambda o: o["disks"][0].update(size=True)), "integer"),
    "bad name": (mutate(lambda o: o["disks"][0].update(name="../x")), "not allowed"),
    "dup disk": (mutate(lambda o: o["disks"].append(o["disks"][0])), "twice"),
    "frame size": (mutate(lambda o: o["disks"][0].update(frameSize=1000)), "frameSize"),
    "hex length": (
        mutate(lambda o: o["disks"][2]["chunks"][0]["frames"][0].__setitem__(1, "ab")),
        "64 lowercase hex",
    ),
    "upper hex": (
        mutate(lambda o: o["disks"][2]["chunks"][0]["frames"][0].__setitem__(1, "A" * 64)),
        "64 lowercase hex",
    ),
    "frame count": (mutate(lambda o: o["disks"][2]["chunks"][0]["frames"].pop()), "frames listed"),
    "frame shape": (
        mutate(lambda o: o["disks"][2]["chunks"][0]["frames"].__setitem__(1, [0, "x"])),
        "csize",
    ),
    "zero csize data": (
        mutate(lambda o: o["disks"][2]["chunks"][0]["frames"].__setitem__(0, [0, "a" * 64])),
        "csize",
    ),
    "size sum": (mutate(lambda o: o["disks"][2]["chunks"][0].update(size=1)), "add up to"),
    "overlap": (mutate(lambda o: o["disks"][2]["chunks"][1].update(offset=FS * 4)), "overlaps"),
    "out of range": (mutate(lambda o: o["disks"][2].update(size=FS * 10)), "past the end"),
    "digest": (
        mutate(lambda o: o["disks"][2]["chunks"][0].update(digest="sha512:00")),
        "sha256:<64 hex>",
    ),
    "codec": (mutate(lambda o: o["disks"][2]["chunks"][0].update(codec="gzip")), "codec"),
    "oversized frame": (
        mutate(lambda o: o["disks"][2]["chunks"][0]["frames"].__setitem__(0, [FS * 2, "a" * 64])),
        "allowed 1..",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_from_bytes_rejects(case: str) -> None:
    data, needle = BAD[case]
    with pytest.raises(IntegrityError) as ei:
        FrameIndex.from_bytes(data)
    assert needle in str(ei.value), str(ei.value)


def test_from_bytes_unsupported_and_max_size() -> None:
    with pytest.raises(UnsupportedError, match="version"):
        FrameIndex.from_bytes(mutate(lambda o: o.update(version=2)))
    with pytest.raises(UnsupportedError, match="blake3"):
        FrameIndex.from_bytes(mutate(lambda o: o["disks"][0].update(hash="blake3")))
    data = sample_index().to_bytes()
    with pytest.raises(IntegrityError, match="over the"):
        FrameIndex.from_bytes(data, max_size=len(data) - 1)


def test_annotations_round_trip() -> None:
    c = sample_index().chunks[0]
    assert parse_chunk_annotations(chunk_annotations(c)) == (c.disk, c.offset, c.length, c.udigest)
    bad = dict(chunk_annotations(c))
    bad["dev.barge.disk.offset"] = "-1"
    with pytest.raises(IntegrityError, match="offset"):
        parse_chunk_annotations(bad)
    del bad["dev.barge.disk.name"]
    with pytest.raises(IntegrityError, match="lacks"):
        parse_chunk_annotations(bad)
    assert c.media_type == "application/vnd.barge.disk.chunk.v1+zstd"


def test_plan_chunks() -> None:
    plans = plan_chunks("d", FS * 10 + 1, FS * 4, frame_size=FS)
    assert [(p.offset, p.length) for p in plans] == [
        (0, FS * 4),
        (FS * 4, FS * 4),
        (FS * 8, FS * 2 + 1),
    ]
    assert plan_chunks("d", 0, FS, frame_size=FS) == []
    with pytest.raises(UsageError, match="multiple of the frame size"):
        plan_chunks("d", 100, FS + 1, frame_size=FS)
    with pytest.raises(IntegrityError):
        plan_chunks("a/b", 100, FS, frame_size=FS)


@settings(max_examples=200, deadline=None)
@given(
    disk_frames=st.integers(1, 200),
    tail=st.integers(0, FS - 1),
    chunk_frames=st.integers(1, 50),
    zero_every=st.integers(1, 5),
)
def test_tiling_property(disk_frames: int, tail: int, chunk_frames: int, zero_every: int) -> None:
    size = disk_frames * FS + tail
    chunks = [
        fake_chunk("d", p.offset, p.length, zero_every=zero_every)
        for p in plan_chunks("d", size, chunk_frames * FS, frame_size=FS)
    ]
    validate_layout({"d": size}, chunks)
    idx = FrameIndex.build({"d": size}, chunks, frame_size=FS)
    again = FrameIndex.from_bytes(idx.to_bytes())
    assert again == idx
    refs = list(again.disk("d").iter_frames())
    assert len(refs) == -(-size // FS)
    pos = 0
    for r in refs:
        assert r.offset == pos
        pos += r.usize
    assert pos == size
    for c in chunks:
        assert sum(f.usize for f in c.frames) == c.length
        assert sum(f.csize for f in c.frames) == c.size


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_random_frame_lists_never_pass_if_inconsistent(data: st.DataObject) -> None:
    length = data.draw(st.integers(1, FS * 8))
    c = fake_chunk("d", 0, length)
    n = data.draw(st.integers(0, 12))
    frames = list(c.frames)
    if n != len(frames):
        # wrong number of frames must always be refused
        frames = (frames * 12)[:n]
        bad = ChunkMeta(
            c.disk, c.offset, c.length, c.digest, c.size, c.udigest, FS, "zstd", tuple(frames)
        )
        with pytest.raises(IntegrityError):
            validate_layout({"d": FS * 8}, [bad])
