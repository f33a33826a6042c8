"""Copying a disk file: copy-on-write where the filesystem can (FICLONE), else a sparse copy
that reads only data extents and writes no zeros."""

from __future__ import annotations

import os

from barge import cancel
from barge.disk.decoder import BLOCK, DiskWriter, address_of
from barge.disk.sparse import data_extents, is_zero, reflink

__all__ = ["clone_file", "copy_sparse"]


def copy_sparse(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, bufsize: int = 8 << 20
) -> int:
    """Copy ``src`` to a new file ``dst`` keeping holes; returns the bytes written.

    Only data extents are read, and all-zero pieces inside them are skipped too, so a 20 GiB
    disk holding 1 GiB of data writes about 1 GiB. Whole aligned pieces are written with
    O_DIRECT where the filesystem allows (see ``barge.disk.decoder.DiskWriter``)."""
    written = 0
    raw = bytearray(bufsize + BLOCK)
    base = (-address_of(raw)) % BLOCK
    mv = memoryview(raw)[base : base + bufsize]
    with open(src, "rb") as fs:
        size = os.fstat(fs.fileno()).st_size
        sfd = fs.fileno()
        with open(dst, "wb") as fd:
            fd.truncate(size)
        out = DiskWriter(dst)
        try:
            for off, length in data_extents(sfd, 0, size):
                pos, stop = off, off + length
                while pos < stop:
                    cancel.check()
                    n = os.preadv(sfd, [mv[: min(bufsize, stop - pos)]], pos)
                    if n <= 0:
                        break
                    piece = mv[:n]
                    if not is_zero(piece):
                        _write_all(out, piece, pos)
                        written += n
                    pos += n
            out.fsync()
        finally:
            out.close()
    return written


def clone_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> str:
    """Clone copy-on-write if the filesystem can, else copy sparse. Returns the method used."""
    if reflink(src, dst):
        return "reflink"
    copy_sparse(src, dst)
    return "sparse-copy"


def _write_all(out: DiskWriter, data: memoryview, offset: int) -> None:
    """Write all of ``data`` (an OSError, ENOSPC included, is the caller's to handle: a clone
    removes its partial copy)."""
    mv = memoryview(data)
    while mv:
        n = out.pwrite(mv, offset)
        mv = mv[n:]
        offset += n
