"""``mignet bench tcp``: mignet's migration against a raw socket loop, side by side.

Each repetition runs both, alternating, over loopback on one connection, each receiver in
its own fresh process with fresh (never touched) memory:

* mignet: ``mignet recv`` (QEMU stream, pages placed straight into numpy) from a ``Sender``
  of a random guest;
* raw: ``sendall`` of the same bytes into a ``recv_into(numpy)`` loop, no framing at all.

Before each run the machine's free memory is warmed (see ``warm_free_memory``), the same way
for both, so the figure does not depend on how long the machine idled before the run.

The figure is the receiver's time from accepting the connection to holding every byte;
the ratio is median(mignet) / median(raw) throughput. Peak RSS of the mignet receiver is
checked against guest size + 150 MiB.
"""

from __future__ import annotations

import socket
import statistics
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from mignet.bench.receiver import receiver_result, recv_command, start_receiver
from mignet.errors import MisuseError
from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam, allocate_guest_memory
from mignet.migration.savevm import Sender
from mignet.transport import connect
from mignet.ui.terminal import console, stats_table
from mignet.units import human_bytes

RSS_SLACK = 150 << 20


@dataclass
class Run:
    kind: str
    seconds: float
    nbytes: int
    peak_rss: int

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9


def warm_free_memory(size: int) -> None:
    """Touch and free ``size`` bytes right before a receiver starts.

    On this VM, memory that the guest kernel has handed back to the host (a few seconds
    after it was freed) faults in at 0.3-0.4 GB/s instead of several GB/s, so without this a
    run's figure depends on how long the machine idled before it. Both receivers still fault
    in fresh pages of their own; only the host-level refill is taken out, for both alike."""
    mem = allocate_guest_memory(size)
    mem.view(np.uint64)[::512] = 1  # one write per 4 KiB page
    del mem


def run_mignet(ram: GuestRam, devices: DeviceSet) -> Run:
    warm_free_memory(ram.total + RSS_SLACK)
    proc, uri = start_receiver(recv_command())
    channel = connect(uri)
    Sender(channel, ram, devices).run()
    channel.close()
    done = receiver_result(proc)
    return Run("mignet", done["stats"]["seconds"], ram.total, done["peak_rss"])


def run_raw(ram: GuestRam) -> Run:
    data = next(iter(ram)).data
    warm_free_memory(ram.total + RSS_SLACK)
    proc, uri = start_receiver([sys.executable, "-m", "mignet.bench.raw_recv", "--size", str(data.size)])
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(data.data)
    done = receiver_result(proc)
    return Run("raw", done["seconds"], int(done["bytes"]), done["peak_rss"])


def bench_tcp(size: int, repeat: int) -> dict[str, Any]:
    if repeat < 1:  # a median of nothing
        raise MisuseError(f"bench_tcp needs at least one run, not {repeat}")
    console.print(f"mignet bench tcp: {2 * repeat} loads of a {human_bytes(size)} guest, each into a "
                  "fresh receiver process"
                  + ("; with the defaults this takes a few minutes" if size >= 1 << 30 else ""))
    console.print(f"generating a {human_bytes(size)} random guest …")
    ram = GuestRam.generate(size, "random", seed=11)
    devices = DeviceSet.example(11)
    runs: list[Run] = []
    for i in range(repeat):
        for kind in (("raw", "mignet") if i % 2 else ("mignet", "raw")):
            run = run_mignet(ram, devices) if kind == "mignet" else run_raw(ram)
            console.print(f"  run {i + 1}/{repeat} {kind:6s}: {run.gbps:.2f} GB/s "
                          f"({run.seconds:.2f} s, peak RSS {human_bytes(run.peak_rss)})")
            runs.append(run)
    mig = [r for r in runs if r.kind == "mignet"]
    raw = [r for r in runs if r.kind == "raw"]
    med_mig = statistics.median(r.gbps for r in mig)
    med_raw = statistics.median(r.gbps for r in raw)
    peak = max(r.peak_rss for r in mig)
    result: dict[str, Any] = {
        "size": size, "repeat": repeat,
        "mignet_gbps": [round(r.gbps, 3) for r in mig], "raw_gbps": [round(r.gbps, 3) for r in raw],
        "mignet_median_gbps": round(med_mig, 3), "raw_median_gbps": round(med_raw, 3),
        "ratio": round(med_mig / med_raw, 3),
        "mignet_peak_rss": peak, "raw_peak_rss": max(r.peak_rss for r in raw),
        "rss_limit": size + RSS_SLACK,
    }
    stats_table("mignet bench tcp (loopback, 1 connection, fresh receiver memory)", [
        ("guest", f"{human_bytes(size)} random"),
        ("mignet median", f"{med_mig:.2f} GB/s  {result['mignet_gbps']}"),
        ("raw recv_into median", f"{med_raw:.2f} GB/s  {result['raw_gbps']}"),
        ("ratio mignet / raw", f"{result['ratio']:.2f}  (target >= 0.85)"),
        ("mignet receiver peak RSS", f"{human_bytes(peak)}  (limit {human_bytes(size + RSS_SLACK)})"),
        ("raw receiver peak RSS", human_bytes(result["raw_peak_rss"])),
    ])
    return result
