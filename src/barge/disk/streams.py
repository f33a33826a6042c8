"""Whole-stream disk layers, by image format: the one place that says which codec a format's
layers use.

barge's own layers are chunks of frames, each frame compressed on its own (:mod:`barge.disk.codec`,
named per chunk in the frame index). Tart's and Vetu's layers are one compressed stream each:

======  ==================================  ==========================
format  codec                               module
======  ==================================  ==========================
tart    Apple LZ4 stream (``bv41`` blocks)    :mod:`barge.disk.applelz4`
vetu    LZ4 frames                          :mod:`barge.disk.lz4frame`
======  ==================================  ==========================

:func:`stream_decoder` serves pull and verify; :func:`encode_region` writes a Tart layer from a
disk region (the only stream format barge writes).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from typing import BinaryIO

from barge.disk import applelz4, lz4frame
from barge.disk.sparse import data_extents
from barge.errors import UnsupportedError, UsageError

__all__ = ["STREAM_CODECS", "StreamDecoder", "encode_region", "stream_decoder"]

#: ``decoder(src, expected_size=n)`` yields the decoded bytes of one layer read from ``src``.
StreamDecoder = Callable[..., Iterator[bytes]]

#: The chunk-index codec name of each format's layers.
STREAM_CODECS = {"tart": "applelz4", "vetu": "lz4frame"}

_DECODERS: dict[str, StreamDecoder] = {
    "tart": applelz4.decode_stream,
    "vetu": lz4frame.decode_stream,
}

#: Disk bytes read (and fed to the encoder) at a time: memory stays bounded.
READ_SIZE = 1 << 20
_ZEROS = bytes(READ_SIZE)


def stream_decoder(fmt: str) -> StreamDecoder:
    """The decoder of a format's disk layers (``tart``, ``vetu``)."""
    try:
        return _DECODERS[fmt]
    except KeyError:
        raise UnsupportedError(f"{fmt!r} images have no whole-stream disk layers") from None


def encode_region(fd: int, offset: int, length: int, out: BinaryIO) -> tuple[str, int]:
    """Compress ``[offset, offset+length)`` of ``fd`` as one Apple LZ4 stream (a Tart disk
    layer) into ``out``; holes are not read (they are fed as zeros). Returns
    ``(layer digest, layer size)``."""
    enc = applelz4.AppleLZ4Encoder()
    h = hashlib.sha256()
    size = 0

    def emit(data: bytes) -> None:
        nonlocal size
        if data:
            out.write(data)
            h.update(data)
            size += len(data)

    end = offset + length
    pos = offset
    extents = [(o, o + n) for o, n in data_extents(fd, offset, end)] + [(end, end)]
    for data_start, data_end in extents:
        while pos < data_start:  # a hole
            n = min(READ_SIZE, data_start - pos)
            emit(enc.write(memoryview(_ZEROS)[:n]))
            pos += n
        while pos < data_end:
            n = min(READ_SIZE, data_end - pos)
            piece = os.pread(fd, n, pos)
            if not piece:
                raise UsageError(
                    f"the disk ended at {pos} while reading the chunk at {offset}+{length}: "
                    "was it modified during the push?"
                )
            emit(enc.write(piece))
            pos += len(piece)
    emit(enc.finish())
    return "sha256:" + h.hexdigest(), size
