"""``migrate-cancel`` at a phase, over QMP: a ``mignet serve`` source or destination
cancelled exactly when the stream reaches setup, RAM or device state (a real forwarding
proxy finds the phase with mignet's decoder, tests/support/phase_proxy.py, and then
forwards nothing more). The cancelled side ends "cancelled", the other "failed", both
within 2 s; the source's guest runs on and migrates again, and the destination takes a
new ``migrate-incoming`` that completes with the same RAM on both ends."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from tests.support.phase_proxy import Phase, PhaseProxy
from tests.support.qmp_serve import FINAL, Serve, migrate_completes, serve

DETECT = 2.0
SLACK = 1.0


async def _final_at(side: Serve, timeout: float) -> tuple[dict[str, object], float]:
    info = await side.wait_status(*FINAL, timeout=timeout)
    return info, time.monotonic()


@pytest.mark.parametrize(("phase", "side"), [
    ("setup", "source"), ("ram", "source"), ("ram", "destination"), ("device", "destination"),
])
def test_migrate_cancel_at_a_phase_then_both_ends_migrate_again(
        tmp_path: Path, phase: Phase, side: str) -> None:
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst, \
                serve(tmp_path, "src", "--size", "16M", "--fill", "random", "--seed", "3") as src:
            uri = await dst.incoming_uri()
            host, port = uri.removeprefix("tcp:").rsplit(":", 1)
            # At device state a serve source (no return path) writes its last bytes and
            # completes at once; a close passed on would fail the destination before its
            # cancel came. There the proxy stalls instead: the destination waits, is cancelled.
            proxy = PhaseProxy((host, int(port)), phase, "stall" if phase == "device" else "hold")
            try:
                # 16 MiB at 4 MiB/s: the proxy drops what it reads once the phase is reached,
                # and at full speed the source would finish before the cancel came
                await src.x("migrate-set-parameters", {"max-bandwidth": 4 << 20})
                await src.x("migrate", {"uri": proxy.uri})
                assert await asyncio.to_thread(proxy.reached.wait, 30), "the phase never came"
                canceller, other = (src, dst) if side == "source" else (dst, src)
                t0 = time.monotonic()
                await canceller.x("migrate-cancel")
                (mine, t_mine), (theirs, t_theirs) = await asyncio.gather(
                    _final_at(canceller, 10), _final_at(other, 10))
                record = {"qmp": True, "phase": phase, "cancelled": side,
                          "took": {"canceller": round(t_mine - t0, 2), "other": round(t_theirs - t0, 2)},
                          "status": {"canceller": mine["status"], "other": theirs["status"]}}
                print(f"\n{json.dumps(record)}")
                if os.environ.get("MIGNET_FAULT_LOG"):
                    with open(os.environ["MIGNET_FAULT_LOG"], "a") as f:
                        f.write(json.dumps(record) + "\n")
                assert mine["status"] == "cancelled", mine
                assert t_mine - t0 < DETECT + SLACK
                if phase == "device":
                    # No return path on serve (QEMU's default): the source wrote all of its
                    # stream before the destination was cancelled and reports completed.
                    assert theirs["status"] in ("failed", "completed"), theirs
                else:
                    assert theirs["status"] == "failed", theirs
                    assert t_theirs - t0 < DETECT + SLACK
            finally:
                proxy.close()
            if src_completed := (await src.x("query-migrate"))["status"] == "completed":
                assert (await src.x("query-status"))["status"] == "postmigrate"
                await src.x("cont")
            del src_completed
            assert (await src.x("query-status"))["status"] == "running"
            uri = await dst.incoming_uri()
            await src.x("migrate-set-parameters", {"max-bandwidth": 0})
            await migrate_completes(src, dst, uri)
    asyncio.run(main())
