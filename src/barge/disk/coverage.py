"""The coverage ledger: which bytes of a disk being written are known to be right.

A pull writes a disk into a staging file that may start with someone else's bytes: a clone of a
cached base image, or what a killed run left (perhaps tampered with). Bytes that nothing in this
pull touched keep whatever was there. The ledger makes that visible: the writer records every
range as it is settled, and :meth:`Coverage.check` refuses to let the disk be published unless
the ranges cover ``[0, size)``. A range is recorded only when, afterwards, it holds exactly what
the frame index says:

* written from a frame whose sha256 was checked (the range was made to read as zeros first, so
  the zero blocks a sparse write skips are zeros too);
* cleared: a range the index says is zeros (a zero frame, or a region no chunk covers) made to
  read as zeros;
* kept: bytes proven right in place — a frame of the cloned base with the same digest at the
  same offset in a verified cached image, or a frame of a resumed staging disk whose sha256 was
  checked on disk.

The ledger is cheap (one entry per frame, adjacent ranges merged as they come) and is the proof
the publish step checks: no byte is published that no one accounted for.
"""

from __future__ import annotations

import threading

from barge.errors import IntegrityError

__all__ = ["Coverage"]


class Coverage:
    """The settled byte ranges of one disk of ``size`` bytes (thread-safe)."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        self._lock = threading.Lock()
        self._ranges: list[tuple[int, int]] = []  # (start, end), merged when it grows
        self._merged = 0  # length of the list after the last merge

    def add(self, offset: int, length: int) -> None:
        """Record ``[offset, offset + length)`` as settled."""
        if length <= 0:
            return
        with self._lock:
            self._ranges.append((offset, offset + length))
            if len(self._ranges) > max(1024, 2 * self._merged):
                self._ranges = _merge(self._ranges)
                self._merged = len(self._ranges)

    def gaps(self) -> list[tuple[int, int]]:
        """``(offset, length)`` of every range of ``[0, size)`` not settled, in order."""
        with self._lock:
            ranges = _merge(self._ranges)
        out: list[tuple[int, int]] = []
        pos = 0
        for start, end in ranges:
            if start >= self.size:
                break
            if start > pos:
                out.append((pos, start - pos))
            pos = max(pos, end)
        if pos < self.size:
            out.append((pos, self.size - pos))
        return out

    def check(self) -> None:
        """Raise :class:`IntegrityError` unless every byte of ``[0, size)`` is settled."""
        gaps = self.gaps()
        if not gaps:
            return
        first, length = gaps[0]
        total = sum(n for _, n in gaps)
        raise IntegrityError(
            f"disk {self.name!r}: {total} bytes in {len(gaps)} range(s), the first "
            f"{first}..{first + length}, were neither written from a verified frame, cleared "
            "nor proven already right; the image was not published",
            hint="a bug in barge (please report it); pulling again re-verifies what was staged",
        )


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with overlapping and adjacent ranges joined."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out
