"""``mignet bench live``: live precopy over a range of dirty rates, and the cost of tracking.

Each row migrates the same random guest, its vCPUs writing uniformly random pages at one
rate, from this process to a fresh ``mignet recv`` process over loopback TCP with
max-bandwidth as the link. Downtime is measured from the vCPU stop to the receiver's
switchover (both read CLOCK_MONOTONIC on this host); every row also checks that the
destination's digest equals the frozen source's. Rates at and beyond the link never converge
without auto-converge: those rows switch over by force after ``--give-up`` seconds and are
repeated with auto-converge.

The tracking cost is measured apart on a 2 GiB guest: one PAGEMAP_SCAN sync (collect and
re-arm) after a vCPU dirtied a given share of it, against the hash fallback.
"""

from __future__ import annotations

import mmap
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mignet.bench.receiver import receiver_result, recv_command, start_receiver
from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam, RamBlock, fill_random
from mignet.migration.dirty import DirtyLog, page_aligned
from mignet.migration.precopy import PrecopyParams
from mignet.transport import connect
from mignet.ui.live import run_live
from mignet.ui.terminal import console, stats_table
from mignet.units import PAGE_SIZE, human_bytes

MiB = 1 << 20
SLACK_MS = 50


@dataclass
class Row:
    dirty_rate: int  # bytes/s the vCPUs write
    auto_converge: bool
    converged: bool
    rounds: int
    total_ms: int
    downtime_ms: int
    expected_ms: int | None
    sent_ratio: float
    measured_dirty_rate: float  # distinct pages/s at the last sync, as bytes/s
    sync_ms: float  # mean cost of a sync during the run
    throttle: int
    identical: bool
    meets_target: bool | None  # None: no target (dirty rate >= half the link)


def run_row(ram: GuestRam, rate: int, bandwidth: int, limit_ms: int, auto: bool, give_up: float) -> Row:
    proc, uri = start_receiver(recv_command(max_ram=ram.total + (64 << 20)))
    done: dict[str, Any] = {}

    def loaded() -> float | None:
        done.update(receiver_result(proc))
        return done["stats"]["switchover_at"]
    params = PrecopyParams(downtime_limit_ms=limit_ms, max_bandwidth=bandwidth, auto_converge=auto)
    channel = connect(uri)
    precopy, workload = run_live(channel, ram, DeviceSet.example(3), dirty_rate=rate, params=params,
                                 destination_loaded=loaded, force_after=give_up, quiet=True, seed=rate % 997)
    channel.close()
    info = precopy.query_migrate()
    last = precopy.rounds[-1]
    converged = not precopy._force.is_set() or last.dirty_pages * PAGE_SIZE <= last.bandwidth * limit_ms / 1000
    target = rate < bandwidth / 2
    return Row(rate, auto, converged, len(precopy.rounds), info["total-time"], info["downtime"],
               int(last.dirty_pages * PAGE_SIZE / last.bandwidth * 1000) if last.bandwidth else None,
               info["ram"]["transferred"] / ram.total, last.dirty_rate * PAGE_SIZE,
               statistics.mean(r.sync_seconds for r in precopy.rounds) * 1000, workload.throttle,
               done["ram_digest"] == ram.digest(done["digest"]),
               (converged and info["downtime"] <= limit_ms + SLACK_MS) if target else None)


def tracking_cost(size: int = 2 << 30, shares: tuple[float, ...] = (0.0, 0.01, 0.1, 1.0),
                  repeat: int = 5) -> dict[str, Any]:
    """Median seconds of one sync of ``size`` bytes after writing each share of its pages."""
    data = np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)
    fill_random(data, 1)
    ram = GuestRam([RamBlock("pc.ram", data)])
    block = next(iter(ram))
    words = block.page_words()
    rng = np.random.default_rng(2)
    out: dict[str, Any] = {"size": size, "kernel": {}, "hash": None}
    with DirtyLog(ram) as log:
        out["method"] = log.method
        log.start()
        for share in shares:
            times = []
            for _ in range(repeat):
                pages = rng.choice(block.pages, int(block.pages * share), replace=False)
                words[pages, 1] += np.uint64(1)
                log.sync()
                times.append(log.last.seconds)
            out["kernel"][share] = statistics.median(times)
    with DirtyLog(ram, force_fallback=True, announce=False) as hashed:  # the figure says what it is
        hashed.start()
        words[rng.choice(block.pages, block.pages // 100, replace=False), 1] += np.uint64(1)
        hashed.sync()
        out["hash"] = hashed.last.seconds
    return out


def bench_live(size: int, bandwidth: int, rates: list[int], limit_ms: int, give_up: float,
               track_size: int) -> dict[str, Any]:
    runs = sum(2 if rate >= bandwidth else 1 for rate in rates)
    longest = give_up + size / bandwidth + 5  # forced switchover, its stop-and-copy, set-up
    console.print(f"mignet bench live: {runs} live migrations of a {human_bytes(size)} guest over a "
                  f"{human_bytes(bandwidth)}/s link, each up to about {longest:.0f} s, and the tracking "
                  f"cost on {human_bytes(track_size)}: up to about {runs * longest / 60:.0f} min")
    console.print(f"measuring the tracking cost on {human_bytes(track_size)} …")
    cost = tracking_cost(track_size)
    console.print(f"generating a {human_bytes(size)} random guest …")
    ram = page_aligned(GuestRam.generate(size, "random", seed=5))
    rows: list[Row] = []
    for rate in rates:
        for auto in ((False, True) if rate >= bandwidth else (False,)):
            t0 = time.monotonic()
            row = run_row(ram, rate, bandwidth, limit_ms, auto, give_up)
            rows.append(row)
            console.print(f"  {human_bytes(rate)}/s{' auto-converge' if auto else ''}: {row.rounds} rounds, "
                          f"downtime {row.downtime_ms} ms, {row.sent_ratio:.2f}x RAM, "
                          f"{'converged' if row.converged else 'forced'} ({time.monotonic() - t0:.1f} s)")
    _print(size, bandwidth, limit_ms, give_up, rows, cost)
    return {"size": size, "bandwidth": bandwidth, "downtime_limit_ms": limit_ms, "give_up_s": give_up,
            "rows": [asdict(r) for r in rows], "tracking": cost}


def _print(size: int, bandwidth: int, limit_ms: int, give_up: float, rows: list[Row],
           cost: dict[str, Any]) -> None:
    # One small table per run, one row per figure: whole at 80 columns, where a table with
    # a column per figure was cut to "vCPU wri… aut… co…" even at 120.
    console.print(f"mignet bench live: {human_bytes(size)} random guest, link = max-bandwidth "
                  f"{human_bytes(bandwidth)}/s, downtime-limit {limit_ms} ms, loopback TCP")
    for r in rows:
        console.print(f"vCPUs writing {human_bytes(r.dirty_rate)}/s, auto-converge "
                      f"{'on' if r.auto_converge else 'off'}:", style="italic")
        stats_table("", [
            ("converged", "yes" if r.converged else f"no: forced at {give_up:.0f} s"),
            ("rounds", r.rounds),
            ("total time", f"{r.total_ms / 1000:.1f} s"),
            ("downtime (limit)", f"{r.downtime_ms} ms ({limit_ms} ms)"),
            ("sent ÷ RAM", f"{r.sent_ratio:.2f}"),
            ("dirty rate at the end", f"{human_bytes(r.measured_dirty_rate)}/s"),
            ("dirty sync per round", f"{r.sync_ms:.1f} ms"),
            ("vCPU throttle", f"{r.throttle}%"),
            ("RAM identical", "yes" if r.identical else "NO"),
            ("downtime target", "-" if r.meets_target is None else ("met" if r.meets_target else "MISSED")),
        ])
    k = cost["kernel"]
    console.print(
        f"tracking cost per round, {human_bytes(cost['size'])} ({cost['method']}, collect + re-arm, median): "
        + ", ".join(f"{share:.0%} dirty {sec * 1000:.1f} ms" for share, sec in k.items())
        + f"  (target < 50 ms); page-hash fallback: {cost['hash'] * 1000:.0f} ms")
