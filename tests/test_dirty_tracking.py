"""Dirty tracking: real userfaultfd write-protect (async) + PAGEMAP_SCAN, and the hash fallback.

Writers are plain numpy writes from real threads that report nothing; the tracker must find
exactly the pages they wrote.
"""

from __future__ import annotations

import mmap
import threading

import numpy as np
import pytest

from mignet.guest.ram import GuestRam, RamBlock
from mignet.migration import dirty
from mignet.migration.dirty import (
    DirtyLog,
    HashTracker,
    UffdTracker,
    _Uffd,
    kernel_tracking_error,
    page_aligned,
    ranges_to_mask,
)
from mignet.units import PAGE_SIZE

KERNEL = kernel_tracking_error()
needs_kernel = pytest.mark.skipif(KERNEL is not None, reason=f"no kernel dirty tracking: {KERNEL}")


def aligned_block(pages: int, fill: bool = True) -> RamBlock:
    data = np.frombuffer(mmap.mmap(-1, pages * PAGE_SIZE), dtype=np.uint8)
    if fill:
        data[:] = 7  # populated
    return RamBlock("pc.ram", data)


def write_pages_in_thread(block: RamBlock, pages: np.ndarray) -> None:
    """A 'vCPU': one vectorised write from another thread, then gone."""
    def vcpu() -> None:
        block.page_words()[pages, 5] += np.uint64(1)
    t = threading.Thread(target=vcpu)
    t.start()
    t.join()


@needs_kernel
def test_uffd_finds_exactly_the_written_pages_and_rearms() -> None:
    block = aligned_block(4096)
    uffd = _Uffd()
    tracker = UffdTracker(block, uffd)
    try:
        tracker.start()
        assert not tracker.collect().any()
        written = np.sort(np.random.default_rng(1).choice(block.pages, 300, replace=False))
        write_pages_in_thread(block, written)
        assert np.array_equal(np.flatnonzero(tracker.collect()), written)
        assert not tracker.collect().any(), "collect must re-protect what it reported"
        # A write after a collect is found by the next one; reads are not writes.
        write_pages_in_thread(block, written[:3])
        _ = int(block.data[::PAGE_SIZE].sum())
        assert np.array_equal(np.flatnonzero(tracker.collect()), written[:3])
    finally:
        tracker.close()
        uffd.close()


@needs_kernel
def test_uffd_sees_first_writes_to_never_touched_pages() -> None:
    """Fresh anonymous memory has no PTEs yet: WP_UNPOPULATED must still catch writes."""
    block = aligned_block(1024, fill=False)
    with DirtyLog(GuestRam([block])) as log:
        assert log.method == "uffd-wp-async"
        log.start()
        block.data[10 * PAGE_SIZE + 99] = 1
        block.data[700 * PAGE_SIZE] = 1
        assert np.flatnonzero(log.sync()["pc.ram"]).tolist() == [10, 700]


@needs_kernel
def test_unaligned_numpy_block_marks_every_overlapping_guest_page() -> None:
    """numpy's large arrays start 16 bytes into their mapping: a written OS page overlaps two
    guest pages, and both must be resent (never fewer)."""
    size = 8 << 20
    data = np.frombuffer(mmap.mmap(-1, size + PAGE_SIZE), dtype=np.uint8, count=size, offset=16)
    data[:] = 3
    block = RamBlock("pc.ram", data)
    ram = GuestRam([block])
    with DirtyLog(ram) as log:
        log.start()
        written = np.array([0, 17, 1000, block.pages - 1])
        write_pages_in_thread(block, written)
        found = set(np.flatnonzero(log.sync()["pc.ram"]).tolist())
        assert set(written.tolist()) <= found
        assert found <= {p + d for p in written.tolist() for d in (-1, 0, 1)}


def test_page_aligned_copies_an_unaligned_block_into_aligned_memory() -> None:
    size = 64 * PAGE_SIZE
    backing = mmap.mmap(-1, size + PAGE_SIZE)
    data = np.frombuffer(backing, dtype=np.uint8, count=size, offset=16)  # like numpy's own
    data[:] = np.random.default_rng(4).integers(0, 256, size, dtype=np.uint8)
    pristine = np.zeros(size // PAGE_SIZE, dtype=bool)
    pristine[[3, 9]] = True
    block = RamBlock("pc.ram", data, pristine)
    assert data.ctypes.data % PAGE_SIZE == 16  # the test's premise: really unaligned
    ram = GuestRam([block])

    aligned = page_aligned(ram)
    (copy,) = list(aligned)
    assert copy is not block
    assert copy.name == "pc.ram"
    assert copy.data.ctypes.data % PAGE_SIZE == 0
    assert copy.size == size
    assert np.array_equal(copy.data, data)
    assert aligned.digest() == ram.digest()
    # A copy, not a view: the pristine map is copied too, and neither side sees the other's writes.
    assert copy.pristine is not None and copy.pristine is not pristine
    assert np.flatnonzero(copy.pristine).tolist() == [3, 9]
    before = int(data[5 * PAGE_SIZE])
    copy.data[5 * PAGE_SIZE] ^= 0xFF
    assert int(data[5 * PAGE_SIZE]) == before
    copy.pristine[0] = True
    assert not pristine[0]


def test_page_aligned_keeps_an_aligned_block_as_is() -> None:
    block = aligned_block(8)
    (kept,) = list(page_aligned(GuestRam([block])))
    assert kept is block


def test_ranges_to_mask_clips_and_merges() -> None:
    base = 0x10000010  # 16 bytes past a page, like numpy
    ranges = np.array([[0x10000000, 0x10001000], [0x10005000, 0x10007000], [0x20000000, 0x20001000]],
                      dtype=np.uint64)
    mask = ranges_to_mask(ranges, base, 8)
    assert np.flatnonzero(mask).tolist() == [0, 4, 5, 6]


def test_hash_fallback_finds_written_pages_and_is_announced_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh "this process has announced nothing yet", whatever other tests printed before.
    monkeypatch.setattr(dirty, "_announced", set())
    block = aligned_block(2048)
    ram = GuestRam([block])
    with DirtyLog(ram, force_fallback=True) as log, DirtyLog(ram, force_fallback=True):
        assert log.method == "page-hash"
        assert all(isinstance(t, HashTracker) for t in log.trackers)
        log.start()
        written = np.sort(np.random.default_rng(3).choice(block.pages, 100, replace=False))
        write_pages_in_thread(block, written)
        assert np.array_equal(np.flatnonzero(log.sync()["pc.ram"]), written)
        assert not log.sync()["pc.ram"].any()
    err = capsys.readouterr().err
    assert err.count("per-page hashing, as asked") == 1  # two logs, one notice per process
