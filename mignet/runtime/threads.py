"""Named threads, and the CPU priority of the bulk ones.

QEMU names its migration threads (``mig/src/main``, ``mig/dst/main``) and tools look for
those names, so an executor's anonymous workers will not do; the Future still gives the
standard result box: ``result(timeout)`` returns the value or re-raises what the thread
raised, BaseExceptions such as MigrationCancelled included. The name is also given to the
kernel (``/proc/thread-self/comm``), so ``top -H``, ``ps -L`` and the benchmark's per-thread
scheduler figures show it.

Bulk threads (the loader, the sender) run at a lower CPU priority than the control plane
(:func:`make_bulk`). They are runnable nearly all the time, and on a machine with few cores
the main loop answering QMP waits on the run queue behind them, once for the wake-up and once
more for each GIL hand-off (docs/benchmarks.md, issue 17, measured from schedstat). At nice
+10 (weight 110 against 1024) the scheduler runs the main loop first when both are runnable;
a bulk thread still gets every cycle nobody else wants, so throughput stays.
``MIGNET_BULK_NICE`` (0-19; 0 turns it off) overrides the default, for a measurement.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import TypeVar

T = TypeVar("T")

#: Nice increment of bulk threads over the process: weight 110 against the main loop's 1024.
BULK_NICE = 10


def bulk_nice() -> int:
    """The increment :func:`make_bulk` applies: ``MIGNET_BULK_NICE`` or :data:`BULK_NICE`."""
    text = os.environ.get("MIGNET_BULK_NICE", "")
    try:
        return max(0, min(19, int(text))) if text else BULK_NICE
    except ValueError:
        return BULK_NICE


def name_native_thread(name: str) -> None:
    """Give the calling thread's name to the kernel (15 bytes at most), best effort: a name
    is for people and tools, never worth failing a migration over."""
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass  # not Linux, or /proc not mounted


def make_bulk() -> None:
    """Lower the calling thread's CPU priority by :func:`bulk_nice` (Linux: nice is per
    thread, set on its TID). Raising one's own nice needs no privilege; threads this one
    starts inherit it. Best effort: elsewhere the thread keeps the process's priority."""
    step = bulk_nice()
    if not step:
        return
    tid = threading.get_native_id()
    try:
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, now + step))
    except (OSError, AttributeError):
        pass  # no per-thread priorities here


def finished(future: Future[T], timeout: float | None) -> bool:
    """Whether the thread behind ``future`` (:func:`start_thread`) is done, waiting up to
    ``timeout`` s. Why not ``Thread.join``: on CPython 3.11 a Ctrl-C that interrupts a join
    releases the running thread's state lock and marks it stopped (the bpo-45274 handler),
    so every later join returns at once and its caller tears down what the thread still
    uses (seen: an RDMA source whose channel was closed under it, SIGSEGV)."""
    done, _ = wait([future], timeout)
    return bool(done)


def start_thread(fn: Callable[[], T], name: str, bulk: bool = False) -> tuple[threading.Thread, Future[T]]:
    """Run ``fn`` in a new daemon thread called ``name``; returns the thread and its Future.
    ``bulk``: the thread moves data and yields the CPU to the control plane (:func:`make_bulk`)."""
    future: Future[T] = Future()
    future.set_running_or_notify_cancel()

    def body() -> None:
        name_native_thread(name)
        if bulk:
            make_bulk()
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the Future
            future.set_exception(exc)
    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    return thread, future


#: The GIL's switch interval while a latency-bound phase runs (postcopy: a fault's page).
#: Threads that wait for the GIL behind a busy one get it only after this interval
#: (CPython's default is 5 ms, most of a fault's latency); 0.2 ms bounds that wait and
#: costs the busy thread only when others want the GIL.
FAST_SWITCH_INTERVAL = 0.0002


def prompt_handoffs(no_gc: bool = False) -> Callable[[], None]:
    """Shorten the GIL switch interval to :data:`FAST_SWITCH_INTERVAL` (and, with
    ``no_gc``, stop garbage collection, whose full passes stall every thread); returns the
    function that puts both back as they were."""
    interval, gc_on = sys.getswitchinterval(), gc.isenabled()
    sys.setswitchinterval(min(interval, FAST_SWITCH_INTERVAL))
    if no_gc:
        gc.disable()

    def restore() -> None:
        sys.setswitchinterval(interval)
        if no_gc and gc_on:
            gc.enable()
    return restore
