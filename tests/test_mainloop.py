"""The QEMU-style main loop and the coroutine loader (the pre-threading receive model)."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable

from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam
from mignet.migration.loadvm import Loader, load_in_coroutine
from mignet.runtime.bql import bql_held, bql_locked
from mignet.runtime.mainloop import MainLoop, record_bql_holds
from mignet.units import PAGE_SIZE
from tests.support.streams import channel_pair, encode_stream


def test_loop_handlers_hold_the_lock_and_select_releases_it() -> None:
    loop = MainLoop()
    took_lock = threading.Event()

    async def main() -> tuple[bool, bool]:
        held = bql_locked()
        aio = asyncio.get_running_loop()
        got: asyncio.Future[bool] = aio.create_future()

        def other_thread() -> None:
            with bql_held():  # only possible while the loop thread waits in select()
                took_lock.set()
            aio.call_soon_threadsafe(got.set_result, True)

        t = threading.Thread(target=other_thread, daemon=True)
        t.start()
        # The loop can only be woken by the other thread once that thread had the lock; a
        # loop that kept the lock in select() would deadlock here (and time out).
        done = await asyncio.wait_for(got, timeout=30)
        t.join(30)
        return held, done and bql_locked()

    try:
        assert loop.run(main()) == (True, True)
    finally:
        loop.close()
    assert took_lock.is_set()
    assert not bql_locked()


def test_coroutine_loader_loads_on_the_main_loop_under_the_lock() -> None:
    src = GuestRam.generate(256 * PAGE_SIZE, "mixed", seed=4)
    devices = DeviceSet.example(4)
    tx, rx = channel_pair()
    stream = encode_stream(src, devices)
    step = 40_000
    chunks = [stream[i:i + step] for i in range(0, len(stream), step)]
    assert len(chunks) >= 3
    seen: dict[str, object] = {}

    class Probe(DeviceSet):
        def load(self, *args: object) -> None:
            seen.setdefault("thread", threading.current_thread().name)
            seen.setdefault("locked", bql_locked())
            super().load(*args)  # type: ignore[arg-type]

    to_send: queue.Queue[bytes | None] = queue.Queue()

    def feeder() -> None:  # a thread, so a full socket buffer never blocks the loop
        while (chunk := to_send.get()) is not None:
            tx.write_all(chunk)
            notify[0](len(chunk))
        tx.close()

    ticks: list[str] = []

    async def ticker(sent: asyncio.Queue[int]) -> None:
        """Other work on the loop, and the only source of the stream: chunk k is sent on
        tick k, so the loader cannot finish unless this ran once per chunk meanwhile."""
        for chunk in chunks:
            ticks.append(threading.current_thread().name)
            to_send.put(chunk)
            assert await asyncio.wait_for(sent.get(), timeout=30) == len(chunk)
        to_send.put(None)

    async def main() -> object:
        aio = asyncio.get_running_loop()
        sent: asyncio.Queue[int] = asyncio.Queue()
        notify.append(lambda n: aio.call_soon_threadsafe(sent.put_nowait, n))
        thread.start()
        tick = asyncio.create_task(ticker(sent))
        result = await load_in_coroutine(Loader(rx, devices=Probe()))
        ticks_at_end.append(len(ticks))
        await tick
        return result

    notify: list[Callable[[int], object]] = []  # the feeder's way to wake the loop
    ticks_at_end: list[int] = []
    thread = threading.Thread(target=feeder, daemon=True)
    loop = MainLoop()
    holds = record_bql_holds()
    try:
        result = loop.run(main())
    finally:
        record_bql_holds(False)
        to_send.put(None)
        loop.close()
    thread.join(30)
    rx.close()
    assert result.ram.digest() == src.digest()  # type: ignore[attr-defined]
    assert result.devices.state_equal(devices)  # type: ignore[attr-defined]
    assert seen == {"thread": threading.main_thread().name, "locked": True}
    # Exactly one tick per chunk, all on the loop thread, interleaved with the waiting loader.
    assert ticks == [threading.main_thread().name] * len(chunks)
    assert ticks_at_end == [len(chunks)]  # the loader ended only after the last tick
    # The loop released the lock in select() at least once per chunk (it had to wait for the
    # feeder each time); how many more times depends on the scheduler.
    assert len(holds) >= len(chunks)
