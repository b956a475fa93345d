"""A live precopy migration over RDMA: vCPU threads keep writing while rounds of dirty pages
are RDMA-written; the destination must equal the frozen source bit for bit."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam
from mignet.migration.loadvm import Loader, start_load_thread
from mignet.migration.savevm import Sender
from mignet.transport import connect, listen

pytestmark = pytest.mark.rdma
MiB = 1 << 20


def test_live_rounds_over_rdma_destination_equals_frozen_source(rdma_uri: str) -> None:
    precopy_mod = pytest.importorskip("mignet.migration.precopy")
    from mignet.guest.workload import Workload
    from mignet.migration.dirty import page_aligned

    ram = page_aligned(GuestRam.generate(16 * MiB, "mixed", seed=21))
    listener = listen(rdma_uri)
    accepted: dict[str, Any] = {}
    t = threading.Thread(target=lambda: accepted.update(ch=listener.accept(timeout=30)))
    t.start()
    channel = connect(rdma_uri)
    t.join(30)
    listener.close()
    load = start_load_thread(Loader(accepted["ch"], devices=DeviceSet.empty()))
    workload = Workload(ram, 1 * MiB, seed=21)
    # TCG is slow: a generous downtime limit, so the rounds converge; correctness is the point
    params = precopy_mod.PrecopyParams(max_bandwidth=0, downtime_limit_ms=5000)
    precopy = precopy_mod.Precopy(Sender(channel, ram, DeviceSet.example(21)), workload, params,
                                  destination_loaded=lambda: load.join(60).stats.switchover_at)
    info = precopy.run()
    assert info["status"] == "completed", info
    dst = load.join(60).ram
    assert np.array_equal(dst["pc.ram"].data, ram["pc.ram"].data)
    assert workload.stats.pages_written > 0
    channel.close()
    accepted["ch"].close()
