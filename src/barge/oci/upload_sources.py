"""What an upload sends: a stored blob read from any offset, or one produced as it is sent.

:class:`Stored` has a known digest and size and reopens its bytes at any offset for every
attempt. :class:`Produced` is a blob produced while it is uploaded (compressed frames): it
is hashed as it is produced, its digest and size are known at its end, and to continue at
an offset it is produced again with the bytes before the offset hashed but not handed out.
:class:`Progress` carries what was handed out to the caller's ``progress(delta)`` and to the
blob's :class:`~barge.oci.retry.Budget`. The session loop is :mod:`barge.oci.uploads`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, BinaryIO

from barge.errors import RegistryError
from barge.oci.retry import Budget

__all__ = ["Produced", "Progress", "SessionLost", "Source", "SourceFailed", "Stored"]


class SessionLost(Exception):
    """The upload session is gone (expired, cancelled, invalidated): start a fresh one.
    ``error`` is what the registry said (it counts against the blob's budget)."""

    def __init__(self, error: RegistryError | None = None) -> None:
        super().__init__(error.message if error is not None else "upload session gone")
        self.error = error


class SourceFailed(Exception):
    """The blob's own source failed while its bytes were being sent (a local error, not the
    registry's): carried through urllib3 untouched and re-raised as the original."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class Progress:
    """Bytes reported to the caller's ``progress(delta)``; its position follows the offset
    being sent and is moved back when an upload continues from an earlier one."""

    def __init__(self, callback: Callable[[int], None] | None, budget: Budget) -> None:
        self._callback = callback
        self._budget = budget
        self.position = 0

    def sent(self, n: int) -> None:
        self.position += n
        if self._callback is not None and n:
            self._callback(n)
        self._budget.advance(self.position)
        self._budget.check_deadline()

    def at(self, offset: int) -> None:
        delta = offset - self.position
        self.position = offset
        if self._callback is not None and delta:
            self._callback(delta)


class _Reader:
    """``n`` bytes of ``f`` as a request body (urllib3 reads it); reports what it hands out."""

    def __init__(self, f: IO[bytes], n: int, progress: Progress) -> None:
        self._f = f
        self._left = n
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        want = self._left if size is None or size < 0 else min(size, self._left)
        try:
            data = self._f.read(want)
        except Exception as e:  # noqa: BLE001 - a local failure, not the registry's
            raise SourceFailed(e) from e
        if not data:
            raise SourceFailed(OSError(f"upload source ended early ({self._left} bytes missing)"))
        self._left -= len(data)
        self._progress.sent(len(data))
        return data


class Stored:
    """A blob whose digest and size are known; ``open_at(offset)`` gives its bytes from any
    offset (re-called for every attempt)."""

    def __init__(self, digest: str, size: int, open_at: Callable[[int], BinaryIO]) -> None:
        self._digest = digest
        self._size = size
        self._open_at = open_at
        self._open: list[IO[bytes]] = []

    def digest(self) -> str:
        return self._digest

    @property
    def size(self) -> int | None:
        return self._size

    def body(self, offset: int, n: int, progress: Progress) -> Callable[[], Any]:
        """A body factory for bytes ``offset .. offset+n``; every call starts them again."""

        def make() -> Any:
            self.close()
            progress.at(offset)
            if n == 0:
                return b""
            try:
                f = self._open_at(offset)
            except Exception as e:  # noqa: BLE001 - a local failure
                raise SourceFailed(e) from e
            self._open.append(f)
            return _Reader(f, n, progress)

        return make

    def close(self) -> None:
        for f in self._open:
            f.close()
        self._open.clear()


class Produced:
    """The bytes of a blob produced while it is uploaded (``produce()`` must yield the same
    bytes every time: barge's encoder is deterministic), hashed as they are produced.

    The position is where the next byte handed out starts. :meth:`seek` moves it: forward by
    producing and hashing without handing out; backward within the last piece taken (kept
    in memory) at no cost; further back by producing again from the start."""

    def __init__(self, produce: Callable[[], Iterable[bytes]]) -> None:
        self._produce = produce
        self._it: Iterator[bytes] | None = None
        self._hash = hashlib.sha256()
        self._pos = 0
        self._pending = memoryview(b"")
        self._last: tuple[int, bytes] | None = None  # the last piece taken: (offset, bytes)
        self._done = False

    @property
    def position(self) -> int:
        return self._pos

    @property
    def size(self) -> int | None:
        return self._pos if self._done and not self._pending else None

    def digest(self) -> str:
        if self.size is None:
            raise AssertionError("the blob is not produced to its end yet")
        return "sha256:" + self._hash.hexdigest()

    def _restart(self) -> None:
        try:
            self._it = iter(self._produce())
        except Exception as e:  # noqa: BLE001 - a local failure
            raise SourceFailed(e) from e
        self._hash = hashlib.sha256()
        self._pos = 0
        self._pending = memoryview(b"")
        self._last = None
        self._done = False

    def _fill(self) -> bool:
        """Produce the next piece into ``_pending``; False at the end."""
        assert self._it is not None
        while not self._pending:
            if self._done:
                return False
            try:
                piece = next(self._it)
            except StopIteration:
                self._done = True
                return False
            except Exception as e:  # noqa: BLE001 - a local failure (disk, encoder)
                raise SourceFailed(e) from e
            if piece:
                self._hash.update(piece)
                self._pending = memoryview(piece)
        return True

    def seek(self, offset: int) -> None:
        if self._it is None:
            self._restart()
        if offset < self._pos:
            last = self._last
            if last is not None and last[0] <= offset:
                start, data = last
                # pending may already hold the tail of the last piece (an earlier step back)
                after = self._pending[max(0, start + len(data) - self._pos) :]
                self._pending = memoryview(bytes(data[offset - start :]) + bytes(after))
                self._pos = offset
            else:
                self._restart()
        if self._pos < offset:
            self._last = None  # what is skipped is not kept: the last piece is no longer last
        while self._pos < offset:  # produce and hash what the registry already holds
            if not self._fill():
                raise SessionLost()  # the registry holds more than the blob has
            k = min(offset - self._pos, len(self._pending))
            self._pending = self._pending[k:]
            self._pos += k

    def take(self, n: int) -> bytes:
        """Up to ``n`` bytes from the position (fewer only at the end)."""
        if self._it is None:
            self._restart()
        out = bytearray()
        start = self._pos
        while len(out) < n and self._fill():
            k = min(n - len(out), len(self._pending))
            out += self._pending[:k]
            self._pending = self._pending[k:]
        self._pos += len(out)
        data = bytes(out)
        self._last = (start, data)
        return data

    def pieces(self, progress: Progress) -> Iterator[bytes]:
        """Everything from the position to the end, piece by piece as produced."""
        if self._it is None:
            self._restart()
        self._last = None
        while self._fill():
            view = self._pending
            whole = view.obj if isinstance(view.obj, bytes) and len(view.obj) == len(view) else None
            piece = whole if whole is not None else bytes(view)  # no copy of a whole piece
            self._pending = memoryview(b"")
            self._pos += len(piece)
            progress.sent(len(piece))
            yield piece

    def close(self) -> None:
        pass


Source = Stored | Produced
