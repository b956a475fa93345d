"""Running one live migration from the command line: the guest's vCPUs, the precopy driver in
its migration thread, a progress line with rounds and dirty rate, and the result table.

Shared by ``mignet send --live``, ``mignet demo`` and ``mignet bench live`` so all three show
and measure the same thing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mignet.channel import Channel
from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam
from mignet.guest.workload import Workload
from mignet.migration.loadvm import IDLE_TIMEOUT
from mignet.migration.multifd import MultifdSender
from mignet.migration.postcopy_source import PostcopyParams, PostcopySource
from mignet.migration.precopy import Precopy, PrecopyParams
from mignet.migration.savevm import PageChannels, Sender
from mignet.ui.terminal import multifd_channels, run_with_progress, stats_table
from mignet.units import human_bytes


def progress_note(info: dict[str, Any]) -> str:
    """'round 3 · dirty 45.1 MiB/s · left 3.2 MiB · throttle 20%' from query-migrate."""
    ram = info.get("ram", {})
    parts = [f"round {info.get('x-mignet', {}).get('rounds', 0) + 1}"]
    if info.get("x-mignet", {}).get("stop-and-copy"):
        parts = ["stop-and-copy"]
    elif info.get("status") == "postcopy-active":
        parts = [f"postcopy · {ram.get('postcopy-requests', 0)} requests"]
    elif info.get("status") == "completed":
        rounds = info["x-mignet"]["rounds"]
        parts = [f"completed after {rounds} round{'s' if rounds != 1 else ''}"]
    if ram.get("dirty-sync-count", 0) >= 2 or info.get("status") == "completed":
        # measured between two syncs: before the second there is no figure (not 0)
        parts.append(f"dirty {human_bytes(ram.get('dirty-pages-rate', 0) * ram.get('page-size', 4096))}/s")
    parts.append(f"left {human_bytes(ram.get('remaining', 0))}")
    if "cpu-throttle-percentage" in info:
        parts.append(f"throttle {info['cpu-throttle-percentage']}%")
    return " · ".join(parts)


def run_live(channel: Channel, ram: GuestRam, devices: DeviceSet, *, dirty_rate: int,
             params: PrecopyParams, hot_fraction: float | None = None,
             destination_loaded: Callable[[], float | None] | None = None,
             force_after: float | None = None, quiet: bool = False,
             seed: int = 0, rdma_pin_all: bool | None = None,
             pages_to: PageChannels | None = None,
             idle_timeout: float | None = IDLE_TIMEOUT,
             sender_options: dict[str, Any] | None = None,
             preempt: Channel | None = None) -> tuple[Precopy, Workload]:
    """Migrate ``ram`` live over ``channel`` while a workload dirties it at ``dirty_rate``
    bytes/s; :class:`PostcopyParams` make it a postcopy source. ``force_after`` seconds:
    switch over even if not converged (benchmarks). ``sender_options``: more of
    :class:`Sender`'s keywords (a snapshot's machine type, section id, description).
    ``preempt``: postcopy's second connection, for the requested pages."""
    workload = Workload(ram, dirty_rate, hot_fraction=hot_fraction, seed=seed)
    sender = Sender(channel, ram, devices, rdma_pin_all=rdma_pin_all, pages_to=pages_to,
                    idle_timeout=idle_timeout, **(sender_options or {}))
    precopy: Precopy
    if isinstance(params, PostcopyParams):
        precopy = PostcopySource(sender, workload, params, destination_loaded=destination_loaded,
                                 preempt=preempt)
    else:
        precopy = Precopy(sender, workload, params, destination_loaded=destination_loaded)
    def poll() -> tuple[int, int | None, str]:
        info = precopy.query_migrate()
        return info.get("ram", {}).get("transferred", 0), None, progress_note(info)
    rows = multifd_channels(pages_to.describe) if isinstance(pages_to, MultifdSender) else None
    run_with_progress(precopy.run, label="live migration", poll=poll, cancel=precopy.cancel,
                      quiet=quiet, force_after=(force_after, precopy.force_switchover) if force_after else None,
                      channels=rows)
    return precopy, workload


def print_live_table(precopy: Precopy, workload: Workload, title: str = "live migration completed") -> None:
    info = precopy.query_migrate()
    ram = info["ram"]
    where = info["x-mignet"]["downtime-measured-at"]
    postcopy = info["x-mignet"].get("postcopy")
    how = {"destination": "vCPU stop → destination " + ("runs" if postcopy else "loaded"),
           "source-pong": "vCPU stop → the destination's answer to the ping just before RUN",
           }.get(where, "vCPU stop → last byte sent; the destination's side is not visible from here")
    tail = (f"{human_bytes(ram['postcopy-bytes'])} after the switch to postcopy" if postcopy
            else f"{human_bytes(ram['downtime-bytes'])} while stopped")
    rows: list[tuple[str, Any]] = [
        ("RAM", human_bytes(ram["total"])),
        ("dirty tracking", info["x-mignet"]["dirty-tracking"]),
        ("guest dirty rate", f"{human_bytes(workload.rate)}/s"
         + (f" (throttled to {100 - workload.throttle}%)" if workload.throttle else "")),
        ("rounds (dirty syncs)", f"{info['x-mignet']['rounds']} ({ram['dirty-sync-count']})"),
        ("total time", f"{info['total-time']} ms (setup {info.get('setup-time', 0)} ms)"),
        ("downtime", f"{info['downtime']} ms, limit {precopy.params.downtime_limit_ms} ms ({how})"),
        ("sent", f"{human_bytes(ram['transferred'])} = {ram['transferred'] / ram['total']:.2f} × RAM "
                 f"({tail})"),
        ("pages: normal / zero", f"{ram['normal']} / {ram['duplicate']}"),
        ("bandwidth (last round)", f"{human_bytes(int(ram['mbps'] * 1e6 / 8))}/s"),
    ]
    if postcopy:
        rows += [
            ("postcopy", f"after {postcopy['after-rounds']} round(s): {postcopy['discarded-pages']} "
                         f"pages discarded, then sent once each"),
            ("page requests", f"{ram['postcopy-requests']} ({postcopy['requested-pages-sent']} pages "
                              f"sent on request, {postcopy['ignored-requests']} for pages already sent)"),
            *([("on the preempt connection", f"{postcopy['preempt-pages']} pages")]
              if postcopy.get("preempt-pages") is not None else []),
            ("max-postcopy-bandwidth", f"{human_bytes(postcopy['max-postcopy-bandwidth'])}/s"
             if postcopy["max-postcopy-bandwidth"] else "unlimited"),
        ]
    stats_table(title, rows)
