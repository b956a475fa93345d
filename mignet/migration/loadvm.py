"""The destination's loader: reads a migration stream from a channel into guest RAM.

This is the only place that knows both the wire format (the sans-I/O decoder) and I/O (the
channel). The same ``Loader.run`` serves both receive models:

* threaded (QEMU's ``mig/dst/main``): ``start_load_thread`` runs it in its own thread; the
  channel blocks in the kernel or in ``poll()``; the big lock is taken only for device state
  and switchover, never for RAM;
* coroutine (the pre-threading model): ``run_coroutine(loader.run)`` on the main loop, with a
  non-blocking channel whose ``wait_cond`` yields; the main loop holds the big lock around it.

Zero copy. Pages go from the socket straight into the numpy block: after a page record, the
payload is read directly into a view of guest RAM together with the next 8-byte record word
(one system call per page). For runs of pages, the loader predicts that the next records are
CONTINUE'd pages at consecutive offsets and reads up to 511 of them (their words into a small
array, their payloads into place) with one vectored read, then validates every predicted word
in one numpy comparison. It only predicts into pages that still hold their initial zeros, so a
wrong guess is undone by zeroing them again, and the bytes that arrived are handed back to the
decoder: nothing is ever written outside the announced RAM blocks, and a wrong guess costs
time, never correctness.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mignet.channel import Channel
from mignet.errors import ConnectionLostError, MignetError, ProtocolError, SetupError, TimedOut
from mignet.guest.devices import KNOWN_DEVICES, DeviceSet
from mignet.guest.ram import GuestRam, RamBlock
from mignet.migration.postcopy import PostcopyIncoming, PostcopyStats, read_page_payload
from mignet.runtime.bql import assert_bql_not_held, bql_held
from mignet.runtime.cancel import Cancel
from mignet.runtime.coroutine import run_coroutine
from mignet.runtime.threads import start_thread
from mignet.units import human_bytes
from mignet.wire import (
    NEED_DATA,
    PAGE_SIZE,
    Configuration,
    DeviceState,
    EndOfStream,
    RamBlocks,
    RamEndOfSection,
    RamPage,
    RamZero,
    StreamDecoder,
    StreamFinished,
    StreamStart,
    VMDescription,
    match_page_run,
)
from mignet.wire.constants import CONTINUE_PAGE_FLAGS, PAGE_RECORD_SIZE
from mignet.wire.decoder_states import DecoderState
from mignet.wire.events import (
    Command,
    Packaged,
    PostcopyAdvise,
    PostcopyDiscard,
    PostcopyListen,
    PostcopyRecvBitmap,
    PostcopyResume,
    PostcopyRun,
)
from mignet.wire.postcopy import PostcopyState, recv_bitmap_reply, resume_ack
from mignet.wire.return_path import CMD_OPEN_RETURN_PATH, CMD_PING, rp_pong, rp_shut

MAX_RUN = 511  # (1 + 2 * 511 + 1) buffers fit Linux's IOV_MAX of 1024
MIN_RUN = 4
BULK_LOW_WATER = 2 << 20  # see SocketChannel.hint_bulk_reads
BQL_BURST = 0.002  # longest the loader keeps the big lock for a burst of device sections
LOAD_THREAD_NAME = "mig/dst/main"


@dataclass
class LoadStats:
    """Progress of one incoming migration; written by the loader, read by anyone."""

    started: float = field(default_factory=time.monotonic)
    ram_total: int = 0
    bytes_received: int = 0  # stream bytes consumed
    normal_pages: int = 0
    zero_pages: int = 0
    sections: int = 0  # RAM iterations (EOS) seen
    device_sections: int = 0
    predicted_pages: int = 0  # placed by the run fast path
    mispredictions: int = 0
    machine_type: str = ""
    ram_section_id: int | None = None  # the source's id for 'ram' (a replay reuses it)
    # QEMU's return path, when the source opened it: {"opened", "pings", "shut"}
    return_path: dict[str, Any] | None = None
    finished: float | None = None
    switchover_at: float | None = None
    setup_seconds: float = 0.0  # registering RAM for remote writes (RDMA), QEMU's setup-time
    placed_bytes: int = 0  # page data the source wrote into our RAM itself (RDMA), as it reports
    postcopy: PostcopyStats | None = None  # when the source switched to postcopy

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def ram_done(self) -> int:
        """RAM bytes placed so far (pages written or zero-filled, by us or by RDMA)."""
        return (self.normal_pages + self.zero_pages) * PAGE_SIZE + self.placed_bytes


@dataclass
class LoadResult:
    stats: LoadStats
    ram: GuestRam
    devices: DeviceSet
    description: dict[str, Any] | None


#: Seconds a peer may stall (send nothing we read, take nothing we send) before a migration
#: gives up with TimedOut. QEMU's sources write at least every 50 ms while they migrate
#: (each iteration ends its section), mignet's at least every section, so a minute of
#: silence is a stalled peer or network, not a slow one.
IDLE_TIMEOUT = 60.0


class Loader:
    """Loads one stream from ``channel``.

    ``ram`` is the destination's RAM; when None, blocks are created as the stream announces
    them (up to ``max_ram_bytes``). With a given ``ram``, the announced layout must match.
    """

    def __init__(self, channel: Channel, *, ram: GuestRam | None = None,
                 devices: DeviceSet | None = None, max_ram_bytes: int = 1 << 40,
                 on_switchover: Callable[[], None] | None = None,
                 block_factory: Callable[[str, int], RamBlock] = RamBlock.anonymous,
                 threaded: bool = True, idle_timeout: float | None = IDLE_TIMEOUT,
                 postcopy: bool = False, vcpus: int = 1) -> None:
        self.channel = channel
        channel.set_idle_timeout(read=idle_timeout)  # a stalled source ends the load
        self._idle_timeout = idle_timeout
        self.pause_reason: str | None = None  # why postcopy last paused
        self.ram = ram
        self.devices = devices if devices is not None else DeviceSet.empty()
        self.decoder = StreamDecoder(devices=KNOWN_DEVICES, max_ram_bytes=max_ram_bytes)
        # QEMU's RDMA source marks its registration exchanges with HOOK records.
        self.decoder.rdma_hooks = channel.page_placement is not None
        self.stats = LoadStats()
        self.description: dict[str, Any] | None = None
        self.on_switchover = on_switchover
        self.block_factory = block_factory
        self.threaded = threaded
        self._cancel = Cancel("incoming migration", on_cancel=self._wake)
        self._small = bytearray(1 << 16)
        self._small_view = memoryview(self._small)
        self._words = np.zeros(MAX_RUN + 1, dtype=">u8")
        word_bytes = self._words.data.cast("B")
        self._word_views = [word_bytes[i * 8:i * 8 + 8] for i in range(MAX_RUN + 1)]
        self._run = MIN_RUN
        self._stash: Any = None  # an event taken during a device burst, not yet handled
        self._bulk_on = False
        self._block_name: str | None = None
        self._block: RamBlock | None = None
        self._block_view: memoryview | None = None
        #: Hooks (multifd): the RAM blocks once created, and every RAM end-of-section
        #: (QEMU's multifd_recv_sync_main barrier); called in the loader's thread.
        self.on_blocks: Callable[[GuestRam], None] | None = None
        self.on_ram_eos: Callable[[], None] | None = None
        self.channel_count: Callable[[], int] | None = None  # multifd channels connected
        #: Postcopy's phases as they happen ("listen": RAM now faults, QEMU's postcopy-active;
        #: "run": the guest runs here), called in the loader's thread.
        self.on_postcopy: Callable[[str], None] | None = None
        self._eos_hooked = False
        #: postcopy-ram on here (QEMU refuses an ADVISE without it); vCPUs that read RAM
        #: once the guest runs, so its page faults pull pages.
        self.postcopy_allowed = postcopy
        self.vcpus = vcpus
        self.postcopy: PostcopyIncoming | None = None
        self._listening = False  # pages go through userfaultfd from now on
        self._rp_lock = threading.Lock()  # PONG/SHUT (loader) and page requests (fault thread)
        self._preempt_lock = threading.Lock()
        #: Postcopy recovery: a connection that replaces a lost one arrives here
        #: (:meth:`offer_recovery`); without ``recoverable`` a loss fails the load.
        self.recoverable = False
        self._recovery: queue.Queue[Channel | None] = queue.Queue()
        self._awaiting_recovery = False
        self._ended = False  # run() returned or raised: late connections are closed
        self._preempt: Channel | None = None  # QEMU's postcopy preempt channel, once accepted
        self._bounce = np.zeros(PAGE_SIZE, dtype=np.uint8)
        self._bounce_view = self._bounce.data.cast("B")

    # --- control ---------------------------------------------------------------------
    def _wake(self) -> None:
        self.channel.shutdown()
        self._recovery.put(None)

    def cancel(self) -> None:
        """Stop loading from any thread: the channel is shut down, a blocked read wakes."""
        self._cancel.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancel.requested

    # --- the loop --------------------------------------------------------------------
    def run(self) -> LoadResult:
        """Load until the stream is complete. Raises ProtocolError for a bad stream,
        ConnectionLostError when the peer vanished, MigrationCancelled on cancel."""
        if self.threaded:
            assert_bql_not_held("the threaded loader")
        failed = True
        try:
            while True:
                try:
                    result = self._load()
                    failed = False
                    return result
                except (ConnectionLostError, TimedOut) as exc:
                    if self.postcopy is not None and self.postcopy.error is not None:
                        raise self.postcopy.error from None  # the fault thread broke first
                    if not self._may_pause():
                        raise
                    self._pause_and_recover(exc)
        finally:
            self._ended = True
            if self.postcopy is not None:
                try:  # idempotent; on failure it wakes any stuck vCPU
                    self.postcopy.close()
                except MignetError:
                    if not failed:
                        raise  # else the error in flight is the one to report
            if self._preempt is not None and not self._preempt.closed:
                self._preempt.close()  # accepted, but postcopy never began
            self._drain_recovery()

    def _load(self) -> LoadResult:
        dec = self.decoder
        with self._cancel.guard():
            while True:
                event, self._stash = (self._stash, None) if self._stash is not None else (dec.next_event(), None)
                cls = type(event)
                if cls is RamPage:
                    if self._listening:
                        self._place_postcopy_page(event)  # type: ignore[arg-type]
                    else:
                        self._place_page(event)  # type: ignore[arg-type]
                elif event is NEED_DATA:
                    if dec.state is DecoderState.PAGE_PAYLOAD:
                        self._place_payload()
                    else:
                        if dec.state is DecoderState.RAM_FOOTER and self.on_ram_eos is not None \
                                and not self._eos_hooked:
                            # At the EOS record, not after its footer: a multifd source
                            # flushes the footer only after the next round's SYNCs.
                            self._eos_hooked = True
                            self.on_ram_eos()
                        self._feed()
                elif cls is RamZero:
                    self._zero_page(event)  # type: ignore[arg-type]
                elif cls is RamEndOfSection:
                    self.stats.ram_section_id = event.section_id  # type: ignore[union-attr]
                    self.stats.sections += 1
                    self.stats.bytes_received = dec.offset
                    if self._eos_hooked:
                        self._eos_hooked = False
                    elif self.on_ram_eos is not None:
                        self.on_ram_eos()
                elif cls is DeviceState:
                    self._load_device(event)  # type: ignore[arg-type]
                elif cls is RamBlocks:
                    self._setup_blocks(event)  # type: ignore[arg-type]
                elif cls is EndOfStream:
                    if self._listening:
                        assert self.postcopy is not None
                        self.postcopy.finish()  # the guest switched over at RUN
                    else:
                        self._switchover()
                elif cls is VMDescription:
                    self.description = event.description  # type: ignore[union-attr]
                    break  # nothing may follow: do not wait for the peer to close
                elif cls is StreamFinished:
                    break
                elif cls is Configuration:
                    self.stats.machine_type = event.machine_type  # type: ignore[union-attr]
                elif cls is Command:
                    self._command(event)  # type: ignore[arg-type]
                elif cls is StreamStart:
                    pass
                else:
                    self._postcopy_event(event)
        self.stats.bytes_received = dec.offset
        rp = self.stats.return_path
        if rp is not None:  # loaded: confirm, so the source may report completed
            self._send_rp(rp_shut(0))
            rp["shut"] = 0
        self.stats.finished = time.monotonic()
        if self.ram is None:
            raise ProtocolError("the stream ended without a RAM section: there is no guest to "
                                "load (is the source a migration of a guest with RAM?)")
        return LoadResult(self.stats, self.ram, self.devices, self.description)

    def _bulk(self, on: bool) -> None:
        """Low water only for predicted-run reads (threaded, blocking): every other read
        must return with whatever is there, or a read-ahead could wait for bytes the peer
        sends only later."""
        if on != self._bulk_on and self.threaded and self.channel.blocking:
            self.channel.hint_bulk_reads(BULK_LOW_WATER if on else 1)
            self._bulk_on = on

    def _feed(self) -> None:
        """Read what the decoder asks for (never page payload, bar the read-aheads its
        ``wanted`` documents) and feed it. Invariant the RDMA transport relies on: every
        event already buffered is applied before the next read."""
        self._bulk(False)
        want = min(self.decoder.wanted(), len(self._small))
        n = self.channel.read_some_into([self._small_view[:want]])
        if n == 0:
            self._cancel.check()
            self.decoder.receive_eof()
        else:
            self.decoder.receive_data(self._small_view[:n])

    def _command(self, event: Command) -> None:
        """QEMU's return path: OPEN_RETURN_PATH, then PING answered with PONG on the same
        channel (the loader's thread writes; nothing else writes on an incoming channel)."""
        if event.cmd == CMD_OPEN_RETURN_PATH:
            self.stats.return_path = {"opened": True, "pings": 0, "shut": None}
        elif event.cmd == CMD_PING:
            rp = self.stats.return_path
            if rp is None:
                raise ProtocolError("PING before OPEN_RETURN_PATH: the source never opened "
                                    "the return path")
            self._send_rp(rp_pong(int.from_bytes(event.data, "big")))
            rp["pings"] += 1

    # --- postcopy recovery (QEMU's postcopy-paused, migrate-recover, migrate -r) ----------
    def offer_recovery(self, channel: Channel) -> bool:
        """A connection that starts with a stream command: a source resuming postcopy
        (any thread). Taken at once if paused; if the old connection still looks alive,
        it is given up for the new one (the source would not reconnect otherwise). Refused
        (False; the caller closes it) where a resume cannot be: before RUN, without
        postcopy, after the load ended — a stranger must not end a healthy migration."""
        if self._ended or not (self._awaiting_recovery or self._may_pause()):
            return False
        self._recovery.put(channel)
        if not self._awaiting_recovery:
            self.channel.shutdown()
        return True

    def _drain_recovery(self) -> None:
        """Close connections offered but not taken (a second resume, or one after the end)."""
        while True:
            try:
                extra = self._recovery.get_nowait()
            except queue.Empty:
                return
            if extra is not None:
                extra.close()

    def _may_pause(self) -> bool:
        pc = self.postcopy
        return (self.recoverable and self._listening and pc is not None and not pc.closed
                and pc.error is None and not pc.has_preempt and not self._cancel.requested
                and self.decoder.postcopy is PostcopyState.RUNNING)

    def _pause_and_recover(self, lost: BaseException) -> None:
        """The source's connection broke in postcopy: the guest keeps its RAM and waits
        (postcopy-paused) until a source resumes on a new connection (postcopy-recover)."""
        assert self.postcopy is not None
        self.channel.close()  # first: a request blocked writing to it wakes, then pause
        self.postcopy.pause()
        self.pause_reason = str(lost)
        self._awaiting_recovery = True
        if self.on_postcopy is not None:
            self.on_postcopy("paused")
        while True:
            try:
                channel = self._recovery.get(timeout=0.5)
            except queue.Empty:
                channel = None
            self._cancel.check()
            if channel is not None:
                break
        self._awaiting_recovery = False
        self._drain_recovery()  # a second resuming connection: the first one is taken
        channel.set_idle_timeout(read=self._idle_timeout)
        self.channel = channel
        self._cancel.check()  # a cancel while swapping shut the old channel only
        self.decoder = self.decoder.resumed()
        self._block_name = None
        if self.on_postcopy is not None:
            self.on_postcopy("recover")

    def _send_rp(self, message: bytes) -> None:
        """One whole return-path message; the loader and the fault thread both send."""
        with self._rp_lock:
            self.channel.write_all(message)

    # --- postcopy (QEMU's loadvm_postcopy_handle_*) ---------------------------------------
    def _postcopy_event(self, event: Any) -> None:
        cls = type(event)
        if cls is PostcopyAdvise:
            self._advise(event)
            return
        pc = self.postcopy
        assert pc is not None  # the decoder allows nothing else before ADVISE
        if self.ram is None:
            raise ProtocolError(f"{cls.__name__.removeprefix('Postcopy').upper()} before the "
                                "RAM section: postcopy of a guest with no RAM")
        if cls is PostcopyDiscard:
            pc.discard(self.ram[event.block], event.ranges)
        elif cls is PostcopyListen:
            if self.stats.return_path is None:
                raise ProtocolError("postcopy without a return path: the source never opened "
                                    "it, so it could never be asked for a page")
            if self.channel_count is not None and self.channel_count():
                raise SetupError("postcopy with multifd is not supported by mignet: turn off "
                                 "multifd or postcopy-ram on the source")
            with self._preempt_lock:
                pc.listen()
                self._listening = True
                if self._preempt is not None:
                    pc.attach_preempt(self._preempt)
            self._bulk(False)
            if self.on_postcopy is not None:
                self.on_postcopy("listen")
        elif cls is PostcopyRun:
            self._switchover()  # the guest runs here from now on
            pc.run()
            if self.on_postcopy is not None:
                self.on_postcopy("run")
        elif cls is PostcopyRecvBitmap:
            self._send_rp(recv_bitmap_reply(event.block, pc.received(event.block)))
        elif cls is PostcopyResume:
            self._send_rp(resume_ack())
            pc.resume()
            if self.on_postcopy is not None:
                self.on_postcopy("active")
        elif cls is not Packaged:
            raise ProtocolError(f"unexpected {cls.__name__} in the stream")

    def attach_preempt(self, channel: Channel) -> None:
        """The postcopy preempt channel was accepted (any thread, any time): its pages are
        read from LISTEN on, whichever comes first."""
        channel.set_idle_timeout(read=None)  # silent until a page is asked for
        with self._preempt_lock:
            if self._ended:
                channel.close()
                return
            self._preempt = channel
            if self._listening and self.postcopy is not None:
                self.postcopy.attach_preempt(channel)

    def _advise(self, event: PostcopyAdvise) -> None:
        if not self.postcopy_allowed:
            raise SetupError("the source advised postcopy (postcopy-ram), which is off here: "
                             "turn it on (recv --postcopy; postcopy-ram on serve) or off there")
        if event.page_size_summary != PAGE_SIZE or event.target_page_size != PAGE_SIZE:
            raise ProtocolError(
                f"postcopy needs matching RAM page sizes: the source has "
                f"{event.page_size_summary:#x} (target {event.target_page_size:#x}), mignet "
                f"{PAGE_SIZE:#x} (huge-page guests cannot be postcopied here)")
        if not self.channel.duplex_threads or self.channel.page_placement is not None:
            raise SetupError(f"postcopy over {self.channel.name} is not supported by mignet: "
                             "use plain tcp: without TLS, or turn off postcopy-ram")
        self.postcopy = PostcopyIncoming(self._send_rp, vcpus=self.vcpus,
                                         on_error=lambda: self.channel.shutdown())
        self.stats.postcopy = self.postcopy.stats
        if self.ram is not None:  # QEMU advises before its RAM setup; take it after too
            self.postcopy.prepare(self.ram)

    # --- RAM -------------------------------------------------------------------------
    def _setup_blocks(self, event: RamBlocks) -> None:
        if self.ram is None:
            blocks: list[RamBlock] = []
            try:
                for name, size in event.blocks:
                    blocks.append(self.block_factory(name, size))
            except (MemoryError, OSError) as exc:
                if isinstance(exc, MignetError):
                    raise
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
                raise SetupError(
                    f"cannot allocate the source's {human_bytes(event.total)} of guest RAM here "
                    f"({why}): lower --max-ram so such a source is refused up front, or free memory"
                ) from None
            self.ram = GuestRam(blocks)
        else:
            for name, size in event.blocks:
                block = self.ram.get(name)
                if block is None:
                    raise ProtocolError(
                        f"the source sends RAM block {name!r}, which this destination lacks "
                        f"(it has {', '.join(b.name for b in self.ram) or 'none'})")
                if block.size != size:
                    raise ProtocolError(
                        f"RAM block {name!r} is {block.size} bytes here but {size} in the stream")
        self.stats.ram_total = event.total
        if self.channel.page_placement is not None:
            t0 = time.monotonic()
            self.channel.page_placement.on_placed = lambda n: setattr(self.stats, "placed_bytes", n)
            for block in self.ram:
                # Pages now change behind the loader's back: nothing is known to be
                # pristine, so a later ZERO record must really clear its page.
                block.pristine = None
            self.channel.page_placement.register_destination_ram(self.ram)
            self.stats.setup_seconds = time.monotonic() - t0
        if self.postcopy is not None:
            self.postcopy.prepare(self.ram)
        if self.on_blocks is not None:
            self.on_blocks(self.ram)

    def _select_block(self, name: str) -> RamBlock:
        if name != self._block_name:
            assert self.ram is not None
            self._block = self.ram[name]
            self._block_view = self._block.view()
            self._block_name = name
        assert self._block is not None
        return self._block

    def _zero_page(self, event: RamZero) -> None:
        block = self._select_block(event.block)
        if self._listening:
            assert self.postcopy is not None
            self.postcopy.place_zero(block, event.offset, event.fill)
        else:
            block.fill_page(event.offset, event.fill)
        self.stats.zero_pages += 1

    def _place_postcopy_page(self, event: RamPage) -> None:
        """After LISTEN: the payload into a bounce page, then placed whole (UFFDIO_COPY),
        never read into RAM the guest may be reading."""
        block = self._select_block(event.block)
        if not read_page_payload(self.channel, self.decoder, self._bounce_view):
            self._cancel.check()
            return
        assert self.postcopy is not None
        self.postcopy.place(block, event.offset, self._bounce.ctypes.data)
        self.stats.normal_pages += 1

    def _place_page(self, event: RamPage) -> None:
        self._select_block(event.block)
        self._page_offset = event.offset
        self._place_payload()

    def _place_payload(self) -> None:
        """Place the current page's payload straight into guest RAM, reading the next
        record word(s) with it — and, where it may, a predicted run of further pages."""
        dec = self.decoder
        block = self._block
        mv = self._block_view
        assert block is not None and mv is not None
        while True:
            off = self._page_offset
            left = dec.payload_left
            end = off + PAGE_SIZE
            if dec.buffered:  # payload bytes that came with a header: copy them in
                left -= dec.take_payload_into(mv[end - left:end])
                if left == 0:
                    self._page_done(block, off, 1)
                    return
            n = self._predict(block, off)
            iov: list[Any] = [None] * (2 * n + 2)
            iov[0] = mv[end - left:end]
            if n:
                iov[1:2 * n:2] = self._word_views[:n]
                iov[2:2 * n + 1:2] = [mv[o:o + PAGE_SIZE] for o in range(end, end + n * PAGE_SIZE, PAGE_SIZE)]
            iov[2 * n + 1] = self._word_views[n]
            self._bulk(n > 0)
            got = self.channel.read_some_into(iov)
            if got == 0:
                self._cancel.check()
                dec.receive_eof()
                return
            if got < left:
                dec.payload_placed(got)
                continue
            dec.payload_placed(left)
            self._page_done(block, off, 1)
            rest = got - left
            if rest == 0:
                return
            full = min(rest // PAGE_RECORD_SIZE, n)
            matched = match_page_run(self._words[:full], end) if full else 0
            if matched:
                dec.accept_page_run(matched)
                self._page_done(block, end, matched)
                self.stats.predicted_pages += matched
            rem = rest - matched * PAGE_RECORD_SIZE
            if matched == n and n:
                self._run = min(MAX_RUN, self._run * 2)
            if rem == 0:
                return
            slot = matched
            if (matched == full and slot < n and rem >= 8
                    and int(self._words[slot]) == (end + slot * PAGE_SIZE) | CONTINUE_PAGE_FLAGS):
                # A predicted page whose payload is still arriving: let the decoder take
                # the word, then keep placing the payload directly.
                dec.receive_data(self._word_views[slot])
                page = dec.next_event()
                assert type(page) is RamPage and page.offset == end + slot * PAGE_SIZE
                dec.payload_placed(rem - 8)  # less than a page: full pairs were counted
                self._page_offset = page.offset
                continue
            self._mispredicted(block, end, slot, rem, n)
            return

    def _predict(self, block: RamBlock, off: int) -> int:
        """How many pages after the one at ``off`` to read speculatively."""
        pristine = block.pristine
        if pristine is None:
            return 0
        first = off // PAGE_SIZE + 1
        window = pristine[first:first + self._run]
        if window.size == 0:
            return 0
        if window.all():
            return int(window.size)
        return int(window.argmin())

    def _mispredicted(self, block: RamBlock, end: int, slot: int, rem: int, n: int) -> None:
        """Undo a wrong guess from ``slot`` on: hand the ``rem`` bytes that arrived there
        back to the decoder in stream order and re-zero the pristine pages they hit."""
        mv = self._block_view
        assert mv is not None
        touched_pages = slot < n and rem > 8
        head = min(8, rem)
        data = bytearray(self._word_views[slot][:head])
        rem -= head
        i = slot
        while rem > 0 and i < n:
            page_at = end + i * PAGE_SIZE
            take = min(PAGE_SIZE, rem)
            data += mv[page_at:page_at + take]
            block.data[page_at:page_at + take] = 0
            rem -= take
            if rem > 0:
                head = min(8, rem)
                data += self._word_views[i + 1][:head]
                rem -= head
            i += 1
        self.decoder.receive_data(data)
        if touched_pages:
            self.stats.mispredictions += 1
            self._run = max(MIN_RUN, self._run // 4)

    def _page_done(self, block: RamBlock, off: int, count: int) -> None:
        if block.pristine is not None:
            first = off // PAGE_SIZE
            block.pristine[first:first + count] = False
        self.stats.normal_pages += count

    # --- devices and switchover ------------------------------------------------------
    def _load_device(self, event: DeviceState) -> None:
        """Apply device sections under the big lock: this one, then those that follow and
        are already buffered, for up to ``BQL_BURST`` seconds — one lock handoff per burst
        instead of per section, and never a wait for I/O with the lock held."""
        deadline = time.perf_counter() + BQL_BURST
        with bql_held():
            while True:
                self.devices.load(event.idstr, event.instance_id, event.version_id, event.raw,
                                  event.fields, event.section_id)
                self.stats.device_sections += 1
                if time.perf_counter() >= deadline:
                    return
                nxt = self.decoder.next_event()  # from the buffer only: NEED_DATA otherwise
                if type(nxt) is not DeviceState:
                    self._stash = nxt  # handled by run() without the lock
                    return
                event = nxt

    def _switchover(self) -> None:
        """The guest changes hosts: at EOF in precopy (every section is loaded), at RUN in
        postcopy (the rest of RAM still streams). Like QEMU's switchover, this touches
        main-loop state (the run state), so it holds the big lock."""
        with bql_held():
            self.stats.switchover_at = time.monotonic()
            if self.on_switchover is not None:
                self.on_switchover()


class LoadThread:
    """Runs a :class:`Loader` in its own thread named ``mig/dst/main`` (started at once);
    the result or the error is collected with :meth:`join`."""

    def __init__(self, loader: Loader, bulk: bool = False) -> None:
        self.loader = loader
        # bulk (a process that answers QMP): below the main loop's CPU priority, so answers
        # do not queue behind the load; a plain ``recv`` keeps its loader at full priority
        self.thread, self.future = start_thread(loader.run, LOAD_THREAD_NAME, bulk=bulk)

    def join(self, timeout: float | None = None) -> LoadResult:
        """The load's result, or what it raised; TimeoutError if still running."""
        try:
            return self.future.result(timeout)
        except FutureTimeout:
            if self.future.done():
                raise  # the load itself timed out (TimedOut is a TimeoutError too)
            raise TimeoutError(f"loader still running after {timeout} s") from None


def start_load_thread(loader: Loader, bulk: bool = False) -> LoadThread:
    return LoadThread(loader, bulk)


async def load_in_coroutine(loader: Loader) -> LoadResult:
    """The pre-threading model: the same ``Loader.run`` as a coroutine of the main loop.

    The channel becomes non-blocking, so a read that would block goes through
    ``wait_cond``, which yields to the loop; on a :class:`~mignet.runtime.mainloop.MainLoop` the
    coroutine therefore holds the big lock except while yielded, as QEMU's did.
    """
    loader.threaded = False
    loader.channel.set_blocking(False)
    return await run_coroutine(loader.run)
