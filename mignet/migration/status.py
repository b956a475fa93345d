"""Migration state: the public status management sees, kept apart from internal phases.

Two layers, deliberately:

* :class:`MigrationStatus` is QEMU's public enum (qapi/migration.json), reported by
  query-migrate and the MIGRATION event. Clients match on its string values, so it never
  changes when the implementation does.
* :class:`Phase` is what mignet's code checks (is the stream still carrying RAM? are we
  switching over?). Phases may be added or split freely; :data:`PUBLIC_STATUS` maps each to
  exactly one public status, and :data:`TRANSITIONS` lists every legal phase change, so an
  illegal one is a bug that raises instead of a state that leaks to management.

One :class:`MigrationState` holds an outgoing and an incoming :class:`DirectionState`. A
process can be both in turn (receive a guest, then migrate it onwards).
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mignet.errors import MisuseError
from mignet.units import PAGE_SIZE


class MigrationStatus(enum.StrEnum):
    """QEMU 7.2's MigrationStatus, value for value."""

    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"


class Phase(enum.Enum):
    """Internal phases of one direction of a migration."""

    IDLE = enum.auto()
    CONNECTING = enum.auto()  # outgoing: opening the channel
    LISTENING = enum.auto()  # incoming: waiting for the source to connect
    RAM = enum.auto()  # the stream carries RAM
    DEVICES = enum.auto()  # RAM is done; device state is in flight
    SWITCHOVER = enum.auto()  # EOF seen / sent; the guest changes hosts
    # the guest runs on the destination before all of its RAM came. Outgoing: the source
    # stopped it and streams what is owed; incoming: from LISTEN, RAM faults here and
    # missing pages are asked for (the guest starts at RUN)
    POSTCOPY = enum.auto()
    # incoming postcopy lost its source's connection: the guest waits here with its RAM
    # until a source resumes (migrate-recover here, migrate resume=true there)
    POSTCOPY_PAUSED = enum.auto()
    POSTCOPY_RECOVER = enum.auto()  # a resuming source connected; the handshake runs
    DONE = enum.auto()
    CANCELLING = enum.auto()
    CANCELLED = enum.auto()
    FAILED = enum.auto()


PUBLIC_STATUS: dict[Phase, MigrationStatus] = {
    Phase.IDLE: MigrationStatus.NONE,
    Phase.CONNECTING: MigrationStatus.SETUP,
    Phase.LISTENING: MigrationStatus.SETUP,
    Phase.RAM: MigrationStatus.ACTIVE,
    # QEMU reports "device" only with pause-before-switchover, which mignet lacks; without
    # it device state travels while the status is still "active".
    Phase.DEVICES: MigrationStatus.ACTIVE,
    Phase.SWITCHOVER: MigrationStatus.ACTIVE,
    Phase.POSTCOPY: MigrationStatus.POSTCOPY_ACTIVE,
    Phase.POSTCOPY_PAUSED: MigrationStatus.POSTCOPY_PAUSED,
    Phase.POSTCOPY_RECOVER: MigrationStatus.POSTCOPY_RECOVER,
    Phase.DONE: MigrationStatus.COMPLETED,
    Phase.CANCELLING: MigrationStatus.CANCELLING,
    Phase.CANCELLED: MigrationStatus.CANCELLED,
    Phase.FAILED: MigrationStatus.FAILED,
}

_ENDED = frozenset({Phase.DONE, Phase.CANCELLED, Phase.FAILED})
_RUNNING = frozenset({Phase.CONNECTING, Phase.LISTENING, Phase.RAM, Phase.DEVICES, Phase.SWITCHOVER,
                      Phase.POSTCOPY, Phase.POSTCOPY_PAUSED, Phase.POSTCOPY_RECOVER})

TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset({Phase.CONNECTING, Phase.LISTENING}),
    Phase.CONNECTING: frozenset({Phase.RAM, Phase.CANCELLING, Phase.FAILED}),
    Phase.LISTENING: frozenset({Phase.RAM, Phase.CANCELLING, Phase.FAILED}),
    # RAM -> SWITCHOVER: a data plane that gives no signal between its last RAM and its
    # device sections (the Sender writes both in one go, the Loader has no hook) skips DEVICES.
    # RAM -> POSTCOPY: a postcopy source hands its stopped guest over before all RAM
    # went; a destination's LISTEN (QEMU's active -> postcopy-active).
    Phase.RAM: frozenset({Phase.DEVICES, Phase.SWITCHOVER, Phase.POSTCOPY, Phase.CANCELLING,
                          Phase.FAILED}),
    Phase.DEVICES: frozenset({Phase.SWITCHOVER, Phase.CANCELLING, Phase.FAILED}),
    # Past switchover the guest has moved: too late to cancel, as in QEMU.
    Phase.SWITCHOVER: frozenset({Phase.DONE, Phase.FAILED}),
    # Postcopy cannot be cancelled either: pages of the running guest exist only at the
    # source and here. A lost connection pauses it (QEMU's postcopy recovery) where the
    # destination can take a resuming source; otherwise it is "failed".
    Phase.POSTCOPY: frozenset({Phase.DONE, Phase.FAILED, Phase.POSTCOPY_PAUSED}),
    # A paused guest whose source is gone for good can be given up (migrate-cancel).
    Phase.POSTCOPY_PAUSED: frozenset({Phase.POSTCOPY_RECOVER, Phase.FAILED, Phase.CANCELLING}),
    Phase.POSTCOPY_RECOVER: frozenset({Phase.POSTCOPY, Phase.POSTCOPY_PAUSED, Phase.FAILED}),
    # Once cancelling, the end is "cancelled" even if the last bytes made it (QEMU does the
    # same: its completion is a compare-and-swap from active that then fails).
    Phase.CANCELLING: frozenset({Phase.CANCELLED}),
    # A finished migration may be followed by a new one.
    Phase.DONE: frozenset({Phase.CONNECTING, Phase.LISTENING}),
    Phase.CANCELLED: frozenset({Phase.CONNECTING, Phase.LISTENING}),
    Phase.FAILED: frozenset({Phase.CONNECTING, Phase.LISTENING}),
}


@dataclass
class RamCounters:
    """The one set of RAM figures of a migration, in QEMU's terms (MigrationStats.ram).

    The sender's and the loader's progress records feed it (``Precopy.counters``, the
    controller's ``_load_counters``); query-migrate, the CLI tables and ``--json`` read
    it, through :meth:`to_qapi` and :func:`query_migrate`, so each figure is computed once."""

    transferred: int = 0
    remaining: int = 0
    total: int = 0
    duplicate: int = 0  # zero pages
    normal: int = 0
    dirty_sync_count: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    dirty_pages_rate: int = 0  # pages/s, measured at the last sync
    expected_downtime_ms: int | None = None  # None: use downtime-limit
    mbps: float | None = None  # None: the direction's own rate meter
    pages_per_second: int | None = None
    cpu_throttle_percentage: int = 0
    multifd_bytes: int = 0  # of ``transferred``, on multifd channels
    postcopy_bytes: int = 0  # of ``transferred``, after the switch to postcopy
    postcopy_requests: int = 0  # page requests (REQ_PAGES): the source counts those it got
    #: an incoming postcopy with capability postcopy-blocktime: (all vCPUs at once, each
    #: vCPU) in ms, query-migrate's postcopy-blocktime and postcopy-vcpu-blocktime
    blocktime: tuple[int, list[int]] | None = None

    def to_qapi(self, mbps: float, pages_per_second: float) -> dict[str, Any]:
        """query-migrate's ``ram`` member, QEMU 7.2's field names."""
        return {
            "transferred": self.transferred, "remaining": self.remaining, "total": self.total,
            "duplicate": self.duplicate, "skipped": 0, "normal": self.normal,
            "normal-bytes": self.normal * PAGE_SIZE, "dirty-pages-rate": self.dirty_pages_rate,
            "mbps": round(mbps, 3), "dirty-sync-count": self.dirty_sync_count,
            "postcopy-requests": self.postcopy_requests, "page-size": PAGE_SIZE,
            "multifd-bytes": self.multifd_bytes,
            "pages-per-second": int(pages_per_second), "precopy-bytes": self.precopy_bytes,
            "downtime-bytes": self.downtime_bytes, "postcopy-bytes": self.postcopy_bytes,
            "dirty-sync-missed-zero-copy": 0,
        }


class RateMeter:
    """Bytes and pages per second over the last second, from samples taken on queries and
    by the main loop's tick; QEMU's mbps is likewise a recent, not an overall, rate."""

    def __init__(self, window: float = 1.0) -> None:
        self.window = window
        self._samples: deque[tuple[float, int, int]] = deque()

    def sample(self, transferred: int, pages: int) -> tuple[float, float]:
        """Record a sample; returns (mbps, pages per second) over the window."""
        now = time.monotonic()
        self._samples.append((now, transferred, pages))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()
        t0, b0, p0 = self._samples[0]
        dt = now - t0
        if dt <= 0:
            return 0.0, 0.0
        return (transferred - b0) * 8 / dt / 1e6, (pages - p0) / dt


StatusListener = Callable[[str, MigrationStatus], None]


@dataclass
class DirectionState:
    """One direction ('outgoing' or 'incoming'): its phase and what query-migrate reports.

    Written by the migration thread, read by the main loop; ``_lock`` makes each phase
    change and each read of several fields consistent (not the big lock: a query must not
    wait for device loading)."""

    direction: str
    on_status: StatusListener | None = None
    phase: Phase = Phase.IDLE
    error_desc: str | None = None
    started: float = 0.0  # monotonic
    setup_done: float | None = None
    ended: float | None = None
    downtime_ms: int | None = None
    socket_address: list[dict[str, str]] = field(default_factory=list)
    counters: Callable[[], RamCounters] | None = None
    # over rdma: which protocol the connection speaks (QEMU's or mignet's) and its figures
    rdma: Callable[[], dict[str, Any]] | None = None
    meter: RateMeter = field(default_factory=RateMeter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def status(self) -> MigrationStatus:
        return PUBLIC_STATUS[self.phase]

    @property
    def running(self) -> bool:
        return self.phase in _RUNNING or self.phase is Phase.CANCELLING

    def to(self, phase: Phase, error: str | None = None) -> None:
        """Change phase; a change the table does not allow is a bug (MisuseError)."""
        if not self.move(frozenset(TRANSITIONS), phase, error):
            raise MisuseError(f"{self.direction} migration: no transition {self.phase.name} -> {phase.name}")

    def move(self, expect: frozenset[Phase], phase: Phase, error: str | None = None) -> bool:
        """Compare-and-swap: change to ``phase`` only from one of ``expect`` and only if the
        table allows it; False otherwise (e.g. completion racing with a cancel)."""
        with self._lock:
            old = self.phase
            if old not in expect or phase not in TRANSITIONS[old]:
                return False
            now = time.monotonic()
            if phase in (Phase.CONNECTING, Phase.LISTENING):
                self.started, self.setup_done, self.ended = now, None, None
                self.downtime_ms, self.error_desc, self.counters = None, None, None
                self.rdma = None
                self.socket_address = []
                self.meter = RateMeter()
            elif phase is Phase.RAM:
                self.setup_done = now
            elif phase in _ENDED:
                self.ended = now
            if error is not None:
                self.error_desc = error
            self.phase = phase
            changed = PUBLIC_STATUS[old] is not PUBLIC_STATUS[phase]
        if changed and self.on_status is not None:
            self.on_status(self.direction, PUBLIC_STATUS[phase])
        return True


class MigrationState:
    """The process's one migration state: an outgoing and an incoming part, plus the run
    state query-status reports (QEMU's RunState values)."""

    def __init__(self, on_status: StatusListener | None = None, runstate: str = "running") -> None:
        self.outgoing = DirectionState("outgoing", on_status)
        self.incoming = DirectionState("incoming", on_status)
        self.runstate = runstate
        # QEMU's autostart: whether an incoming guest runs when its load completes
        # (``stop`` before the end clears it, ``cont`` sets it).
        self.autostart = True

    def set_listener(self, on_status: StatusListener) -> None:
        self.outgoing.on_status = on_status
        self.incoming.on_status = on_status

    def current(self) -> DirectionState | None:
        """What query-migrate reports: the outgoing side once it has been used, otherwise
        the incoming side once used (QEMU fills source info, then destination info)."""
        if self.outgoing.phase is not Phase.IDLE:
            return self.outgoing
        if self.incoming.phase is not Phase.IDLE:
            return self.incoming
        return None


_SHOWS_RAM = frozenset({MigrationStatus.ACTIVE, MigrationStatus.CANCELLING, MigrationStatus.DEVICE,
                        MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.COMPLETED})


def query_migrate(side: DirectionState, downtime_limit_ms: int) -> dict[str, Any]:
    """The ``query-migrate`` reply for one direction, as QEMU 7.2 shapes it: built here and
    nowhere else (QMP, ``Precopy.query_migrate``, the CLI and ``--json`` all call it)."""
    status = side.status
    info: dict[str, Any] = {"status": status.value}
    if side.socket_address:
        info["socket-address"] = side.socket_address
    if status is MigrationStatus.FAILED and side.error_desc:
        info["error-desc"] = side.error_desc
    if status not in _SHOWS_RAM or side.counters is None:
        return info
    c = side.counters()
    end = side.ended if status is MigrationStatus.COMPLETED and side.ended else None
    now = end or time.monotonic()
    info["total-time"] = int((now - side.started) * 1000)
    if side.setup_done is not None:
        info["setup-time"] = int((side.setup_done - side.started) * 1000)
    if status is MigrationStatus.COMPLETED:
        if side.downtime_ms is not None:
            info["downtime"] = side.downtime_ms
    else:
        info["expected-downtime"] = (c.expected_downtime_ms if c.expected_downtime_ms is not None
                                     else downtime_limit_ms)
    if status is MigrationStatus.COMPLETED and c.mbps is None:
        elapsed = max(1e-9, now - (side.setup_done or side.started))
        mbps, pps = c.transferred * 8 / elapsed / 1e6, c.normal / elapsed
    else:
        mbps, pps = side.meter.sample(c.transferred, c.normal + c.duplicate)
        if c.mbps is not None and c.pages_per_second is not None:
            mbps, pps = c.mbps, c.pages_per_second  # the precopy driver's per-round rates
    info["ram"] = c.to_qapi(mbps, pps)
    if c.cpu_throttle_percentage:
        info["cpu-throttle-percentage"] = c.cpu_throttle_percentage
    if c.blocktime is not None:
        info["postcopy-blocktime"], info["postcopy-vcpu-blocktime"] = c.blocktime
    if side.rdma is not None:  # not in QEMU's reply: an x- member, as QAPI names extensions
        info["x-mignet-rdma"] = {k.replace("_", "-"): v for k, v in side.rdma().items()}
    return info
