"""Bulk threads yield the CPU to the control plane: the loader (``mig/dst/main``) and the
sender (``mig/src/main``) run at a lower CPU priority than the main loop that answers QMP,
seen from outside in ``/proc`` of real ``mignet serve`` processes during a migration."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from mignet.runtime.threads import BULK_NICE, start_thread
from tests.support.qmp_serve import FINAL, serve

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="Linux /proc needed")


def _stat(pid: int, tid: int) -> tuple[str, int]:
    """(kernel name, nice) of one thread, from /proc/PID/task/TID/{comm,stat}."""
    with open(f"/proc/{pid}/task/{tid}/comm") as f:
        name = f.read().strip()
    with open(f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()  # the name may hold spaces
    return name, int(fields[16])  # field 19 of stat(5); fields[0] is field 3


def _threads(pid: int) -> dict[str, int]:
    """Kernel thread name -> nice, for every thread of ``pid`` (the main thread as "main")."""
    out: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name, nice = _stat(pid, int(tid))
        except (OSError, ValueError, IndexError):
            continue  # the thread ended meanwhile
        out["main" if int(tid) == pid else name] = nice
    return out


def test_a_bulk_thread_is_named_and_niced_and_a_plain_one_is_not() -> None:
    def me() -> tuple[str, int]:
        return _stat(os.getpid(), threading.get_native_id())

    base = os.getpriority(os.PRIO_PROCESS, 0)
    _, bulk = start_thread(me, "mig/test/bulk", bulk=True)
    _, plain = start_thread(me, "mig/test/plain")
    assert bulk.result(10) == ("mig/test/bulk", min(19, base + BULK_NICE))
    assert plain.result(10) == ("mig/test/plain", base)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the calling thread is untouched


def test_loader_and_sender_run_below_their_main_loops_during_a_migration(tmp_path: Path) -> None:
    seen: dict[str, dict[str, int]] = {}

    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst, \
                serve(tmp_path, "src", "--size", "512M", "--fill", "random") as src:
            uri = await dst.incoming_uri()
            # 512 MiB at 256 MiB/s: two seconds in which both threads surely exist
            await src.x("migrate-set-parameters", {"max-bandwidth": 256 << 20})
            await src.x("migrate", {"uri": uri})
            while (await src.x("query-migrate")).get("status") not in FINAL:
                seen["dst"] = {**seen.get("dst", {}), **_threads(dst.proc.pid)}
                seen["src"] = {**seen.get("src", {}), **_threads(src.proc.pid)}
                await asyncio.sleep(0.05)
            assert (await dst.wait_status(*FINAL))["status"] == "completed"

    asyncio.run(main())
    for side, bulk in (("dst", "mig/dst/main"), ("src", "mig/src/main")):
        threads = seen[side]
        assert bulk in threads, f"no {bulk} thread seen in {side}: {threads}"
        assert threads[bulk] == min(19, threads["main"] + BULK_NICE), threads
