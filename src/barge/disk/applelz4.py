"""Apple LZ4 streams: what Apple's Compression framework writes for ``COMPRESSION_LZ4``.

Tart compresses every ``application/vnd.cirruslabs.tart.disk.v2`` layer as one such stream
(``NSData.compressed(using: .lz4)``). The format (see ``shared/FORMAT.md`` §1) is a sequence of
blocks, each starting with a 4-byte marker:

``bv41`` + uint32 LE uncompressed size + uint32 LE compressed size + one raw LZ4 *block*
    The block may reference the previous 64 KiB of output as its LZ4 dictionary.
``bv4-`` + uint32 LE size + that many stored bytes
    The stored bytes become part of the dictionary for the next block.
``bv4$``
    End of stream. Nothing may follow it.

Apple's framework writes ``bv41`` blocks of exactly 64 KiB uncompressed (the last one shorter):
that is what every block of the vectors in ``tests/testdata/apple-lz4`` holds. The decoder does
not rely on that: it accepts blocks of up to ``max_block`` bytes (default 4 MiB) on either
marker, so that a stream from another writer with larger blocks still decodes, while a hostile
stream that claims 4 GiB is refused *before* anything is allocated.

Dictionary: the decoder keeps the last 64 KiB of output (the LZ4 window) and hands it to every
``bv41`` block. That is a superset of "the previous block's uncompressed bytes" (Apple's blocks
are 64 KiB), so any stream that is valid under the stricter reading decodes identically.

The encoder emits independent 64 KiB ``bv41`` blocks (no dictionary use, which every reader
accepts), a ``bv4-`` block where compression does not shrink the data, then ``bv4$``.

Every error is a :class:`barge.errors.IntegrityError` whose message names the byte offset in
the compressed stream and what was expected there.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

import lz4.block

from barge.errors import IntegrityError

MARKER_COMPRESSED = b"bv41"
MARKER_STORED = b"bv4-"
MARKER_END = b"bv4$"

#: Uncompressed size of every block Apple's framework writes (and our encoder writes).
BLOCK_SIZE = 64 * 1024
#: The LZ4 window: how far back a match may reach, so how much history the decoder keeps.
WINDOW_SIZE = 64 * 1024
#: Default bound on one block's uncompressed size. Apple writes 64 KiB; anything above this
#: is refused before allocation (see ``max_block``).
DEFAULT_MAX_BLOCK = 4 * 1024 * 1024
#: Hard ceiling for ``max_block`` so that a caller cannot disable the check by accident.
MAX_BLOCK_CEILING = 256 * 1024 * 1024

_U32 = struct.Struct("<I")
_U32X2 = struct.Struct("<II")

__all__ = [
    "BLOCK_SIZE",
    "DEFAULT_MAX_BLOCK",
    "AppleLZ4Decoder",
    "AppleLZ4Encoder",
    "compress_bound",
    "decode",
    "decode_into",
    "decode_stream",
    "encode",
    "encode_into",
]


def compress_bound(n: int) -> int:
    """LZ4_COMPRESSBOUND: the largest compressed size a block of ``n`` bytes can have."""
    return n + n // 255 + 16


class AppleLZ4Decoder:
    """Streaming decoder with bounded memory: at most one block of input, one block of output
    and 64 KiB of history are held at a time.

    One instance decodes one stream at a time; it may be reused for the next stream.
    """

    def __init__(self, *, max_block: int = DEFAULT_MAX_BLOCK) -> None:
        if not 0 < max_block <= MAX_BLOCK_CEILING:
            raise ValueError(f"max_block must be in 1..{MAX_BLOCK_CEILING}, got {max_block}")
        self.max_block = max_block

    def decode_stream(
        self,
        src: BinaryIO,
        *,
        expected_size: int | None = None,
    ) -> Iterator[bytes]:
        """Yield the decoded bytes of the Apple LZ4 stream read from ``src``, block by block.

        Reads ``src`` to its end: after ``bv4$`` a single extra byte is trailing garbage.
        ``expected_size`` (when given) is checked before each block is decoded, so a stream
        that would exceed it fails before it produces the excess, and again at the end.
        Raises :class:`IntegrityError` on any malformation.
        """
        if expected_size is not None and expected_size < 0:
            raise ValueError("expected_size must be non-negative")
        pos = 0  # offset in the compressed stream, for error messages
        produced = 0
        history = b""  # last WINDOW_SIZE bytes of output
        max_block = self.max_block
        read = src.read
        while True:
            marker = read(4)
            while 0 < len(marker) < 4:  # a short read, not necessarily the end
                more = read(4 - len(marker))
                if not more:
                    break
                marker += more
            if len(marker) != 4:
                if not marker and pos == 0:
                    raise IntegrityError("Apple LZ4 stream is empty (expected at least 'bv4$')")
                raise IntegrityError(
                    f"Apple LZ4 stream truncated at offset {pos + len(marker)}: expected a block "
                    f"marker or the 'bv4$' end marker after {produced} decoded bytes"
                )
            if marker == MARKER_COMPRESSED:
                header = _read_exact(src, 8, pos + 4, "the bv41 block header")
                usize, csize = _U32X2.unpack(header)
                if usize == 0 or usize > max_block:
                    raise IntegrityError(
                        f"Apple LZ4 bv41 block at offset {pos} claims {usize} uncompressed bytes; "
                        f"expected 1..{max_block}"
                    )
                if csize == 0 or csize > compress_bound(usize):
                    raise IntegrityError(
                        f"Apple LZ4 bv41 block at offset {pos} claims {csize} compressed bytes for "
                        f"{usize} uncompressed; expected 1..{compress_bound(usize)}"
                    )
                _check_expected(expected_size, produced, usize, pos)
                payload = _read_exact(src, csize, pos + 12, "bv41 block data")
                try:
                    block = lz4.block.decompress(payload, uncompressed_size=usize, dict=history)
                except lz4.block.LZ4BlockError as e:
                    raise IntegrityError(
                        f"Apple LZ4 bv41 block at offset {pos} is corrupt "
                        f"({usize} bytes expected): {e}"
                    ) from None
                if len(block) != usize:
                    raise IntegrityError(
                        f"Apple LZ4 bv41 block at offset {pos} decoded to {len(block)} bytes; "
                        f"its header says {usize}"
                    )
                pos += 12 + csize
            elif marker == MARKER_STORED:
                header = _read_exact(src, 4, pos + 4, "the bv4- block header")
                (usize,) = _U32.unpack(header)
                if usize > max_block:
                    raise IntegrityError(
                        f"Apple LZ4 bv4- block at offset {pos} claims {usize} bytes; "
                        f"expected at most {max_block}"
                    )
                _check_expected(expected_size, produced, usize, pos)
                block = _read_exact(src, usize, pos + 8, "bv4- stored bytes")
                pos += 8 + usize
            elif marker == MARKER_END:
                pos += 4
                extra = read(1)
                if extra:
                    raise IntegrityError(
                        f"Apple LZ4 stream has trailing data at offset {pos} after its 'bv4$' "
                        "end marker"
                    )
                if expected_size is not None and produced != expected_size:
                    raise IntegrityError(
                        f"Apple LZ4 stream decoded to {produced} bytes; expected {expected_size}"
                    )
                return
            else:
                raise IntegrityError(
                    f"Apple LZ4 stream has an unknown block marker {marker!r} at offset {pos} "
                    "(expected 'bv41', 'bv4-' or 'bv4$')"
                )
            produced += len(block)
            if len(block) >= WINDOW_SIZE:
                history = block if len(block) == WINDOW_SIZE else block[-WINDOW_SIZE:]
            elif block:
                history = (history + block)[-WINDOW_SIZE:]
            yield block

    def decode_into(
        self,
        src: BinaryIO,
        write: Callable[[bytes], object],
        *,
        expected_size: int | None = None,
    ) -> int:
        """Decode ``src`` and pass each decoded block to ``write``; return the decoded size."""
        total = 0
        for block in self.decode_stream(src, expected_size=expected_size):
            write(block)
            total += len(block)
        return total


def _check_expected(expected_size: int | None, produced: int, usize: int, pos: int) -> None:
    if expected_size is not None and produced + usize > expected_size:
        raise IntegrityError(
            f"Apple LZ4 stream decodes to more than the expected {expected_size} bytes "
            f"(block at offset {pos} would end at {produced + usize})"
        )


def _read_exact(src: BinaryIO, n: int, pos: int, what: str) -> bytes:
    """Read exactly ``n`` bytes (``n`` was bounded by the caller) or raise IntegrityError."""
    data = src.read(n)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = src.read(n - got)
        if not more:
            raise IntegrityError(
                f"Apple LZ4 stream truncated at offset {pos + got}: expected {n} bytes of "
                f"{what} starting at offset {pos}, got {got}"
            )
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def decode_stream(
    src: BinaryIO,
    *,
    expected_size: int | None = None,
    max_block: int = DEFAULT_MAX_BLOCK,
) -> Iterator[bytes]:
    """Module-level shortcut for :meth:`AppleLZ4Decoder.decode_stream`."""
    return AppleLZ4Decoder(max_block=max_block).decode_stream(src, expected_size=expected_size)


def decode_into(
    src: BinaryIO,
    write: Callable[[bytes], object],
    *,
    expected_size: int | None = None,
    max_block: int = DEFAULT_MAX_BLOCK,
) -> int:
    """Module-level shortcut for :meth:`AppleLZ4Decoder.decode_into`."""
    return AppleLZ4Decoder(max_block=max_block).decode_into(src, write, expected_size=expected_size)


def decode(
    data: bytes, *, expected_size: int | None = None, max_block: int = DEFAULT_MAX_BLOCK
) -> bytes:
    """Decode a whole in-memory stream (small data and tests)."""
    import io

    return b"".join(
        decode_stream(io.BytesIO(data), expected_size=expected_size, max_block=max_block)
    )


# --------------------------------------------------------------------------------------------
# Encoder


def _encode_block(block: bytes | memoryview) -> bytes:
    n = len(block)
    compressed: bytes = lz4.block.compress(block, store_size=False)
    if len(compressed) < n:
        return MARKER_COMPRESSED + _U32X2.pack(n, len(compressed)) + compressed
    return MARKER_STORED + _U32.pack(n) + bytes(block)


class AppleLZ4Encoder:
    """Streaming encoder: feed bytes with :meth:`write`, collect the encoded output it returns,
    and end with :meth:`finish` (which returns the last block and ``bv4$``).

    Every block is 64 KiB uncompressed (the last one may be shorter) and independent.
    """

    def __init__(self) -> None:
        self._pending = bytearray()
        self._finished = False
        self.bytes_in = 0
        self.bytes_out = 0

    def write(self, data: bytes | bytearray | memoryview) -> bytes:
        if self._finished:
            raise ValueError("AppleLZ4Encoder.write() after finish()")
        self.bytes_in += len(data)
        out: list[bytes] = []
        view = memoryview(data)
        if self._pending:
            take = min(BLOCK_SIZE - len(self._pending), len(view))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < BLOCK_SIZE:
                return b""
            out.append(_encode_block(bytes(self._pending)))
            self._pending.clear()
        full = len(view) - len(view) % BLOCK_SIZE
        for start in range(0, full, BLOCK_SIZE):
            out.append(_encode_block(view[start : start + BLOCK_SIZE]))
        if full < len(view):
            self._pending += view[full:]
        result = b"".join(out)
        self.bytes_out += len(result)
        return result

    def finish(self) -> bytes:
        if self._finished:
            raise ValueError("AppleLZ4Encoder.finish() called twice")
        self._finished = True
        out = b""
        if self._pending:
            out = _encode_block(bytes(self._pending))
            self._pending.clear()
        out += MARKER_END
        self.bytes_out += len(out)
        return out


def encode(data: bytes | bytearray | memoryview) -> bytes:
    """Encode ``data`` as one Apple LZ4 stream."""
    enc = AppleLZ4Encoder()
    return enc.write(data) + enc.finish()


def encode_into(
    src: BinaryIO,
    write: Callable[[bytes], object],
    *,
    limit: int | None = None,
) -> tuple[int, int]:
    """Read ``src`` (up to ``limit`` bytes, or to its end), write one Apple LZ4 stream to
    ``write``; return ``(uncompressed_bytes, compressed_bytes)``.

    Memory stays bounded by a few blocks whatever the input size.
    """
    enc = AppleLZ4Encoder()
    remaining = limit
    read_size = 16 * BLOCK_SIZE
    while remaining is None or remaining > 0:
        n = read_size if remaining is None else min(read_size, remaining)
        data = src.read(n)
        if not data:
            break
        if remaining is not None:
            remaining -= len(data)
        out = enc.write(data)
        if out:
            write(out)
    write(enc.finish())
    return enc.bytes_in, enc.bytes_out
