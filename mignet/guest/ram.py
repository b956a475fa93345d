"""Guest RAM: named blocks backed by numpy memory.

A block is anonymous memory (``np.zeros``: the kernel hands out zero pages lazily, so an
untouched destination costs nothing) or a mapped file, e.g. the ``memory-backend-file`` image
of a real QEMU guest in /dev/shm, so real VM images can be a source or a target.

Page work is vectorised: zero-page detection looks at whole batches of pages with numpy
reductions, never a Python loop per page.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import urllib.parse
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import blake3
import numpy as np
import xxhash

from mignet.errors import MisuseError, SetupError
from mignet.guest.userfault import MADV_DONTNEED, MADV_REMOVE, madvise_ranges
from mignet.units import PAGE_SIZE

Fill = Literal["random", "zero", "mixed"]

#: What ``--digest`` may name; ``none`` computes nothing.
DIGESTS = ("xxh3", "blake3", "sha256", "none")
#: XXH3-128: on this machine kind 30 GB/s on one core, against 4.7 GB/s for BLAKE3 and
#: 1.8 GB/s for sha256 (docs/benchmarks.md), so checking a guest costs almost nothing.
DEFAULT_DIGEST = "xxh3"


class _Hash(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...
    def hexdigest(self) -> str: ...


def new_hash(algorithm: str) -> _Hash:
    """A fresh hash of ``algorithm``; each gives what its standard tool prints for a file
    (``xxh128sum``, ``b3sum``, ``sha256sum``), so a block file can be checked without mignet.
    Large updates release the GIL in all three; BLAKE3 also hashes one buffer on every core."""
    if algorithm == "xxh3":
        return xxhash.xxh3_128()
    if algorithm == "blake3":
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise MisuseError(f"no digest {algorithm!r}: use one of {', '.join(DIGESTS[:-1])}")


def combine_digests(algorithm: str, blocks: Iterable[tuple[str, int, str]]) -> str:
    """The RAM digest from the block digests, so no byte is hashed twice: ``algorithm`` over
    one ``"<block digest> <size> <name>\0"`` per block, in stream order. Equal RAM digests,
    equal block names, sizes and contents; a shell can recompute it from a manifest."""
    h = new_hash(algorithm)
    for name, size, digest in blocks:
        h.update(f"{digest} {size} {name}\0".encode())
    return h.hexdigest()


def zero_pages(words: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Which pages of a (pages, 512) uint64 array (or of its ``rows``) are all zeros.

    Like QEMU's ``buffer_is_zero``, first and last word go first: a page with either set is
    data at the cost of two words, so only the remaining candidates are read in full. When
    most pages are candidates (a mostly zero guest), one reduction over all is cheaper than
    gathering them."""
    whole = rows is None
    if rows is None:
        rows = np.arange(len(words))
    maybe = np.asarray((words[rows, 0] == 0) & (words[rows, -1] == 0))
    cand = np.flatnonzero(maybe)
    if len(cand) * 4 > len(maybe):
        return np.asarray(~(words if whole else words[rows]).any(axis=1))
    if len(cand):
        maybe[cand] = ~words[rows[cand]].any(axis=1)
    return maybe


def allocate_guest_memory(size: int) -> np.ndarray:
    """Zeroed anonymous memory for guest RAM, backed by transparent huge pages where the
    kernel allows (QEMU madvises its RAM the same way). On this machine kind first touch of
    fresh memory runs at 0.4-1.6 GB/s with 4 KiB pages and 6-7 GB/s with huge pages, and
    first touch is what bounds a receiver. Pages stay lazily allocated either way."""
    mem = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mem.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pass  # no THP: plain pages work, only slower to fault in
    return np.frombuffer(mem, dtype=np.uint8)


@dataclass
class RamBlock:
    """One RAM block. ``data`` is a 1-D uint8 array of ``size`` bytes (whole pages).

    ``pristine`` marks pages known to still hold their initial zeros (never written since the
    block was allocated); the receiver's fast path only speculates into such pages, because
    those can be restored by zeroing. It is None where nothing is known (a mapped file).
    """

    name: str
    data: np.ndarray
    pristine: np.ndarray | None = field(default=None, repr=False)
    #: The shared file mapping behind ``data`` (see :meth:`mapped`), flushed by :meth:`flush`.
    mapping: mmap.mmap | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.data.dtype != np.uint8 or self.data.ndim != 1:
            raise MisuseError("RAM block data must be a 1-D uint8 array")
        if self.data.size % PAGE_SIZE:
            raise MisuseError(f"RAM block {self.name!r} is not a whole number of pages")

    @staticmethod
    def check_size(name: str, size: int) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise SetupError(f"RAM block {name!r}: size {size} is not a positive multiple of 4 KiB")

    @classmethod
    def anonymous(cls, name: str, size: int) -> RamBlock:
        cls.check_size(name, size)
        return cls(name, allocate_guest_memory(size), np.ones(size // PAGE_SIZE, dtype=bool))

    @classmethod
    def mapped(cls, name: str, fd: int, size: int) -> RamBlock:
        """Map a new, all-zero file of ``size`` bytes that the caller opened (read-write) and
        sized: the caller decides how it is created (``recv --out``: relative to its folder,
        exclusively, space reserved); the mapping keeps the file, ``fd`` may be closed."""
        cls.check_size(name, size)
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        return cls(name, np.frombuffer(mapping, dtype=np.uint8), np.ones(size // PAGE_SIZE, dtype=bool),
                   mapping)

    @classmethod
    def from_file(cls, name: str, path: Path, *, writable: bool, size: int | None = None,
                  private: bool = False) -> RamBlock:
        """Map a file (e.g. QEMU's memory-backend-file image). A new file is created
        sparse (all zeros) when ``size`` is given, and is then pristine. ``private`` (not
        ``writable``): copy-on-write, so that RDMA can register it (the kernel pins
        registered memory for writing, and refuses a read-only shared mapping: EFAULT);
        the file itself never changes."""
        created = False
        if size is not None and (not path.exists() or path.stat().st_size == 0):
            with open(path, "wb") as f:
                f.truncate(size)
            created = True
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            raise SetupError(f"guest image {path} does not exist") from None
        if actual == 0 or actual % PAGE_SIZE:
            raise SetupError(f"guest image {path} is {actual} bytes, not a whole number of 4 KiB pages")
        if size is not None and actual != size:
            raise SetupError(f"guest image {path} is {actual} bytes, the stream says {size}")
        if writable:
            data = np.memmap(path, dtype=np.uint8, mode="r+", shape=(actual,))
        else:
            data = np.memmap(path, dtype=np.uint8, mode="c" if private else "r", shape=(actual,))
        pristine = np.ones(actual // PAGE_SIZE, dtype=bool) if created else None
        return cls(name, data, pristine)

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    def view(self) -> memoryview:
        return self.data.data

    def page_words(self, first: int = 0, count: int | None = None) -> np.ndarray:
        """Pages ``first..first+count`` as a (count, 512) uint64 array (a view)."""
        end = self.pages if count is None else first + count
        return self.data[first * PAGE_SIZE:end * PAGE_SIZE].view(np.uint64).reshape(-1, PAGE_SIZE // 8)

    def zero_mask(self, first: int = 0, count: int | None = None) -> np.ndarray:
        """True for each page of the range that is all zeros."""
        return zero_pages(self.page_words(first, count))

    def fill_page(self, offset: int, value: int) -> None:
        """Apply a ZERO record: QEMU skips the write when the page already matches."""
        page = self.data[offset:offset + PAGE_SIZE]
        if value == 0:
            if self.pristine is not None and self.pristine[offset // PAGE_SIZE]:
                return
            if not page.view(np.uint64).any():
                return
        page.fill(value)
        if self.pristine is not None:
            self.pristine[offset // PAGE_SIZE] = value == 0 and self.pristine[offset // PAGE_SIZE]

    def discard(self, ranges: np.ndarray) -> None:
        """Drop the contents of the (offset, length) byte ranges (an (n, 2) array) so that
        they read as missing (postcopy's RAM_DISCARD): anonymous memory gives its pages
        back; a shared file (tmpfs) gets a hole, since unmapping alone would leave the old
        page in the file."""
        shared = self.mapping is not None or isinstance(self.data, np.memmap)
        spans = np.array(ranges, dtype=np.uint64).reshape(-1, 2)
        spans[:, 0] += np.uint64(self.data.ctypes.data)
        madvise_ranges(spans, MADV_REMOVE if shared else MADV_DONTNEED)

    def digest(self, algorithm: str = "sha256") -> str:
        """The block's bytes hashed: what the algorithm's standard tool prints for its file."""
        h = new_hash(algorithm)
        h.update(self.data.data)
        return h.hexdigest()

    def flush(self) -> None:
        if self.mapping is not None:
            self.mapping.flush()
        elif isinstance(self.data, np.memmap):
            self.data.flush()


@dataclass(frozen=True)
class RamDigests:
    """A guest's digests under one algorithm: each block's, in order, and the RAM's
    (:func:`combine_digests` of them). Computed once, then printed and written."""

    algorithm: str
    blocks: list[str]
    ram: str


class GuestRam:
    """The ordered set of a guest's RAM blocks."""

    def __init__(self, blocks: list[RamBlock] | None = None) -> None:
        self._blocks: dict[str, RamBlock] = {}
        for block in blocks or []:
            self.add(block)

    def add(self, block: RamBlock) -> None:
        if block.name in self._blocks:
            raise MisuseError(f"RAM block {block.name!r} exists already")
        self._blocks[block.name] = block

    def __getitem__(self, name: str) -> RamBlock:
        return self._blocks[name]

    def get(self, name: str) -> RamBlock | None:
        return self._blocks.get(name)

    def __iter__(self) -> Iterator[RamBlock]:
        return iter(self._blocks.values())

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def total(self) -> int:
        return sum(b.size for b in self)

    def layout(self) -> list[tuple[str, int]]:
        return [(b.name, b.size) for b in self]

    def block_digests(self, algorithm: str = "sha256") -> list[str]:
        """Every block's digest, in order, blocks hashed in parallel threads (the hashes
        release the GIL): a guest of several blocks uses every core even with sha256."""
        blocks = list(self)
        if len(blocks) <= 1 or (os.cpu_count() or 1) == 1:
            return [b.digest(algorithm) for b in blocks]
        with ThreadPoolExecutor(min(len(blocks), os.cpu_count() or 1)) as pool:
            return list(pool.map(lambda b: b.digest(algorithm), blocks))

    def digest(self, algorithm: str = "sha256", block_digests: list[str] | None = None) -> str:
        """One digest over every block's name, size and bytes (:func:`combine_digests` of
        the block digests, given or computed here): equal digests, equal RAM."""
        digests = self.block_digests(algorithm) if block_digests is None else block_digests
        return combine_digests(algorithm, ((b.name, b.size, d) for b, d in zip(self, digests, strict=True)))

    def digests(self, algorithm: str) -> RamDigests | None:
        """Block digests and the RAM digest derived from them; None for ``none``."""
        if algorithm == "none":
            return None
        blocks = self.block_digests(algorithm)
        return RamDigests(algorithm, blocks, self.digest(algorithm, blocks))

    @classmethod
    def generate(cls, size: int, fill: Fill, seed: int = 0, name: str = "pc.ram") -> GuestRam:
        """A synthetic guest: ``random`` pages, all ``zero``, or ``mixed`` (runs of random
        and zero pages, about a third zero), reproducible from ``seed``."""
        block = RamBlock.anonymous(name, size)
        if fill != "zero":
            fill_random(block.data, seed)
            if block.pristine is not None:
                block.pristine[:] = False
        if fill == "mixed":
            rng = np.random.default_rng(seed + 1)
            pages = block.pages
            run_starts = np.sort(rng.choice(pages, size=max(1, pages // 48), replace=False))
            lengths = rng.integers(1, 32, size=len(run_starts))
            words = block.page_words()
            for start, length in zip(run_starts.tolist(), lengths.tolist(), strict=True):
                words[start:start + length] = 0
        elif fill not in ("random", "zero"):
            raise SetupError(f"unknown fill {fill!r}: use random, zero or mixed")
        return cls([block])

    @classmethod
    def from_image(cls, path: Path, *, name: str = "pc.ram", writable: bool = False,
                   private: bool = False) -> GuestRam:
        return cls([RamBlock.from_file(name, path, writable=writable, private=private)])


def fill_random(data: np.ndarray, seed: int, chunk: int = 64 << 20) -> None:
    """Fill ``data`` with reproducible random bytes, in chunks to bound temporary memory."""
    rng = np.random.default_rng(seed)
    words = data.view(np.uint64)
    step = chunk // 8
    for start in range(0, words.size, step):
        part = words[start:start + step]
        part[:] = rng.integers(0, np.iinfo(np.uint64).max, size=part.size, dtype=np.uint64,
                               endpoint=True)


#: Longest file name (bytes) on Linux file systems.
NAME_MAX = 255


def block_filename(name: str) -> str:
    """A file name for a block name such as '/rom@etc/acpi/tables' (reversible quoting).

    QEMU allows block names up to 255 bytes, and quoting makes them up to 12 times longer
    ('/' is 3 bytes, 'é' 6), past NAME_MAX. Such a name gets its quoted head, a ',' (which
    quoting never produces, so it cannot equal a short name's file) and 128 bits of its
    sha256: short and unique; the manifest maps it back to the name."""
    quoted = urllib.parse.quote(name, safe="@.-_")
    if len(quoted) + len(".ram") <= NAME_MAX:
        return quoted + ".ram"
    head = re.sub(r"%[0-9A-F]?$", "", quoted[:64])  # no escape cut in half
    return f"{head},{hashlib.sha256(name.encode()).hexdigest()[:32]}.ram"
