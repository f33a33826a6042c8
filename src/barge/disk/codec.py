"""Frame codecs of barge's disk format: zstd, lz4 and none.

Every frame of a chunk is compressed on its own (see docs/format.md), so a codec here works on
one whole frame at a time: :meth:`Codec.compress` turns a frame into one self-contained
compressed frame and :meth:`Codec.decompress_into` turns one back, into a caller's buffer of the
exact expected size. A hostile frame can never make it allocate more than that size.

* ``zstd``: one standard zstd frame per barge frame, with the content size in the header and no
  xxhash checksum (barge verifies a sha256 of every frame). A layer blob is therefore a valid
  ``.zst`` stream of the chunk's non-zero frames.
* ``lz4``: one standard LZ4 *frame* (``lz4.frame``) per barge frame, content size in the header,
  no block or content checksum. Measured against raw ``lz4.block`` in bench/codecs.py: the same
  speed and ratio within noise, and the frame form keeps a layer a valid ``.lz4`` stream.
* ``none``: the frame stored as is.

Codec objects are immutable and thread-safe: the zstandard contexts they use are not, so each
thread gets its own compressor and decompressor.
"""

from __future__ import annotations

import threading
from typing import Any

import lz4.frame
import zstandard

from barge.errors import IntegrityError, UsageError

__all__ = [
    "CODEC_NAMES",
    "DEFAULT_CODEC",
    "DEFAULT_LZ4_LEVEL",
    "DEFAULT_ZSTD_LEVEL",
    "Codec",
    "parse_codec",
]

CODEC_NAMES = ("zstd", "lz4", "none")
DEFAULT_ZSTD_LEVEL = 1
DEFAULT_LZ4_LEVEL = 0  # lz4's fast mode; 3..16 are the slow "HC" levels
ZSTD_LEVELS = range(1, 20)  # 20..22 ("ultra") need large windows; refuse them
LZ4_LEVELS = range(0, 17)
DEFAULT_CODEC = f"zstd:{DEFAULT_ZSTD_LEVEL}"

Buffer = bytes | bytearray | memoryview


class Codec:
    """One frame codec (``zstd``, ``lz4`` or ``none``) at one level."""

    __slots__ = ("_local", "level", "name")

    def __init__(self, name: str, level: int | None = None) -> None:
        if name == "zstd":
            lvl = DEFAULT_ZSTD_LEVEL if level is None else level
            if lvl not in ZSTD_LEVELS:
                raise UsageError(
                    f"zstd level {lvl} is out of range (use {ZSTD_LEVELS.start}..{ZSTD_LEVELS.stop - 1})"
                )
        elif name == "lz4":
            lvl = DEFAULT_LZ4_LEVEL if level is None else level
            if lvl not in LZ4_LEVELS:
                raise UsageError(f"lz4 level {lvl} is out of range (use 0..16)")
        elif name == "none":
            if level not in (None, 0):
                raise UsageError("codec 'none' takes no level")
            lvl = 0
        else:
            raise UsageError(f"unknown codec {name!r} (use one of: zstd, zstd:LEVEL, lz4, none)")
        self.name = name
        self.level = lvl
        self._local = threading.local()

    # -- identity ---------------------------------------------------------------------------
    @property
    def media_type_suffix(self) -> str:
        """``+zstd``, ``+lz4`` or ``""``: appended to a layer media type."""
        return "" if self.name == "none" else f"+{self.name}"

    @property
    def spec(self) -> str:
        """The string :func:`parse_codec` turns back into this codec, e.g. ``zstd:3``."""
        return "none" if self.name == "none" else f"{self.name}:{self.level}"

    def __repr__(self) -> str:
        return f"Codec({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and (self.name, self.level) == (other.name, other.level)

    def __hash__(self) -> int:
        return hash((self.name, self.level))

    def max_compressed_size(self, usize: int) -> int:
        """The largest compressed size a valid frame of ``usize`` bytes can have.

        Decoders refuse any larger claim before reading it (see ``validate_layout``).
        """
        if self.name == "zstd":
            # ZSTD_COMPRESSBOUND plus the frame header (at most 18 bytes) and some slack.
            small = ((128 << 10) - usize) >> 11 if usize < (128 << 10) else 0
            return usize + (usize >> 8) + small + 64
        if self.name == "lz4":
            # LZ4_COMPRESSBOUND per 4 MiB block plus frame header, block headers, end mark.
            return usize + usize // 255 + 16 + 19 + 4 * (usize // (64 << 10) + 2) + 4
        return usize

    # -- per-thread contexts ------------------------------------------------------------------
    def _cctx(self) -> Any:
        cctx = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = zstandard.ZstdCompressor(
                level=self.level, write_checksum=False, write_content_size=True
            )
            self._local.cctx = cctx
        return cctx

    def _dctx(self) -> Any:
        dctx = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = zstandard.ZstdDecompressor()
            self._local.dctx = dctx
        return dctx

    # -- work ---------------------------------------------------------------------------------
    def compress(self, data: Buffer) -> bytes:
        """Compress one whole frame into one self-contained compressed frame."""
        if self.name == "zstd":
            return bytes(self._cctx().compress(data))
        if self.name == "lz4":
            return bytes(
                lz4.frame.compress(
                    data,
                    compression_level=self.level,
                    block_size=lz4.frame.BLOCKSIZE_MAX4MB,
                    content_checksum=False,
                    block_checksum=False,
                    store_size=True,
                    block_linked=True,
                )
            )
        return bytes(data)

    def decompress_into(self, src: Buffer, dst: memoryview) -> int:
        """Decompress one frame into ``dst``, which has the frame's exact uncompressed size.

        Returns ``len(dst)``. Raises :class:`IntegrityError` when ``src`` is not one valid frame
        of exactly that size (corrupt, truncated, trailing bytes, or a size claim that differs).
        Never allocates more than ``len(dst)`` bytes.
        """
        n = len(dst)
        if self.name == "none":
            if len(src) != n:
                raise IntegrityError(f"stored frame is {len(src)} bytes, expected {n}")
            dst[:] = src
            return n
        try:
            if self.name == "zstd":
                params = zstandard.get_frame_parameters(src)
                if params.content_size != n:
                    raise IntegrityError(
                        f"zstd frame claims {params.content_size} bytes, expected {n}"
                        if params.content_size != zstandard.CONTENTSIZE_UNKNOWN
                        else f"zstd frame has no content size, expected {n} bytes"
                    )
                out = self._dctx().decompress(
                    src, max_output_size=n, read_across_frames=False, allow_extra_data=False
                )
            else:
                info = lz4.frame.get_frame_info(src)
                if info.get("content_size") != n:
                    raise IntegrityError(
                        f"lz4 frame claims {info.get('content_size')} bytes, expected {n}"
                    )
                dec = lz4.frame.LZ4FrameDecompressor()
                out = dec.decompress(src, max_length=n)
                if not dec.eof or dec.unused_data or not dec.needs_input:
                    raise IntegrityError("lz4 frame is truncated or has trailing bytes")
        except IntegrityError:
            raise
        except (zstandard.ZstdError, RuntimeError, ValueError, OSError) as exc:
            raise IntegrityError(f"corrupt {self.name} frame: {exc}") from None
        if len(out) != n:
            raise IntegrityError(f"{self.name} frame decoded to {len(out)} bytes, expected {n}")
        dst[:] = out
        return n


def parse_codec(spec: str) -> Codec:
    """Parse ``zstd``, ``zstd:LEVEL``, ``lz4``, ``lz4:LEVEL`` or ``none``."""
    if not isinstance(spec, str) or not spec:
        raise UsageError("empty codec (use one of: zstd, zstd:LEVEL, lz4, none)")
    name, sep, level_s = spec.strip().lower().partition(":")
    level: int | None = None
    if sep:
        if not level_s.isdigit() or len(level_s) > 3:
            raise UsageError(f"bad codec level in {spec!r}: expected a number, e.g. zstd:3")
        level = int(level_s)
    if name not in CODEC_NAMES:
        raise UsageError(f"unknown codec {spec!r} (use one of: zstd, zstd:LEVEL, lz4, none)")
    return Codec(name, level)
