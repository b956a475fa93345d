"""A running guest: "vCPU" threads that keep writing guest RAM while it is migrated.

They write plain numpy — never telling anyone which pages they touched — so only the kernel's
dirty tracking (or the hash fallback) can find the writes, exactly as a real guest's vCPUs
write memory behind QEMU's back. Each tick writes a whole batch of pages with one numpy
fancy-index assignment, which runs with the GIL released, so the sender thread keeps going.

The rate is a token bucket per thread (bytes per second over all threads). ``throttle`` is
QEMU's cpu-throttle-percentage: a vCPU throttled by p % runs (100 - p) % of the time, so it
writes that fraction of its unthrottled rate; auto-converge raises it.
"""

from __future__ import annotations

import ctypes
import threading
import time
from dataclasses import dataclass

import numpy as np

from mignet.errors import MisuseError, SetupError
from mignet.guest.ram import GuestRam
from mignet.units import PAGE_SIZE

TICK = 0.005  # seconds between batches
MAX_BATCH = 4096  # pages per assignment (16 MiB): bounds the temporary


@dataclass
class WorkloadStats:
    pages_written: int = 0
    ticks: int = 0

    @property
    def bytes_written(self) -> int:
        return self.pages_written * PAGE_SIZE


class Workload:
    """Threads writing random data into random pages of ``ram`` at ``rate`` bytes/s.

    ``hot_fraction``: None for uniform writes over all of RAM, else the fraction of RAM (from
    a random start, contiguous) that receives every write — a guest's working set.
    """

    def __init__(self, ram: GuestRam, rate: int, *, threads: int = 2,
                 hot_fraction: float | None = None, seed: int = 0) -> None:
        if rate < 0:
            raise SetupError(f"dirty rate must not be negative, got {rate}")
        if threads < 1:
            raise SetupError("the workload needs at least one vCPU thread")
        if hot_fraction is not None and not 0 < hot_fraction <= 1:
            raise SetupError(f"hot set fraction must be in (0, 1], got {hot_fraction}")
        self.ram = ram
        self.rate = rate
        self.threads = threads
        self.hot_fraction = hot_fraction
        self.seed = seed
        self.throttle = 0  # percent, 0..99
        self.stats = WorkloadStats()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # guards stats across vCPU threads
        blocks = list(ram)
        self._blocks = blocks
        self._weights = np.array([b.pages for b in blocks], dtype=np.float64)
        self._weights /= self._weights.sum()

    @property
    def running(self) -> bool:
        return bool(self._threads)

    def set_throttle(self, percent: int) -> None:
        """Throttle the vCPUs by ``percent`` (0..99), effective from the next tick."""
        self.throttle = max(0, min(99, int(percent)))

    def start(self) -> None:
        """Start (or resume) the vCPUs."""
        if self._threads:
            raise MisuseError("the workload is running already")
        self._stop.clear()
        for i in range(self.threads):
            t = threading.Thread(target=self._vcpu, args=(self.seed * 1000 + i,),
                                 name=f"vcpu/{i}", daemon=True)
            self._threads.append(t)
            t.start()

    def stop(self) -> None:
        """Stop the vCPUs; when this returns no thread writes guest RAM any more."""
        self._stop.set()
        for t in self._threads:
            t.join()
        self._threads.clear()

    def _vcpu(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        pool = rng.integers(1, np.iinfo(np.uint64).max, size=(MAX_BATCH, PAGE_SIZE // 8), dtype=np.uint64)
        scratch = np.empty_like(pool)
        ranges = [self._page_range(b.pages) for b in self._blocks]
        tokens = 0.0
        last = time.monotonic()
        stamp = np.uint64(seed << 32)
        while not self._stop.is_set():
            now = time.monotonic()
            share = self.rate * (100 - self.throttle) / 100 / self.threads
            # At most 100 ms of writes saved up: a vCPU resumed after a stall does not burst.
            tokens = min(tokens + share * (now - last), max(share * 0.1, PAGE_SIZE)) if share else 0.0
            last = now
            count = min(int(tokens // PAGE_SIZE), MAX_BATCH)
            if count == 0:
                self._stop.wait(TICK)
                continue
            tokens -= count * PAGE_SIZE
            which = int(rng.choice(len(self._blocks), p=self._weights)) if len(self._blocks) > 1 else 0
            lo, hi = ranges[which]
            pages = rng.integers(lo, hi, size=count)
            stamp += np.uint64(1)
            # New content each time (pool XOR a counter), written with one assignment.
            np.bitwise_xor(pool[:count], stamp, out=scratch[:count])
            self._blocks[which].page_words()[pages] = scratch[:count]
            with self._lock:
                self.stats.pages_written += count
                self.stats.ticks += 1
            if tokens < PAGE_SIZE:
                self._stop.wait(TICK)

    def _page_range(self, pages: int) -> tuple[int, int]:
        """[lo, hi) of the pages the vCPUs write in a block: all, or the (shared) hot set."""
        if self.hot_fraction is None:
            return 0, pages
        size = max(1, int(pages * self.hot_fraction))
        start = int(np.random.default_rng(self.seed).integers(0, pages - size + 1))
        return start, start + size


class Reader:
    """A destination's running guest under postcopy: "vCPU" threads that read every page
    of ``ram`` once, in a seeded random order, as fast as the pages come.

    A read of a page that has not arrived stops the thread in the kernel until the page is
    placed — what a real vCPU does — so the read goes through a ctypes call, which releases
    the GIL: a vCPU stuck in a fault never stops the Python thread that resolves it. They
    only read, so the RAM stays comparable byte for byte with the source's.
    """

    def __init__(self, ram: GuestRam, *, threads: int = 1, seed: int = 0) -> None:
        if threads < 1:
            raise SetupError("the reader needs at least one vCPU thread")
        self.ram = ram
        self.threads = threads
        self.seed = seed
        self.pages_read = 0
        self.finished: float | None = None  # monotonic time the last page was read
        self.native_ids: list[int] = []  # the vCPU threads' kernel ids, in vCPU order
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    def start(self) -> None:
        if self._workers:
            raise MisuseError("the reader is running already")
        rng = np.random.default_rng(self.seed)
        # every page of every block as (address), shuffled, split among the threads
        addrs = np.concatenate([b.data.ctypes.data + np.arange(b.pages, dtype=np.uint64) * PAGE_SIZE
                                for b in self.ram]).astype(np.uint64)
        rng.shuffle(addrs)
        self._left = self.threads
        for i, part in enumerate(np.array_split(addrs, self.threads)):
            t = threading.Thread(target=self._vcpu, args=(part,), name=f"vcpu/{i}",
                                 daemon=True)
            self._workers.append(t)
            t.start()
        for t in self._workers:  # known once each has started
            while t.native_id is None:
                time.sleep(0.001)
        self.native_ids = [int(t.native_id) for t in self._workers if t.native_id is not None]

    def stop(self, timeout: float | None = None) -> None:
        """Ask the threads to stop and wait; a thread still blocked in a fault wakes only
        when its page is placed or its range unregistered (the caller's job)."""
        self._stop.set()
        for t in self._workers:
            t.join(timeout)
        self._workers = [t for t in self._workers if t.is_alive()]

    def _vcpu(self, addresses: np.ndarray) -> None:
        """Its share of the pages, 256 at a time as Python ints (a list of every page of
        a large guest would cost seconds and ~36 bytes a page at RUN)."""
        scratch = ctypes.create_string_buffer(8)
        memmove = ctypes.memmove
        done = 0
        for start in range(0, len(addresses), 256):
            if self._stop.is_set():
                break
            for addr in addresses[start:start + 256].tolist():
                memmove(scratch, addr, 1)
            done += min(256, len(addresses) - start)
        with self._lock:
            self.pages_read += done
            self._left -= 1
            if self._left == 0:
                self.finished = time.monotonic()
