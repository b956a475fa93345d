"""``mignet bench rdma``: mignet's RDMA migration against ``ib_write_bw`` and mignet TCP.

Run inside one soft-RoCE guest (``mignet rxe run -- mignet bench rdma``), so all three
share the same emulated CPUs and the same rxe device; under TCG the absolute figures are
tiny, the ratios are what this measures.

* ``ib_write_bw`` (perftest): RDMA WRITEs of ``MAX_WRITE`` (1 MiB) bytes, the size mignet's
  coalesced page writes reach on contiguous RAM, ``WRITE_WINDOW`` in flight (``-t``), over
  rdma_cm (``-R``), as many iterations as the guest has MiB. Its "MB/sec" is MiB/s.
* mignet RDMA: ``mignet recv --listen rdma:…`` in a fresh process, a random guest sent from
  this process; the receiver's time from accepting to holding every byte, registration of
  its RAM included, as in a real migration (ib_write_bw registers before it starts timing).
  Twice: in the default chunk mode, and with ``rdma-pin-all``, whose registration is one
  setup phase that is also shown apart (QEMU's throughput excludes setup-time).
* mignet TCP: the same over loopback TCP in the same guest.

Figures are MiB/s (2^20 bytes), medians over ``repeat`` runs in rotating order.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import time
from typing import Any

from mignet.bench.receiver import receiver_result, recv_command, start_receiver
from mignet.errors import MignetError, SetupError
from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam
from mignet.migration.savevm import Sender
from mignet.rdma.placement import MAX_WRITE, WRITE_WINDOW
from mignet.transport import connect
from mignet.ui.terminal import console, stats_table
from mignet.units import human_bytes

MiB = 1 << 20
_BW_LINE = re.compile(r"^\s*(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")


def ib_write_bw(addr: str, port: int, size: int, device: str = "rxe0") -> float:
    """Run perftest's ib_write_bw server and client here; its average bandwidth in MiB/s."""
    iters = max(10, size // MAX_WRITE)
    common = ["ib_write_bw", "-d", device, "-R", "-F", "-s", str(MAX_WRITE), "-n", str(iters),
              "-t", str(WRITE_WINDOW), "-p", str(port)]
    for attempt in range(3):  # under TCG the server may not listen yet: try again
        try:
            server = subprocess.Popen(common, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
        except FileNotFoundError:
            raise SetupError("ib_write_bw missing: install perftest (tools/rxe/setup.sh)") from None
        time.sleep(3.0 + 3 * attempt)
        try:
            client = subprocess.run([*common, addr], capture_output=True, text=True, timeout=300)
            out, _ = server.communicate(timeout=30 if client.returncode else 120)
        except subprocess.TimeoutExpired:
            client = None
            out = ""
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        text = (client.stdout if client else "") + "\n" + out
        for line in text.splitlines():
            m = _BW_LINE.match(line)
            if m:
                return float(m.group(4))
        port += 1
    raise MignetError(f"ib_write_bw failed three times; last output: {text.strip()[-300:]!r}")


def _mignet_run(uri: str, ram: GuestRam, devices: DeviceSet,
                pin_all: bool = False) -> tuple[float, dict[str, Any]]:
    """One migration to a fresh ``mignet recv`` process; (receiver MiB/s, its stats)."""
    proc, listening = start_receiver(recv_command(listen=uri))
    channel = connect(listening)
    Sender(channel, ram, devices, rdma_pin_all=pin_all).run()
    channel.close()
    done = receiver_result(proc)
    if done["ram_sha256"] != ram.digest():
        raise MignetError("benchmark receiver got different RAM")
    return ram.total / MiB / done["stats"]["seconds"], done["stats"]


def bench_rdma(size: int, repeat: int, addr: str, port: int = 19500) -> dict[str, Any]:
    console.print(f"generating a {human_bytes(size)} random guest …")
    ram = GuestRam.generate(size, "random", seed=13)
    devices = DeviceSet.example(13)
    kinds = ["ib_write_bw", "mignet_rdma", "mignet_rdma_pin_all", "mignet_tcp"]
    runs: dict[str, list[float]] = {k: [] for k in kinds}
    runs["mignet_rdma_pin_all_after_setup"] = []
    for i in range(repeat):
        for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:  # rotate the order
            port += 4
            note = ""
            if kind == "ib_write_bw":
                mib_s = ib_write_bw(addr, port, size)
            elif kind == "mignet_tcp":
                mib_s, _ = _mignet_run("tcp:127.0.0.1:0", ram, devices)
            else:
                pin = kind == "mignet_rdma_pin_all"
                mib_s, st = _mignet_run(f"rdma:{addr}:{port}", ram, devices, pin_all=pin)
                if pin:
                    after = ram.total / MiB / (st["seconds"] - st["setup_seconds"])
                    runs["mignet_rdma_pin_all_after_setup"].append(after)
                    note = f"  ({after:.1f} after {st['setup_seconds']:.2f} s setup)"
            runs[kind].append(mib_s)
            console.print(f"  run {i + 1}/{repeat} {kind:20s}: {mib_s:8.1f} MiB/s{note}")
    med = {k: statistics.median(v) for k, v in runs.items()}
    ib = med["ib_write_bw"]
    result: dict[str, Any] = {
        "size": size, "repeat": repeat, "message_size": MAX_WRITE, "window": WRITE_WINDOW,
        "runs_mib_s": {k: [round(x, 1) for x in v] for k, v in runs.items()},
        "median_mib_s": {k: round(v, 1) for k, v in med.items()},
        "rdma_vs_ib_write_bw": round(med["mignet_rdma"] / ib, 3),
        "rdma_pin_all_vs_ib_write_bw": round(med["mignet_rdma_pin_all"] / ib, 3),
        "rdma_pin_all_after_setup_vs_ib_write_bw": round(med["mignet_rdma_pin_all_after_setup"] / ib, 3),
        "rdma_vs_tcp": round(med["mignet_rdma"] / med["mignet_tcp"], 3),
    }

    def row(kind: str) -> str:
        return f"{med[kind]:.1f} MiB/s  {result['runs_mib_s'][kind]}"
    stats_table(f"mignet bench rdma ({human_bytes(size)} random guest, "
                f"{human_bytes(MAX_WRITE)} writes, {WRITE_WINDOW} in flight)", [
        ("ib_write_bw", row("ib_write_bw")),
        ("mignet RDMA (1 MiB chunks, default)", row("mignet_rdma")),
        ("mignet RDMA, rdma-pin-all", row("mignet_rdma_pin_all")),
        ("  … after its setup phase", row("mignet_rdma_pin_all_after_setup")),
        ("mignet TCP (loopback)", row("mignet_tcp")),
        ("mignet RDMA / ib_write_bw", f"{result['rdma_vs_ib_write_bw']:.2f}  (target >= 0.8)"),
        ("pin-all / ib_write_bw", f"{result['rdma_pin_all_vs_ib_write_bw']:.2f}, after setup "
                                  f"{result['rdma_pin_all_after_setup_vs_ib_write_bw']:.2f}"),
        ("mignet RDMA / mignet TCP", f"{result['rdma_vs_tcp']:.2f}"),
    ])
    return result
