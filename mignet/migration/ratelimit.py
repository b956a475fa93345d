"""Bandwidth limiting in QEMU's style (``max-bandwidth``, bytes per second).

QEMU's rate limiter hands out a budget per 100 ms window; once a window's budget is spent,
the migration thread sleeps until the next window. The limit can change at any moment and
takes effect at the next window boundary — at most 100 ms later. 0 means unlimited.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

WINDOW = 0.1  # seconds, QEMU's BUFFER_DELAY


def _event_wait(event: threading.Event, timeout: float) -> object:
    return event.wait(timeout)


class RateLimiter:
    """``clock`` (seconds, monotonic) and ``wait`` (block on the wake event for at most
    ``timeout`` seconds) are injectable so tests can drive the windows without wall time;
    the defaults are :func:`time.monotonic` and :meth:`threading.Event.wait`."""

    def __init__(
        self,
        bytes_per_second: int = 0,
        *,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[threading.Event, float], object] = _event_wait,
    ) -> None:
        self._clock = clock
        self._wait = wait
        self._limit = bytes_per_second
        self._window_start = clock()
        self._used = 0
        self._wake = threading.Event()

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, bytes_per_second: int) -> None:
        """Change the limit; a sender sleeping on the old limit wakes at once."""
        self._limit = max(0, int(bytes_per_second))
        # A new window: bytes sent under the old limit are not charged at the new one
        # (QEMU resets its rate-limit window on a max-bandwidth change too).
        self._used = 0
        self._window_start = self._clock()
        self._wake.set()

    def wake(self) -> None:
        """End a sender's current sleep early without changing the limit or the window:
        for a caller whose ``should_stop`` just became set (a postcopy page request must
        not wait out a window of the background stream)."""
        self._wake.set()

    def consume(self, nbytes: int, should_stop: threading.Event | None = None) -> float:
        """Account ``nbytes`` just sent; sleep while over budget. Returns seconds slept."""
        slept = 0.0
        self._used += nbytes
        while True:
            limit = self._limit
            now = self._clock()
            # Compared with the window's end (not ``now - start >= WINDOW``): after sleeping
            # exactly ``end - now`` the float sum lands on the end again, never just short.
            if now >= self._window_start + WINDOW:
                # Carry over any overshoot so the long-run rate stays at the limit.
                budget = limit * (now - self._window_start) if limit else self._used
                self._used = max(0, int(self._used - budget))
                self._window_start = now
            if not limit or self._used < limit * WINDOW:
                return slept
            self._wake.clear()  # before the check: a wake() after it ends the wait below
            if should_stop is not None and should_stop.is_set():
                return slept
            delay = self._window_start + WINDOW - now
            t0 = self._clock()
            self._wait(self._wake, max(0.0, delay))
            slept += self._clock() - t0
