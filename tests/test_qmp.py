"""QMP end to end: ``mignet serve`` processes driven by QEMU's own client library (qemu.qmp),
over real UNIX sockets, with real migrations between them (and from a real QEMU 7.2)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import stat
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.qemu_peer import QemuSource, qemu_skip_reason
from tests.support.qmp_serve import FINAL, serve, statuses

MiB = 1 << 20


# --- a full migration ---------------------------------------------------------------------
def test_full_migration_between_two_mignet_processes_over_qmp_only(tmp_path: Path) -> None:
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst, \
                serve(tmp_path, "src", "--size", "128M", "--fill", "mixed", "--seed", "4") as src:
            assert (await dst.x("query-status"))["status"] == "inmigrate"
            assert await dst.x("query-migrate") == {}
            await dst.x("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
            uri = await dst.incoming_uri()
            await src.x("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
            await src.x("migrate-set-parameters", {"max-bandwidth": 0})
            await src.x("migrate", {"uri": uri})
            # Poll the destination while it loads at full speed: answers must come promptly.
            latencies, seen = [], set()
            while True:
                t0 = time.perf_counter()
                info = await dst.x("query-migrate")
                latencies.append(time.perf_counter() - t0)
                seen.add(info["status"])
                if info["status"] in FINAL:
                    break
                await asyncio.sleep(0.005)
            assert info["status"] == "completed", info
            assert "active" in seen
            done = await src.wait_status(*FINAL)
            assert done["status"] == "completed"
            for key in ("total-time", "setup-time", "downtime"):
                assert isinstance(done[key], int)
            ram = done["ram"]
            assert ram["total"] == 128 * MiB and ram["remaining"] == 0
            assert ram["normal"] + ram["duplicate"] == 128 * MiB // 4096
            assert ram["normal-bytes"] == ram["normal"] * 4096 and ram["transferred"] > ram["normal-bytes"]
            assert ram["mbps"] > 0 and ram["dirty-sync-count"] >= 1  # QEMU reports 2-3 for a paused guest
            got, sent = await dst.x("x-mignet-query-guest"), await src.x("x-mignet-query-guest")
            assert got["ram-sha256"] == sent["ram-sha256"] and got["devices"] == sent["devices"] == 4
            assert (await src.x("query-status"))["status"] == "postmigrate"
            assert (await dst.x("query-status"))["status"] == "running"
            await asyncio.sleep(0.05)
            assert statuses(dst.events()) == ["setup", "active", "completed"]
            src_events: list[Any] = src.client.events.clear()
            names = [e["event"] if e["event"] != "MIGRATION" else e["data"]["status"] for e in src_events]
            # One MIGRATION_PASS per dirty-bitmap sync, as QEMU: a paused guest needs 1-2.
            assert names[:3] == ["setup", "active", "MIGRATION_PASS"] and names[-1] == "completed"
            assert set(names[3:-1]) <= {"MIGRATION_PASS"}
            passes = [e["data"]["pass"] for e in src_events if e["event"] == "MIGRATION_PASS"]
            assert passes == list(range(1, len(passes) + 1))
            stamps = [e["timestamp"] for e in src_events]
            assert all(set(s) == {"seconds", "microseconds"} for s in stamps)
            assert [(s["seconds"], s["microseconds"]) for s in stamps] == sorted(
                (s["seconds"], s["microseconds"]) for s in stamps)
            # The option lock is released on both sides once the migration is over.
            await src.x("migrate-set-parameters", {"multifd-channels": 4})
            await dst.x("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
            lat_ms = sorted(x * 1000 for x in latencies)
            print(f"\nquery-migrate during a full-speed 128 MiB load: {len(lat_ms)} polls, "
                  f"median {statistics.median(lat_ms):.2f} ms, max {lat_ms[-1]:.2f} ms")
            assert statistics.median(lat_ms) < 50 and lat_ms[-1] < 500
    asyncio.run(main())


# --- the option lock and an allowlisted change ----------------------------------------------
def test_options_locked_on_both_sides_while_max_bandwidth_change_takes_effect(tmp_path: Path) -> None:
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst, \
                serve(tmp_path, "src", "--size", "96M", "--fill", "random") as src:
            uri = await dst.incoming_uri()
            # Incoming: locked from migrate-incoming on, before any byte arrived.
            cls, desc = await dst.error("migrate-set-capabilities",
                                        {"capabilities": [{"capability": "events", "state": True}]})
            assert cls == "GenericError" and "migration process in progress (incoming)" in desc
            await src.x("migrate-set-parameters", {"max-bandwidth": 16 * MiB})
            await src.x("migrate", {"uri": uri})
            await src.wait_status("active")
            await dst.wait_status("active")
            for side in (src, dst):
                cls, desc = await side.error("migrate-set-parameters", {"multifd-channels": 4})
                assert cls == "GenericError" and "multifd-channels cannot change" in desc
                cls, desc = await side.error("migrate-set-capabilities",
                                             {"capabilities": [{"capability": "events", "state": True}]})
                assert "capabilities cannot change" in desc
                # All or nothing: the allowlisted half of a refused request is not applied.
                await side.error("migrate-set-parameters", {"downtime-limit": 999, "compress-level": 3})
                assert (await side.x("query-migrate-parameters"))["downtime-limit"] == 300
                await side.x("migrate-set-parameters", {"downtime-limit": 500})  # allowlisted
                assert (await side.x("query-migrate-parameters"))["downtime-limit"] == 500
            cls, desc = await src.error("migrate", {"uri": uri})
            assert desc == "There's a migration process in progress"

            async def rate(seconds: float) -> float:
                a = (await src.x("query-migrate"))["ram"]["transferred"]
                t0 = time.monotonic()
                await asyncio.sleep(seconds)
                b = (await src.x("query-migrate"))["ram"]["transferred"]
                return (b - a) / (time.monotonic() - t0)
            slow = await rate(1.0)
            await src.x("migrate-set-parameters", {"max-bandwidth": 64 * MiB})
            await asyncio.sleep(0.15)
            fast = await rate(0.5)
            print(f"\nmax-bandwidth 16 MiB/s -> {slow / MiB:.1f} MiB/s; "
                  f"raised to 64 MiB/s mid-migration -> {fast / MiB:.1f} MiB/s")
            assert 11 * MiB < slow < 21 * MiB
            assert fast > 2.5 * slow
            assert (await src.x("query-migrate"))["status"] == "active"
            await src.x("migrate-set-parameters", {"max-bandwidth": 0})
            assert (await src.wait_status(*FINAL))["status"] == "completed"
            assert (await dst.wait_status(*FINAL))["status"] == "completed"
            for side in (src, dst):
                await side.x("migrate-set-parameters", {"multifd-channels": 4})
    asyncio.run(main())


# --- cancel -----------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["source", "destination"])
def test_migrate_cancel(tmp_path: Path, side: str) -> None:
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst, \
                serve(tmp_path, "src", "--size", "64M", "--fill", "random") as src:
            for s in (src, dst):  # QEMU sends MIGRATION events only with this capability
                await s.x("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
            uri = await dst.incoming_uri()
            await src.x("migrate-set-parameters", {"max-bandwidth": 8 * MiB})
            await src.x("migrate", {"uri": uri})
            await src.wait_status("active")
            await dst.wait_status("active")
            canceller, other = (src, dst) if side == "source" else (dst, src)
            await canceller.x("migrate-cancel")
            assert (await canceller.wait_status(*FINAL))["status"] == "cancelled"
            failed = await other.wait_status(*FINAL)
            assert failed["status"] == "failed" and failed["error-desc"]
            await asyncio.sleep(0.05)
            assert statuses(canceller.events()) == ["setup", "active", "cancelling", "cancelled"]
            assert statuses(other.events()) == ["setup", "active", "failed"]
            # The lock is gone on both sides; the source's guest runs on.
            for s in (src, dst):
                await s.x("migrate-set-parameters", {"multifd-channels": 3})
            assert (await src.x("query-status"))["status"] == "running"
            await src.x("migrate-cancel")  # nothing running: a no-op, as in QEMU
    asyncio.run(main())


# --- errors -----------------------------------------------------------------------------------
def test_bad_input_gets_qemus_error_classes(tmp_path: Path) -> None:
    async def main() -> None:
        async with serve(tmp_path, "src", "--size", "4M", "--fill", "zero") as src:
            cases: list[tuple[str, dict[str, Any] | None, str, str]] = [
                ("no-such-command", None, "CommandNotFound", "The command no-such-command has not been found"),
                ("migrate", {}, "GenericError", "Parameter 'uri' is missing"),
                ("migrate", {"uri": 5}, "GenericError", "Invalid parameter type for 'uri', expected: string"),
                ("migrate", {"uri": "tcp:x:1", "bogus": 1}, "GenericError", "Parameter 'bogus' is unexpected"),
                ("migrate", {"uri": "ftp:somewhere"}, "GenericError", "unsupported migration URI scheme"),
                ("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}, "GenericError",
                 "'-incoming' was not specified on the command line"),
                ("migrate-set-parameters", {"no-such": 1}, "GenericError", "Parameter 'no-such' is unexpected"),
                ("migrate-set-parameters", {"downtime-limit": "fast"}, "GenericError",
                 "Invalid parameter type for 'downtime-limit', expected: integer"),
                ("migrate-set-parameters", {"downtime-limit": 3_000_000}, "GenericError",
                 "Parameter 'downtime-limit' expects an integer in the range of 0 to 2000 seconds"),
                ("migrate-set-parameters", {"multifd-channels": 0}, "GenericError",
                 "Parameter 'multifd-channels' expects a value between 1 and 255"),
                ("migrate-set-parameters", {"multifd-compression": "lz4"}, "GenericError",
                 "Parameter 'multifd-compression' does not accept value 'lz4'"),
                ("migrate-set-capabilities", {"capabilities": [{"capability": "warp", "state": True}]},
                 "GenericError", "Parameter 'capabilities[0].capability' does not accept value 'warp'"),
                ("migrate-set-capabilities", {"capabilities": [{"capability": "events"}]},
                 "GenericError", "Parameter 'capabilities[0].state' is missing"),
                ("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": True}]},
                 "GenericError", "Capability 'xbzrle' is not supported by mignet"),
                ("migrate", {"uri": "tcp:127.0.0.1:1", "config": {"parameters": {"multifd-channels": 999}}},
                 "GenericError", "Parameter 'multifd-channels' expects uint8_t"),
                ("qmp_capabilities", None, "CommandNotFound",
                 "Capabilities negotiation is already complete, command ignored"),
            ]
            for cmd, args, cls, desc in cases:
                got = await src.error(cmd, args)
                assert got[0] == cls and desc in got[1], (cmd, args, got)
            # Refused requests changed nothing.
            params = await src.x("query-migrate-parameters")
            assert params["downtime-limit"] == 300 and params["max-bandwidth"] == 134217728
            assert params["multifd-channels"] == 2 and params["multifd-compression"] == "none"
            caps = {c["capability"]: c["state"] for c in await src.x("query-migrate-capabilities")}
            assert len(caps) == 21 and not any(caps.values())
            # A refused connection is reported as a failed migration, with QEMU's shape.
            await src.x("migrate", {"uri": f"unix:{tmp_path}/nobody"})
            failed = await src.wait_status(*FINAL)
            assert failed["status"] == "failed" and "nothing is listening" in failed["error-desc"]
            # The atomic config of migrate is applied with the start, and stays.
            await src.x("migrate", {"uri": f"unix:{tmp_path}/nobody",
                                    "config": {"parameters": {"downtime-limit": 123},
                                               "capabilities": [{"capability": "events", "state": True}]}})
            await src.wait_status("failed")
            assert (await src.x("query-migrate-parameters"))["downtime-limit"] == 123
    asyncio.run(main())


def test_raw_protocol_greeting_negotiation_ids_and_socket_mode(tmp_path: Path) -> None:
    async def main() -> None:
        async with serve(tmp_path, "src", "--size", "4M", "--fill", "zero") as src:
            assert stat.S_IMODE(os.stat(src.path).st_mode) == 0o600
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(src.path))
            f = sock.makefile("rwb")

            def ask(raw: bytes) -> dict[str, Any]:
                f.write(raw)
                f.flush()
                return json.loads(f.readline())
            greeting = json.loads(f.readline())
            assert greeting["QMP"]["version"]["qemu"] == {"major": 7, "minor": 2, "micro": 0}
            assert greeting["QMP"]["capabilities"] == []
            early = ask(b'{"execute": "query-status", "id": 1}')
            assert early == {"error": {"class": "CommandNotFound",
                                       "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"},
                             "id": 1}
            assert ask(b'{"execute": "qmp_capabilities", "id": {"any": ["json"]}}') == {
                "return": {}, "id": {"any": ["json"]}}
            # Objects need no newline between them, and may arrive split.
            f.write(b'{"execute": "query-st')
            f.flush()
            assert ask(b'atus", "id": "a"}{"execute": "query-status", "id": "b"}')["id"] == "a"
            assert json.loads(f.readline())["id"] == "b"
            assert ask(b"[1, 2]\n")["error"]["desc"] == "QMP input must be a JSON object"
            assert ask(b'{"arguments": {}}')["error"]["desc"] == "QMP input lacks member 'execute'"
            assert ask(b'{"execute": "query-status", "arguments": []}')["error"]["class"] == "GenericError"
            assert "JSON parse error" in ask(b"{nope}")["error"]["desc"]
            assert "return" in ask(b'{"execute": "query-status"}')
            sock.close()
    asyncio.run(main())


# --- a real QEMU source ---------------------------------------------------------------------
@pytest.mark.qemu
@pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")
def test_real_qemu_source_into_mignet_destination_set_up_over_qmp(tmp_path: Path) -> None:
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst:
            await dst.x("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
            uri = await dst.incoming_uri()
            with QemuSource(tmp_path / "qemu", mem_mib=64, fill="mixed", seed=9) as qemu:
                info = await asyncio.to_thread(qemu.migrate, uri)
                assert info["status"] == "completed"
                expected = hashlib.sha256(qemu.image_path.read_bytes()).hexdigest()
            assert (await dst.wait_status(*FINAL))["status"] == "completed"
            guest = await dst.x("x-mignet-query-guest")
            blocks = {b["name"]: b for b in guest["blocks"]}
            assert blocks["m0"]["size"] == 64 * MiB and blocks["m0"]["sha256"] == expected
            assert "pc.bios" in blocks and guest["devices"] > 20
            assert statuses(dst.events()) == ["setup", "active", "completed"]
    asyncio.run(main())


def test_incoming_uri_on_the_command_line_listens_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", f"unix:{tmp_path}/mig.sock") as dst:
            info = await dst.x("query-migrate")
            assert info == {"status": "setup",
                            "socket-address": [{"type": "unix", "path": f"{tmp_path}/mig.sock"}]}
            _, desc = await dst.error("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            assert desc == "The incoming migration has already been started"
            _, desc = await dst.error("migrate", {"uri": "tcp:127.0.0.1:1"})
            assert desc == "Guest is waiting for an incoming migration"
            # No MIGRATION events: they need the events capability, and options are locked
            # while the incoming migration runs.
            _, desc = await dst.error("migrate-set-capabilities",
                                      {"capabilities": [{"capability": "events", "state": True}]})
            assert "migration process in progress" in desc, desc
            await dst.x("migrate-cancel")  # stops listening
            assert (await dst.wait_status(*FINAL))["status"] == "cancelled"
            assert dst.events() == []
    asyncio.run(main())


# --- live precopy over QMP ----------------------------------------------------------------------
def test_live_guest_migrates_in_rounds_over_qmp(tmp_path: Path) -> None:
    """A running source (vCPU threads writing 20 MiB/s) on a 40 MiB/s link: several passes,
    a measured dirty rate, then stop-and-copy; the destination equals the frozen source."""
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst, \
                serve(tmp_path, "src", "--size", "64M", "--dirty-rate", "20MiB/s") as src:
            uri = await dst.incoming_uri()
            await src.x("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
            await src.x("migrate-set-parameters", {"max-bandwidth": 40 * MiB, "downtime-limit": 300})
            await src.x("migrate", {"uri": uri})
            dirty_rates = []
            while True:
                info = await src.x("query-migrate")
                if info["status"] == "active":
                    dirty_rates.append(info["ram"]["dirty-pages-rate"])
                if info["status"] in FINAL:
                    break
                await asyncio.sleep(0.05)
            assert info["status"] == "completed", info
            assert info["ram"]["dirty-sync-count"] >= 3
            assert max(dirty_rates + [info["ram"]["dirty-pages-rate"]]) > 0
            assert info["downtime"] < 2000
            assert (await src.x("query-status"))["status"] == "postmigrate"
            passes = [e for e in src.client.events.clear() if e["event"] == "MIGRATION_PASS"]
            assert len(passes) >= 3
            await dst.wait_status(*FINAL)
            src_guest, dst_guest = await src.x("x-mignet-query-guest"), await dst.x("x-mignet-query-guest")
            assert src_guest["ram-sha256"] == dst_guest["ram-sha256"]
    asyncio.run(main())


def test_stop_before_incoming_keeps_the_guest_paused_until_cont(tmp_path: Path) -> None:
    """libvirt's order: ``stop`` on the destination before the load ends (autostart off),
    then ``cont`` once it completed; runstates as QEMU 7.2 reports them."""
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst, \
                serve(tmp_path, "src", "--size", "16M", "--seed", "5") as src:
            assert (await dst.x("query-status"))["status"] == "inmigrate"
            await dst.x("stop")
            assert (await dst.x("query-status"))["status"] == "inmigrate"
            uri = await dst.incoming_uri()
            await src.x("migrate", {"uri": uri})
            assert (await dst.wait_status(*FINAL))["status"] == "completed"
            assert (await src.wait_status(*FINAL))["status"] == "completed"
            status = await dst.x("query-status")
            assert (status["status"], status["running"]) == ("paused", False)
            await dst.x("cont")
            status = await dst.x("query-status")
            assert (status["status"], status["running"]) == ("running", True)
            await dst.x("stop")
            assert (await dst.x("query-status"))["status"] == "paused"
            # The source after its migration: postmigrate; cont resumes it there, as in QEMU.
            assert (await src.x("query-status"))["status"] == "postmigrate"
            await src.x("cont")
            assert (await src.x("query-status"))["status"] == "running"
    asyncio.run(main())
