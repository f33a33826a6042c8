"""Disk space: what is free, what a full disk looks like, and the catalog's reserve.

A full filesystem must never leave barge unable to record (or undo) what it did: every command
writes the catalog, and SQLite needs room to write even a deletion (its WAL grows, its shared
memory file must exist). Two rules keep that room:

* **Give the space back first.** An operation that fails for want of space removes what it was
  building (a pull's staging directory) *before* it touches the catalog again, and ``prune``
  removes abandoned work in ``tmp/`` before its first catalog write.
* **A reserve for SQLite.** ``catalog.reserve`` is a file of :data:`RESERVE_SIZE` really
  allocated bytes (``posix_fallocate``, or written data where that is unsupported), created
  while there is room. When the filesystem has less than :data:`LOW_WATER` free as a catalog
  connection opens or a write transaction begins, the reserve is deleted, which gives SQLite
  those megabytes whatever filled the disk (barge, a growing VM disk, another program). It is
  created again once there is room (at the next catalog open, after a prune). 8 MiB covers the
  WAL growth of a catalog write many times over (a transaction writes a few 4 KiB pages; the
  WAL is checkpointed at 4 MiB and then reused) plus the 32 KiB shared-memory file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from pathlib import Path

from barge.errors import NoSpaceError

RESERVE_SIZE = 8 << 20
LOW_WATER = 2 << 20
_SQLITE_IOERR = 10
_SQLITE_FULL = 13


class NotEnoughSpace(NoSpaceError):
    """A free-space check refused an operation before it wrote anything."""


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer may still allocate on ``path``'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def is_no_space(e: BaseException, where: str | os.PathLike[str] | None = None) -> bool:
    """True when ``e`` says the disk (or quota) is full. An SQLite I/O error counts when the
    filesystem of ``where`` is nearly full: that is how SQLite reports a shared-memory file it
    could not allocate."""
    if isinstance(e, NoSpaceError):
        return True
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, sqlite3.Error):
        code = getattr(e, "sqlite_errorcode", 0) & 0xFF
        if code == _SQLITE_FULL or "database or disk is full" in str(e):
            return True
        if code == _SQLITE_IOERR and where is not None:
            with contextlib.suppress(OSError):
                return free_bytes(where) < LOW_WATER
    return False


class Reserve:
    """A file of really allocated bytes, deleted to give SQLite room on a full disk."""

    def __init__(self, path: Path, size: int = RESERVE_SIZE) -> None:
        self.path = path
        self.size = size

    def present(self) -> bool:
        try:
            return os.stat(self.path).st_blocks * 512 >= self.size
        except OSError:
            return False

    def ensure(self) -> bool:
        """Create the reserve if it is missing and the filesystem has room for it twice over.
        Best effort: never raises. Returns whether it is in place."""
        if self.present():
            return True
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            if free_bytes(self.path.parent) < 2 * self.size + LOW_WATER:
                return False
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                try:
                    os.posix_fallocate(fd, 0, self.size)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    # no fallocate (or a compressing filesystem would make zeros free): data
                    os.pwrite(fd, os.urandom(self.size), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            return True
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False

    def release(self) -> bool:
        """Delete the reserve (its space goes back to the filesystem). True if it was there."""
        try:
            os.unlink(self.path)
            return True
        except OSError:
            return False

    def make_room(self) -> None:
        """Release the reserve when the filesystem is nearly full."""
        with contextlib.suppress(OSError):
            if free_bytes(self.path.parent) < LOW_WATER:
                self.release()
