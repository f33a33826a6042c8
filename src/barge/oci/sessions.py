"""Upload sessions kept across runs, so a killed or interrupted push can resume a blob.

An upload session is a URL the registry gave (``POST /v2/<repo>/blobs/uploads/``), updated
by every ``PATCH`` answer. :class:`UploadSessions` keeps the latest one per (registry,
repository, key) in ``$BARGE_HOME/uploads/<sha256>.json`` (mode 0600; the URL can carry a
signed state token, so it is never printed). The key names the bytes (``blob:<digest>``, or
the caller's description of a blob being produced) and must change whenever they could.

A :class:`Claim` holds an exclusive ``flock`` on its file for as long as one upload uses it:
two processes never drive one session, and a killed process's lock goes with it. The next
run asks the registry where the session stands (``GET`` → ``Range``) and continues from
there; a session the registry no longer knows is dropped (:meth:`Claim.clear`). Records not
touched for :data:`MAX_AGE` seconds are removed (registries purge abandoned uploads after
about a week; distribution's default is 168 hours).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from pathlib import Path

from barge.reference import Reference

__all__ = ["MAX_AGE", "Claim", "UploadSessions"]

MAX_AGE = 7 * 24 * 3600
MAX_RECORD = 64 << 10


class Claim:
    """The session record of one upload, locked by this process until :meth:`release`."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self.location: str | None = None
        self.offset = 0
        try:
            doc = json.loads(os.pread(fd, MAX_RECORD, 0) or b"{}")
            if isinstance(doc, dict) and isinstance(doc.get("location"), str):
                self.location = doc["location"]
                off = doc.get("offset")
                self.offset = off if isinstance(off, int) and off >= 0 else 0
        except ValueError:  # torn by a crash mid-write: as good as no record
            self.location = None

    def save(self, location: str, offset: int) -> None:
        """Remember where the session stands (after the POST and every PATCH answer)."""
        self.location, self.offset = location, offset
        data = json.dumps({"location": location, "offset": offset}).encode()
        with contextlib.suppress(OSError):  # losing the record only costs a resume
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, data, 0)

    def clear(self) -> None:
        """The session is finished or gone: forget it (the lock is kept until release)."""
        self.location, self.offset = None, 0
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)

    def release(self) -> None:
        """Let go of the record; an empty one is deleted."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            if self.location is None:
                self.path.unlink(missing_ok=True)  # while still locked: no one reads it half
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = -1


class UploadSessions:
    """The session records under one directory (``$BARGE_HOME/uploads``)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._swept = False

    def claim(self, ref: Reference, key: str) -> Claim | None:
        """The record for this upload into ``ref``'s repository, locked; None when another
        process is uploading the same bytes right now, or the directory cannot be written
        (then nothing is kept)."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self._swept:
                self._swept = True
                self._sweep()
            record = f"{ref.registry}\0{ref.repository}\0{key}"
            name = hashlib.sha256(record.encode()).hexdigest()
            path = self.directory / f"{name}.json"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return Claim(path, fd)

    def _sweep(self) -> None:
        """Remove records nobody touched for MAX_AGE (and nobody holds)."""
        cutoff = time.time() - MAX_AGE
        with contextlib.suppress(OSError):
            for p in self.directory.glob("*.json"):
                with contextlib.suppress(OSError):
                    if p.stat().st_mtime >= cutoff:
                        continue
                    fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        p.unlink(missing_ok=True)
                    finally:
                        os.close(fd)
