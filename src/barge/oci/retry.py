"""Backoff and the retry budget of one transfer.

A :class:`Budget` belongs to one step (a manifest request) or one whole blob transfer (every
request, resume and fresh upload session of it). It says, after each failed attempt, whether
to try again and how long to wait first:

* the wait is exponential backoff with full jitter (``RetryPolicy``), or the registry's
  ``Retry-After`` (up to ``retry_after_cap``);
* it gives up when ``retry_timeout`` seconds have passed since the transfer last made
  progress, when ``attempts`` attempts in a row failed without progress, or when the
  operation's deadline would pass during the wait;
* progress is the furthest byte of the blob reached so far growing (:meth:`Budget.advance`),
  so a transfer that keeps moving is never given up, however many times its connection
  breaks, and one that is stuck is given up after a bounded time.

When it gives up, the error says so: "...; gave up after 3 attempts in 92 s".
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from barge import cancel
from barge.errors import BargeError
from barge.oci.errors import RegistryTimeout, TooManyRequests
from barge.oci.settings import HostSettings

__all__ = ["Budget", "RetryPolicy", "deadline_error"]


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter; a cap on failures in a row without progress."""

    attempts: int = 10  # failed attempts in a row, without progress, before giving up
    base: float = 0.5  # first backoff (seconds), doubled each time
    cap: float = 15.0  # longest single sleep
    retry_after_cap: float = 60.0  # longest Retry-After we honour

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_cap)
        return random.uniform(0, min(self.cap, self.base * (2 ** min(attempt, 30))))


def deadline_error(settings: HostSettings, registry: str, what: str) -> RegistryTimeout:
    return RegistryTimeout(
        f"{registry}: {what}: the {settings.timeout:g} s allowed for this operation ran out",
        hint="give more time with --timeout or BARGE_TIMEOUT (0: no limit)",
    )


class Budget:
    """The retry budget of one transfer (see the module docstring). Used by one thread."""

    def __init__(
        self,
        policy: RetryPolicy,
        settings: HostSettings,
        *,
        registry: str,
        what: str,
        deadline: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = cancel.sleep,
    ) -> None:
        self.policy = policy
        self.settings = settings
        self.registry = registry
        self.what = what
        self.deadline = deadline
        self._clock = clock
        self._sleep = sleep
        self.started = self.last_progress = clock()
        self.attempts = 0  # failed attempts in all
        self.failures = 0  # failed attempts since the last progress
        self.best = 0  # the furthest byte reached

    def advance(self, position: int) -> None:
        """The transfer reached byte ``position``; progress if no attempt got this far."""
        if position > self.best:
            self.best = position
            self.last_progress = self._clock()
            self.failures = 0

    def check_deadline(self) -> None:
        """Raise when the operation's deadline passed (or the user asked to stop)."""
        cancel.check()
        if self.deadline is not None and self._clock() >= self.deadline:
            raise deadline_error(self.settings, self.registry, self.what)

    def retry(
        self, err: BargeError, *, retry_after: float | None = None, limit: int | None = None
    ) -> None:
        """Count a failed attempt; sleep the backoff before the next, or raise ``err`` (its
        message saying that barge gave up) when the budget is spent. ``limit`` lowers the cap
        on failures in a row for this kind of failure. After a cancellation request (a
        failure it caused, its sockets shut down) it raises :class:`~barge.errors.Interrupted`."""
        cancel.check()
        self.attempts += 1
        self.failures += 1
        now = self._clock()
        cap = self.policy.attempts if limit is None else min(limit, self.policy.attempts)
        if retry_after is None and isinstance(err, TooManyRequests):
            retry_after = err.retry_after
        delay = self.policy.delay(self.failures - 1, retry_after)
        idle = now - self.last_progress
        if self.deadline is not None and now + delay >= self.deadline:
            self._give_up(err, now, f"the {self.settings.timeout:g} s --timeout ran out")
        if self.failures >= cap:
            self._give_up(err, now)
        if idle + delay > self.settings.retry_timeout:
            why = None
            if retry_after is not None and retry_after > self.settings.retry_timeout - idle:
                why = f"the registry asks to wait {retry_after:g} s"
            self._give_up(err, now, why)
        self._sleep(delay)

    def _give_up(self, err: BargeError, now: float, why: str | None = None) -> None:
        n = self.attempts
        tail = f"gave up after {n} attempt{'s' if n != 1 else ''} in {now - self.started:.0f} s"
        if why:
            tail += f" ({why})"
        if not err.message.endswith(tail):
            err.message = f"{err.message}; {tail}"
            err.args = (err.message,)
        if err.hint is None and isinstance(err, RegistryTimeout):
            err.hint = (
                "if the registry is only slow, wait longer with --stall-timeout or "
                "BARGE_STALL_TIMEOUT; --retry-timeout sets how long barge keeps retrying"
            )
        raise err
