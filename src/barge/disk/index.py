"""The frame index of barge's disk format, and the layout rules every reader enforces.

The index blob (``application/vnd.barge.disk.index.v1+json``) says, for every disk of an image,
its size and frame size and, for every chunk (= one layer), where it goes and what each of its
frames is: compressed size and sha256 of the uncompressed bytes, or ``[0]`` for an all-zero
frame that has no bytes in the layer. Regions of a disk that no chunk covers are zeros.

Encoding (canonical: sorted keys, no spaces, disks sorted by name, chunks by offset)::

    {"disks":[{"chunks":[{"codec":"zstd","digest":"sha256:<layer>","frames":[[812345,"<hex>"],[0],...],
                         "length":536870912,"offset":0,"size":<layer bytes>,"udigest":"sha256:<hex>"}],
               "frameSize":4194304,"hash":"sha256","name":"disk.img","size":21474836480}],
     "version":1}

:func:`validate_layout` is the check a hostile index or manifest must pass before a single byte
is written: names, offsets and lengths in range, chunks aligned to the frame grid and not
overlapping, frames tiling each chunk exactly, compressed sizes bounded and summing to the layer.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from barge.disk.codec import Codec
from barge.errors import IntegrityError, UnsupportedError
from barge.untrusted import load_json

__all__ = [
    "ANNOTATION_DIGEST",
    "ANNOTATION_LENGTH",
    "ANNOTATION_NAME",
    "ANNOTATION_OFFSET",
    "CHUNK_MEDIA_TYPE",
    "DEFAULT_MAX_INDEX_SIZE",
    "HASH_ALGORITHM",
    "INDEX_MEDIA_TYPE",
    "MAX_CHUNK_SIZE",
    "MAX_DISK_SIZE",
    "MAX_FRAME_SIZE",
    "MIN_FRAME_SIZE",
    "ChunkMeta",
    "DiskIndex",
    "FrameIndex",
    "FrameInfo",
    "FrameRef",
    "chunk_annotations",
    "chunk_digest",
    "chunk_media_type",
    "parse_chunk_annotations",
    "validate_disk_name",
    "validate_layout",
    "zero_digest",
]

INDEX_MEDIA_TYPE = "application/vnd.barge.disk.index.v1+json"
CHUNK_MEDIA_TYPE = "application/vnd.barge.disk.chunk.v1"  # + "+zstd" / "+lz4" / ""
ANNOTATION_NAME = "dev.barge.disk.name"
ANNOTATION_OFFSET = "dev.barge.disk.offset"
ANNOTATION_LENGTH = "dev.barge.disk.length"
ANNOTATION_DIGEST = "dev.barge.disk.digest"

HASH_ALGORITHM = "sha256"
INDEX_VERSION = 1
MIN_FRAME_SIZE = 64 << 10
MAX_FRAME_SIZE = 64 << 20
MAX_CHUNK_SIZE = 64 << 30
MAX_DISK_SIZE = 1 << 50  # 1 PiB
MAX_CHUNKS = 1 << 20
DEFAULT_MAX_INDEX_SIZE = 256 << 20
_CODECS = ("zstd", "lz4", "none")

_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._+-]{0,254}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


# --------------------------------------------------------------------------------------------
# data model


@dataclass(frozen=True, slots=True)
class FrameInfo:
    """One frame of a chunk. Offsets are derived: ``uoffset`` within the chunk, ``coffset``
    within the layer blob. ``digest`` is ``sha256:<hex>`` of the uncompressed frame (for a zero
    frame, the digest of ``usize`` zero bytes); a zero frame has ``csize == 0``."""

    uoffset: int
    usize: int
    coffset: int
    csize: int
    digest: str
    zero: bool


@dataclass(frozen=True, slots=True)
class ChunkMeta:
    """One chunk of one disk, stored as one layer (``digest``, ``size`` bytes)."""

    disk: str
    offset: int
    length: int
    digest: str  # layer digest (compressed), "sha256:<hex>"
    size: int  # layer size in bytes (sum of frame csizes)
    udigest: str  # the chunk's hash-list digest: chunk_digest(frame digests)
    frame_size: int
    codec: str  # "zstd" | "lz4" | "none"
    frames: tuple[FrameInfo, ...]

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def media_type(self) -> str:
        return chunk_media_type(self.codec)


@dataclass(frozen=True, slots=True)
class FrameRef:
    """One frame of a disk on the frame grid, as :meth:`DiskIndex.iter_frames` yields it.

    ``chunk``/``index`` are None for frames that no chunk covers (implicit zeros)."""

    offset: int  # in the disk
    usize: int
    digest: str
    zero: bool
    chunk: ChunkMeta | None
    index: int  # frame number within the chunk, -1 when chunk is None


@dataclass(frozen=True, slots=True)
class DiskIndex:
    name: str
    size: int
    frame_size: int
    chunks: tuple[ChunkMeta, ...]
    hash: str = HASH_ALGORITHM

    def iter_frames(self) -> Iterator[FrameRef]:
        """Every frame of the disk in order, including the implicit zero frames of regions that
        no chunk covers (chunks are aligned to the frame grid)."""
        pos = 0
        fs = self.frame_size
        for chunk in sorted(self.chunks, key=lambda c: c.offset):
            while pos < chunk.offset:
                n = min(fs, chunk.offset - pos)
                yield FrameRef(pos, n, zero_digest(n), True, None, -1)
                pos += n
            for i, f in enumerate(chunk.frames):
                yield FrameRef(chunk.offset + f.uoffset, f.usize, f.digest, f.zero, chunk, i)
            pos = chunk.end
        while pos < self.size:
            n = min(fs, self.size - pos)
            yield FrameRef(pos, n, zero_digest(n), True, None, -1)
            pos += n

    def zero_ranges(self) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` of the regions of the disk that are zeros: zero frames and the
        regions no chunk covers, adjacent ones merged, in order. Together with the non-zero
        frames of the chunks they tile ``[0, size)``."""
        pos = 0
        for chunk in sorted(self.chunks, key=lambda c: c.offset):
            for f in chunk.frames:
                if f.zero:
                    continue
                off = chunk.offset + f.uoffset
                if off > pos:
                    yield pos, off - pos
                pos = off + f.usize
        if self.size > pos:
            yield pos, self.size - pos


@dataclass(frozen=True, slots=True)
class FrameIndex:
    """The whole index blob: one :class:`DiskIndex` per disk, sorted by name."""

    disks: tuple[DiskIndex, ...]

    @classmethod
    def build(
        cls, disks: Mapping[str, int], chunks: Iterable[ChunkMeta], *, frame_size: int
    ) -> FrameIndex:
        """Assemble (and validate) an index from disk sizes and the encoded chunks.
        ``frame_size`` applies to disks without chunks; the others use their chunks'."""
        chunk_list = list(chunks)
        validate_layout(dict(disks), chunk_list)
        out = []
        for name in sorted(disks):
            mine = sorted((c for c in chunk_list if c.disk == name), key=lambda c: c.offset)
            fs = mine[0].frame_size if mine else frame_size
            _check_frame_size(fs, name)
            out.append(DiskIndex(name, disks[name], fs, tuple(mine)))
        return cls(tuple(out))

    def disk(self, name: str) -> DiskIndex:
        for d in self.disks:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def chunks(self) -> list[ChunkMeta]:
        return [c for d in self.disks for c in d.chunks]

    def to_json(self) -> dict[str, Any]:
        disks = []
        for d in sorted(self.disks, key=lambda d: d.name):
            chunks = []
            for c in sorted(d.chunks, key=lambda c: c.offset):
                frames: list[list[Any]] = [
                    [0] if f.zero else [f.csize, f.digest.removeprefix("sha256:")] for f in c.frames
                ]
                chunks.append(
                    {
                        "codec": c.codec,
                        "digest": c.digest,
                        "frames": frames,
                        "length": c.length,
                        "offset": c.offset,
                        "size": c.size,
                        "udigest": c.udigest,
                    }
                )
            disks.append(
                {
                    "chunks": chunks,
                    "frameSize": d.frame_size,
                    "hash": d.hash,
                    "name": d.name,
                    "size": d.size,
                }
            )
        return {"disks": disks, "version": INDEX_VERSION}

    def to_bytes(self) -> bytes:
        """Canonical JSON: the same disks always give the same bytes (and index digest)."""
        return json.dumps(
            self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes, *, max_size: int = DEFAULT_MAX_INDEX_SIZE) -> FrameIndex:
        """Parse and strictly validate an index blob; raises :class:`IntegrityError`
        (or :class:`UnsupportedError` for an unknown version or hash algorithm)."""
        if len(data) > max_size:
            raise IntegrityError(f"disk index is {len(data)} bytes, over the {max_size} limit")
        obj = load_json(
            data,
            "disk index",
            max_size=max_size,
            object_pairs_hook=_no_duplicates,
            parse_float=_no_float,
            parse_constant=_no_float,
            parse_int=_bounded_int,
        )
        return cls.from_json(obj)

    @classmethod
    def from_json(cls, obj: Any) -> FrameIndex:
        o = _obj(obj, "disk index", {"disks", "version"})
        version = o["version"]
        if version != INDEX_VERSION or type(version) is not int:
            raise UnsupportedError(f"disk index version {version!r} is not supported (only 1)")
        disk_list = _list(o["disks"], "disk index 'disks'")
        disks: list[DiskIndex] = []
        sizes: dict[str, int] = {}
        all_chunks: list[ChunkMeta] = []
        for i, dobj in enumerate(disk_list):
            where = f"disk index disks[{i}]"
            d = _obj(dobj, where, {"chunks", "frameSize", "hash", "name", "size"})
            name = _str(d["name"], f"{where}.name")
            validate_disk_name(name)
            if name in sizes:
                raise IntegrityError(f"disk index names disk {name!r} twice")
            if d["hash"] != HASH_ALGORITHM:
                raise UnsupportedError(
                    f"disk index for {name!r} uses hash {d['hash']!r}; only sha256 is supported"
                )
            size = _int(d["size"], f"{where}.size", 0, MAX_DISK_SIZE)
            fs = _int(d["frameSize"], f"{where}.frameSize", MIN_FRAME_SIZE, MAX_FRAME_SIZE)
            _check_frame_size(fs, name)
            sizes[name] = size
            chunk_objs = _list(d["chunks"], f"{where}.chunks")
            if len(chunk_objs) > MAX_CHUNKS:
                raise IntegrityError(f"disk {name!r} has {len(chunk_objs)} chunks, too many")
            chunks = []
            for j, cobj in enumerate(chunk_objs):
                chunks.append(_chunk_from_json(cobj, f"{where}.chunks[{j}]", name, fs))
            all_chunks.extend(chunks)
            disks.append(DiskIndex(name, size, fs, tuple(sorted(chunks, key=lambda c: c.offset))))
        validate_layout(sizes, all_chunks)
        return cls(tuple(sorted(disks, key=lambda d: d.name)))


# --------------------------------------------------------------------------------------------
# helpers shared with the encoder and decoder


@lru_cache(maxsize=16)
def zero_digest(n: int) -> str:
    """``sha256:<hex>`` of ``n`` zero bytes (cached: frame sizes repeat)."""
    h = hashlib.sha256()
    block = bytes(min(n, 4 << 20))
    left = n
    while left:
        k = min(left, len(block))
        h.update(block if k == len(block) else block[:k])
        left -= k
    return "sha256:" + h.hexdigest()


def chunk_digest(frame_digests: Iterable[str]) -> str:
    """A chunk's uncompressed digest in barge's format: sha256 over its frames' raw 32-byte
    sha256 digests, in order (a hash list).

    Verifying every frame therefore verifies the chunk for the cost of hashing 32 bytes a
    frame; holes (zero frames, whose digest is a constant) are never hashed, and data is hashed
    once instead of twice. Tart and Vetu chunks keep their plain sha256 of the content.
    """
    h = hashlib.sha256()
    for d in frame_digests:
        h.update(bytes.fromhex(d[7:]))
    return "sha256:" + h.hexdigest()


def chunk_media_type(codec: str) -> str:
    return CHUNK_MEDIA_TYPE + ("" if codec == "none" else f"+{codec}")


def chunk_annotations(meta: ChunkMeta) -> dict[str, str]:
    """The annotations of a chunk layer's descriptor."""
    return {
        ANNOTATION_NAME: meta.disk,
        ANNOTATION_OFFSET: str(meta.offset),
        ANNOTATION_LENGTH: str(meta.length),
        ANNOTATION_DIGEST: meta.udigest,
    }


def parse_chunk_annotations(ann: Mapping[str, str]) -> tuple[str, int, int, str]:
    """(disk name, offset, length, udigest) from a chunk layer's annotations, validated."""
    try:
        name, off_s, len_s, dig = (
            ann[ANNOTATION_NAME],
            ann[ANNOTATION_OFFSET],
            ann[ANNOTATION_LENGTH],
            ann[ANNOTATION_DIGEST],
        )
    except KeyError as exc:
        raise IntegrityError(f"disk layer lacks the {exc.args[0]} annotation") from None
    validate_disk_name(name)
    for label, s in (("offset", off_s), ("length", len_s)):
        if not isinstance(s, str) or not s.isdigit() or len(s) > 16 or (len(s) > 1 and s[0] == "0"):
            raise IntegrityError(f"disk layer {label} annotation {s!r} is not a decimal number")
    if not isinstance(dig, str) or not _DIGEST_RE.fullmatch(dig):
        raise IntegrityError(f"disk layer digest annotation {dig!r} is not sha256:<64 hex>")
    return name, int(off_s), int(len_s), dig


def validate_disk_name(name: str) -> None:
    """A disk name becomes a file name in a VM directory: allow only a safe, plain name."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise IntegrityError(
            f"disk name {name!r} is not allowed (letters, digits, '.', '_', '+', '-', not "
            "starting with '.'; at most 255; no path)"
        )


def _check_frame_size(fs: int, disk: str) -> None:
    if not (MIN_FRAME_SIZE <= fs <= MAX_FRAME_SIZE) or fs % 4096:
        raise IntegrityError(
            f"disk {disk!r}: frame size {fs} is not a multiple of 4096 in "
            f"{MIN_FRAME_SIZE}..{MAX_FRAME_SIZE}"
        )


@lru_cache(maxsize=64)
def _max_csize(codec: str, usize: int) -> int:
    return Codec(codec).max_compressed_size(usize)


def validate_layout(disks: Mapping[str, int], chunks: Iterable[ChunkMeta]) -> None:
    """Check a set of chunks against the disks they claim to fill; raise :class:`IntegrityError`
    naming the first problem. Nothing is written before this passes."""
    by_disk: dict[str, list[ChunkMeta]] = {}
    for name, size in disks.items():
        validate_disk_name(name)
        if type(size) is not int or not 0 <= size <= MAX_DISK_SIZE:
            raise IntegrityError(f"disk {name!r} has an invalid size {size!r}")
        by_disk[name] = []
    for c in chunks:
        where = f"chunk {c.digest} ({c.disk!r} at {c.offset})"
        if c.disk not in by_disk:
            raise IntegrityError(f"{where} names a disk that the image does not declare")
        size = disks[c.disk]
        if c.codec not in _CODECS:
            raise IntegrityError(f"{where} has unknown codec {c.codec!r}")
        for label, d in (("layer digest", c.digest), ("uncompressed digest", c.udigest)):
            if not isinstance(d, str) or not _DIGEST_RE.fullmatch(d):
                raise IntegrityError(f"{where}: {label} {d!r} is not sha256:<64 hex>")
        fs = c.frame_size
        _check_frame_size(fs, c.disk)
        if type(c.offset) is not int or type(c.length) is not int:
            raise IntegrityError(f"{where}: offset and length must be integers")
        if c.offset < 0 or c.length <= 0 or c.length > MAX_CHUNK_SIZE:
            raise IntegrityError(f"{where}: bad offset/length {c.offset}+{c.length}")
        if c.offset + c.length > size:
            raise IntegrityError(
                f"{where}: {c.offset}+{c.length} extends past the end of the disk ({size} bytes)"
            )
        if c.offset % fs:
            raise IntegrityError(f"{where}: offset is not a multiple of the frame size {fs}")
        if c.length % fs and c.offset + c.length != size:
            raise IntegrityError(
                f"{where}: length {c.length} is not a multiple of the frame size {fs} "
                "and the chunk does not end the disk"
            )
        expected_frames = -(-c.length // fs)
        if len(c.frames) != expected_frames:
            raise IntegrityError(
                f"{where}: {len(c.frames)} frames listed, {expected_frames} expected "
                f"for {c.length} bytes at frame size {fs}"
            )
        uoff = coff = 0
        for i, f in enumerate(c.frames):
            usize = min(fs, c.length - uoff)
            if f.uoffset != uoff or f.usize != usize or f.coffset != coff:
                raise IntegrityError(f"{where}: frame {i} does not tile the chunk")
            if f.zero:
                if f.csize != 0:
                    raise IntegrityError(f"{where}: zero frame {i} claims {f.csize} bytes")
                if f.digest != zero_digest(usize):
                    raise IntegrityError(f"{where}: zero frame {i} has a non-zero digest")
            else:
                bound = _max_csize(c.codec, usize)
                if type(f.csize) is not int or not 0 < f.csize <= bound:
                    raise IntegrityError(
                        f"{where}: frame {i} claims {f.csize} compressed bytes "
                        f"(allowed 1..{bound} for {usize} bytes of {c.codec})"
                    )
                if not isinstance(f.digest, str) or not _DIGEST_RE.fullmatch(f.digest):
                    raise IntegrityError(f"{where}: frame {i} digest {f.digest!r} is malformed")
            uoff += usize
            coff += f.csize
        if coff != c.size:
            raise IntegrityError(
                f"{where}: frames add up to {coff} compressed bytes, the layer has {c.size}"
            )
        by_disk[c.disk].append(c)
    for name, lst in by_disk.items():
        lst.sort(key=lambda c: c.offset)
        for a, b in zip(lst, lst[1:], strict=False):
            if b.offset < a.end:
                raise IntegrityError(
                    f"disk {name!r}: chunk {b.digest} at {b.offset} overlaps chunk {a.digest} "
                    f"({a.offset}+{a.length})"
                )
        if lst and len({c.frame_size for c in lst}) != 1:
            raise IntegrityError(f"disk {name!r}: chunks disagree on the frame size")


# --------------------------------------------------------------------------------------------
# strict JSON parsing


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise IntegrityError(f"disk index has a duplicate key {k!r}")
        out[k] = v
    return out


def _no_float(s: str) -> Any:
    raise IntegrityError(f"disk index has a non-integer number {s!r}")


def _bounded_int(s: str) -> int:
    if len(s) > 19:
        raise IntegrityError(f"disk index has an out-of-range number {s[:24]!r}")
    return int(s)


def _obj(v: Any, where: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise IntegrityError(f"{where} must be an object")
    missing = keys - v.keys()
    extra = v.keys() - keys
    if missing:
        raise IntegrityError(f"{where} lacks {sorted(missing)}")
    if extra:
        raise IntegrityError(f"{where} has unknown fields {sorted(extra)}")
    return v


def _list(v: Any, where: str) -> list[Any]:
    if not isinstance(v, list):
        raise IntegrityError(f"{where} must be a list")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise IntegrityError(f"{where} must be a string")
    return v


def _int(v: Any, where: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise IntegrityError(f"{where} must be an integer in {lo}..{hi}, not {v!r}")
    return v


def _chunk_from_json(v: Any, where: str, disk: str, fs: int) -> ChunkMeta:
    c = _obj(v, where, {"codec", "digest", "frames", "length", "offset", "size", "udigest"})
    codec = _str(c["codec"], f"{where}.codec")
    if codec not in _CODECS:
        raise IntegrityError(f"{where}.codec {codec!r} is not one of {', '.join(_CODECS)}")
    digest = _str(c["digest"], f"{where}.digest")
    udigest = _str(c["udigest"], f"{where}.udigest")
    for label, d in (("digest", digest), ("udigest", udigest)):
        if not _DIGEST_RE.fullmatch(d):
            raise IntegrityError(f"{where}.{label} {d!r} is not sha256:<64 hex>")
    offset = _int(c["offset"], f"{where}.offset", 0, MAX_DISK_SIZE)
    length = _int(c["length"], f"{where}.length", 1, MAX_CHUNK_SIZE)
    size = _int(c["size"], f"{where}.size", 0, MAX_CHUNK_SIZE * 2)
    flist = _list(c["frames"], f"{where}.frames")
    expected = -(-length // fs)
    if len(flist) != expected:
        raise IntegrityError(
            f"{where}: {len(flist)} frames listed, {expected} expected for {length} bytes"
        )
    frames: list[FrameInfo] = []
    uoff = coff = 0
    for i, fobj in enumerate(flist):
        usize = min(fs, length - uoff)
        if not isinstance(fobj, list) or not fobj:
            raise IntegrityError(f"{where}.frames[{i}] must be [csize, hex] or [0]")
        if fobj == [0] and type(fobj[0]) is int:
            frames.append(FrameInfo(uoff, usize, coff, 0, zero_digest(usize), True))
        else:
            if len(fobj) != 2:
                raise IntegrityError(f"{where}.frames[{i}] must be [csize, hex] or [0]")
            csize = _int(fobj[0], f"{where}.frames[{i}] csize", 1, MAX_FRAME_SIZE * 2)
            hexd = fobj[1]
            if not isinstance(hexd, str) or not _HEX64.fullmatch(hexd):
                raise IntegrityError(f"{where}.frames[{i}][1] is not 64 lowercase hex digits")
            frames.append(FrameInfo(uoff, usize, coff, csize, "sha256:" + hexd, False))
            coff += csize
        uoff += usize
    return ChunkMeta(disk, offset, length, digest, size, udigest, fs, codec, tuple(frames))
