"""Streaming LZ4 *frame* decoder for Vetu disk layers (``application/vnd.cirruslabs.vetu.disk.v1``).

Vetu compresses each disk layer with an LZ4 frame writer (``shared/FORMAT.md`` §2). This module
decodes such a layer from a stream with bounded memory: input is fed in pieces of ``read_size``
bytes and the decompressor is asked for at most ``max_output`` bytes per call, so a frame that
expands a small input into gigabytes is produced piece by piece rather than all at once.

Concatenated frames (allowed by the LZ4 frame specification) decode to the concatenation of
their contents. Frame checksums, when the writer put them there, are verified by liblz4.
Every failure is a :class:`barge.errors.IntegrityError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import BinaryIO

import lz4.frame

from barge.errors import IntegrityError

DEFAULT_READ_SIZE = 1024 * 1024
DEFAULT_MAX_OUTPUT = 4 * 1024 * 1024

__all__ = ["decode", "decode_into", "decode_stream"]


def decode_stream(
    src: BinaryIO,
    *,
    expected_size: int | None = None,
    read_size: int = DEFAULT_READ_SIZE,
    max_output: int = DEFAULT_MAX_OUTPUT,
) -> Iterator[bytes]:
    """Yield the decoded contents of the LZ4 frame(s) read from ``src`` in pieces of at most
    ``max_output`` bytes. ``expected_size`` is checked as output is produced and at the end."""
    if read_size <= 0 or max_output <= 0:
        raise ValueError("read_size and max_output must be positive")
    if expected_size is not None and expected_size < 0:
        raise ValueError("expected_size must be non-negative")
    dec = lz4.frame.LZ4FrameDecompressor()
    consumed = 0  # compressed bytes read so far (for messages)
    produced = 0
    in_frame = False  # a frame has started and not yet ended
    frames = 0

    def run(data: bytes) -> Iterator[bytes]:
        nonlocal dec, produced, in_frame, frames
        while True:
            try:
                out: bytes = dec.decompress(data, max_length=max_output)
            except (RuntimeError, EOFError, ValueError) as e:
                raise IntegrityError(
                    f"LZ4 frame stream is corrupt near compressed offset {consumed}: {e}"
                ) from None
            data = b""
            in_frame = True
            if out:
                produced += len(out)
                if expected_size is not None and produced > expected_size:
                    raise IntegrityError(
                        f"LZ4 frame stream decodes to more than the expected {expected_size} bytes"
                    )
                yield out
            if dec.eof:
                frames += 1
                in_frame = False
                rest = dec.unused_data
                dec = lz4.frame.LZ4FrameDecompressor()
                if rest:
                    data = rest
                    continue
                return
            if dec.needs_input:
                return

    while True:
        chunk = src.read(read_size)
        if not chunk:
            break
        consumed += len(chunk)
        yield from run(chunk)
    if in_frame:
        raise IntegrityError(
            f"LZ4 frame stream truncated: ended after {consumed} compressed bytes inside a frame "
            f"({produced} bytes decoded)"
        )
    if frames == 0:
        raise IntegrityError("LZ4 frame stream is empty (expected at least one frame)")
    if expected_size is not None and produced != expected_size:
        raise IntegrityError(
            f"LZ4 frame stream decoded to {produced} bytes; expected {expected_size}"
        )


def decode_into(
    src: BinaryIO,
    write: Callable[[bytes], object],
    *,
    expected_size: int | None = None,
    read_size: int = DEFAULT_READ_SIZE,
    max_output: int = DEFAULT_MAX_OUTPUT,
) -> int:
    """Decode ``src`` and pass every decoded piece to ``write``; return the decoded size."""
    total = 0
    for piece in decode_stream(
        src, expected_size=expected_size, read_size=read_size, max_output=max_output
    ):
        write(piece)
        total += len(piece)
    return total


def decode(data: bytes, *, expected_size: int | None = None) -> bytes:
    """Decode a whole in-memory LZ4 frame stream (small data and tests)."""
    import io

    return b"".join(decode_stream(io.BytesIO(data), expected_size=expected_size))
