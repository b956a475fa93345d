"""The big lock (QEMU's BQL): one process-wide lock for state shared with the main loop.

Rules, as in QEMU:

* RAM loading never takes it; device state and switchover do (``with bql_held():``).
* ``bql_held()`` is QEMU's ``BQL_LOCK_GUARD``: it takes the lock unless this thread already
  holds it, so the same loader code runs in a thread (lock not held) and in a coroutine of
  the main loop (lock held except while yielded).
* ``bql_released()`` drops a lock the caller must hold, and takes it back afterwards — used
  around blocking waits. Calling it without the lock is a bug and raises ``BqlMisuseError``,
  as QEMU asserts; so does taking the lock twice with ``bql_lock()``.

Hold times are recorded (``hold_times``) because how long the lock is held is exactly what
decides the control plane's latency, and the recv-model benchmark reports it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from mignet.errors import BqlMisuseError


class BigLock:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._acquired_at = 0.0
        self.record_holds = False
        self.hold_times: list[float] = []

    def locked_by_me(self) -> bool:
        return self._owner == threading.get_ident()

    def lock(self) -> None:
        if self.locked_by_me():
            raise BqlMisuseError("bql_lock(): this thread already holds the big lock")
        self._lock.acquire()
        self._owner = threading.get_ident()
        self._acquired_at = time.perf_counter()

    def unlock(self) -> None:
        if not self.locked_by_me():
            raise BqlMisuseError("bql_unlock(): this thread does not hold the big lock")
        if self.record_holds:
            self.hold_times.append(time.perf_counter() - self._acquired_at)
        self._owner = None
        self._lock.release()


BQL = BigLock()


def bql_locked() -> bool:
    """Does the calling thread hold the big lock? (QEMU's ``bql_locked()``)"""
    return BQL.locked_by_me()


def bql_lock() -> None:
    BQL.lock()


def bql_unlock() -> None:
    BQL.unlock()


@contextmanager
def bql_held() -> Iterator[None]:
    """Hold the big lock for the block; a no-op if this thread holds it already."""
    if BQL.locked_by_me():
        yield
        return
    BQL.lock()
    try:
        yield
    except BaseException:
        if BQL.locked_by_me():
            BQL.unlock()
        raise  # the body's error wins over any lock misuse it may also have caused
    if not BQL.locked_by_me():
        raise BqlMisuseError("the big lock was released inside a bql_held() block and not retaken")
    BQL.unlock()


@contextmanager
def bql_released() -> Iterator[None]:
    """Drop the big lock for the block (the caller must hold it) and take it back after."""
    BQL.unlock()  # raises BqlMisuseError when not held
    try:
        yield
    finally:
        BQL.lock()


def assert_bql_held(what: str) -> None:
    if not BQL.locked_by_me():
        raise BqlMisuseError(f"{what} must run with the big lock held")


def assert_bql_not_held(what: str) -> None:
    if BQL.locked_by_me():
        raise BqlMisuseError(f"{what} must not run with the big lock held")
