"""Sans-I/O encoder of QEMU's migration stream.

Every method returns the bytes (or, for page runs, a list of buffers whose page entries are
views of guest RAM) to write; the caller owns the I/O. Returning views instead of copies is
what makes the sender zero copy: a vectored write sends page data straight from guest RAM.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from mignet.errors import MisuseError
from mignet.wire.constants import (
    PAGE_RECORD_SIZE,
    PAGE_SIZE,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    RAM_SECTION_NAME,
    RAM_SECTION_VERSION,
    RamFlag,
    SectionType,
)

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_ZERO_RECORD = np.dtype([("word", ">u8"), ("fill", "u1")])  # packed: 9 bytes
_CONTINUE = int(RamFlag.CONTINUE)


def _name(text: str) -> bytes:
    raw = text.encode("utf-8")
    if not 0 < len(raw) < 256:
        raise MisuseError(f"name {text!r} must be 1..255 bytes of UTF-8")
    return bytes([len(raw)]) + raw


class StreamEncoder:
    """Builds one stream. Tracks the CONTINUE block (which persists across sections, as in
    QEMU) and section ids."""

    def __init__(self) -> None:
        self._last_block: str | None = None
        # Never 0 for 'ram': QEMU matches a PART/END section to the first handler whose
        # load id equals it, and every handler not yet loaded has id 0 (it would go to
        # 'timer'). QEMU's own numbering gives 'ram' 2; any non-zero id works.
        self._next_section_id = 1
        self._ram_section_id: int | None = None

    # --- framing ---------------------------------------------------------------------
    def header(self) -> bytes:
        return _BE32.pack(QEMU_VM_FILE_MAGIC) + _BE32.pack(QEMU_VM_FILE_VERSION)

    def configuration(self, machine_type: str) -> bytes:
        raw = machine_type.encode()
        return bytes([SectionType.CONFIGURATION]) + _BE32.pack(len(raw)) + raw

    def _new_section_id(self, wanted: int | None = None) -> int:
        """The next free id, or ``wanted`` (a replay keeps the source's ids)."""
        if wanted is not None:
            self._next_section_id = max(self._next_section_id, wanted + 1)
            return wanted
        sid = self._next_section_id
        self._next_section_id += 1
        return sid

    def footer(self, section_id: int) -> bytes:
        return bytes([SectionType.SECTION_FOOTER]) + _BE32.pack(section_id)

    # --- RAM -------------------------------------------------------------------------
    def ram_start(self, blocks: Sequence[tuple[str, int]], section_id: int | None = None) -> bytes:
        """SECTION_START of 'ram' with MEM_SIZE and the block list, EOS and footer."""
        if self._ram_section_id is not None:
            raise MisuseError("ram section already started")
        if section_id == 0:
            raise MisuseError("QEMU cannot load a 'ram' section with id 0")
        sid = self._ram_section_id = self._new_section_id(section_id)
        total = sum(size for _, size in blocks)
        if total & (PAGE_SIZE - 1):
            raise MisuseError("RAM blocks must be whole pages")
        out = bytearray([SectionType.SECTION_START])
        out += _BE32.pack(sid) + _name(RAM_SECTION_NAME) + _BE32.pack(0) + _BE32.pack(RAM_SECTION_VERSION)
        out += _BE64.pack(total | RamFlag.MEM_SIZE)
        for name, size in blocks:
            out += _name(name) + _BE64.pack(size)
        out += self.eos() + self.footer(sid)
        return bytes(out)

    def ram_section(self, final: bool) -> bytes:
        """The header of a SECTION_PART (or SECTION_END when ``final``) of 'ram'."""
        if self._ram_section_id is None:
            raise MisuseError("ram_start() must come first")
        kind = SectionType.SECTION_END if final else SectionType.SECTION_PART
        return bytes([kind]) + _BE32.pack(self._ram_section_id)

    def ram_section_close(self) -> bytes:
        """EOS and footer closing a PART/END section."""
        assert self._ram_section_id is not None
        return self.eos() + self.footer(self._ram_section_id)

    @staticmethod
    def eos() -> bytes:
        return _BE64.pack(RamFlag.EOS)

    @staticmethod
    def hook() -> bytes:
        """RAM_SAVE_FLAG_HOOK: on QEMU's RDMA protocol, where a registration round starts
        (QEMU's ``qemu_rdma_registration_start``); nothing follows it in the stream."""
        return _BE64.pack(RamFlag.HOOK)

    def _first_word(self, block: str, offset: int, flag: RamFlag) -> bytes:
        """The first record of a run: CONTINUE if the block did not change, else the name."""
        # Plain ints: an int or-ed with an IntFlag builds a new flag object through enum's
        # _missing_ for every offset (2% of a one-stream sender's time in its main thread).
        if block == self._last_block:
            return _BE64.pack(offset | int(flag) | _CONTINUE)
        self._last_block = block
        return _BE64.pack(offset | int(flag)) + _name(block)

    def zero_records(self, block: str, offsets: np.ndarray) -> bytes:
        """ZERO records (word + fill byte 0) for the given page offsets of ``block``."""
        if len(offsets) == 0:
            return b""
        first = self._first_word(block, int(offsets[0]), RamFlag.ZERO) + b"\x00"
        rest = np.zeros(len(offsets) - 1, dtype=_ZERO_RECORD)
        rest["word"] = offsets[1:].astype(np.uint64) | np.uint64(int(RamFlag.ZERO) | _CONTINUE)
        return first + rest.tobytes()

    def page_records(self, block: str, data: np.ndarray, offsets: np.ndarray,
                     staging: np.ndarray | None = None) -> list[Any]:
        """Full-page records of ``block`` (whose bytes are ``data``) at ``offsets``.

        Returns [first word (+ name), first page (a view of RAM), the other records packed
        into ``staging``]. Packing costs one cache-friendly copy per batch, but measured on
        loopback it sends 1.5x faster than a vectored write of 8-byte words interleaved with
        page views (the kernel pays per segment); the receiver still places pages directly.
        """
        n = len(offsets)
        if n == 0:
            return []
        first = int(offsets[0])
        out: list[Any] = [self._first_word(block, first, RamFlag.PAGE),
                          data[first:first + PAGE_SIZE].data]
        if n == 1:
            return out
        rest = offsets[1:].astype(np.uint64)
        size = (n - 1) * PAGE_RECORD_SIZE
        if staging is None or staging.size < size:
            staging = np.empty(size, dtype=np.uint8)
        records = staging[:size].reshape(n - 1, PAGE_RECORD_SIZE)
        words = (rest | np.uint64(int(RamFlag.PAGE) | _CONTINUE)).astype(">u8")
        records[:, :8] = words.view(np.uint8).reshape(n - 1, 8)
        pages = data.reshape(-1, PAGE_SIZE)
        idx = rest // np.uint64(PAGE_SIZE)
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        if hi - lo == n - 1 and (n == 2 or bool((np.diff(idx) == 1).all())):  # a run: slice copy
            records[:, 8:] = pages[lo:hi]
        else:
            records[:, 8:] = pages[idx.astype(np.intp)]
        out.append(staging[:size].data)
        return out

    # --- devices and the end ---------------------------------------------------------
    def device_section(self, idstr: str, instance_id: int, version_id: int, body: bytes,
                       section_id: int | None = None) -> bytes:
        """A SECTION_FULL: header, the vmstate field bytes, footer."""
        sid = self._new_section_id(section_id)
        head = bytes([SectionType.SECTION_FULL]) + _BE32.pack(sid) + _name(idstr)
        head += _BE32.pack(instance_id) + _BE32.pack(version_id)
        return head + body + self.footer(sid)

    @staticmethod
    def eof() -> bytes:
        return bytes([SectionType.EOF])

    @staticmethod
    def vmdescription(description: dict[str, Any]) -> bytes:
        # json.dumps' default separators: byte for byte what QEMU 7.2 writes.
        raw = json.dumps(description).encode()
        return bytes([SectionType.VMDESCRIPTION]) + _BE32.pack(len(raw)) + raw
