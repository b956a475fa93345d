"""Dirty-page tracking of guest RAM by the kernel, as QEMU relies on KVM's dirty log.

Guest RAM is registered with userfaultfd in write-protect *async* mode
(``UFFD_FEATURE_WP_ASYNC``, Linux 6.7+): a write to a protected page does not stop the
writer — the kernel just clears the page's write-protect bit in its PTE. Each round, one
``PAGEMAP_SCAN`` ioctl on ``/proc/self/pagemap`` with ``PM_SCAN_WP_MATCHING`` returns the
written ranges *and* write-protects them again, atomically per PTE, so a write can never slip
between "collect" and "re-arm". The writers (our "vCPUs") never report anything.

Where the kernel lacks that (older kernel, no userfaultfd, a file mapping uffd-wp does not
support), a portable fallback hashes every page with one vectorised numpy pass per chunk and
compares with the previous round; this is announced once per process, because it costs a
full read of RAM per round instead of a walk of the page tables.

Both report, per RAM block, a boolean mask of *guest* pages (4 KiB units from the block's
first byte). A block that is not page aligned (numpy puts a 16-byte header in front of
large allocations) is handled: a written OS page marks every guest page it overlaps.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from mignet.errors import SetupError
from mignet.guest.ram import GuestRam, RamBlock, allocate_guest_memory
from mignet.units import PAGE_SIZE

OS_PAGE = mmap.PAGESIZE

# --- kernel ABI (linux/userfaultfd.h, linux/fs.h) ------------------------------------------
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282, "riscv64": 282, "ppc64le": 364, "s390x": 355}
UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0

PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WRITTEN = 1 << 1


def _iowr(kind: int, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | nr


UFFDIO_API = _iowr(0xAA, 0x3F, 24)  # struct uffdio_api {api, features, ioctls}
UFFDIO_REGISTER = _iowr(0xAA, 0x00, 32)  # {range {start, len}, mode, ioctls}
UFFDIO_UNREGISTER = (2 << 30) | (16 << 16) | (0xAA << 8) | 0x01  # _IOR, struct uffdio_range
UFFDIO_WRITEPROTECT = _iowr(0xAA, 0x06, 24)  # {range {start, len}, mode}
PAGEMAP_SCAN = _iowr(ord("f"), 16, 96)  # struct pm_scan_arg, 12 x u64
SCAN_VEC = 1 << 16  # page_region entries per ioctl; a walk resumes at walk_end when full

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def _ioctl(fd: int, request: int, arg: ctypes.Array[ctypes.c_char] | int, what: str) -> int:
    """ioctl through ctypes, which drops the GIL for the call (a 2 GiB scan must not stall
    the sender thread)."""
    ptr = arg if isinstance(arg, int) else ctypes.addressof(arg)
    ret = _libc.ioctl(fd, request, ptr)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


# --- the interface ---------------------------------------------------------------------------
@dataclass
class SyncCost:
    """What the last collection of the dirty set cost."""

    seconds: float = 0.0
    bytes_tracked: int = 0
    dirty_pages: int = 0


class BlockTracker(ABC):
    """Tracks writes to one RAM block."""

    method: str

    def __init__(self, block: RamBlock) -> None:
        self.block = block

    @abstractmethod
    def start(self) -> None:
        """Arm: from now on, every write to the block is recorded."""

    @abstractmethod
    def collect(self) -> np.ndarray:
        """Boolean mask over the block's guest pages written since the last ``start`` or
        ``collect``; tracking stays armed for the next round."""

    def close(self) -> None:  # noqa: B027 - optional: trackers without kernel state keep it
        """Stop tracking and release kernel resources."""


# --- userfaultfd write-protect async + PAGEMAP_SCAN ------------------------------------------
class _Uffd:
    """One userfaultfd in WP-async mode plus the pagemap fd used to scan."""

    def __init__(self) -> None:
        nr = _SYS_USERFAULTFD.get(platform.machine())
        if nr is None:
            raise SetupError(f"userfaultfd syscall number unknown on {platform.machine()}")
        fd = _libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
        if fd < 0:
            err = ctypes.get_errno()
            raise SetupError(f"userfaultfd: {os.strerror(err)}")
        self.fd = int(fd)
        want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM
        try:
            self.features = self._api(want)
        except OSError:
            # Shared-memory write-protect is optional (only for /dev/shm images): ask again
            # for anonymous memory only. UFFDIO_API may be called once per fd.
            os.close(self.fd)
            self.fd = int(_libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY))
            try:
                self.features = self._api(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)
            except OSError as exc:
                os.close(self.fd)
                raise SetupError(f"userfaultfd without write-protect async mode ({exc.strerror}); "
                                 "it needs Linux 6.7+") from None
        try:
            self.pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            os.close(self.fd)
            raise SetupError(f"/proc/self/pagemap: {exc.strerror}") from None

    def _api(self, features: int) -> int:
        buf = ctypes.create_string_buffer(struct.pack("QQQ", UFFD_API, features, 0), 24)
        _ioctl(self.fd, UFFDIO_API, buf, "UFFDIO_API")
        return struct.unpack("QQQ", buf.raw)[1]

    def close(self) -> None:
        os.close(self.pagemap)
        os.close(self.fd)


class UffdTracker(BlockTracker):
    """Kernel tracking: uffd-wp async marks writes in the PTEs, PAGEMAP_SCAN collects and
    re-protects them in one pass over the page tables (no page is read)."""

    method = "uffd-wp-async"

    def __init__(self, block: RamBlock, uffd: _Uffd) -> None:
        super().__init__(block)
        self.uffd = uffd
        self.base = int(block.data.ctypes.data)
        self.start_addr = self.base & ~(OS_PAGE - 1)
        self.end_addr = (self.base + block.size + OS_PAGE - 1) & ~(OS_PAGE - 1)
        self._vec = np.zeros((SCAN_VEC, 3), dtype=np.uint64)  # struct page_region {start, end, categories}
        self._registered = False
        buf = ctypes.create_string_buffer(
            struct.pack("QQQQ", self.start_addr, self.end_addr - self.start_addr, UFFDIO_REGISTER_MODE_WP, 0), 32)
        try:
            _ioctl(uffd.fd, UFFDIO_REGISTER, buf, "UFFDIO_REGISTER")
        except OSError as exc:
            raise SetupError(f"RAM block {block.name!r}: userfaultfd write-protect refused "
                             f"({exc.strerror}); e.g. a regular-file mapping") from None
        self._registered = True

    def start(self) -> None:
        buf = ctypes.create_string_buffer(
            struct.pack("QQQ", self.start_addr, self.end_addr - self.start_addr, UFFDIO_WRITEPROTECT_MODE_WP), 24)
        _ioctl(self.uffd.fd, UFFDIO_WRITEPROTECT, buf, "UFFDIO_WRITEPROTECT")

    def scan(self) -> np.ndarray:
        """Written OS-page ranges as an (n, 2) array of absolute [start, end) addresses,
        write-protecting them again (PM_SCAN_WP_MATCHING)."""
        arg = (ctypes.c_uint64 * 12)()
        vec_addr = int(self._vec.ctypes.data)
        parts: list[np.ndarray] = []
        start = self.start_addr
        while start < self.end_addr:
            arg[:] = [96, PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, start, self.end_addr, 0,
                      vec_addr, SCAN_VEC, 0, 0, PAGE_IS_WRITTEN, 0, PAGE_IS_WRITTEN]
            n = _ioctl(self.uffd.pagemap, PAGEMAP_SCAN, ctypes.addressof(arg), "PAGEMAP_SCAN")
            if n:
                parts.append(self._vec[:n, :2].copy())
            walk_end = int(arg[4])
            if walk_end <= start:  # no progress: the kernel would loop forever otherwise
                raise SetupError(f"PAGEMAP_SCAN made no progress at {start:#x}")
            start = walk_end
        if not parts:
            return np.zeros((0, 2), dtype=np.uint64)
        return np.concatenate(parts)

    def collect(self) -> np.ndarray:
        return ranges_to_mask(self.scan(), self.base, self.block.pages)

    def close(self) -> None:
        if self._registered:
            buf = ctypes.create_string_buffer(
                struct.pack("QQ", self.start_addr, self.end_addr - self.start_addr), 16)
            try:
                _ioctl(self.uffd.fd, UFFDIO_UNREGISTER, buf, "UFFDIO_UNREGISTER")
            except OSError:
                pass  # the mapping is gone already; closing the fd drops it anyway
            self._registered = False


def ranges_to_mask(ranges: np.ndarray, base: int, pages: int) -> np.ndarray:
    """Absolute [start, end) byte ranges -> mask of the guest pages (4 KiB from ``base``)
    they overlap. Vectorised with a difference array: +1 at each first page, -1 after each
    last page, then a running sum."""
    mask = np.zeros(pages, dtype=bool)
    if len(ranges) == 0:
        return mask
    rel_start = ranges[:, 0].astype(np.int64) - base
    rel_end = ranges[:, 1].astype(np.int64) - base
    first = np.clip(rel_start // PAGE_SIZE, 0, pages)
    last = np.clip((rel_end - 1) // PAGE_SIZE + 1, 0, pages)  # exclusive
    keep = last > first
    diff = np.zeros(pages + 1, dtype=np.int32)
    np.add.at(diff, first[keep], 1)
    np.add.at(diff, last[keep], -1)
    np.cumsum(diff[:-1], out=diff[:-1])
    return diff[:-1] > 0


# --- portable fallback: per-page hashes ------------------------------------------------------
class HashTracker(BlockTracker):
    """Compares a 64-bit hash of every page with last round's. Each page's 512 words are
    multiplied by fixed odd random keys and summed (a multilinear hash: two different pages
    collide with probability about 2^-63), one numpy pass per 64 MiB chunk.

    Hash *before* sending: a write after the hash is seen next round, since the hash then
    differs from the stored one."""

    method = "page-hash"
    CHUNK_PAGES = 16384  # 64 MiB per pass bounds the temporaries

    def __init__(self, block: RamBlock) -> None:
        super().__init__(block)
        rng = np.random.default_rng(0x6D69676E6574)
        self._keys = rng.integers(0, 1 << 63, size=PAGE_SIZE // 8, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._hashes = np.zeros(block.pages, dtype=np.uint64)

    def _hash_all(self) -> np.ndarray:
        out = np.empty(self.block.pages, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for first in range(0, self.block.pages, self.CHUNK_PAGES):
                count = min(self.CHUNK_PAGES, self.block.pages - first)
                words = self.block.page_words(first, count)
                out[first:first + count] = words @ self._keys  # wraps mod 2^64: intended
        return out

    def start(self) -> None:
        self._hashes = self._hash_all()

    def collect(self) -> np.ndarray:
        now = self._hash_all()
        dirty = now != self._hashes
        self._hashes = now
        return dirty


# --- the whole guest -------------------------------------------------------------------------
_announced: set[str] = set()


def announce_once(message: str) -> None:
    """Print a notice on stderr the first time it occurs in this process."""
    if message not in _announced:
        _announced.add(message)
        print(f"mignet: {message}", file=sys.stderr, flush=True)


def kernel_tracking_error() -> str | None:
    """None when userfaultfd WP-async + PAGEMAP_SCAN work here, else why not. Probed on a
    scratch mapping: arm, write one page, scan, expect exactly that page."""
    try:
        uffd = _Uffd()
    except SetupError as exc:
        return str(exc)
    try:
        scratch = mmap.mmap(-1, 4 * OS_PAGE)
        arr = np.frombuffer(scratch, dtype=np.uint8)
        block = RamBlock("probe", arr)
        tracker = UffdTracker(block, uffd)
        try:
            tracker.start()
            arr[2 * OS_PAGE] = 1
            mask = tracker.collect()
            again = tracker.collect()
        finally:
            tracker.close()  # the scratch mapping goes with the last reference to it
        if mask.tolist() != [False, False, True, False] or again.any():
            return f"PAGEMAP_SCAN reported {mask.tolist()} / {again.tolist()} for one written page"
        return None
    except (SetupError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.EINVAL, errno.ENOTTY):
            return f"PAGEMAP_SCAN is not supported here ({exc.strerror}); it needs Linux 6.7+"
        return str(exc)
    finally:
        uffd.close()


@dataclass
class DirtyLog:
    """QEMU's dirty bitmap sync over a whole guest: ``start()`` arms every block,
    ``sync()`` returns each block's pages written since the previous sync.

    ``force_fallback`` selects page hashing even where the kernel could track (tests, and
    the benchmark's comparison); ``announce=False`` keeps that choice off stderr, for a
    caller that labels the figure itself."""

    ram: GuestRam
    force_fallback: bool = False
    announce: bool = True
    trackers: list[BlockTracker] = field(default_factory=list)
    last: SyncCost = field(default_factory=SyncCost)
    _uffd: _Uffd | None = None

    def __post_init__(self) -> None:
        problem = None if self.force_fallback else kernel_tracking_error()
        if self.force_fallback:
            if self.announce:
                announce_once("dirty tracking by per-page hashing, as asked (a full read of RAM per round)")
        elif problem is None:
            self._uffd = _Uffd()
        else:
            announce_once(f"kernel dirty tracking unavailable ({problem}); "
                          "falling back to per-page hashing (a full read of RAM per round)")
        for block in self.ram:
            tracker: BlockTracker | None = None
            if self._uffd is not None:
                try:
                    tracker = UffdTracker(block, self._uffd)
                except SetupError as exc:
                    announce_once(f"{exc}; hashing that block's pages instead")
            self.trackers.append(tracker or HashTracker(block))

    @property
    def method(self) -> str:
        methods = sorted({t.method for t in self.trackers})
        return "+".join(methods)

    def start(self) -> None:
        for tracker in self.trackers:
            tracker.start()

    def sync(self) -> dict[str, np.ndarray]:
        """Dirty mask per block name; records the cost in ``last``."""
        t0 = time.perf_counter()
        masks = {t.block.name: t.collect() for t in self.trackers}
        dirty = sum(int(np.count_nonzero(m)) for m in masks.values())
        self.last = SyncCost(time.perf_counter() - t0, self.ram.total, dirty)
        return masks

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers.clear()
        if self._uffd is not None:
            self._uffd.close()
            self._uffd = None

    def __enter__(self) -> DirtyLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def page_aligned(ram: GuestRam) -> GuestRam:
    """The same guest with every block in page-aligned anonymous memory (mmap), copying the
    blocks that are not. numpy offsets large arrays 16 bytes into their mapping, so each
    guest page would straddle two OS pages and every write would dirty two guest pages."""
    blocks: list[RamBlock] = []
    for block in ram:
        if block.data.ctypes.data % OS_PAGE == 0:
            blocks.append(block)
            continue
        data = allocate_guest_memory(block.size)
        data[:] = block.data
        pristine = None if block.pristine is None else block.pristine.copy()
        blocks.append(RamBlock(block.name, data, pristine))
    return GuestRam(blocks)
