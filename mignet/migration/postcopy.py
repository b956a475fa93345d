"""The destination's side of postcopy: RAM that faults, pages asked for, pages placed.

The loader drives it from the stream (QEMU's order: ADVISE, RAM_DISCARD..., LISTEN, RUN)
and places every page that arrives after LISTEN through it; a fault thread
(``mig/dst/fault``, QEMU's ``postcopy/fault``) turns the guest's page faults into page
requests on the return path. Why a page is never written directly once listening: the
guest runs, and a page must appear whole and at once (UFFDIO_COPY), or a vCPU could read
half of it.

Which pages are still owed is known exactly: the discarded ones (``needed``). A fault on
any other missing page is a page the source sent as zero before postcopy and that was
never touched here; it is zero-filled on the spot, since the source would ignore a request
for a page it does not consider dirty.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mignet.channel import Channel
from mignet.errors import MignetError, ProtocolError, SetupError, TimedOut
from mignet.guest.ram import GuestRam, RamBlock
from mignet.guest.userfault import (
    MADV_NOHUGEPAGE,
    PageExists,
    Registration,
    Userfaultfd,
    madvise,
)
from mignet.guest.workload import Reader
from mignet.runtime.threads import prompt_handoffs, start_thread
from mignet.units import PAGE_SIZE
from mignet.wire import NEED_DATA, RamPage, RamZero, StreamDecoder, StreamFinished
from mignet.wire.postcopy import req_pages
from mignet.wire.return_path import rp_message

FAULT_THREAD_NAME = "mig/dst/fault"
PREEMPT_THREAD_NAME = "mig/dst/preempt"
#: How long the end of the main stream waits for the preempt channel's EOS, which QEMU
#: sends right after the main stream's EOF.
PREEMPT_END_TIMEOUT = 30.0
#: Pages asked for per fault: the faulting one and the next ones, which a guest that
#: touched one page is likely to touch next. The source sends the faulting page first and
#: skips those it has sent already.
REQUEST_PAGES = 4
_POLL_MS = 200


@dataclass
class PostcopyStats:
    """What postcopy did here; read by the CLI's JSON and by query-migrate."""

    discarded_pages: int = 0
    pages_placed: int = 0  # after LISTEN, through UFFDIO_COPY / ZEROPAGE
    faults: int = 0  # distinct pages the guest stopped on
    requests: int = 0  # REQ_PAGES messages sent
    local_zero_faults: int = 0  # never-touched zero pages filled here
    listen_at: float | None = None
    run_at: float | None = None
    preempt_pages: int = 0  # of those, the ones that came on the preempt channel
    pauses: int = 0  # connections lost and recovered from (QEMU's postcopy-paused)
    latencies: list[float] = field(default_factory=list)  # fault to placement, seconds
    #: each vCPU's waits for pages, (start, end) on perf_counter, by thread id; and the
    #: vCPUs' thread ids in order (QEMU's postcopy-blocktime and postcopy-vcpu-blocktime)
    blocked: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    vcpu_tids: list[int] = field(default_factory=list)
    #: fault to request sent: this side's share of a fault's latency; the rest is the
    #: source's turnaround and the wire
    request_latencies: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"discarded-pages": self.discarded_pages, "pages-placed": self.pages_placed,
                "preempt-pages": self.preempt_pages, "faults": self.faults,
                "requests": self.requests, "local-zero-faults": self.local_zero_faults,
                "pauses": self.pauses,
                "fault-latency-ms": percentiles_ms(self.latencies),
                "request-latency-ms": percentiles_ms(self.request_latencies),
                "blocktime-ms": self.blocktime_ms(), "vcpu-blocktime-ms": self.vcpu_blocktime_ms()}

    def vcpu_blocktime_ms(self) -> list[int]:
        """Each vCPU's time waiting for pages, in ms (QEMU's postcopy-vcpu-blocktime)."""
        return [int(sum(e - s for s, e in self.blocked.get(tid, ())) * 1000) for tid in self.vcpu_tids]

    def blocktime_ms(self) -> int:
        """The time every vCPU waited at once, in ms (QEMU's postcopy-blocktime: the guest
        as a whole made no progress). A vCPU waits for one page at a time, so its waits do
        not overlap; the sweep counts how many wait at each instant."""
        if not self.vcpu_tids:
            return 0
        events = sorted((t, d) for tid in self.vcpu_tids for s, e in self.blocked.get(tid, ())
                        for t, d in ((s, 1), (e, -1)))
        total, waiting, since = 0.0, 0, 0.0
        for t, d in events:
            if waiting == len(self.vcpu_tids):
                total += t - since
            waiting += d
            since = t
        return int(total * 1000)


def read_page_payload(channel: Channel, dec: StreamDecoder, view: memoryview) -> bool:
    """The current page's payload into ``view`` (a bounce page, never guest RAM): what the
    decoder holds, then the channel. False when the channel ended first (the decoder is
    told, so its next event reports the truncation)."""
    got = dec.take_payload_into(view) if dec.buffered else 0
    while got < PAGE_SIZE:
        n = channel.read_some_into([view[got:]])
        if n == 0:
            dec.receive_eof()
            return False
        dec.payload_placed(n)
        got += n
    return True


def percentiles_ms(seconds: list[float]) -> dict[str, float | None]:
    """p50 / p99 / max in milliseconds (None each when nothing was measured)."""
    if not seconds:
        return {"p50": None, "p99": None, "max": None}
    ms = np.array(seconds) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 3),
            "p99": round(float(np.percentile(ms, 99)), 3), "max": round(float(ms.max()), 3)}


class PostcopyIncoming:
    """One incoming postcopy. ``send_rp`` writes a whole return-path message (the loader
    serialises it with its own PONG and SHUT); ``vcpus`` reader threads start at RUN."""

    def __init__(self, send_rp: Callable[[bytes], None], *, vcpus: int = 1,
                 on_error: Callable[[], None] | None = None) -> None:
        self.uffd = Userfaultfd()  # fails now, at ADVISE, if the kernel cannot
        self.send_rp = send_rp
        self.vcpus = vcpus
        self.stats = PostcopyStats()
        #: What stopped the fault thread: vCPUs then wait for pages nobody asks for, so
        #: ``on_error`` wakes the loader at once (it shuts the channel) and this is its error.
        self.error: MignetError | None = None
        self._on_error = on_error
        self.ram: GuestRam | None = None
        self.reader: Reader | None = None
        self._regs: dict[str, Registration] = {}
        self._needed: dict[str, np.ndarray] = {}
        self._order: list[tuple[int, int, RamBlock]] = []  # (start, end, block) by address
        self._requested: dict[tuple[str, int], float] = {}  # page -> when it faulted
        self._waiting: dict[tuple[str, int], list[tuple[int, float]]] = {}  # page -> (tid, since)
        self._last_block: str | None = None
        self._zero = np.zeros(PAGE_SIZE, dtype=np.uint8)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._fault_thread: threading.Thread | None = None
        self._fault_future: Any = None
        self._place_lock = threading.Lock()  # the main and the preempt channel both place
        self._preempt: Channel | None = None
        self._preempt_future: Any = None
        # the GIL's switch interval and the collector, as they were before LISTEN: the
        # fault and preempt threads must not wait 5 ms for the GIL behind the loader
        self._restore_handoffs: Callable[[], None] | None = None
        # Paused (the source's connection was lost): faults are recorded, not asked for,
        # until a recovery resumes; the lock orders that against the fault thread.
        self._paused = False
        self._request_lock = threading.Lock()
        self._closed = False

    # --- setup, in stream order ----------------------------------------------------------
    def prepare(self, ram: GuestRam) -> None:
        """The blocks exist (precopy is about to fill them): turn off huge pages, as QEMU
        does, so a discard never has to split one; and check each block can be registered,
        so a destination that cannot serve faults says so now, not at switchover."""
        self.ram = ram
        for block in ram:
            addr = block.data.ctypes.data
            if block.mapping is None and not isinstance(block.data, np.memmap):
                try:
                    madvise(addr, block.size, MADV_NOHUGEPAGE)
                except SetupError:
                    pass  # no THP here: nothing to turn off
            try:
                self.uffd.register(addr, block.size)
            except OSError as exc:
                raise SetupError(
                    f"postcopy: RAM block {block.name!r} cannot fault on missing pages here "
                    f"({exc.strerror}): userfaultfd serves anonymous memory and tmpfs files; "
                    "put --out on /dev/shm or leave it out") from None
            self.uffd.unregister(addr, block.size)
            self._needed[block.name] = np.zeros(block.pages, dtype=bool)
            self._order.append((addr, addr + block.size, block))
        self._order.sort(key=lambda t: t[0])

    def discard(self, block: RamBlock, ranges: tuple[tuple[int, int], ...]) -> None:
        """Throw away pages the source dirtied after sending: they must fault again."""
        spans = np.array(ranges, dtype=np.uint64).reshape(-1, 2)
        block.discard(spans)
        first, count = (spans[:, 0] // PAGE_SIZE).astype(np.int64), (spans[:, 1] // PAGE_SIZE).astype(np.int64)
        # every page of every range, without a Python step per range
        self._needed[block.name][np.repeat(first - np.cumsum(count) + count, count)
                                 + np.arange(int(count.sum()))] = True
        if block.pristine is not None:
            block.pristine[:] = False  # precopy is over: no more speculative reads
        self.stats.discarded_pages = int(sum(int(n.sum()) for n in self._needed.values()))

    def listen(self) -> None:
        """Register all RAM and start answering faults (QEMU's LISTEN)."""
        assert self.ram is not None
        for block in self.ram:
            try:
                self._regs[block.name] = self.uffd.register(block.data.ctypes.data, block.size)
            except OSError as exc:  # prepare() registered it once: the host changed since
                raise SetupError(f"postcopy: RAM block {block.name!r} cannot fault on missing "
                                 f"pages ({exc.strerror})") from None
        self.stats.listen_at = time.monotonic()
        self._restore_handoffs = prompt_handoffs(no_gc=True)
        self._fault_thread, self._fault_future = start_thread(self._fault_loop, FAULT_THREAD_NAME)

    def attach_preempt(self, channel: Channel) -> None:
        """QEMU's postcopy preempt channel (capability postcopy-preempt): a second
        connection carrying only the pages asked for, so they never queue behind the
        background stream. Read in its own thread once listening."""
        assert self._regs, "the preempt channel is read only after LISTEN"
        self._preempt = channel
        _, self._preempt_future = start_thread(lambda: self._preempt_loop(channel),
                                               PREEMPT_THREAD_NAME)

    def _preempt_loop(self, channel: Channel) -> None:
        assert self.ram is not None
        dec = StreamDecoder.records({b.name: b.size for b in self.ram})
        page = np.zeros(PAGE_SIZE, dtype=np.uint8)
        view = page.data.cast("B")
        small = memoryview(bytearray(1 << 16))
        while True:
            event = dec.next_event()
            if event is NEED_DATA:
                n = channel.read_some_into([small[:min(dec.wanted(), len(small))]])
                if n == 0:
                    dec.receive_eof()  # the next event says the channel was cut short
                else:
                    dec.receive_data(small[:n])
            elif type(event) is RamPage:
                if not read_page_payload(channel, dec, view):
                    continue  # the next event reports the truncation
                assert self.ram is not None
                self.place(self.ram[event.block], event.offset, page.ctypes.data)
                self.stats.preempt_pages += 1
            elif type(event) is RamZero:
                assert self.ram is not None
                self.place_zero(self.ram[event.block], event.offset, event.fill)
                self.stats.preempt_pages += 1
            elif type(event) is StreamFinished:
                return

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def has_preempt(self) -> bool:
        return self._preempt is not None

    def run(self) -> None:
        """The guest runs (QEMU's RUN): start its vCPUs."""
        assert self.ram is not None
        self.stats.run_at = time.monotonic()
        if self.vcpus:
            self.reader = Reader(self.ram, threads=self.vcpus)
            self.reader.start()
            self.stats.vcpu_tids = list(self.reader.native_ids)

    # --- pages, from the loader's thread --------------------------------------------------
    def place(self, block: RamBlock, offset: int, src: int) -> None:
        """Place the page at ``offset`` from the PAGE_SIZE bytes at address ``src``."""
        try:
            self.uffd.copy(block.data.ctypes.data + offset, src, PAGE_SIZE)
        except PageExists:
            raise self._twice(block, offset) from None
        self._placed(block, offset)

    def place_zero(self, block: RamBlock, offset: int, fill: int) -> None:
        reg = self._regs[block.name]
        try:
            if fill == 0 and reg.zeropage:
                self.uffd.zeropage(block.data.ctypes.data + offset, PAGE_SIZE)
            else:
                page = np.full(PAGE_SIZE, fill, dtype=np.uint8) if fill else self._zero
                self.uffd.copy(block.data.ctypes.data + offset, page.ctypes.data, PAGE_SIZE)
        except PageExists:
            raise self._twice(block, offset) from None
        self._placed(block, offset)

    def _placed(self, block: RamBlock, offset: int) -> None:
        with self._place_lock:
            self._needed[block.name][offset // PAGE_SIZE] = False
            self.stats.pages_placed += 1
            key = (block.name, offset)
            asked = self._requested.pop(key, None)
            now = time.perf_counter()
            if asked is not None:
                self.stats.latencies.append(now - asked)
            for tid, since in self._waiting.pop(key, ()):
                self.stats.blocked.setdefault(tid, []).append((since, now))

    def _twice(self, block: RamBlock, offset: int) -> ProtocolError:
        return ProtocolError(f"postcopy: the source sent page {offset:#x} of {block.name!r}, "
                             "which is here already (it was not discarded, or came twice)")

    # --- the fault thread ----------------------------------------------------------------
    def _fault_loop(self) -> None:
        poller = select.poll()
        poller.register(self.uffd.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while not self._stop.is_set():
                poller.poll(_POLL_MS)
                for addr, tid in self.uffd.read_faults():
                    self._fault(addr, tid)
        except Exception as exc:  # noqa: BLE001 - reported as the migration's error
            self.error = exc if isinstance(exc, MignetError) else SetupError(
                f"postcopy: the page-fault thread failed ({type(exc).__name__}: {exc}): the "
                "guest's vCPUs would wait for pages nobody asks for")
            if self._on_error is not None:
                self._on_error()

    def _fault(self, addr: int, tid: int = 0) -> None:
        found = next(((start, b) for start, end, b in self._order if start <= addr < end), None)
        if found is None:
            return  # not guest RAM: cannot happen for a registered range
        start, block = found
        offset = (addr - start) & ~(PAGE_SIZE - 1)
        page = offset // PAGE_SIZE
        needed = self._needed[block.name]
        key = (block.name, offset)
        if not needed[page]:
            try:  # a zero page never touched here: nobody will send it
                if self._regs[block.name].zeropage:
                    self.uffd.zeropage(addr & ~(PAGE_SIZE - 1), PAGE_SIZE)
                else:
                    self.uffd.copy(addr & ~(PAGE_SIZE - 1), self._zero.ctypes.data, PAGE_SIZE)
                self.stats.local_zero_faults += 1
            except PageExists:
                pass  # placed meanwhile; the copy woke the vCPU
            return
        faulted = time.perf_counter()
        with self._place_lock:
            if not needed[page]:
                return  # placed meanwhile; the copy woke the vCPU
            self._waiting.setdefault(key, []).append((tid, faulted))
            if key in self._requested:
                return  # asked already; several vCPUs stopped on one page
            self._requested[key] = faulted
        self.stats.faults += 1
        count = 1
        while count < REQUEST_PAGES and page + count < len(needed) and needed[page + count]:
            count += 1
        with self._request_lock:
            if self._paused:
                return  # asked for again when the migration resumes
            try:
                self._request(block.name, offset, count)
            except (MignetError, OSError):
                return  # the connection is gone: the loader pauses, the page stays owed
        self.stats.request_latencies.append(time.perf_counter() - faulted)

    def _request(self, block: str, offset: int, count: int) -> None:
        name = None if block == self._last_block else block
        kind, data = req_pages(offset, count * PAGE_SIZE, name)
        self.send_rp(rp_message(kind, data))
        self._last_block = block
        self.stats.requests += 1

    # --- recovery ------------------------------------------------------------------------
    def pause(self) -> None:
        """The source's connection is lost: keep the guest's faults, ask for nothing."""
        with self._request_lock:
            self._paused = True
        self.stats.pauses += 1

    def received(self, name: str) -> np.ndarray:
        """Pages of block ``name`` that are here for good: all but the ones still owed."""
        return ~self._needed[name]

    def resume(self) -> None:
        """The source is back (after its RESUME): ask again for every page a vCPU still
        waits for, since the lost connection may have lost those requests too."""
        with self._request_lock:
            self._last_block = None  # the source forgot it with the old connection
            for name, offset in list(self._requested):
                if self._needed[name][offset // PAGE_SIZE]:
                    self._request(name, offset, 1)
            self._paused = False

    # --- the end --------------------------------------------------------------------------
    def missing_pages(self) -> int:
        return int(sum(int(n.sum()) for n in self._needed.values()))

    def finish(self) -> None:
        """The stream ended: every discarded page must be back (the preempt channel ends
        with its own EOS just after the main stream's EOF)."""
        if self._preempt_future is not None:
            try:
                self._preempt_future.result(PREEMPT_END_TIMEOUT)
            except FutureTimeout:
                raise TimedOut(f"the postcopy preempt channel did not end within "
                               f"{PREEMPT_END_TIMEOUT:.0f} s of the main stream") from None
        missing = self.missing_pages()
        if missing:
            raise ProtocolError(f"postcopy ended with {missing} discarded pages never sent "
                                "again: the guest's RAM is incomplete")
        self.close()

    def close(self) -> None:
        """Stop the fault thread and the vCPUs and let go of userfaultfd (also on failure:
        closing it wakes any vCPU still waiting, which then reads what is there)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._restore_handoffs is not None:
            self._restore_handoffs()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._preempt is not None:
            self._preempt.shutdown()  # wakes its reader
        try:
            if self._fault_future is not None:
                self._fault_future.result(5)  # it ends within a poll interval
            if self.error is not None:
                raise self.error
        except FutureTimeout:
            raise SetupError("postcopy: the page-fault thread did not stop") from None
        finally:
            if self._preempt is not None:
                try:
                    self._preempt_future.result(5)
                except BaseException:  # noqa: BLE001 - the main stream's error is the one to report
                    pass
                self._preempt.close()
            self.uffd.close()
            if self.reader is not None:
                self.reader.stop()
            os.close(self._wake_r)
            os.close(self._wake_w)
