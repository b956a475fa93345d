"""Multifd driven over QMP, as management software drives QEMU: the ``multifd`` capability
and ``multifd-channels`` on ``mignet serve`` (real processes, real QMP over a real socket,
real TCP channels), QEMU 7.2's own multifd source into ``serve --incoming defer``, and the
refusals for what mignet cannot do with multifd."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mignet.guest.directory import block_filename
from tests.support.qemu_peer import QemuSource, qemu_skip_reason
from tests.support.qmp_serve import FINAL, Serve, migrate_completes, serve

MiB = 1 << 20


async def _multifd(side: Serve, channels: int) -> None:
    await side.x("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True},
                                                               {"capability": "events", "state": True}]})
    await side.x("migrate-set-parameters", {"multifd-channels": channels})


@pytest.mark.parametrize("dirty_rate", ["0", "24MiB/s"], ids=["paused", "live"])
def test_multifd_between_two_serve_processes(tmp_path: Path, dirty_rate: str) -> None:
    """Three channels; with a running guest the dirty pages of each round go over the
    channels too, and both sides end with the same RAM."""
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst, \
                serve(tmp_path, "src", "--size", "64M", "--fill", "mixed", "--seed", "3",
                      "--dirty-rate", dirty_rate) as src:
            await _multifd(dst, 3)
            uri = await dst.incoming_uri()
            await _multifd(src, 3)
            await src.x("migrate-set-parameters", {"max-bandwidth": 96 * MiB})
            done, got = await migrate_completes(src, dst, uri, timeout=120, dst_timeout=30)
            sent_ram, got_ram = done["ram"], got["ram"]
            # the data pages went over the channels, on both sides' counters
            assert sent_ram["multifd-bytes"] >= sent_ram["normal-bytes"] > 0
            assert got_ram["multifd-bytes"] >= sent_ram["normal-bytes"] // 2
            assert got_ram["normal"] + got_ram["duplicate"] >= 64 * MiB // 4096
            # per-channel figures, mignet's own command: every channel carried pages, and
            # both ends count the same pages on the same channel
            sent_ch = (await src.x("x-mignet-query-multifd"))["outgoing"]
            got_ch = (await dst.x("x-mignet-query-multifd"))["incoming"]
            assert sent_ch["channels"] == got_ch["channels"] == 3
            assert sent_ch["pages"] == got_ch["pages"] and all(n > 0 for n in sent_ch["pages"].values())
            assert (await src.x("x-mignet-query-multifd"))["incoming"] is None
            if dirty_rate != "0":
                assert done["ram"]["dirty-sync-count"] >= 2  # live rounds happened
    asyncio.run(main())


def test_multifd_refusals_are_answered_at_once_and_leave_options_unlocked(tmp_path: Path) -> None:
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst, \
                serve(tmp_path, "src", "--size", "4M") as src:
            await _multifd(src, 2)
            await src.x("migrate-set-parameters", {"multifd-compression": "zlib"})
            cls, desc = await src.error("migrate", {"uri": "tcp:127.0.0.1:1"})
            assert cls == "GenericError" and "multifd-compression 'zlib' is not supported" in desc
            await src.x("migrate-set-parameters", {"multifd-compression": "none"})  # not locked
            await _multifd(dst, 2)
            cls, desc = await dst.error("migrate-incoming", {"uri": "rdma:127.0.0.1:0"})
            assert cls == "GenericError" and "multifd is not supported on rdma: URIs" in desc
            await dst.x("migrate-set-parameters", {"multifd-channels": 4})  # not locked
    asyncio.run(main())


def test_cancel_while_waiting_for_a_multifd_source(tmp_path: Path) -> None:
    """A destination listening for a multifd source that never comes cancels promptly."""
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst:
            await _multifd(dst, 2)
            await dst.incoming_uri()
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            await dst.x("migrate-cancel")
            info = await dst.wait_status(*FINAL, timeout=10)
            assert info["status"] == "cancelled", info
            assert time.monotonic() - t0 < 3
    asyncio.run(main())


qemu = pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")


@pytest.mark.qemu
@qemu
def test_real_qemu_multifd_into_serve_incoming_defer(tmp_path: Path) -> None:
    """QEMU 7.2 (multifd, 2 channels) → ``mignet serve --incoming defer --out DIR`` with the
    capability set over QMP: byte-identical, and every channel carried pages."""
    out = tmp_path / "received"

    async def main() -> dict[str, Any]:
        async with serve(tmp_path, "dst", "--incoming", "defer", "--out", str(out)) as dst:
            await _multifd(dst, 2)
            uri = await dst.incoming_uri()
            with QemuSource(tmp_path, mem_mib=128, fill="random", seed=5) as src:
                info = await asyncio.to_thread(src.migrate, uri, None, 180, {"multifd": True},
                                               {"multifd_channels": 2})
                assert info["status"] == "completed", info
                got = await dst.wait_status(*FINAL, timeout=60)
                assert got["status"] == "completed", got
                assert np.array_equal(np.fromfile(out / block_filename("m0"), np.uint8),
                                      np.fromfile(src.image_path, np.uint8))
                return dict(got)
    got = asyncio.run(main())
    assert got["ram"]["multifd-bytes"] >= 128 * MiB
