"""The source's side of postcopy (QEMU's postcopy-ram): precopy rounds first, then the guest
moves to the destination before all of its RAM has, and the rest follows — the pages the
destination asks for first, the others streamed behind them.

Why postcopy at all: a guest that dirties memory faster than the link moves it never
converges in precopy (the dirty set never fits the downtime limit). Postcopy bounds the
downtime by the device state instead of the dirty set, and sends every page once more at
most. The price: the guest on the destination waits for each page it touches that has not
come yet (a fault, a request on the return path, the page), and if the connection breaks
after the switch neither side has the whole guest (so a failure then never restarts the
vCPUs here).

The order follows QEMU 7.2 (migration.c ``migration_thread`` and ``postcopy_start``, ram.c
``ram_postcopy_send_discard_bitmap`` and ``ram_save_queue_pages``):

* after the header: OPEN_RETURN_PATH, PING 1, POSTCOPY_ADVISE; then precopy rounds;
* the switch (after ``postcopy-after`` rounds, or at the first sync after
  :meth:`PostcopySource.start_postcopy`, unless precopy converged first, which
  finishes as precopy, as QEMU does): the vCPUs stop, a last dirty sync, RAM_DISCARD for
  every page still dirty (the destination throws them away and will fault on them), PING 2,
  PACKAGED(LISTEN, device state, PING 3, RUN), PING 4;
* the dirty pages, each once: a page the destination asked for goes out before the next
  background batch, a request for a page already sent is ignored; the background stream
  keeps to max-postcopy-bandwidth, requested pages do not;
* the last RAM section (END) and EOF, no VM description; then the destination's SHUT.

A return-path thread (``mig/src/rp``, QEMU's "return path" thread) reads the destination's
messages the whole time — PONGs, page requests, SHUT — so a request is seen while the
sender writes. Downtime is measured from the vCPUs' stop to the destination's RUN: its
switchover time when the caller can read it (same host, CLOCK_MONOTONIC), else the arrival
of PONG 3, the destination's answer to the ping just before RUN in the package.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mignet.channel import Channel
from mignet.errors import (
    ConnectionLostError,
    MignetError,
    PeerFailedError,
    ProtocolError,
    TimedOut,
)
from mignet.guest.ram import GuestRam, RamBlock, zero_pages
from mignet.guest.workload import Workload
from mignet.migration.dirty import DirtyLog
from mignet.migration.precopy import Precopy, PrecopyParams, RoundStats
from mignet.migration.savevm import Sender
from mignet.migration.status import DirectionState, Phase, RamCounters
from mignet.runtime.halves import bottom_half, upper_half
from mignet.runtime.threads import prompt_handoffs, start_thread
from mignet.units import PAGE_SIZE
from mignet.wire import StreamEncoder
from mignet.wire.postcopy import (
    CMD_PACKAGED,
    CMD_POSTCOPY_LISTEN,
    CMD_POSTCOPY_RAM_DISCARD,
    CMD_POSTCOPY_RUN,
    RP_REQ_PAGES,
    RP_REQ_PAGES_ID,
    discard_payload,
    parse_req_pages,
)
from mignet.wire.return_path import CMD_PING, RP_PONG, RP_SHUT, command, parse_rp_frames, rp_value

RP_THREAD_NAME = "mig/src/rp"
#: Ranges per RAM_DISCARD command: 16 bytes each, well inside the be16 command length
#: (QEMU sends 12 at a time; the destination takes any number).
DISCARD_RANGES = 1024
#: Pages per background batch: small, so a request waits behind at most this much of
#: the stream (256 KiB) before it is served.
STREAM_PAGES = 64
PING_BEFORE_PACKAGE, PING_BEFORE_RUN, PING_AFTER_PACKAGE = 2, 3, 4


@dataclass
class PostcopyParams(PrecopyParams):
    """Precopy's parameters plus postcopy's (QMP names in the comments)."""

    # rounds (dirty syncs) before switching; mignet's, not QEMU's. None: only on request
    # (start_postcopy), as QEMU, whose source switches only on migrate-start-postcopy
    postcopy_after: int | None = 1
    max_postcopy_bandwidth: int = 0  # max-postcopy-bandwidth, bytes/s; 0 = unlimited


@dataclass(frozen=True)
class PageRequest:
    """Pages the destination asked for: ``count`` pages of ``block`` from page ``first``."""

    block: RamBlock
    first: int
    count: int


class ReturnPathReader:
    """Reads the destination's return-path messages in its own thread, from the start of
    the migration to SHUT: PONGs (timestamped), page requests (queued for the sender) and
    SHUT. ``on_request`` runs in this thread after each request is queued (the sender's
    wake-up). An error — a malformed message, a request outside guest RAM, the connection
    lost before SHUT — is kept and ends the thread, which shuts the channel down so a sender
    blocked writing wakes; the sender raises it as the cause."""

    def __init__(self, channel: Channel, ram: GuestRam, on_request: Callable[[], None]) -> None:
        self.channel = channel
        self.ram = ram
        self.on_request = on_request
        self.requests: deque[PageRequest] = deque()  # appended here, popped by the sender
        self.received = 0  # page requests, valid or not used (QEMU's postcopy-requests)
        self.pongs: dict[int, float] = {}  # ping value -> when its PONG came (monotonic)
        self.shut: int | None = None
        self.error: MignetError | None = None
        self.attention = threading.Event()  # a request, SHUT or an error: look now
        #: With a preempt channel: requests are served here, in this thread, as they come
        #: (QEMU 8.0 moved it to its return-path thread for the latency), not queued.
        self.on_urgent: Callable[[PageRequest], None] | None = None
        self._ended = threading.Event()
        self._last: RamBlock | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread, _ = start_thread(self._run, RP_THREAD_NAME)

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        buf = bytearray(64 << 10)
        pending = b""
        try:
            while self.shut is None:
                n = self.channel.read_some_into([memoryview(buf)])
                if n == 0:
                    raise ConnectionLostError(
                        "the destination closed the connection without confirming the load (no "
                        "SHUT on the return path): it most likely failed; see its log")
                try:
                    frames, pending = parse_rp_frames(pending + bytes(buf[:n]), requests=True)
                except ValueError as exc:
                    raise ProtocolError(f"return path: {exc}") from None
                for kind, data in frames:
                    self._message(kind, data)
        except MignetError as exc:
            self.error = exc
            try:  # wakes a sender blocked writing to a destination that stopped reading
                self.channel.shutdown()
            except MignetError:
                pass
        finally:
            self._ended.set()
            self.attention.set()
            self.on_request()

    def _message(self, kind: int, data: bytes) -> None:
        if kind == RP_PONG:
            self.pongs[rp_value(data)] = time.monotonic()
        elif kind == RP_SHUT:
            self.shut = rp_value(data)
        elif kind in (RP_REQ_PAGES, RP_REQ_PAGES_ID):
            self.received += 1
            request = self._request(kind, data)
            if self.on_urgent is not None:
                self.on_urgent(request)
                return
            self.requests.append(request)
            self.attention.set()
            self.on_request()

    def _request(self, kind: int, data: bytes) -> PageRequest:
        """Checked as QEMU's migrate_handle_rp_req_pages / ram_save_queue_pages do."""
        try:
            offset, length, name = parse_req_pages(kind, data)
        except ValueError as exc:
            raise ProtocolError(f"return path: {exc}") from None
        if name is not None:
            block = self.ram.get(name)
            if block is None:
                raise ProtocolError(f"the destination asked for pages of RAM block {name!r}, "
                                    "which this guest lacks: it is not this migration's peer")
            self._last = block
        elif self._last is None:
            raise ProtocolError("the destination sent REQ_PAGES before any REQ_PAGES_ID: it "
                                "never said which RAM block it means")
        block = self._last
        if offset % PAGE_SIZE or length % PAGE_SIZE or not length or offset + length > block.size:
            raise ProtocolError(f"the destination asked for {length:#x} bytes at {offset:#x} of "
                                f"{block.name!r} ({block.size:#x} bytes): not whole pages inside it")
        return PageRequest(block, offset // PAGE_SIZE, length // PAGE_SIZE)

    def wait_shut(self, timeout: float) -> int:
        """The destination's SHUT value, once it came (the Sender's ``shut_from``)."""
        if not self._ended.wait(timeout):
            raise TimedOut(f"the destination did not confirm the load within {timeout:.0f} s "
                           "(no SHUT on the return path)")
        if self.shut is not None:
            return self.shut
        assert self.error is not None
        raise self.error


@dataclass
class _Switch:
    """What the switch to postcopy and the pages after it measured."""

    due: bool = False  # the rounds ended for postcopy, not because precopy converged
    after_rounds: int = 0
    discarded_pages: int = 0
    discard_commands: int = 0
    package_bytes: int = 0
    package_sent: float | None = None  # monotonic
    requested_pages_sent: int = 0  # pages sent because they were asked for
    preempt_pages: int = 0  # of those, the ones sent on the preempt channel
    ignored_requests: int = 0  # requests for pages already sent (all of them)
    background_pages: int = 0


class PostcopySource(Precopy):
    """Precopy rounds, then postcopy: see the module's docstring. ``params`` is a
    :class:`PostcopyParams`; everything else as :class:`Precopy`. The channel must carry a
    return path in both directions from two threads (plain TCP or a UNIX socket)."""

    params: PostcopyParams

    def __init__(self, sender: Sender, workload: Workload | None = None,
                 params: PostcopyParams | None = None, *,
                 destination_loaded: Callable[[], float | None] | None = None,
                 on_round: Callable[[RoundStats], None] | None = None,
                 on_stop: Callable[[], None] | None = None,
                 force_fallback: bool = False, state: DirectionState | None = None,
                 on_active: Callable[[], None] | None = None,
                 preempt: Channel | None = None) -> None:
        super().__init__(sender, workload, params or PostcopyParams(),
                         destination_loaded=destination_loaded, on_round=on_round,
                         on_stop=on_stop, force_fallback=force_fallback, state=state,
                         on_active=on_active)
        sender.return_path = True  # postcopy needs it: QEMU opens it for postcopy-ram
        sender.postcopy_advise = True
        self.reader = ReturnPathReader(sender.channel, sender.ram, sender.limiter.wake)
        sender.shut_from = self.reader.wait_shut
        self._switch = _Switch()
        self._start_now = threading.Event()
        self._handed_over = False  # the package went out: the guest is the destination's
        # postcopy-preempt: a second connection for the requested pages only, written by the
        # return-path thread; ``_claim`` makes each owed page go out once, on either channel
        self.preempt = preempt
        self._preempt_enc = StreamEncoder()  # its own CONTINUE state, as QEMU's per channel
        self._preempt_done = False
        self._claim = threading.Lock()
        self._owed: dict[str, np.ndarray] = {}
        self._restore_handoffs: Callable[[], None] | None = None

    # --- control from other threads ---------------------------------------------------
    @upper_half
    def set_max_postcopy_bandwidth(self, bytes_per_second: int) -> None:
        """QMP migrate-set-parameters max-postcopy-bandwidth: for the background stream
        after the switch, effective at once if it has begun (0 = unlimited)."""
        self.params.max_postcopy_bandwidth = max(0, int(bytes_per_second))
        if self.state.phase is Phase.POSTCOPY:
            self.sender.limiter.set_limit(self.params.max_postcopy_bandwidth)

    @upper_half
    def set_max_bandwidth(self, bytes_per_second: int) -> None:
        """max-bandwidth shapes precopy only; after the switch max-postcopy-bandwidth does."""
        self.params.max_bandwidth = max(0, int(bytes_per_second))
        if self.state.phase is not Phase.POSTCOPY:
            self.sender.limiter.set_limit(self.params.max_bandwidth)

    @upper_half
    def start_postcopy(self) -> None:
        """QMP migrate-start-postcopy: switch at the next sync, whatever the round count."""
        self._start_now.set()

    # --- the migration ----------------------------------------------------------------
    @bottom_half
    def run(self) -> dict[str, Any]:
        """Migrate; returns :meth:`query_migrate`. The return-path thread runs throughout."""
        self.reader.start()
        try:
            return super().run()
        except BaseException as exc:
            for ch in (self.sender.channel, self.preempt):
                try:  # ends the reader's read, and a preempt write blocked in it
                    if ch is not None:
                        ch.shutdown()
                except MignetError:
                    pass
            cause = self.reader.error
            if isinstance(exc, MignetError) and cause is not None and cause is not exc:
                # The reader failed first and shut the channel: its error is the cause.
                self.error = self.state.error_desc = str(cause)
                raise cause from None
            raise
        finally:
            self.reader.join(10)
            if self._restore_handoffs is not None:
                self._restore_handoffs()

    def _leave_precopy(self) -> bool:
        after = self.params.postcopy_after
        due = (after is not None and len(self.rounds) >= after) or self._start_now.is_set()
        self._switch.due = due
        return due

    def _source_may_resume(self) -> bool:
        return not self._handed_over

    def _stop_and_copy(self, log: DirtyLog) -> None:
        if self._switch.due:
            self._postcopy(log)
        else:  # converged first: precopy's own end
            super()._stop_and_copy(log)

    def _postcopy(self, log: DirtyLog) -> None:
        sender, c, sw = self.sender, self._c, self._switch
        sw.after_rounds = len(self.rounds)
        owed = self._stop_guest(log, Phase.POSTCOPY)  # discards and package: no rate limit
        assert c.stopped is not None
        sw.discarded_pages = c.remaining_pages
        discards = [command(CMD_POSTCOPY_RAM_DISCARD, discard_payload(block.name, chunk))
                    for block in sender.ram for chunk in _discard_chunks(owed[block.name])]
        sw.discard_commands = len(discards)
        body = b"".join([
            command(CMD_POSTCOPY_LISTEN), *sender.device_sections(),
            command(CMD_PING, PING_BEFORE_RUN.to_bytes(4, "big")), command(CMD_POSTCOPY_RUN)])
        sw.package_bytes = len(body)
        self._owed = owed
        if self.preempt is not None:
            self.reader.on_urgent = self._urgent
            self._restore_handoffs = prompt_handoffs()
        sender.write_commands([*discards, command(CMD_PING, PING_BEFORE_PACKAGE.to_bytes(4, "big")),
                               command(CMD_PACKAGED, len(body).to_bytes(4, "big")), body])
        self._handed_over = True  # from here the destination may run the guest
        sw.package_sent = time.monotonic()
        sender.write_commands([command(CMD_PING, PING_AFTER_PACKAGE.to_bytes(4, "big"))])
        sender.limiter.set_limit(self.params.max_postcopy_bandwidth)
        self._stream(owed)
        sender.finish_postcopy(after_eof=self._end_preempt)
        c.sent_all = time.monotonic()
        c.remaining_pages = 0
        loaded = self.destination_loaded() if self.destination_loaded is not None else None
        if loaded is not None:
            downtime, c.downtime_at = loaded - c.stopped, "destination"
        elif PING_BEFORE_RUN in self.reader.pongs:
            downtime, c.downtime_at = self.reader.pongs[PING_BEFORE_RUN] - c.stopped, "source-pong"
        else:
            downtime, c.downtime_at = sw.package_sent - c.stopped, "source"
        self.state.downtime_ms = int(round(downtime * 1000))

    def _stream(self, owed: dict[str, np.ndarray]) -> None:
        """Every owed page once: requested ones between background batches, at once; the
        background stream in address order, charged to max-postcopy-bandwidth (requested
        pages are not: they are what the guest is waiting for)."""
        sender, sw = self.sender, self._switch
        for block in sender.ram:
            mask = owed[block.name]
            order = np.flatnonzero(mask)
            for start in range(0, len(order), STREAM_PAGES):
                self._serve_requests(owed)
                idx = order[start:start + STREAM_PAGES]
                with self._claim:
                    idx = idx[mask[idx]]  # less what requests took meanwhile
                    mask[idx] = False
                if not len(idx):
                    continue
                before = sender.stats.transferred
                sender.send_page_list(block, idx)
                sw.background_pages += len(idx)
                self._pace(sender.stats.transferred - before, owed)
        self._serve_requests(owed)

    def _pace(self, sent: int, owed: dict[str, np.ndarray]) -> None:
        """Charge a background batch to the limit and wait for the next one's budget,
        serving requests meanwhile: a request ends the wait, the wait resumes after it."""
        limiter, attention = self.sender.limiter, self.reader.attention
        while True:
            limiter.consume(sent, attention)
            sent = 0
            if not attention.is_set():
                return
            self._serve_requests(owed)

    def _serve_requests(self, owed: dict[str, np.ndarray]) -> None:
        reader, sw = self.reader, self._switch
        if not reader.attention.is_set():
            return
        reader.attention.clear()  # before draining: a request queued after it sets it again
        if reader.error is not None:
            raise reader.error
        if reader.shut not in (None, 0):
            raise PeerFailedError(f"the destination failed during postcopy (SHUT {reader.shut}): "
                                  "see its log; the guest is lost on both sides")
        while reader.requests:
            req = reader.requests.popleft()
            want = self._take(req)
            if not len(want):
                sw.ignored_requests += 1  # sent already: it is on its way (QEMU ignores it too)
                continue
            self.sender.send_page_list(req.block, want)
            sw.requested_pages_sent += len(want)

    def _take(self, req: PageRequest) -> np.ndarray:
        """The requested pages still owed, now no longer owed (claimed to be sent)."""
        with self._claim:
            return self._take_locked(req)

    def _take_locked(self, req: PageRequest) -> np.ndarray:
        mask = self._owed[req.block.name]
        pages = np.arange(req.first, req.first + req.count)
        want = pages[mask[pages]]
        mask[want] = False
        return want

    # --- postcopy-preempt (return-path thread) ------------------------------------------
    def _urgent(self, req: PageRequest) -> None:
        """A request, served at once on the preempt channel by the thread that read it."""
        sw = self._switch
        with self._claim:  # the end of the channel must not come between its records
            if self._preempt_done:
                return
            want = self._take_locked(req)
            if not len(want):
                sw.ignored_requests += 1
                return
            block = req.block
            zero = zero_pages(block.page_words(), want)
            offsets = want.astype(np.uint64) * PAGE_SIZE
            bufs: list[Any] = [self._preempt_enc.zero_records(block.name, offsets[zero])]
            bufs += self._preempt_enc.page_records(block.name, block.data, offsets[~zero])
            assert self.preempt is not None
            self.preempt.writev_all(bufs)
        sw.requested_pages_sent += len(want)
        sw.preempt_pages += len(want)

    def _end_preempt(self) -> None:
        """After the main stream's EOF: the preempt channel's EOS (as QEMU's
        postcopy_preempt_shutdown_file), then nothing more on it."""
        if self.preempt is None:
            return
        with self._claim:
            self._preempt_done = True
            self.preempt.write_all(StreamEncoder.eos())

    # --- statistics -------------------------------------------------------------------
    @upper_half
    def counters(self) -> RamCounters:
        """Precopy's figures; after the switch the bytes are postcopy's, not downtime's."""
        rc = super().counters()
        if self._switch.due and self._c.stopped is not None:
            rc.postcopy_bytes, rc.downtime_bytes = rc.downtime_bytes, 0
        rc.postcopy_requests = self.reader.received
        return rc

    def query_migrate(self) -> dict[str, Any]:
        """Precopy's, plus ``x-mignet.postcopy``: whether and when it switched and what the
        requests did (None when precopy converged first)."""
        info = super().query_migrate()
        sw, c = self._switch, self._c
        x = info["x-mignet"]
        x["stop-and-copy"] = x["stop-and-copy"] and not sw.due
        x["postcopy"] = {
            "after-rounds": sw.after_rounds, "discarded-pages": sw.discarded_pages,
            "discard-commands": sw.discard_commands, "package-bytes": sw.package_bytes,
            "requests": self.reader.received, "requested-pages-sent": sw.requested_pages_sent,
            "ignored-requests": sw.ignored_requests, "background-pages": sw.background_pages,
            "preempt-pages": sw.preempt_pages if self.preempt is not None else None,
            "max-postcopy-bandwidth": self.params.max_postcopy_bandwidth,
            "package-sent-ms": (round((sw.package_sent - c.stopped) * 1000, 3)
                                if sw.package_sent is not None and c.stopped is not None else None),
            "stopped-at": c.stopped,  # CLOCK_MONOTONIC, to compare with the destination's RUN
        } if sw.due and c.stopped is not None else None
        ram = info.get("ram")
        if ram and ram.get("total"):
            x["sent-per-ram"] = round(ram["transferred"] / ram["total"], 3)
        return info


def _discard_chunks(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """The set pages of ``mask`` as (start, length) byte ranges of contiguous runs, in
    commands of at most :data:`DISCARD_RANGES` ranges."""
    if not mask.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask.view(np.int8), [0]))))
    starts, ends = edges[0::2], edges[1::2]
    ranges = [(int(s) * PAGE_SIZE, int(e - s) * PAGE_SIZE) for s, e in zip(starts, ends, strict=True)]
    return [ranges[i:i + DISCARD_RANGES] for i in range(0, len(ranges), DISCARD_RANGES)]
