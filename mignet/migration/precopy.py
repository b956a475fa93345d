"""Live precopy: QEMU's iterative RAM migration around a :class:`~mignet.migration.savevm.Sender`.

Round 1 sends all of RAM while the guest runs; every later round first syncs the dirty log
(the kernel's, see :mod:`.dirty`) and sends the pages written since the previous sync. After
each sync the rounds driver compares what is left with what the link moves in the downtime
limit — ``remaining <= bandwidth * downtime-limit``, as QEMU's ``migration_iteration_run`` —
and when it fits it stops the vCPUs, syncs once more, sends the rest (as QEMU, regardless of
max-bandwidth), then the device state.

Downtime is *measured*, not estimated: from the moment the vCPUs are told to stop until the
destination has loaded everything (its switchover, which the loader timestamps on
CLOCK_MONOTONIC). The destination has no return path in precopy, so the caller supplies its
switchover time: in-process from the :class:`~mignet.migration.loadvm.Loader`, or from a receiver
process on the same host (CLOCK_MONOTONIC is system-wide). Without one, the figure is the
source side only — stop until the last byte was handed to the socket — and
``x-mignet.downtime-measured-at`` says ``source``.

Auto-converge follows QEMU's ``migration_trigger_throttle``: when a period dirtied more than
``throttle-trigger-threshold`` % of what it transferred, twice in a row, the vCPUs are
throttled to ``cpu-throttle-initial`` %, then ``cpu-throttle-increment`` more each time, up to
``max-cpu-throttle``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mignet.errors import MigrationCancelled, MisuseError
from mignet.guest.workload import Workload
from mignet.migration.dirty import DirtyLog
from mignet.migration.savevm import Sender, range_pages
from mignet.migration.status import DirectionState, Phase, RamCounters, query_migrate
from mignet.runtime.halves import bottom_half, upper_half
from mignet.units import PAGE_SIZE

MiB = 1 << 20


_CANCELLABLE = frozenset({Phase.CONNECTING, Phase.RAM})


@dataclass
class PrecopyParams:
    """QEMU's migration parameters that shape precopy (QMP names in the comments).

    Read at every round, so changing a field while migrating takes effect at the next sync;
    max-bandwidth goes through :meth:`Precopy.set_max_bandwidth`, which applies at once."""

    downtime_limit_ms: int = 300  # downtime-limit
    max_bandwidth: int = 128 * MiB  # max-bandwidth, bytes/s; 0 = unlimited
    auto_converge: bool = False  # capability auto-converge
    cpu_throttle_initial: int = 20  # cpu-throttle-initial, %
    cpu_throttle_increment: int = 10  # cpu-throttle-increment, %
    max_cpu_throttle: int = 99  # max-cpu-throttle, %
    throttle_trigger_threshold: int = 50  # throttle-trigger-threshold, %


@dataclass
class RoundStats:
    """One iteration: what was sent, and the sync that ended it."""

    round: int
    seconds: float  # from the previous sync (or the start of round 1) to this sync
    bytes_sent: int
    pages_sent: int
    dirty_pages: int  # found by the sync that ended this round
    dirty_rate: float  # pages/s over the period
    bandwidth: float  # bytes/s over the period
    sync_seconds: float  # cost of collecting the dirty set
    throttle: int  # cpu-throttle-percentage during the round


@dataclass
class _Rounds:
    """What the rounds measured, between syncs; the public figures come out of
    :meth:`Precopy.counters` as one :class:`RamCounters`."""

    stopped: float | None = None  # vCPUs stopped: downtime starts
    sent_all: float | None = None
    downtime_at: str = ""
    precopy_bytes: int = 0
    remaining_pages: int = 0
    round_scanned_at: int = 0  # sender.stats.pages_scanned at the start of the round
    bandwidth: float = 0.0
    dirty_rate: float = 0.0
    pages_per_second: float = 0.0
    sync_count: int = 0
    expected_downtime: float | None = None


class Precopy:
    """Migrates ``sender.ram`` while ``workload`` keeps writing it.

    ``destination_loaded``, called once the stream is sent, returns the destination's
    switchover time on this host's CLOCK_MONOTONIC (``time.monotonic()``), or None when it
    cannot be known. ``on_round`` is called after each sync (progress display).

    Status lives in ``state``, a :class:`DirectionState` (the one status machine): the
    controller passes its outgoing side, so QMP and the driver see the same phase;
    standalone (``mignet send --live``) the driver keeps its own and ends it itself."""

    def __init__(self, sender: Sender, workload: Workload | None = None,
                 params: PrecopyParams | None = None, *,
                 destination_loaded: Callable[[], float | None] | None = None,
                 on_round: Callable[[RoundStats], None] | None = None,
                 on_stop: Callable[[], None] | None = None,
                 force_fallback: bool = False, state: DirectionState | None = None,
                 on_active: Callable[[], None] | None = None) -> None:
        self.sender = sender
        self.workload = workload
        self.params = params or PrecopyParams()
        self.destination_loaded = destination_loaded
        self.on_round = on_round
        self.on_stop = on_stop  # the vCPUs just stopped for the final copy (runstate change)
        self.force_fallback = force_fallback
        self.on_active = on_active  # setup done, status active: the first pass begins
        self.owns_state = state is None
        self.state = state if state is not None else DirectionState("outgoing")
        self.rounds: list[RoundStats] = []
        self.tracking = ""
        self.error: str | None = None
        self._c = _Rounds()
        self._started = False
        self._force = threading.Event()
        self._high_dirty = 0
        self._throttle_active = False
        self._pending: dict[str, np.ndarray] = {}  # the deciding sync's dirty set

    # --- control from other threads ---------------------------------------------------
    @upper_half
    def set_max_bandwidth(self, bytes_per_second: int) -> None:
        """QMP migrate-set-parameters max-bandwidth: effective at once (0 = unlimited)."""
        self.params.max_bandwidth = max(0, int(bytes_per_second))
        self.sender.limiter.set_limit(self.params.max_bandwidth)

    @upper_half
    def force_switchover(self) -> None:
        """Stop and copy at the next sync whatever is left (the downtime may exceed the
        limit): what raising downtime-limit to infinity would do."""
        self._force.set()

    @upper_half
    def cancel(self) -> None:
        """Upper half (any thread). Too late once the vCPUs stopped for the final copy."""
        if self.owns_state and not self.state.move(_CANCELLABLE, Phase.CANCELLING):
            return
        self.sender.cancel()

    @property
    def status(self) -> str:
        """The public status (QEMU's MigrationStatus value)."""
        return self.state.status.value

    @property
    def phase(self) -> Phase:
        return self.state.phase

    # --- the migration ----------------------------------------------------------------
    @bottom_half
    def run(self) -> dict[str, Any]:
        """Migrate; returns :meth:`query_migrate`. On failure or cancel the vCPUs run on."""
        if self._started:
            raise MisuseError("a Precopy object runs one migration")
        self._started = True
        c, st = self._c, self.state
        if self.owns_state:
            st.to(Phase.CONNECTING)
        st.counters = self.counters
        sender = self.sender
        if sender.placement is not None:  # rdma: the protocol this connection speaks
            st.rdma = sender.placement.describe
        sender.limiter.set_limit(self.params.max_bandwidth)
        log = DirtyLog(sender.ram, force_fallback=self.force_fallback)
        self.tracking = log.method
        try:
            if self.workload is not None and not self.workload.running:
                self.workload.start()
            log.start()  # arm before the first page goes out: every later write is seen
            sender.start()
            if not st.move(frozenset({Phase.CONNECTING}), Phase.RAM):
                raise MigrationCancelled("outgoing migration cancelled")
            if self.on_active is not None:
                self.on_active()
            self._iterate(log)
            self._stop_and_copy(log)
        except BaseException as exc:
            self.error = str(exc)
            if self.owns_state:  # else the controller ends it, after releasing the options
                cancelled = isinstance(exc, (MigrationCancelled, KeyboardInterrupt))
                if cancelled and st.phase in _CANCELLABLE:
                    st.move(_CANCELLABLE, Phase.CANCELLING)
                if st.phase is Phase.CANCELLING:
                    st.to(Phase.CANCELLED)
                else:
                    st.to(Phase.FAILED, str(exc))
            if self.workload is not None:
                self.workload.set_throttle(0)  # as QEMU: a failed migration leaves the guest
                if not self.workload.running and c.stopped is not None \
                        and self._source_may_resume():  # running, unthrottled
                    self.workload.start()
            raise
        finally:
            log.close()
        if self.owns_state:
            st.to(Phase.DONE)
        return self.query_migrate()

    def _iterate(self, log: DirtyLog) -> None:
        sender, c, ram = self.sender, self._c, self.sender.ram
        c.remaining_pages = ram.total // PAGE_SIZE
        period_start = time.monotonic()
        sent_before, scanned_before = sender.stats.transferred, sender.stats.pages_scanned
        for block in ram:  # round 1: everything
            sender.send_pages(block, range_pages(block))
        sender.close_section()
        sender.first_pass = False
        while True:
            masks = log.sync()
            now = time.monotonic()
            period = max(now - period_start, 1e-6)
            sent = sender.stats.transferred - sent_before
            pages_sent = sender.stats.pages_scanned - scanned_before
            dirty = log.last.dirty_pages
            c.sync_count += 1
            c.dirty_rate = dirty / period
            c.pages_per_second = pages_sent / period
            if sent >= 256 << 10 or not c.bandwidth:  # a tiny round says little about the link
                c.bandwidth = sent / period
            throttle = self.workload.throttle if self.workload is not None else 0
            round_stats = RoundStats(len(self.rounds) + 1, period, sent, pages_sent, dirty,
                                     c.dirty_rate, c.bandwidth, log.last.seconds, throttle)
            self.rounds.append(round_stats)
            remaining = dirty * PAGE_SIZE
            c.remaining_pages = dirty
            c.round_scanned_at = sender.stats.pages_scanned
            c.expected_downtime = remaining / c.bandwidth if c.bandwidth else None
            if self.on_round is not None:
                self.on_round(round_stats)
            if self._converged(remaining) or self._force.is_set() or self._leave_precopy():
                self._pending = masks
                return
            self._maybe_throttle(dirty * PAGE_SIZE, sent)
            period_start = now
            sent_before, scanned_before = sender.stats.transferred, sender.stats.pages_scanned
            for block in ram:
                sender.send_page_list(block, np.flatnonzero(masks[block.name]))
            sender.close_section()

    def _leave_precopy(self) -> bool:
        """End the rounds now although precopy has not converged: never in precopy; a
        postcopy source (:mod:`.postcopy_source`) switches after its rounds."""
        return False

    def _source_may_resume(self) -> bool:
        """Whether a failed migration may restart the vCPUs here: always in precopy; not
        once a postcopy source has handed the guest to the destination."""
        return True

    def _converged(self, remaining: int) -> bool:
        """QEMU: switch over once the rest fits in downtime-limit at the measured bandwidth."""
        return remaining <= self._c.bandwidth * self.params.downtime_limit_ms / 1000

    def _maybe_throttle(self, dirtied: int, transferred: int) -> None:
        """QEMU's migration_trigger_throttle / mig_throttle_guest_down."""
        p, w = self.params, self.workload
        if not p.auto_converge or w is None:
            return
        if dirtied <= transferred * p.throttle_trigger_threshold / 100:
            return
        self._high_dirty += 1
        if self._high_dirty < 2:
            return
        self._high_dirty = 0
        if not self._throttle_active:
            self._throttle_active = True
            w.set_throttle(p.cpu_throttle_initial)
        else:
            w.set_throttle(min(w.throttle + p.cpu_throttle_increment, p.max_cpu_throttle))

    def _stop_guest(self, log: DirtyLog, phase: Phase) -> dict[str, np.ndarray]:
        """Stop the vCPUs for the switch (to ``phase``: stop-and-copy, or postcopy) and
        return what is still to send: the pages left from the rounds plus the writes since
        the deciding sync, per block. The rest goes regardless of max-bandwidth, as QEMU's."""
        sender, c = self.sender, self._c
        c.precopy_bytes = sender.stats.transferred
        if not self.state.move(frozenset({Phase.RAM}), phase):
            raise MigrationCancelled("outgoing migration cancelled")
        c.stopped = time.monotonic()
        if self.workload is not None:
            self.workload.stop()
        if self.on_stop is not None:
            self.on_stop()
        last = log.sync()  # writes since the deciding sync, up to the stop
        c.sync_count += 1
        sender.rate_limited = False
        c.round_scanned_at = sender.stats.pages_scanned
        final = {name: self._pending[name] | last[name] for name in last}
        c.remaining_pages = int(sum(int(np.count_nonzero(m)) for m in final.values()))
        return final

    def _stop_and_copy(self, log: DirtyLog) -> None:
        sender, c = self.sender, self._c
        # Past this point a cancel comes too late (QEMU: the stream's end is on its way).
        final = self._stop_guest(log, Phase.SWITCHOVER)
        assert c.stopped is not None
        for block in sender.ram:
            sender.send_page_list(block, np.flatnonzero(final[block.name]))
        sender.finish()
        c.sent_all = time.monotonic()
        c.remaining_pages = 0
        loaded = self.destination_loaded() if self.destination_loaded is not None else None
        if loaded is not None:
            downtime, c.downtime_at = loaded - c.stopped, "destination"
        else:
            downtime, c.downtime_at = c.sent_all - c.stopped, "source"
        self.state.downtime_ms = int(round(downtime * 1000))

    # --- statistics -------------------------------------------------------------------
    @upper_half
    def counters(self) -> RamCounters:
        """This migration's figures, from the sender's record and the rounds (any thread)."""
        c, s = self._c, self.sender.stats
        in_rounds = self.state.phase in (Phase.CONNECTING, Phase.RAM, Phase.SWITCHOVER, Phase.POSTCOPY)
        if in_rounds or c.stopped is None:
            remaining = max(0, c.remaining_pages - (s.pages_scanned - c.round_scanned_at))
        else:
            remaining = 0
        active = self.state.phase is Phase.RAM
        return RamCounters(
            transferred=s.transferred, remaining=remaining * PAGE_SIZE, total=s.ram_total,
            duplicate=s.zero_pages, normal=s.normal_pages, dirty_sync_count=c.sync_count,
            precopy_bytes=c.precopy_bytes if c.stopped is not None else s.transferred,
            downtime_bytes=s.transferred - c.precopy_bytes if c.stopped is not None else 0,
            dirty_pages_rate=int(c.dirty_rate),
            expected_downtime_ms=(int(c.expected_downtime * 1000)
                                  if active and c.expected_downtime is not None else None),
            mbps=c.bandwidth * 8 / 1e6, pages_per_second=int(c.pages_per_second),
            cpu_throttle_percentage=self.workload.throttle if self.workload is not None else 0,
            multifd_bytes=s.multifd_bytes)

    def query_migrate(self) -> dict[str, Any]:
        """``query-migrate`` of this migration: the one builder QMP uses, plus mignet's own
        ``x-mignet`` member (rounds, tracking method, where downtime was measured)."""
        info = query_migrate(self.state, self.params.downtime_limit_ms)
        if self.error is not None and "error-desc" not in info and self.status != "cancelled":
            info["error-desc"] = self.error
        c = self._c
        info["x-mignet"] = {
            "rounds": len(self.rounds),
            "dirty-tracking": self.tracking,
            "last-sync-ms": round(self.rounds[-1].sync_seconds * 1000, 3) if self.rounds else None,
            "downtime-measured-at": c.downtime_at or None,
            "downtime-limit": self.params.downtime_limit_ms,
            "stop-and-copy": self.state.phase is Phase.SWITCHOVER,
        }
        return info
