"""The main loop freezes what exists when it starts, so a full garbage collection during a
load (which holds the GIL, and can run in the loader while it holds the big lock) does not
walk the process's start-up heap: measured, that walk was the longest wait of a QMP answer."""

from __future__ import annotations

import gc

from mignet.runtime.mainloop import MainLoop


def test_objects_alive_when_the_loop_starts_are_frozen_and_a_full_collection_skips_them() -> None:
    gc.unfreeze()
    before = gc.get_freeze_count()
    loop = MainLoop()

    async def main() -> int:
        return gc.get_freeze_count()

    try:
        frozen = loop.run(main())
    finally:
        loop.close()
        gc.unfreeze()  # the rest of the test session collects as usual
    assert before == 0
    # pytest, mignet and their imports: tens of thousands of objects, now out of the walk
    assert frozen > 10_000
