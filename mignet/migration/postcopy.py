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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mignet.errors import ProtocolError, SetupError
from mignet.guest.ram import GuestRam, RamBlock
from mignet.guest.userfault import (
    MADV_NOHUGEPAGE,
    PageExists,
    Registration,
    Userfaultfd,
    madvise,
)
from mignet.guest.workload import Reader
from mignet.runtime.threads import start_thread
from mignet.units import PAGE_SIZE
from mignet.wire.postcopy import req_pages
from mignet.wire.return_path import rp_message

FAULT_THREAD_NAME = "mig/dst/fault"
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
    latencies: list[float] = field(default_factory=list)  # fault to placement, seconds

    def to_json(self) -> dict[str, Any]:
        lat = np.array(self.latencies) * 1000
        pct = (lambda q: round(float(np.percentile(lat, q)), 3)) if lat.size else (lambda q: None)
        return {"discarded-pages": self.discarded_pages, "pages-placed": self.pages_placed,
                "faults": self.faults, "requests": self.requests,
                "local-zero-faults": self.local_zero_faults,
                "fault-latency-ms": {"p50": pct(50), "p99": pct(99),
                                     "max": round(float(lat.max()), 3) if lat.size else None}}


class PostcopyIncoming:
    """One incoming postcopy. ``send_rp`` writes a whole return-path message (the loader
    serialises it with its own PONG and SHUT); ``vcpus`` reader threads start at RUN."""

    def __init__(self, send_rp: Callable[[bytes], None], *, vcpus: int = 1) -> None:
        self.uffd = Userfaultfd()  # fails now, at ADVISE, if the kernel cannot
        self.send_rp = send_rp
        self.vcpus = vcpus
        self.stats = PostcopyStats()
        self.ram: GuestRam | None = None
        self.reader: Reader | None = None
        self._regs: dict[str, Registration] = {}
        self._needed: dict[str, np.ndarray] = {}
        self._order: list[tuple[int, int, RamBlock]] = []  # (start, end, block) by address
        self._requested: dict[tuple[str, int], float] = {}  # page -> when it faulted
        self._last_block: str | None = None
        self._zero = np.zeros(PAGE_SIZE, dtype=np.uint8)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._fault_thread: threading.Thread | None = None
        self._fault_future: Any = None
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
                except OSError:
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
        needed = self._needed[block.name]
        for start, length in ranges:
            block.discard(start, length)
            needed[start // PAGE_SIZE:(start + length) // PAGE_SIZE] = True
        if block.pristine is not None:
            block.pristine[:] = False  # precopy is over: no more speculative reads
        self.stats.discarded_pages = int(sum(int(n.sum()) for n in self._needed.values()))

    def listen(self) -> None:
        """Register all RAM and start answering faults (QEMU's LISTEN)."""
        assert self.ram is not None
        for block in self.ram:
            self._regs[block.name] = self.uffd.register(block.data.ctypes.data, block.size)
        self.stats.listen_at = time.monotonic()
        self._fault_thread, self._fault_future = start_thread(self._fault_loop, FAULT_THREAD_NAME)

    def run(self) -> None:
        """The guest runs (QEMU's RUN): start its vCPUs."""
        assert self.ram is not None
        self.stats.run_at = time.monotonic()
        if self.vcpus:
            self.reader = Reader(self.ram, threads=self.vcpus)
            self.reader.start()

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
        self._needed[block.name][offset // PAGE_SIZE] = False
        self.stats.pages_placed += 1
        asked = self._requested.pop((block.name, offset), None)
        if asked is not None:
            self.stats.latencies.append(time.perf_counter() - asked)

    def _twice(self, block: RamBlock, offset: int) -> ProtocolError:
        return ProtocolError(f"postcopy: the source sent page {offset:#x} of {block.name!r}, "
                             "which is here already (it was not discarded, or came twice)")

    # --- the fault thread ----------------------------------------------------------------
    def _fault_loop(self) -> None:
        poller = select.poll()
        poller.register(self.uffd.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            poller.poll(_POLL_MS)
            for addr in self.uffd.read_faults():
                self._fault(addr)

    def _fault(self, addr: int) -> None:
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
                self.uffd.zeropage(addr & ~(PAGE_SIZE - 1), PAGE_SIZE)
                self.stats.local_zero_faults += 1
            except PageExists:
                pass  # placed meanwhile; the copy woke the vCPU
            return
        if key in self._requested:
            return  # asked already; several vCPUs stopped on one page
        self.stats.faults += 1
        self._requested[key] = time.perf_counter()
        count = 1
        while count < REQUEST_PAGES and page + count < len(needed) and needed[page + count]:
            count += 1
        name = None if block.name == self._last_block else block.name
        self._last_block = block.name
        kind, data = req_pages(offset, count * PAGE_SIZE, name)
        self.send_rp(rp_message(kind, data))
        self.stats.requests += 1

    # --- the end --------------------------------------------------------------------------
    def missing_pages(self) -> int:
        return int(sum(int(n.sum()) for n in self._needed.values()))

    def finish(self) -> None:
        """The stream ended: every discarded page must be back."""
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
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        try:
            if self._fault_future is not None:
                self._fault_future.result()  # re-raises what the fault thread hit
        finally:
            self.uffd.close()
            if self.reader is not None:
                self.reader.stop()
            os.close(self._wake_r)
            os.close(self._wake_w)
