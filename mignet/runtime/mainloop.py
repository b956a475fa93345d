"""The main loop, QEMU style: an asyncio loop that holds the big lock except while it waits.

QEMU's main loop runs every handler with the BQL held and drops it only inside ``poll()``.
``MainLoop`` reproduces that on asyncio: its selector releases the big lock around the
``select()`` system call and takes it back before any callback runs. Code on the loop (QMP
handlers, a coroutine loader) therefore owns the lock; threads (the ``mig/dst/main`` loader)
can take it only while the loop is idle.

The selector also measures what the control plane feels: how long each loop iteration ran
without returning to ``select()`` (a "stall": nothing else on the loop can run meanwhile).
"""

from __future__ import annotations

import asyncio
import gc
import selectors
import statistics
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from mignet.runtime.bql import BQL, bql_held, bql_locked, bql_released

T = TypeVar("T")


class BqlSelector(selectors.DefaultSelector):
    """A selector that drops the big lock while blocked and records busy stretches."""

    def __init__(self) -> None:
        super().__init__()
        self.stalls: list[float] = []  # seconds between leaving select() and re-entering
        self._left_select: float | None = None
        self.record = False

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        now = time.perf_counter()
        if self.record and self._left_select is not None:
            self.stalls.append(now - self._left_select)
        if bql_locked():
            with bql_released():
                ready = super().select(timeout)
        else:
            ready = super().select(timeout)
        self._left_select = time.perf_counter()
        return ready


_current: MainLoop | None = None


def current_main_loop() -> MainLoop | None:
    """The MainLoop running on this process's main thread, if any."""
    return _current


class MainLoop:
    """Owns an asyncio loop whose handlers run under the big lock."""

    def __init__(self) -> None:
        self.selector = BqlSelector()
        self.loop = asyncio.SelectorEventLoop(self.selector)

    def run(self, main: Coroutine[Any, Any, T]) -> T:
        """Run ``main`` to completion on this thread, holding the big lock except in
        ``select()``, as QEMU's main loop does."""
        global _current
        asyncio.set_event_loop(self.loop)
        _current = self
        # Everything that exists now (modules, the guest, the QMP server) lives as long as
        # the process. Frozen, a full collection no longer walks it: measured, a collection
        # triggered in the loader walked ~40 000 objects for 25 ms with the GIL held, and the
        # QMP answer waiting for that GIL took as long (docs/benchmarks.md).
        gc.freeze()
        try:
            with bql_held():
                return self.loop.run_until_complete(main)
        finally:
            _current = None
            asyncio.set_event_loop(None)

    def close(self) -> None:
        self.loop.close()

    def record_stalls(self, on: bool = True) -> None:
        self.selector.record = on
        if on:
            self.selector.stalls.clear()
            self.selector._left_select = None


def summarize(samples: list[float]) -> dict[str, float | int]:
    """count, p50, p99 and max of durations in seconds, reported in milliseconds."""
    if not samples:
        return {"count": 0, "p50-ms": 0.0, "p99-ms": 0.0, "max-ms": 0.0}
    if len(samples) == 1:
        p50 = p99 = samples[0]
    else:  # 99 cut points; "inclusive": the sample's own range, as a latency report wants
        cuts = statistics.quantiles(samples, n=100, method="inclusive")
        p50, p99 = cuts[49], cuts[98]
    return {"count": len(samples), "p50-ms": round(p50 * 1000, 3), "p99-ms": round(p99 * 1000, 3),
            "max-ms": round(max(samples) * 1000, 3)}


def record_bql_holds(on: bool = True) -> list[float]:
    """Start (or stop) recording big-lock hold times; returns the live list."""
    BQL.record_holds = on
    if on:
        BQL.hold_times.clear()
    return BQL.hold_times
