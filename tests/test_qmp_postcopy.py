"""Postcopy into ``mignet serve``, driven over QMP as management drives QEMU's destination:
``postcopy-ram`` on both ends, QEMU 7.2 as the source switching with
``migrate-start-postcopy``, and the destination going active -> postcopy-active ->
completed through its one status machine (MIGRATION events, query-migrate's
``ram.postcopy-requests``), or failed with a one-line reason.

Real processes throughout: QEMU 7.2, ``mignet serve``, QMP over a UNIX socket, TCP for the
stream; nothing is mocked."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from mignet.errors import MisuseError
from mignet.migration.status import MigrationState, MigrationStatus, Phase
from tests.support.qemu_peer import QemuMigrationError, QemuSource, qemu_skip_reason
from tests.support.qmp_serve import FINAL, Serve, serve, statuses

MiB = 1 << 20
qemu = pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")


def caps(**on: bool) -> dict[str, Any]:
    return {"capabilities": [{"capability": k.replace("_", "-"), "state": v} for k, v in on.items()]}


async def watch(dst: Serve, seen: list[dict[str, Any]], stop: asyncio.Event) -> None:
    """Poll the destination while the source migrates: every query-migrate answer taken in
    postcopy-active is kept (with query-status), so a test can check what management sees
    there, not only the end."""
    while not stop.is_set():
        info = await dst.x("query-migrate")
        if info.get("status") == "postcopy-active":
            info["runstate"] = (await dst.x("query-status"))["status"]
            seen.append(info)
        if info.get("status") in FINAL:
            return
        await asyncio.sleep(0.02)


# --- the status machine -----------------------------------------------------------------------
def test_postcopy_phase_in_the_status_table() -> None:
    """RAM -> POSTCOPY is public ``postcopy-active`` (one event); from there only completed
    or failed: a cancel is refused, as after switchover, since the guest runs here."""
    seen: list[str] = []
    st = MigrationState(on_status=lambda _d, s: seen.append(s.value))
    inc = st.incoming
    inc.to(Phase.LISTENING)
    with pytest.raises(MisuseError):
        inc.to(Phase.POSTCOPY)  # only from RAM (LISTEN comes inside the stream)
    inc.to(Phase.RAM)
    inc.to(Phase.POSTCOPY)
    assert inc.status is MigrationStatus.POSTCOPY_ACTIVE and inc.running
    assert not inc.move(frozenset(Phase), Phase.CANCELLING)
    assert not inc.move(frozenset(Phase), Phase.SWITCHOVER)
    inc.to(Phase.DONE)
    assert seen == ["setup", "active", "postcopy-active", "completed"]


# --- what serve takes and refuses, answered at once ---------------------------------------------
def test_postcopy_ram_is_taken_on_a_destination_and_refused_where_mignet_cannot(tmp_path: Path) -> None:
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst:
            await dst.x("migrate-set-capabilities", caps(postcopy_ram=True))
            got = {c["capability"]: c["state"] for c in await dst.x("query-migrate-capabilities")}
            assert got["postcopy-ram"] is True
            _, desc = await dst.error("migrate-set-capabilities", caps(xbzrle=True))
            assert desc.startswith("Capability 'xbzrle' is not supported by mignet"), desc
            assert "\n" not in desc
        async with serve(tmp_path, "co", "--incoming", "defer", "--recv-model", "coroutine") as co:
            await co.x("migrate-set-capabilities", caps(postcopy_ram=True))
            _, desc = await co.error("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            assert "--recv-model thread" in desc, desc
            assert (await co.x("query-migrate")) == {}  # nothing started, nothing locked
            await co.x("migrate-set-capabilities", caps(postcopy_ram=False))
        async with serve(tmp_path, "src", "--size", "4M") as src:
            # a postcopy source (tests/test_qmp_postcopy_source.py) without multifd
            await src.x("migrate-set-capabilities", caps(postcopy_ram=True, multifd=True))
            _, desc = await src.error("migrate", {"uri": "tcp:127.0.0.1:1"})
            assert "postcopy-ram with multifd is not supported" in desc, desc
            await src.x("migrate-set-capabilities", caps(postcopy_ram=False))  # not locked
    asyncio.run(main())


# --- real QEMU 7.2 as the source ----------------------------------------------------------------
@pytest.mark.qemu
@qemu
@pytest.mark.parametrize("vcpus, preempt", [(2, False), (0, False), (2, True)])
def test_real_qemu_postcopy_into_serve(tmp_path: Path, vcpus: int, preempt: bool) -> None:
    """QEMU switches to postcopy after ~4 MiB of a 64 MiB guest: serve goes active ->
    postcopy-active -> completed, starts the guest at RUN (query-status), counts the
    page requests exactly as the source does, and ends with the source's RAM. With no
    vCPUs (``--vcpus 0``) nothing faults, so nothing is requested: the source pushes every
    owed page unasked. With postcopy-preempt the requested pages come on QEMU's second
    connection, which serve takes as the preempt channel."""
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer", "--vcpus", str(vcpus)) as dst:
            await dst.x("migrate-set-capabilities",
                        caps(postcopy_ram=True, events=True, postcopy_preempt=preempt,
                             postcopy_blocktime=True))
            uri = await dst.incoming_uri()
            with QemuSource(tmp_path / "qemu", mem_mib=64, fill="mixed", seed=21) as src:
                seen: list[dict[str, Any]] = []
                stop = asyncio.Event()
                poller = asyncio.create_task(watch(dst, seen, stop))
                try:
                    # with vCPUs, owed pages trickle (8 MiB/s), so the vCPUs surely
                    # fault on some before the source pushes them
                    info = await asyncio.to_thread(src.migrate_postcopy, uri, 180,
                                                   8 * MiB if vcpus else 0, preempt)
                finally:
                    got = await dst.wait_status(*FINAL, timeout=120)
                    stop.set()
                    await poller
                expected = hashlib.sha256(src.image_path.read_bytes()).hexdigest()
            assert info["status"] == "completed", info
            assert got["status"] == "completed", got
            assert statuses(dst.events()) == ["setup", "active", "postcopy-active", "completed"]
            # seen in postcopy-active by query-migrate too (the phase lasts while owed pages
            # travel: at least one poll of 20 ms fits on a loaded machine, not guaranteed)
            # postcopy-active from LISTEN; the guest starts at RUN, after the device state
            runstates = [during["runstate"] for during in seen]
            assert set(runstates) <= {"inmigrate", "running"}, runstates
            if "running" in runstates:  # started at RUN, and running from then on
                assert "inmigrate" not in runstates[runstates.index("running"):], runstates
            for during in seen:
                assert isinstance(during["ram"]["postcopy-requests"], int)
                assert during["ram"]["postcopy-requests"] >= 0
            requests = got["ram"]["postcopy-requests"]
            assert isinstance(requests, int) and requests >= 0
            assert requests == info["ram"]["postcopy-requests"], (got["ram"], info["ram"])
            if vcpus == 0:
                assert requests == 0  # no vCPU runs here, so no page fault asks for a page
            else:
                assert requests >= 1  # faults became requests, counted alike at both ends
            assert got["ram"]["postcopy-bytes"] > 0 and got["ram"]["remaining"] == 0
            # postcopy-blocktime on: each vCPU's wait, and the time all waited at once (ms)
            per_vcpu = got["postcopy-vcpu-blocktime"]
            assert len(per_vcpu) == vcpus and all(isinstance(t, int) and t >= 0 for t in per_vcpu)
            assert 0 <= got["postcopy-blocktime"] <= min(per_vcpu, default=0)
            assert (await dst.x("query-status"))["status"] == "running"
            guest = await dst.x("x-mignet-query-guest")
            blocks = {b["name"]: b for b in guest["blocks"]}
            assert blocks["m0"]["size"] == 64 * MiB and blocks["m0"]["sha256"] == expected
            assert "pc.bios" in blocks and guest["devices"] > 20
    asyncio.run(main())


@pytest.mark.qemu
@qemu
def test_real_qemu_postcopy_into_serve_without_postcopy_ram_fails_in_one_line(tmp_path: Path) -> None:
    """QEMU's destination refuses an ADVISE it did not agree to; so does serve: the reason
    in query-migrate's error-desc, the source fails, and serve waits for another try."""
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst:
            await dst.x("migrate-set-capabilities", caps(events=True))
            uri = await dst.incoming_uri()
            with QemuSource(tmp_path / "qemu", mem_mib=16, fill="random", seed=1) as src:
                src.set_capabilities(postcopy_ram=True)
                src.qmp("migrate", {"uri": uri})
                got = await dst.wait_status(*FINAL, timeout=60)
                with pytest.raises(QemuMigrationError, match="failed"):
                    await asyncio.to_thread(src.wait_migration, 60)
            assert got["status"] == "failed", got
            desc = got["error-desc"]
            assert "advised postcopy (postcopy-ram), which is off here" in desc, desc
            assert "\n" not in desc
            assert statuses(dst.events()) == ["setup", "active", "failed"]
            assert (await dst.x("query-status"))["status"] == "inmigrate"
            await dst.x("migrate-set-capabilities", caps(postcopy_ram=True))  # unlocked again
    asyncio.run(main())


@pytest.mark.qemu
@qemu
def test_source_lost_during_postcopy_pauses_the_destination(tmp_path: Path) -> None:
    """The source dies while serve is postcopy-active (pages owed, vCPUs waiting on them):
    serve pauses (postcopy-paused, as QEMU's destination), not stuck in active and not
    "completed"; a guest whose source is gone for good can be given up with migrate-cancel,
    after which the process takes a new migrate-incoming."""
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer", "--vcpus", "2") as dst:
            await dst.x("migrate-set-capabilities", caps(postcopy_ram=True, events=True))
            uri = await dst.incoming_uri()
            _, desc = await dst.error("migrate-recover", {"uri": "tcp:127.0.0.1:0"})
            assert desc == "Migrate recover can only be run when postcopy is paused.", desc
            with QemuSource(tmp_path / "qemu", mem_mib=64, fill="random", seed=3) as src:
                # 1 MiB/s after the switch: the 60 MiB still owed take a minute
                await asyncio.to_thread(src.start_postcopy, uri, 4 * MiB, 60, 1 * MiB)
                await dst.wait_status("postcopy-active", timeout=60)
                assert src.pid is not None
                os.kill(src.pid, signal.SIGKILL)
                t0 = time.monotonic()
                await dst.wait_status("postcopy-paused", timeout=90)
            assert time.monotonic() - t0 < 60  # the lost peer is seen, not waited out
            assert statuses(dst.events()) == ["setup", "active", "postcopy-active", "postcopy-paused"]
            await dst.x("migrate-cancel")  # nobody will resume it: give the guest up
            got = await dst.wait_status(*FINAL, timeout=30)
            assert got["status"] == "cancelled", got
            assert (await dst.x("query-status"))["status"] == "inmigrate"
            await dst.x("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            assert (await dst.x("query-migrate"))["status"] == "setup"
            await dst.x("migrate-cancel")
            assert (await dst.wait_status(*FINAL))["status"] == "cancelled"
    asyncio.run(main())


@pytest.mark.qemu
@qemu
def test_postcopy_recovered_with_migrate_recover(tmp_path: Path) -> None:
    """QEMU's postcopy recovery through serve: the link fails mid-postcopy (a proxy resets
    it), serve pauses; ``migrate-recover`` listens anew, QEMU's ``migrate`` with ``resume``
    connects there, and the migration completes with the source's RAM."""
    from tests.support.proxy import CuttableProxy

    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer", "--vcpus", "1") as dst:
            await dst.x("migrate-set-capabilities", caps(postcopy_ram=True, events=True))
            uri = await dst.incoming_uri()
            host, port = uri.removeprefix("tcp:").rsplit(":", 1)
            proxy = CuttableProxy((host, int(port)))
            try:
                with QemuSource(tmp_path / "qemu", mem_mib=64, fill="mixed", seed=4) as src:
                    await asyncio.to_thread(src.start_postcopy, proxy.uri, 4 * MiB, 60, 2 * MiB)
                    await dst.wait_status("postcopy-active", timeout=60)
                    await asyncio.sleep(1)
                    proxy.cut()
                    await dst.wait_status("postcopy-paused", timeout=60)
                    await dst.x("migrate-recover", {"uri": "tcp:127.0.0.1:0"})
                    first = (await dst.x("query-migrate"))["socket-address"][0]
                    # again (a corrected URI): the first listener goes, as in QEMU 7.2
                    await dst.x("migrate-recover", {"uri": "tcp:127.0.0.1:0"})
                    addr = (await dst.x("query-migrate"))["socket-address"][0]
                    assert addr["port"] != first["port"]
                    import socket
                    with pytest.raises(ConnectionRefusedError):
                        socket.create_connection((first["host"], int(first["port"])), timeout=5).close()
                    deadline = time.monotonic() + 60
                    while src.query_migrate()["status"] != "postcopy-paused":
                        assert time.monotonic() < deadline, src.query_migrate()
                        await asyncio.sleep(0.05)
                    src.set_parameters(max_postcopy_bandwidth=0)
                    src.qmp("migrate", {"uri": f"tcp:{addr['host']}:{addr['port']}", "resume": True})
                    info = await asyncio.to_thread(src.wait_migration, 120)
                    got = await dst.wait_status(*FINAL, timeout=60)
                    expected = hashlib.sha256(src.image_path.read_bytes()).hexdigest()
            finally:
                proxy.close()
            assert info["status"] == "completed" and got["status"] == "completed", got
            assert statuses(dst.events()) == ["setup", "active", "postcopy-active", "postcopy-paused",
                                              "postcopy-recover", "postcopy-active", "completed"]
            guest = await dst.x("x-mignet-query-guest")
            assert {b["name"]: b for b in guest["blocks"]}["m0"]["sha256"] == expected
    asyncio.run(main())
