"""A named thread whose outcome is a :class:`concurrent.futures.Future`.

QEMU names its migration threads (``mig/src/main``, ``mig/dst/main``) and tools look for
those names, so an executor's anonymous workers will not do; the Future still gives the
standard result box: ``result(timeout)`` returns the value or re-raises what the thread
raised, BaseExceptions such as MigrationCancelled included.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


def start_thread(fn: Callable[[], T], name: str) -> tuple[threading.Thread, Future[T]]:
    """Run ``fn`` in a new daemon thread called ``name``; returns the thread and its Future."""
    future: Future[T] = Future()
    future.set_running_or_notify_cancel()

    def body() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the Future
            future.set_exception(exc)
    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    return thread, future
