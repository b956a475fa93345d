"""Stackful coroutines on top of asyncio, the way QEMU's coroutines sit on its main loop.

QEMU's old incoming migration ran ``qemu_loadvm_state`` as a coroutine: deep inside ordinary,
blocking-looking code, a read that would block yields back to the main loop, which re-enters
the coroutine once the fd is readable. Python's native ``async def`` cannot do that without
colouring every function, so we use greenlets (stackful, like QEMU's ucontext coroutines) and
let an asyncio task drive one: the coroutine hands an awaitable to its driver and sleeps; the
driver awaits it on the event loop and switches back with the result.

This lets exactly the same loader code run in a thread (``wait_cond`` blocks in ``poll()``)
or in a coroutine (``wait_cond`` yields); the channel decides how to wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import greenlet

from mignet.errors import MisuseError

T = TypeVar("T")


class _Coroutine(greenlet.greenlet):
    """A greenlet that is known to be driven by :func:`run_coroutine`."""


class _AwaitRequest:
    """What a coroutine passes to its driver when it yields: the thing to wait for."""

    __slots__ = ("awaitable",)

    def __init__(self, awaitable: Awaitable[Any]) -> None:
        self.awaitable = awaitable


def in_coroutine() -> bool:
    """True when called from inside a coroutine started by :func:`run_coroutine`
    (QEMU's ``qemu_in_coroutine()``)."""
    return isinstance(greenlet.getcurrent(), _Coroutine)


def yield_until(awaitable: Awaitable[T]) -> T:
    """Suspend the current coroutine until ``awaitable`` completes on the event loop.

    Exceptions from the awaitable are raised here, inside the coroutine.
    """
    current = greenlet.getcurrent()
    if not isinstance(current, _Coroutine):
        if asyncio.iscoroutine(awaitable):
            awaitable.close()
        raise MisuseError("yield_until() called outside a mignet coroutine")
    return current.parent.switch(_AwaitRequest(awaitable))


async def run_coroutine(fn: Callable[..., T], *args: Any) -> T:
    """Run the plain (blocking-style) function ``fn`` as a coroutine on the running loop.

    Whenever ``fn`` calls :func:`yield_until` (for example through ``Channel.wait_cond``), the
    event loop gets control back until the awaited thing is done; in between ``fn`` runs on
    the loop's thread, as QEMU's coroutines run in the main loop.
    """
    co = _Coroutine(fn, parent=greenlet.getcurrent())
    step: Any = co.switch(*args)
    while not co.dead:
        if not isinstance(step, _AwaitRequest):  # pragma: no cover - defensive
            raise MisuseError(f"coroutine yielded {step!r} instead of an await request")
        try:
            value = await step.awaitable
        except BaseException as exc:  # noqa: BLE001 - re-raised inside the coroutine
            step = co.throw(exc)
        else:
            step = co.switch(value)
    return step


async def wait_fds(fds: list[tuple[int, int]], timeout: float | None) -> bool:
    """Wait on the running loop until any of ``fds`` (fd, POLLIN|POLLOUT mask) is ready.

    Returns False on timeout. Used by ``Channel.wait_cond`` when in a coroutine.
    """
    import select

    loop = asyncio.get_running_loop()
    ready: asyncio.Future[bool] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(True)

    added: list[tuple[str, int]] = []
    try:
        for fd, events in fds:
            if events & select.POLLIN:
                loop.add_reader(fd, wake)
                added.append(("r", fd))
            if events & select.POLLOUT:
                loop.add_writer(fd, wake)
                added.append(("w", fd))
        try:
            return await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            return False
    finally:
        for kind, fd in added:
            if kind == "r":
                loop.remove_reader(fd)
            else:
                loop.remove_writer(fd)
