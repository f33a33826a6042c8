"""Progress reporting as a callback interface, so nothing below the CLI knows the terminal.

Library code receives a :class:`Reporter`; the CLI passes one that draws rich progress bars
(bytes, rate, ETA) on a TTY and stays silent otherwise or with ``--quiet``. Notes (one-line
decisions such as "chunk size raised to 1 GiB to fit 500 layers") always reach stderr unless
quiet.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Protocol

from barge.untrusted import printable


class Task(Protocol):
    """One piece of work being reported (a push's chunks, a pull's layers): bytes moved."""

    def advance(self, n: int) -> None:
        """``n`` more bytes are done (negative when a retried transfer undoes some)."""
        ...

    def add_total(self, n: int) -> None:
        """The work grew by ``n`` bytes (a total learnt on the way)."""
        ...


class Reporter(Protocol):
    """What barge tells about its progress: anything with these methods (``barge.push(...,
    reporter=r)``). Called from worker threads: an implementation must be thread-safe."""

    def task(self, description: str, total: int | None) -> Task:
        """A new task (``total`` bytes, None when not known yet)."""
        ...

    def note(self, message: str) -> None:
        """A one-line decision or fact (``chunk size raised to 1 GiB ...``, ``no tag given``)."""
        ...

    def close(self) -> None:
        """The operation is over (the CLI's reporter removes its bars)."""
        ...


class _NullTask:
    def __init__(self) -> None:
        self.done = 0
        self.total = 0

    def advance(self, n: int) -> None:
        self.done += n

    def add_total(self, n: int) -> None:
        self.total += n


class NullReporter:
    """Collects notes (tests read them) and draws nothing."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def task(self, description: str, total: int | None) -> Task:
        t = _NullTask()
        t.total = total or 0
        return t

    def note(self, message: str) -> None:
        self.notes.append(message)

    def close(self) -> None:
        pass


class _RichTask:
    def __init__(self, progress: Any, task_id: Any, total: int | None) -> None:
        self._p = progress
        self._id = task_id
        self._total = total or 0

    def advance(self, n: int) -> None:
        self._p.update(self._id, advance=n)

    def add_total(self, n: int) -> None:
        self._total += n
        self._p.update(self._id, total=self._total)


class ConsoleReporter:
    """rich progress bars on a TTY; plain notes on stderr otherwise; nothing when quiet."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet
        self._lock = threading.Lock()
        self._progress: Any = None
        self._console: Any = None
        if not quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            self._console = Console(stderr=True)
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=self._console,
                transient=False,
            )
            self._progress.start()

    def task(self, description: str, total: int | None) -> Task:
        if self._progress is None:
            t = _NullTask()
            t.total = total or 0
            return t
        with self._lock:
            return _RichTask(
                self._progress, self._progress.add_task(description, total=total), total
            )

    def note(self, message: str) -> None:
        if self.quiet:
            return
        message = printable(message)  # notes quote image content: one line, always
        if self._console is not None:
            self._console.print(f"barge: {message}", markup=False, highlight=False)
        else:
            print(f"barge: {message}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
