"""``mignet bench postcopy``: precopy against postcopy, side by side, at dirty rates below
and above the link.

Each run migrates the same random guest, its vCPUs writing at one rate, from this process
to a fresh ``mignet recv --postcopy`` process over loopback TCP, max-bandwidth (and
max-postcopy-bandwidth) being the link. Per dirty rate, in one go: precopy (a run that has
not converged after ``--give-up`` seconds is switched over by force, as ``bench live``),
postcopy after the first round, and postcopy with the preempt connection. Downtime is from
the source's vCPU stop to the destination's switchover (precopy: loaded; postcopy: RUN),
both on CLOCK_MONOTONIC; fault latency is the destination's, from a vCPU's fault to the
page placed (p50/p99/max); every run checks the destination's RAM digest against the
frozen source's. A run that fails is reported as failed, with its error, never as figures.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from mignet.bench.receiver import receiver_result, recv_command, start_receiver
from mignet.errors import MignetError
from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam
from mignet.migration.dirty import page_aligned
from mignet.migration.postcopy_source import PostcopyParams
from mignet.migration.precopy import PrecopyParams
from mignet.transport import connect
from mignet.ui.live import run_live
from mignet.ui.terminal import console, stats_table
from mignet.units import human_bytes

MODES = ("precopy", "postcopy", "postcopy+preempt")


@dataclass
class Run:
    mode: str
    dirty_rate: int
    error: str | None = None  # a failed run: no figures
    switched: str = ""  # converged / forced / postcopy after N rounds
    rounds: int = 0
    total_ms: int = 0
    downtime_ms: int = 0
    sent_ratio: float = 0.0
    identical: bool = False
    faults: int | None = None
    requests: int | None = None
    latency_ms: dict[str, float | None] | None = None  # p50 / p99 / max, destination


def run_one(ram: GuestRam, mode: str, rate: int, link: int, limit_ms: int, give_up: float,
            vcpus: int) -> Run:
    postcopy, preempt = mode != "precopy", mode == "postcopy+preempt"
    extra = ["--postcopy", "--vcpus", str(vcpus)] + (["--postcopy-preempt"] if preempt else [])
    proc, uri = start_receiver([*recv_command(max_ram=ram.total + (64 << 20)), *extra])
    done: dict[str, Any] = {}
    run = Run(mode, rate)

    def loaded() -> float | None:
        done.update(receiver_result(proc))
        return done["stats"]["switchover_at"]
    params: PrecopyParams = (PostcopyParams(downtime_limit_ms=limit_ms, max_bandwidth=link,
                                            postcopy_after=1, max_postcopy_bandwidth=link)
                             if postcopy else PrecopyParams(downtime_limit_ms=limit_ms, max_bandwidth=link))
    channel = second = None
    try:
        channel = connect(uri)
        second = connect(uri) if preempt else None
        source, _ = run_live(channel, ram, DeviceSet.example(3), dirty_rate=rate, params=params,
                             destination_loaded=loaded, force_after=None if postcopy else give_up,
                             quiet=True, seed=rate % 997, preempt=second)
    except MignetError as exc:
        run.error = str(exc)
        return run
    finally:
        for ch in (channel, second):
            if ch is not None:
                ch.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    info = source.query_migrate()
    pc_src = info["x-mignet"].get("postcopy")
    run.switched = ("postcopy" if pc_src else "forced" if source._force.is_set() else "converged")
    run.rounds, run.total_ms, run.downtime_ms = len(source.rounds), info["total-time"], info["downtime"]
    run.sent_ratio = info["ram"]["transferred"] / ram.total
    run.identical = done["ram_digest"] == ram.digest(done["digest"])
    pc: dict[str, Any] | None = done["stats"].get("postcopy")
    if pc is not None:
        run.faults, run.requests, run.latency_ms = pc["faults"], pc["requests"], pc["fault-latency-ms"]
    return run


def bench_postcopy(size: int, link: int, rates: list[int], limit_ms: int, give_up: float,
                   vcpus: int, repeat: int) -> dict[str, Any]:
    count = len(rates) * len(MODES) * repeat
    longest = give_up + 2 * size / link + 5
    total = count * longest
    console.print(f"mignet bench postcopy: {count} migrations of a {human_bytes(size)} guest over a "
                  f"{human_bytes(link)}/s link, each up to about {longest:.0f} s: up to about "
                  + (f"{total / 60:.0f} min" if total >= 90 else f"{total:.0f} s"))
    ram = page_aligned(GuestRam.generate(size, "random", seed=5))
    runs: list[Run] = []
    for _ in range(repeat):
        for rate in rates:
            for mode in MODES:  # side by side: the modes alternate within one rate
                t0 = time.monotonic()
                run = run_one(ram, mode, rate, link, limit_ms, give_up, vcpus)
                runs.append(run)
                console.print(f"  {human_bytes(rate)}/s {mode}: " + (
                    f"FAILED: {run.error}" if run.error else
                    f"downtime {run.downtime_ms} ms, {run.sent_ratio:.2f}x RAM, {run.switched}")
                    + f" ({time.monotonic() - t0:.1f} s)", soft_wrap=True)
    _print(size, link, limit_ms, vcpus, runs)
    return {"size": size, "link": link, "downtime_limit_ms": limit_ms, "give_up_s": give_up,
            "vcpus": vcpus, "runs": [asdict(r) for r in runs]}


def _print(size: int, link: int, limit_ms: int, vcpus: int, runs: list[Run]) -> None:
    console.print(f"mignet bench postcopy: {human_bytes(size)} random guest, link {human_bytes(link)}/s "
                  f"(max-bandwidth, max-postcopy-bandwidth), downtime-limit {limit_ms} ms, "
                  f"{vcpus} destination vCPU(s) reading every page, loopback TCP", soft_wrap=True)
    for r in runs:
        console.print(f"vCPUs writing {human_bytes(r.dirty_rate)}/s, {r.mode}:", style="italic")
        if r.error:
            stats_table("", [("result", f"FAILED: {r.error}")])
            continue
        lat = r.latency_ms
        rows: list[tuple[str, Any]] = [
            ("switch", f"{r.switched}, after {r.rounds} round{'s' if r.rounds != 1 else ''}"),
            ("total time", f"{r.total_ms / 1000:.2f} s"),
            ("downtime (limit)", f"{r.downtime_ms} ms ({limit_ms} ms)"),
            ("sent ÷ RAM", f"{r.sent_ratio:.2f}"),
            ("RAM identical", "yes" if r.identical else "NO"),
        ]
        if lat is not None and r.faults:
            rows += [("faults / requests", f"{r.faults} / {r.requests}"),
                     ("fault latency p50/p99/max", f"{lat['p50']} / {lat['p99']} / {lat['max']} ms")]
        stats_table("", rows)
