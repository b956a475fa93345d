"""The QEMU-style main loop and the coroutine loader (the pre-threading receive model)."""

from __future__ import annotations

import asyncio
import threading
import time

from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam
from mignet.migration.loadvm import Loader, load_in_coroutine
from mignet.runtime.bql import bql_held, bql_locked
from mignet.runtime.mainloop import MainLoop, record_bql_holds
from mignet.units import PAGE_SIZE
from tests.support.streams import channel_pair, encode_stream, feed_in_chunks


def test_loop_handlers_hold_the_lock_and_select_releases_it() -> None:
    loop = MainLoop()
    took: list[float] = []

    def other_thread() -> None:
        t0 = time.monotonic()
        with bql_held():
            took.append(time.monotonic() - t0)

    async def main() -> bool:
        held = bql_locked()
        t = threading.Thread(target=other_thread)
        t.start()
        await asyncio.sleep(0.2)  # the loop waits in select(): the lock is free
        t.join(1)
        return held

    try:
        assert loop.run(main()) is True
    finally:
        loop.close()
    assert took and took[0] < 0.15
    assert not bql_locked()


def test_coroutine_loader_loads_on_the_main_loop_under_the_lock() -> None:
    src = GuestRam.generate(256 * PAGE_SIZE, "mixed", seed=4)
    devices = DeviceSet.example(4)
    tx, rx = channel_pair()
    feeder = feed_in_chunks(tx, encode_stream(src, devices), [3000, 50000], delay=0.002)
    seen: dict[str, object] = {}

    class Probe(DeviceSet):
        def load(self, *args: object) -> None:
            seen.setdefault("thread", threading.current_thread().name)
            seen.setdefault("locked", bql_locked())
            super().load(*args)  # type: ignore[arg-type]

    ticks: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            await asyncio.sleep(0.001)

    async def main() -> object:
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        result = await load_in_coroutine(Loader(rx, devices=Probe()))
        stop.set()
        await tick
        return result

    loop = MainLoop()
    holds = record_bql_holds()
    try:
        result = loop.run(main())
    finally:
        record_bql_holds(False)
        loop.close()
    feeder.join(5)
    rx.close()
    assert result.ram.digest() == src.digest()  # type: ignore[attr-defined]
    assert result.devices.state_equal(devices)  # type: ignore[attr-defined]
    assert seen == {"thread": threading.main_thread().name, "locked": True}
    assert len(ticks) > 1  # other work ran on the loop while the loader waited
    assert holds  # the loop held the lock in stretches, released in select()
