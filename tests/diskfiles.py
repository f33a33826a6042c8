"""Disk files for the codec tests: a sparse file with given writes, and a whole file encoded to
(chunk metadata, blobs by digest) and decoded back, with small frames (:data:`FS`)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from barge.disk import ChunkMeta, decode_chunk, encode_chunk, parse_codec, plan_chunks
from barge.disk.codec import Codec

__all__ = ["FS", "decode_file", "encode_file", "make_disk"]

KiB = 1 << 10
FS = 64 * KiB  # small frames keep the tests fast; the code is the same at 4 MiB


def make_disk(path: Path, size: int, writes: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)


def encode_file(
    path: Path,
    name: str,
    chunk_size: int,
    frame_size: int = FS,
    codec: Codec | None = None,
    workers: int = 1,
) -> tuple[list[ChunkMeta], dict[str, bytes]]:
    codec = codec or parse_codec("zstd:1")
    size = path.stat().st_size
    metas: list[ChunkMeta] = []
    blobs: dict[str, bytes] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        for plan in plan_chunks(name, size, chunk_size, frame_size=frame_size):
            out = io.BytesIO()
            enc = encode_chunk(fd, plan, frame_size, codec, out, workers=workers)
            assert enc.csize == len(out.getvalue())
            if enc.all_zero:
                assert out.getvalue() == b""
                continue
            metas.append(enc.meta)
            blobs[enc.cdigest] = out.getvalue()
    finally:
        os.close(fd)
    return metas, blobs


def decode_file(path: Path, size: int, metas: list[ChunkMeta], blobs: dict[str, bytes]) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for m in metas:
            decode_chunk(io.BytesIO(blobs[m.digest]), fd, m)
    finally:
        os.close(fd)
