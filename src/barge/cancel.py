"""Cancellation: one Ctrl-C (or SIGTERM) stops every worker of an operation within a second.

One process-wide *cancel event*. :func:`request` sets it (the CLI's signal handler calls it on
the first SIGINT or SIGTERM) and shuts down every socket the registry transport opened, so a
read or write blocked on a slow or silent server ends at once instead of after its timeout.
Long-running code calls :func:`check` at its natural steps (between frames, between reads,
before a retry) and sleeps through :func:`sleep`; both raise :class:`~barge.errors.Interrupted`
once the event is set. Nothing waits for an executor to drain: :func:`parallel` runs workers
on daemon threads, stops handing out work at the first failure or interrupt, and gives the
running ones a bounded grace period (:data:`GRACE`) to reach a check.

An operation that catches :class:`~barge.errors.Interrupted` at its top says what it kept and
re-raises; the CLI prints that one line and exits 130.

This module imports nothing of barge's but :mod:`barge.errors`, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import FrameType
from typing import Any, Protocol, TypeVar

from barge.errors import Interrupted

__all__ = [
    "GRACE",
    "Stopped",
    "abandoned",
    "check",
    "checked",
    "handle_signals",
    "parallel",
    "request",
    "requested",
    "reset",
    "sleep",
    "track_socket",
]

T = TypeVar("T")
R = TypeVar("R")

#: How long an interrupted :func:`parallel` waits for running workers to reach a check.
GRACE = 1.0

_event = threading.Event()
_local = threading.local()
_sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
_sockets_lock = threading.Lock()
_abandoned = threading.Event()


class Stopped(Exception):
    """A sibling worker of a :func:`parallel` call failed: this one stops at its next check.
    Never escapes :func:`parallel` unless an enclosing one was stopped too."""


def requested() -> bool:
    """True once cancellation was requested (Ctrl-C, SIGTERM or :func:`request`)."""
    return _event.is_set()


def check() -> None:
    """Raise :class:`Interrupted` if cancellation was requested (:class:`Stopped` if a sibling
    worker of the calling thread's :func:`parallel` failed)."""
    if _event.is_set():
        raise Interrupted("interrupted")
    for stop in getattr(_local, "stops", ()):
        if stop.is_set():
            raise Stopped()


def sleep(seconds: float) -> None:
    """``time.sleep`` that ends as soon as cancellation is requested (then raises)."""
    if seconds > 0:
        _event.wait(seconds)
    check()


def request() -> None:
    """Request cancellation: set the event and shut down every tracked socket, so that blocked
    reads and writes return now. Safe to call from a signal handler (the sockets are shut down
    on a helper thread: the handler may have interrupted a thread holding their lock)."""
    if _event.is_set():
        return
    _event.set()
    threading.Thread(target=_shutdown_sockets, name="barge-cancel", daemon=True).start()


def reset() -> None:
    """Forget a previous request (a new command starts; tests running the CLI in-process)."""
    _event.clear()
    _abandoned.clear()


def abandoned() -> bool:
    """True when an interrupted :func:`parallel` returned while some of its workers were still
    running. File descriptors those workers may use must then stay open (a closed number can
    be reused by the next ``open``, and a late write would land in the wrong file)."""
    return _abandoned.is_set()


def track_socket(sock: socket.socket) -> None:
    """Have :func:`request` shut ``sock`` down. Held weakly: a closed socket drops out."""
    with _sockets_lock:
        _sockets.add(sock)
    if _event.is_set():  # opened after the request: it must not block either
        _shutdown(sock)


def _shutdown_sockets() -> None:
    with _sockets_lock:
        socks = list(_sockets)
    for s in socks:
        _shutdown(s)


def _shutdown(s: socket.socket) -> None:
    # socket.socket's own shutdown, also for an SSLSocket (whose shutdown() would drop its TLS
    # object under a thread still reading through it)
    with contextlib.suppress(OSError, ValueError):
        socket.socket.shutdown(s, socket.SHUT_RDWR)


class _Task(Protocol):
    def advance(self, n: int) -> None: ...
    def add_total(self, n: int) -> None: ...


class CheckedTask:
    """A progress task whose every advance is a cancellation check; :attr:`done` sums them."""

    def __init__(self, task: _Task) -> None:
        self._task = task
        self._lock = threading.Lock()
        self.done = 0  # the sum of every advance: how far the work got

    def advance(self, n: int) -> None:
        check()
        with self._lock:
            self.done += n
        self._task.advance(n)

    def add_total(self, n: int) -> None:
        self._task.add_total(n)


def checked(task: _Task) -> CheckedTask:
    """A progress task whose every ``advance`` is also a cancellation check: the encoders and
    decoders report progress once per frame, which is exactly where they can stop."""
    return CheckedTask(task)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """For the duration of one command: the first SIGINT or SIGTERM requests cancellation (the
    operation stops at its next check and reports what it kept); a second SIGINT raises
    KeyboardInterrupt at once. Any other error that ends the command after a request (a socket
    shut down under a request that was not retried) is reported as the interruption it is.
    Only the main thread can install handlers; elsewhere only the event is reset."""
    reset()
    old: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():

        def on_signal(signum: int, frame: FrameType | None) -> None:
            if _event.is_set() and signum == signal.SIGINT:
                raise KeyboardInterrupt
            request()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except (Interrupted, KeyboardInterrupt):
        raise
    except Exception as e:
        if _event.is_set():
            raise Interrupted("interrupted") from e
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def parallel(
    fn: Callable[[T], R], items: Iterable[T], workers: int, *, name: str = "barge"
) -> list[R]:
    """``[fn(x) for x in items]`` on up to ``workers`` threads, results in order.

    The first failure stops the rest: no new item starts, running ones stop at their next
    :func:`check` (they see :class:`Stopped`), and that first error is raised once they have.
    On a cancellation request the call returns within :data:`GRACE` seconds by raising
    :class:`Interrupted`, whether or not every worker has stopped (see :func:`abandoned`).
    Worker threads are daemons: a stuck one never holds the process at exit."""
    todo: Sequence[T] = list(items)
    parent = tuple(getattr(_local, "stops", ()))
    if workers <= 1 or len(todo) <= 1:
        out = []
        for item in todo:
            check()
            out.append(fn(item))
        return out
    results: list[Any] = [None] * len(todo)
    errors: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()
    done = threading.Event()
    state = {"next": 0, "running": min(workers, len(todo))}

    def worker() -> None:
        _local.stops = (*parent, stop)
        try:
            while True:
                with lock:
                    i = state["next"]
                    if i >= len(todo) or stop.is_set() or _event.is_set():
                        return
                    state["next"] = i + 1
                try:
                    results[i] = fn(todo[i])
                except BaseException as e:  # noqa: BLE001 - handed to the caller below
                    with lock:
                        errors.append(e)
                    stop.set()
                    return
        finally:
            with lock:
                state["running"] -= 1
                if state["running"] == 0:
                    done.set()

    threads = [
        threading.Thread(target=worker, name=f"{name}-{k}", daemon=True)
        for k in range(state["running"])
    ]
    for t in threads:
        t.start()
    try:
        while not done.wait(0.05):
            if _event.is_set():
                if not done.wait(GRACE):
                    _abandoned.set()
                raise Interrupted("interrupted")
    except BaseException:
        # workers left behind stop at their next check even after a reset() (the next
        # command in this process) or a KeyboardInterrupt nobody turned into a request
        stop.set()
        raise
    if _event.is_set():
        raise Interrupted("interrupted")
    if errors:
        real = [e for e in errors if not isinstance(e, Stopped | Interrupted)]
        raise (real or errors)[0]
    return results
