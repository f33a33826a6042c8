"""The encoder of barge's disk format: cut a raw disk into chunks and frames, hash, compress.

A chunk (one layer) covers ``[offset, offset + length)`` of one disk; it is cut into frames of
``frame_size`` bytes (the last may be shorter), each compressed on its own and concatenated into
the layer blob. An all-zero frame is written as nothing (``csize == 0``, ``zero``); holes are
found with SEEK_DATA/SEEK_HOLE and never read.

Memory is bounded: frames are read with ``os.preadv`` into a few reused buffers of one frame
each (``workers + 2`` of them when frames are compressed on worker threads).
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import BinaryIO

from barge.disk.codec import Codec
from barge.disk.index import (
    MAX_FRAME_SIZE,
    MIN_FRAME_SIZE,
    ChunkMeta,
    FrameInfo,
    chunk_digest,
    validate_disk_name,
    zero_digest,
)
from barge.disk.sizing import DEFAULT_FRAME_SIZE
from barge.disk.sparse import data_extents
from barge.errors import BargeError, UsageError

__all__ = [
    "ChunkDigests",
    "ChunkPlan",
    "EncodeStream",
    "EncodedChunk",
    "FrameInfo",
    "encode_chunk",
    "hash_chunk",
    "iter_encoded_chunk",
    "plan_chunks",
]


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    disk: str
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class ChunkDigests:
    """The result of :func:`hash_chunk`: sha256 of the chunk and ``(digest, zero)`` per frame."""

    udigest: str
    frames: tuple[tuple[str, bool], ...]

    @property
    def all_zero(self) -> bool:
        return all(z for _, z in self.frames)


@dataclass(frozen=True, slots=True)
class EncodedChunk:
    plan: ChunkPlan
    udigest: str  # barge's hash-list digest of the uncompressed chunk (index.chunk_digest)
    cdigest: str  # sha256 of the layer blob (the layer digest)
    csize: int  # layer size
    frames: tuple[FrameInfo, ...]
    codec: str
    frame_size: int

    @property
    def all_zero(self) -> bool:
        """True when every frame is zero: the layer is empty and barge omits the chunk."""
        return self.csize == 0

    @property
    def meta(self) -> ChunkMeta:
        return ChunkMeta(
            disk=self.plan.disk,
            offset=self.plan.offset,
            length=self.plan.length,
            digest=self.cdigest,
            size=self.csize,
            udigest=self.udigest,
            frame_size=self.frame_size,
            codec=self.codec,
            frames=self.frames,
        )


class DiskChangedError(BargeError):
    """The disk got shorter (or unreadable) while barge read it."""


def plan_chunks(
    disk_name: str, disk_size: int, chunk_size: int, *, frame_size: int = DEFAULT_FRAME_SIZE
) -> list[ChunkPlan]:
    """Consecutive chunks of ``chunk_size`` (the last shorter) covering the whole disk."""
    validate_disk_name(disk_name)
    _check_frame_size(frame_size)
    if chunk_size <= 0 or chunk_size % frame_size:
        raise UsageError(
            f"chunk size {chunk_size} must be a positive multiple of the frame size {frame_size}"
        )
    if disk_size < 0:
        raise UsageError(f"disk size {disk_size} is negative")
    return [
        ChunkPlan(disk_name, off, min(chunk_size, disk_size - off))
        for off in range(0, disk_size, chunk_size)
    ]


def hash_chunk(
    fd: int,
    plan: ChunkPlan,
    frame_size: int = DEFAULT_FRAME_SIZE,
    *,
    content_digest: bool = False,
) -> ChunkDigests:
    """Hash a chunk without compressing it (holes are not read; zero frames are detected).

    ``udigest`` is barge's hash-list digest (:func:`chunk_digest`): every data byte is hashed
    once and holes not at all. ``content_digest=True`` makes it the plain sha256 of the whole
    chunk instead (zeros included), as Tart's and Vetu's annotations need.
    Cheap enough to run before deciding what to upload; pass the result to
    :func:`encode_chunk` as ``known`` to skip hashing (and hole reading) a second time."""
    _check_frame_size(frame_size)
    reader = _FrameReader(fd, plan, frame_size, nbufs=1)
    content = hashlib.sha256() if content_digest else None
    frames: list[tuple[str, bool]] = []
    for i in range(reader.count):
        buf, n, zero = reader.read(i, reader.take())
        if zero:
            if content is not None:
                content.update(reader.zeros[:n])
            frames.append((zero_digest(n), True))
        else:
            view = memoryview(buf)[:n]
            if content is not None:
                content.update(view)
            frames.append(("sha256:" + hashlib.sha256(view).hexdigest(), False))
        reader.give(buf)
    if content is not None:
        return ChunkDigests("sha256:" + content.hexdigest(), tuple(frames))
    return ChunkDigests(chunk_digest(d for d, _ in frames), tuple(frames))


def encode_chunk(
    fd: int,
    plan: ChunkPlan,
    frame_size: int,
    codec: Codec,
    out: BinaryIO,
    *,
    known: ChunkDigests | None = None,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> EncodedChunk:
    """Encode one chunk into ``out`` (the layer blob) and describe it.

    With ``known`` (from :func:`hash_chunk` on the unchanged disk) frames are not hashed again
    and known-zero frames are not read. ``workers > 1`` compresses frames on that many threads
    (codecs release the GIL) while this thread reads and hashes.
    """
    stream = iter_encoded_chunk(
        fd, plan, frame_size, codec, known=known, workers=workers, progress=progress
    )
    for piece in stream:
        out.write(piece)
    return stream.result


def iter_encoded_chunk(
    fd: int,
    plan: ChunkPlan,
    frame_size: int,
    codec: Codec,
    *,
    known: ChunkDigests | None = None,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    hash_layer: bool = True,
) -> EncodeStream:
    """The streaming form of :func:`encode_chunk`: iterate it for the compressed frames (one
    ``bytes`` per non-zero frame, in order), then read ``.result``. With ``hash_layer=False``
    the layer is not hashed and ``result.cdigest`` is empty: for a consumer that hashes what
    it receives anyway (a streamed upload), so the compressed bytes are hashed once."""
    _check_frame_size(frame_size)
    return EncodeStream(fd, plan, frame_size, codec, known, workers, progress, hash_layer)


class EncodeStream:
    """Iterator of a layer's compressed frames; ``result`` is filled when it is exhausted."""

    def __init__(
        self,
        fd: int,
        plan: ChunkPlan,
        frame_size: int,
        codec: Codec,
        known: ChunkDigests | None,
        workers: int,
        progress: Callable[[int], None] | None = None,
        hash_layer: bool = True,
    ) -> None:
        self._hash_layer = hash_layer
        self._progress = progress
        self._fd = fd
        self._plan = plan
        self._fs = frame_size
        self._codec = codec
        self._known = known
        self._workers = max(1, workers)
        self._result: EncodedChunk | None = None
        self._started = False

    @property
    def result(self) -> EncodedChunk:
        if self._result is None:
            raise RuntimeError("the encoded chunk is not complete yet: iterate the stream first")
        return self._result

    def __iter__(self) -> Iterator[bytes]:
        if self._started:
            raise RuntimeError("an EncodeStream can be iterated once")
        self._started = True
        return self._run()

    def _run(self) -> Iterator[bytes]:
        plan, fs, codec, known = self._plan, self._fs, self._codec, self._known
        reader = _FrameReader(self._fd, plan, fs, nbufs=self._workers + 1)
        if known is not None and len(known.frames) != reader.count:
            raise UsageError(
                f"known digests list {len(known.frames)} frames, the chunk has {reader.count}"
            )
        # a caller that streams the layer into an upload that hashes it anyway says so
        layer_hash = hashlib.sha256() if self._hash_layer else None
        frames: list[FrameInfo] = []
        coff = 0
        pool = ThreadPoolExecutor(self._workers) if self._workers > 1 else None
        # pending: (index, n, digest, buffer or None, future or compressed bytes or None)
        pending: deque[tuple[int, int, str, bytearray | None, Future[bytes] | bytes | None]]
        pending = deque()

        def finish_one() -> bytes | None:
            nonlocal coff
            i, n, digest, buf, work = pending.popleft()
            data = work.result() if isinstance(work, Future) else work
            if buf is not None:
                reader.give(buf)
            uoff = i * fs
            if self._progress is not None:
                self._progress(n)
            if data is None:
                frames.append(FrameInfo(uoff, n, coff, 0, digest, True))
                return None
            frames.append(FrameInfo(uoff, n, coff, len(data), digest, False))
            coff += len(data)
            if layer_hash is not None:
                layer_hash.update(data)
            return data

        try:
            for i in range(reader.count):
                if known is not None and known.frames[i][1]:
                    n = reader.usize(i)
                    pending.append((i, n, zero_digest(n), None, None))
                else:
                    buf, n, zero = reader.read(i, reader.take())
                    view = memoryview(buf)[:n]
                    if zero:
                        digest = zero_digest(n)
                        reader.give(buf)
                        pending.append((i, n, digest, None, None))
                    else:
                        if known is not None:
                            digest = known.frames[i][0]
                        else:
                            digest = "sha256:" + hashlib.sha256(view).hexdigest()
                        work: Future[bytes] | bytes
                        if pool is not None:
                            work = pool.submit(codec.compress, view)
                        else:
                            work = codec.compress(view)
                        pending.append((i, n, digest, buf, work))
                while pending and (
                    len(pending) > self._workers or not isinstance(pending[0][4], Future)
                ):
                    data = finish_one()
                    if data:
                        yield data
            while pending:
                data = finish_one()
                if data:
                    yield data
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        udigest = known.udigest if known is not None else chunk_digest(f.digest for f in frames)
        self._result = EncodedChunk(
            plan=plan,
            udigest=udigest,
            cdigest="sha256:" + layer_hash.hexdigest() if layer_hash is not None else "",
            csize=coff,
            frames=tuple(frames),
            codec=codec.name,
            frame_size=fs,
        )


# --------------------------------------------------------------------------------------------
# reading frames: holes skipped, zero frames detected, buffers reused


def _check_frame_size(fs: int) -> None:
    if not (MIN_FRAME_SIZE <= fs <= MAX_FRAME_SIZE) or fs % 4096:
        raise UsageError(
            f"frame size {fs} must be a multiple of 4096 in {MIN_FRAME_SIZE}..{MAX_FRAME_SIZE}"
        )


@lru_cache(maxsize=4)
def _zeros(n: int) -> memoryview:
    return memoryview(bytes(n))


def is_zero_prefix(buf: bytearray | bytes, n: int, zeros: memoryview | None = None) -> bool:
    """True when ``buf[:n]`` is all zeros (memcmp speed, no copy)."""
    z = zeros if zeros is not None and len(zeros) >= n else _zeros(n)
    return buf.startswith(z[:n], 0, n)


class _FrameReader:
    """Reads the frames of one chunk into reused frame-sized buffers."""

    def __init__(self, fd: int, plan: ChunkPlan, frame_size: int, nbufs: int) -> None:
        self.fd = fd
        self.plan = plan
        self.fs = frame_size
        self.count = -(-plan.length // frame_size)
        self.zeros = _zeros(frame_size)
        self.free: list[bytearray] = []
        self._nbufs = nbufs
        self._made = 0
        self._runs = [(o, o + n) for o, n in data_extents(fd, plan.offset, plan.end)]
        self._ri = 0

    def usize(self, i: int) -> int:
        return min(self.fs, self.plan.length - i * self.fs)

    def take(self) -> bytearray:
        if self.free:
            return self.free.pop()
        self._made += 1
        if self._made > self._nbufs + 1:  # a logic error, not a user error
            raise RuntimeError("frame buffer pool exhausted")
        return bytearray(self.fs)

    def give(self, buf: bytearray) -> None:
        self.free.append(buf)

    def read(self, i: int, buf: bytearray) -> tuple[bytearray, int, bool]:
        """Read frame ``i`` into ``buf``: ``(buf, usize, all_zero)``. Holes are not read."""
        n = self.usize(i)
        a = self.plan.offset + i * self.fs
        b = a + n
        runs = self._runs
        while self._ri < len(runs) and runs[self._ri][1] <= a:
            self._ri += 1
        parts: list[tuple[int, int]] = []
        j = self._ri
        while j < len(runs) and runs[j][0] < b:
            parts.append((max(runs[j][0], a), min(runs[j][1], b)))
            j += 1
        if not parts:
            return buf, n, True
        view = memoryview(buf)
        if len(parts) != 1 or parts[0] != (a, b):
            view[:n] = self.zeros[:n]
        for s, e in parts:
            self._pread(view[s - a : e - a], s)
        return buf, n, is_zero_prefix(buf, n, self.zeros)

    def _pread(self, view: memoryview, off: int) -> None:
        got = 0
        while got < len(view):
            try:
                k = os.preadv(self.fd, [view[got:]], off + got)
            except OSError as exc:
                raise DiskChangedError(
                    f"cannot read disk {self.plan.disk!r} at {off + got}: {exc.strerror}"
                ) from exc
            if k == 0:
                raise DiskChangedError(
                    f"disk {self.plan.disk!r} ended at {off + got} while reading the chunk at "
                    f"{self.plan.offset}+{self.plan.length}: was it modified during the push?"
                )
            got += k
