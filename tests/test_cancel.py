"""barge.cancel's rules, in memory: results in order, the first failure stops the siblings, a
cancellation request ends blocked sockets, sleeps and the parallel map within the grace period.
(tests/test_interrupts.py sends real signals to real pushes, pulls and copies.)"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from barge import cancel
from barge.errors import IntegrityError, Interrupted


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    cancel.reset()
    yield
    cancel.reset()


def test_parallel_keeps_order_and_runs_inline_for_one_worker() -> None:
    assert cancel.parallel(lambda x: x * x, range(20), 4) == [x * x for x in range(20)]
    seen: list[str] = []
    assert cancel.parallel(lambda x: seen.append(threading.current_thread().name), "ab", 1)
    assert seen == [threading.main_thread().name] * 2


def test_the_first_failure_stops_the_siblings_and_is_raised() -> None:
    started = threading.Event()
    stopped: list[BaseException] = []

    def work(i: int) -> None:
        if i == 0:  # a long item that only checks
            started.set()
            try:
                while True:
                    cancel.check()
                    time.sleep(0.01)
            except BaseException as e:
                stopped.append(e)
                raise
        started.wait(5)
        raise IntegrityError(f"item {i} is corrupt")

    with pytest.raises(IntegrityError, match="item 1"):
        cancel.parallel(work, range(10), 2)
    assert len(stopped) == 1 and isinstance(stopped[0], cancel.Stopped)


def test_a_request_ends_the_map_within_the_grace_even_if_a_worker_never_checks() -> None:
    release = threading.Event()
    threading.Timer(0.2, cancel.request).start()
    start = time.monotonic()
    with pytest.raises(Interrupted):
        cancel.parallel(lambda i: release.wait(30), range(4), 2)
    assert time.monotonic() - start < 0.2 + cancel.GRACE + 0.5
    assert cancel.abandoned()  # those workers are still blocked: callers keep their fds
    release.set()


def test_a_request_shuts_down_tracked_sockets_and_ends_sleeps() -> None:
    a, b = socket.socketpair()
    with a, b:
        cancel.track_socket(a)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(a.recv(10)))
        reader.start()
        sleeper_error: list[BaseException] = []

        def sleeper() -> None:
            try:
                cancel.sleep(30)
            except BaseException as e:
                sleeper_error.append(e)

        t = threading.Thread(target=sleeper)
        t.start()
        time.sleep(0.1)
        cancel.request()
        reader.join(2)
        t.join(2)
        assert not reader.is_alive() and got == [b""]  # the blocked recv returned
        assert not t.is_alive() and isinstance(sleeper_error[0], Interrupted)
        with pytest.raises(Interrupted):
            cancel.check()
