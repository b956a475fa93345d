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
import shutil
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


def ib_write_bw_result(text: str) -> float:
    """ib_write_bw's average bandwidth (MiB/s) from its output; a run that printed no
    figure, or 0, failed (seen: 0.00 when the client gave up early) and raises."""
    for line in text.splitlines():
        m = _BW_LINE.match(line)
        if m:
            average = float(m.group(4))
            if average > 0:
                return average
            raise RunFailed(f"ib_write_bw reported {average} MiB/s")
    raise RunFailed(f"ib_write_bw printed no result; its last output: {text.strip()[-200:]!r}")


def ib_write_bw(addr: str, port: int, size: int, device: str = "rxe0") -> float:
    """Run perftest's ib_write_bw server and client here; its average bandwidth in MiB/s."""
    iters = max(10, size // MAX_WRITE)
    common = ["ib_write_bw", "-d", device, "-R", "-F", "-s", str(MAX_WRITE), "-n", str(iters),
              "-t", str(WRITE_WINDOW), "-p", str(port)]
    failure = RunFailed("ib_write_bw did not run")
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
        try:
            return ib_write_bw_result((client.stdout if client else "") + "\n" + out)
        except RunFailed as exc:
            failure = exc
        port += 1
    raise RunFailed(f"failed three times: {failure}")


class RunFailed(MignetError):
    """One benchmark run failed: it is reported as failed and left out of the medians
    (counting it as 0 would drag the median down with a figure nobody measured)."""


def median_of_ok(runs: list[float | None]) -> float | None:
    """The median of the runs that succeeded (None marks a failed run); None if none did."""
    ok = [r for r in runs if r is not None]
    return statistics.median(ok) if ok else None


def _mignet_run(uri: str, ram: GuestRam, devices: DeviceSet,
                pin_all: bool = False) -> tuple[float, dict[str, Any]]:
    """One migration to a fresh ``mignet recv`` process; (receiver MiB/s, its stats)."""
    proc, listening = start_receiver(recv_command(listen=uri))
    channel = connect(listening)
    Sender(channel, ram, devices, rdma_pin_all=pin_all).run()
    channel.close()
    done = receiver_result(proc)
    if done["ram_digest"] != ram.digest(done["digest"]):
        raise MignetError("benchmark receiver got different RAM")
    return ram.total / MiB / done["stats"]["seconds"], done["stats"]


def bench_rdma(size: int, repeat: int, addr: str, port: int = 19500) -> dict[str, Any]:
    if shutil.which("ib_write_bw") is None:  # said before minutes of mignet runs, not after
        raise SetupError("ib_write_bw missing: install perftest (tools/rxe/setup.sh)")
    console.print(f"mignet bench rdma: {4 * repeat} runs of a {human_bytes(size)} guest "
                  "(ib_write_bw, mignet RDMA twice, mignet TCP); under the soft-RoCE guest's "
                  "emulated CPUs this takes minutes")
    console.print(f"generating a {human_bytes(size)} random guest …")
    ram = GuestRam.generate(size, "random", seed=13)
    devices = DeviceSet.example(13)
    kinds = ["ib_write_bw", "mignet_rdma", "mignet_rdma_pin_all", "mignet_tcp"]
    runs: dict[str, list[float | None]] = {k: [] for k in kinds}
    runs["mignet_rdma_pin_all_after_setup"] = []
    failures: list[str] = []
    for i in range(repeat):
        for kind in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:  # rotate the order
            port += 4
            note = ""
            try:
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
            except RunFailed as exc:
                runs[kind].append(None)
                if kind == "mignet_rdma_pin_all":
                    runs["mignet_rdma_pin_all_after_setup"].append(None)
                failures.append(f"run {i + 1} {kind}: {exc}")
                console.print(f"  run {i + 1}/{repeat} {kind:20s}: FAILED, not counted ({exc})",
                              soft_wrap=True, markup=False)
                continue
            runs[kind].append(mib_s)
            console.print(f"  run {i + 1}/{repeat} {kind:20s}: {mib_s:8.1f} MiB/s{note}")
    med = {k: median_of_ok(v) for k, v in runs.items()}

    def ratio(a: str, b: str) -> float | None:
        x, y = med[a], med[b]
        return round(x / y, 3) if x is not None and y else None
    result: dict[str, Any] = {
        "size": size, "repeat": repeat, "message_size": MAX_WRITE, "window": WRITE_WINDOW,
        "runs_mib_s": {k: [None if x is None else round(x, 1) for x in v] for k, v in runs.items()},
        "median_mib_s": {k: None if v is None else round(v, 1) for k, v in med.items()},
        "failed_runs": failures,
        "rdma_vs_ib_write_bw": ratio("mignet_rdma", "ib_write_bw"),
        "rdma_pin_all_vs_ib_write_bw": ratio("mignet_rdma_pin_all", "ib_write_bw"),
        "rdma_pin_all_after_setup_vs_ib_write_bw": ratio("mignet_rdma_pin_all_after_setup", "ib_write_bw"),
        "rdma_vs_tcp": ratio("mignet_rdma", "mignet_tcp"),
    }

    def row(kind: str) -> str:
        shown = ["failed" if x is None else x for x in result["runs_mib_s"][kind]]
        m = med[kind]
        return f"{'-' if m is None else f'{m:.1f}'} MiB/s  {shown}"

    def fig(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"
    stats_table(f"mignet bench rdma ({human_bytes(size)} random guest, "
                f"{human_bytes(MAX_WRITE)} writes, {WRITE_WINDOW} in flight; medians of the runs "
                "that succeeded)", [
        ("ib_write_bw", row("ib_write_bw")),
        ("mignet RDMA (1 MiB chunks, default)", row("mignet_rdma")),
        ("mignet RDMA, rdma-pin-all", row("mignet_rdma_pin_all")),
        ("  … after its setup phase", row("mignet_rdma_pin_all_after_setup")),
        ("mignet TCP (loopback)", row("mignet_tcp")),
        ("mignet RDMA / ib_write_bw", f"{fig(result['rdma_vs_ib_write_bw'])}  (target >= 0.8)"),
        ("pin-all / ib_write_bw", f"{fig(result['rdma_pin_all_vs_ib_write_bw'])}, after setup "
                                  f"{fig(result['rdma_pin_all_after_setup_vs_ib_write_bw'])}"),
        ("mignet RDMA / mignet TCP", fig(result["rdma_vs_tcp"])),
    ])
    return result
