"""QMP ``migrate`` / ``migrate-incoming`` with ``rdma:`` URIs between two ``mignet serve``
processes, driven by qemu.qmp, with the source's ``rdma-pin-all`` capability."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mignet.guest.ram import GuestRam
from tests.support.qmp_serve import FINAL, serve, statuses

pytestmark = pytest.mark.rdma
MiB = 1 << 20


def test_qmp_migration_over_rdma_with_pin_all(tmp_path: Path, rdma_uri: str) -> None:
    async def main() -> None:
        async with serve(tmp_path, "dst", "--incoming", "defer") as dst, \
                serve(tmp_path, "src", "--size", "32M", "--fill", "mixed", "--seed", "5") as src:
            events = {"capabilities": [{"capability": "events", "state": True}]}
            await dst.x("migrate-set-capabilities", events)
            await dst.x("migrate-incoming", {"uri": rdma_uri})
            await src.x("migrate-set-capabilities",
                        {"capabilities": [{"capability": "rdma-pin-all", "state": True}]})
            await src.x("migrate", {"uri": rdma_uri})
            done = await src.wait_status(*FINAL, timeout=180)
            assert done["status"] == "completed", done
            got = await dst.wait_status(*FINAL, timeout=60)
            assert got["status"] == "completed", got
            assert statuses(dst.events()) == ["setup", "active", "completed"]
            a, b = await src.x("x-mignet-query-guest"), await dst.x("x-mignet-query-guest")
            assert a["ram-sha256"] == b["ram-sha256"] == GuestRam.generate(32 * MiB, "mixed", seed=5).digest()
            # The destination counts the pages RDMA wrote into its RAM, though none crossed
            # its stream: every data page once (a paused guest, one pass, zero pages skipped).
            assert got["ram"]["normal"] == done["ram"]["normal"] > 0
            # both ends say which RDMA protocol ran (an x- member: QEMU's reply has none)
            for end in (done, got):
                assert end["x-mignet-rdma"]["protocol"] == "mignet", end
                assert end["x-mignet-rdma"]["pin-all"] is True, end
            # The option lock is released once the migration is over.
            await src.x("migrate-set-capabilities",
                        {"capabilities": [{"capability": "rdma-pin-all", "state": False}]})
    asyncio.run(main())
