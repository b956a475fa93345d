"""``mignet serve`` as a postcopy *source*, driven over QMP as management drives QEMU 7.2's:
``postcopy-ram`` on, ``migrate`` runs precopy rounds and never switches by itself;
``migrate-start-postcopy`` switches at the next round; ``max-postcopy-bandwidth`` changes
apply to the running migration; query-migrate and MIGRATION events show
active -> postcopy-active -> completed, with ``ram.postcopy-requests`` and
``postcopy-bytes`` from the source's own counters.

Real processes throughout: two ``mignet serve`` processes (or serve and ``mignet recv``),
QMP over real UNIX sockets, TCP for the stream; nothing is mocked."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import start_recv
from tests.support.qemu_peer import QemuSource, qemu_skip_reason
from tests.support.qmp_serve import FINAL, Serve, serve, statuses

MiB = 1 << 20
NOT_ENABLED = "Enable postcopy with migrate_set_capability before the start of migration"
NOT_STARTED = "Postcopy must be started after migration has been started"


def caps(**on: bool) -> dict[str, Any]:
    return {"capabilities": [{"capability": k.replace("_", "-"), "state": v} for k, v in on.items()]}


async def rounds_pass(src: Serve, syncs: int, timeout: float = 120) -> dict[str, Any]:
    """Wait until the source has done ``syncs`` dirty syncs, still in precopy: proof that it
    does not switch by itself while precopy does not converge."""
    deadline = time.monotonic() + timeout
    while True:
        info = await src.x("query-migrate")
        assert info["status"] in ("setup", "active"), info
        if info.get("ram", {}).get("dirty-sync-count", 0) >= syncs:
            return info
        assert time.monotonic() < deadline, info
        await asyncio.sleep(0.05)


async def watch(src: Serve, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Poll the source to its end; keep every answer taken in postcopy-active."""
    while True:
        info = await src.x("query-migrate")
        if info.get("status") == "postcopy-active":
            seen.append(info)
        if info.get("status") in FINAL:
            return info
        await asyncio.sleep(0.02)


# --- serve -> serve ---------------------------------------------------------------------------
@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
def test_serve_to_serve_postcopy_on_migrate_start_postcopy(tmp_path: Path, preempt: bool) -> None:
    """A guest dirtying 64 MiB/s over a 16 MiB/s link never converges: precopy goes on, round
    after round, until ``migrate-start-postcopy``; then postcopy-active, the destination's
    vCPU faults ask for pages (counted alike at both ends), max-postcopy-bandwidth is raised
    while the owed pages stream, and the destination ends with the source's frozen RAM."""
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer", "--vcpus", "1") as dst, \
                serve(tmp_path, "src", "--size", "64M", "--fill", "mixed", "--seed", "7",
                      "--dirty-rate", "64MiB/s") as src:
            both = caps(postcopy_ram=True, events=True, postcopy_preempt=preempt)
            await dst.x("migrate-set-capabilities", both)
            uri = await dst.incoming_uri()
            await src.x("migrate-set-capabilities", both)
            await src.x("migrate-set-parameters", {"max-bandwidth": 16 * MiB, "downtime-limit": 100,
                                                   "max-postcopy-bandwidth": 2 * MiB})
            await src.x("migrate", {"uri": uri})
            await rounds_pass(src, 3)  # no switch without the command
            await src.x("migrate-start-postcopy")
            seen: list[dict[str, Any]] = []
            poller = asyncio.create_task(watch(src, seen))
            await src.wait_status("postcopy-active", *FINAL, timeout=120)
            await src.x("migrate-set-parameters", {"max-postcopy-bandwidth": 0})  # unlimited now
            info = await asyncio.wait_for(poller, 240)
            got = await dst.wait_status(*FINAL, timeout=120)
            assert info["status"] == "completed", info
            assert got["status"] == "completed", got
            assert statuses(src.events()) == ["setup", "active", "postcopy-active", "completed"]
            assert statuses(dst.events()) == ["setup", "active", "postcopy-active", "completed"]
            assert (await src.x("query-migrate-parameters"))["max-postcopy-bandwidth"] == 0
            # the source's own figures: bytes after the switch, requests it served
            ram = info["ram"]
            assert ram["postcopy-bytes"] > 0 and ram["downtime-bytes"] == 0
            assert ram["dirty-sync-count"] >= 4
            assert ram["postcopy-requests"] == got["ram"]["postcopy-requests"] > 0, (ram, got["ram"])
            for during in seen:
                assert during["ram"]["postcopy-requests"] >= 0
            assert isinstance(info["downtime"], int) and info["downtime"] >= 0
            # the guest left: stopped here after the switch, running there
            assert (await src.x("query-status"))["status"] == "postmigrate"
            assert (await dst.x("query-status"))["status"] == "running"
            a, b = await src.x("x-mignet-query-guest"), await dst.x("x-mignet-query-guest")
            assert a["ram-sha256"] == b["ram-sha256"]
            # options are unlocked again
            await src.x("migrate-set-capabilities", caps(postcopy_ram=False, postcopy_preempt=False))
    asyncio.run(main())


def test_raised_max_postcopy_bandwidth_applies_to_the_running_stream(tmp_path: Path) -> None:
    """No vCPUs on the destination, so nothing is requested: every owed page comes by the
    background stream, held to 256 KiB/s (minutes for what is owed) until
    max-postcopy-bandwidth is raised; then the rest goes at once."""
    slow = 256 << 10

    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer", "--vcpus", "0") as dst, \
                serve(tmp_path, "src", "--size", "32M", "--seed", "9", "--dirty-rate", "64MiB/s") as src:
            await dst.x("migrate-set-capabilities", caps(postcopy_ram=True))
            uri = await dst.incoming_uri()
            await src.x("migrate-set-capabilities", caps(postcopy_ram=True))
            await src.x("migrate-set-parameters", {"max-bandwidth": 16 * MiB, "downtime-limit": 50,
                                                   "max-postcopy-bandwidth": slow})
            await src.x("migrate", {"uri": uri})
            await src.x("migrate-start-postcopy")  # before the first sync: switch at it
            during = await src.wait_status("postcopy-active", timeout=120)
            await asyncio.sleep(1)
            during = await src.x("query-migrate")
            assert during["status"] == "postcopy-active", during
            owed = during["ram"]["remaining"]
            assert owed >= 4 * MiB, during  # at 256 KiB/s: 16 s and more
            t0 = time.monotonic()
            await src.x("migrate-set-parameters", {"max-postcopy-bandwidth": 0})
            info = await src.wait_status(*FINAL, timeout=owed / slow)
            elapsed = time.monotonic() - t0
            assert info["status"] == "completed", info
            assert elapsed < owed / slow / 2, (elapsed, owed)  # the old limit would need twice that
            assert info["ram"]["postcopy-requests"] == 0 and info["ram"]["postcopy-bytes"] >= owed
            got = await dst.wait_status(*FINAL, timeout=60)
            assert got["status"] == "completed" and got["ram"]["postcopy-requests"] == 0, got
            a, b = await src.x("x-mignet-query-guest"), await dst.x("x-mignet-query-guest")
            assert a["ram-sha256"] == b["ram-sha256"]
    asyncio.run(main())


# --- serve -> mignet recv -----------------------------------------------------------------------
def test_serve_postcopy_preempt_into_mignet_recv(tmp_path: Path, mignet_cmd: list[str],
                                                 subprocess_env: dict[str, str]) -> None:
    """serve's source with postcopy-preempt into ``mignet recv --postcopy --postcopy-preempt``:
    the second connection opens after the main one, the requested pages come on it, and
    the receiver ends with the source's frozen RAM."""
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--postcopy", "--postcopy-preempt",
                           "--vcpus", "1", "--digest", "sha256")

    async def main() -> None:
        async with serve(tmp_path, "src", "--size", "64M", "--fill", "mixed", "--seed", "11",
                         "--dirty-rate", "64MiB/s") as src:
            await src.x("migrate-set-capabilities", caps(postcopy_ram=True, postcopy_preempt=True))
            await src.x("migrate-set-parameters", {"max-bandwidth": 16 * MiB,
                                                   "max-postcopy-bandwidth": 4 * MiB})
            await src.x("migrate", {"uri": uri})
            await rounds_pass(src, 2)
            await src.x("migrate-start-postcopy")
            info = await src.wait_status(*FINAL, timeout=240)
            assert info["status"] == "completed", info
            stdout, stderr = await asyncio.to_thread(recv.communicate, timeout=120)
            assert recv.returncode == 0, stderr
            got = json.loads(stdout.strip().splitlines()[-1])
            assert got["ram_digest"] == (await src.x("x-mignet-query-guest"))["ram-sha256"]
            pc = got["stats"]["postcopy"]
            assert pc["discarded-pages"] > 0 and pc["requests"] == info["ram"]["postcopy-requests"]
            assert pc["faults"] > 0 and pc["preempt-pages"] > 0
            assert info["ram"]["postcopy-bytes"] > 0
    asyncio.run(main())


def test_destination_lost_after_the_switch_fails_with_the_guest_stopped(
        tmp_path: Path, mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    """The destination dies in postcopy-active: the source ends "failed" with a one-line
    reason (QEMU 7.2 would pause, awaiting a recovery mignet's source does not offer), and
    its guest stays stopped (runstate postmigrate, not running again): after the switch it
    may be running on the destination. The options are unlocked again."""
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--postcopy", "--vcpus", "0")

    async def main() -> None:
        async with serve(tmp_path, "src", "--size", "32M", "--seed", "13",
                         "--dirty-rate", "64MiB/s") as src:
            await src.x("migrate-set-capabilities", caps(postcopy_ram=True, events=True))
            await src.x("migrate-set-parameters", {"max-bandwidth": 16 * MiB,
                                                   "max-postcopy-bandwidth": 64 << 10})
            await src.x("migrate", {"uri": uri})
            await src.x("migrate-start-postcopy")
            await src.wait_status("postcopy-active", timeout=120)
            assert (await src.x("query-status"))["status"] == "finish-migrate"
            recv.kill()
            await asyncio.to_thread(recv.wait, 30)
            info = await src.wait_status(*FINAL, timeout=120)
            assert info["status"] == "failed", info
            assert info["error-desc"] and "\n" not in info["error-desc"], info
            assert statuses(src.events()) == ["setup", "active", "postcopy-active", "failed"]
            assert (await src.x("query-status"))["status"] == "postmigrate"
            before = await src.x("x-mignet-query-guest")
            await asyncio.sleep(0.5)  # a running workload writes 32 MiB in that time
            assert (await src.x("x-mignet-query-guest"))["ram-sha256"] == before["ram-sha256"]
            await src.x("migrate-set-capabilities", caps(postcopy_ram=False))
    asyncio.run(main())


# --- what migrate-start-postcopy answers ----------------------------------------------------
def test_migrate_start_postcopy_errors_as_qemu(tmp_path: Path) -> None:
    """QEMU 7.2's checks, in its order and words: the capability first, then a migration
    that has started; once one has, even ended, the command is accepted (QEMU: refusing
    would race with the end). What mignet's postcopy source cannot do is refused at
    ``migrate``, with the options unlocked after it."""
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst, \
                serve(tmp_path, "src", "--size", "4M") as src:
            assert (await src.error("migrate-start-postcopy")) == ("GenericError", NOT_ENABLED)
            await src.x("migrate-set-capabilities", caps(postcopy_ram=True))
            assert (await src.error("migrate-start-postcopy")) == ("GenericError", NOT_STARTED)
            _, desc = await src.error("migrate-start-postcopy", {"now": True})
            assert desc == "Parameter 'now' is unexpected"
            await src.x("migrate-set-capabilities", caps(multifd=True))
            _, desc = await src.error("migrate", {"uri": "tcp:127.0.0.1:1"})
            assert "postcopy-ram with multifd is not supported" in desc, desc
            await src.x("migrate-set-capabilities", caps(multifd=False))
            _, desc = await src.error("migrate", {"uri": "rdma:127.0.0.1:1"})
            assert "postcopy-ram is not supported on rdma: URIs" in desc, desc
            # a destination has no outgoing migration: "not started", as QEMU's
            await dst.x("migrate-set-capabilities", caps(postcopy_ram=True))
            uri = await dst.incoming_uri()
            assert (await dst.error("migrate-start-postcopy")) == ("GenericError", NOT_STARTED)
            # an idle guest converges in its first round: precopy's end, as QEMU's
            await src.x("migrate", {"uri": uri})
            assert (await src.wait_status(*FINAL, timeout=60))["status"] == "completed"
            assert (await dst.wait_status(*FINAL, timeout=60))["status"] == "completed"
            assert (await src.x("migrate-start-postcopy")) == {}  # ended: accepted, no effect
            await src.x("migrate-set-capabilities", caps(postcopy_ram=False))
            assert (await src.error("migrate-start-postcopy")) == ("GenericError", NOT_ENABLED)
    asyncio.run(main())


@pytest.mark.qemu
@pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")
def test_real_qemu_answers_migrate_start_postcopy_alike(tmp_path: Path) -> None:
    """The messages above are QEMU 7.2's own: asked of a real QEMU, the same answers."""
    from qemu.qmp import ExecuteError

    with QemuSource(tmp_path / "qemu", mem_mib=16, fill="zero") as vm:
        with pytest.raises(ExecuteError) as info:
            vm.qmp("migrate-start-postcopy")
        assert info.value.error.error.desc == NOT_ENABLED
        vm.set_capabilities(postcopy_ram=True)
        with pytest.raises(ExecuteError) as info:
            vm.qmp("migrate-start-postcopy")
        assert info.value.error.error.desc == NOT_STARTED
