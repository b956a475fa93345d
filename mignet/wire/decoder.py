"""Sans-I/O decoder of QEMU's migration stream: feed bytes, pull events.

The decoder never reads a socket. To let page data go straight from the wire into guest RAM
(zero copy), it tells its driver how many bytes it needs next (``wanted``) so the driver never
pulls page data into the decoder's buffer, and after a ``RamPage`` event it lets the driver
place the PAGE_SIZE payload itself (``payload_placed``) — the decoder only counts it.

Everything read from the wire is validated before it is acted on: an unknown section type,
flag, block or section id, an offset outside its block, sizes that disagree — each raises
``ProtocolError`` with the stream offset.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from mignet.errors import MisuseError, ProtocolError, StreamTruncatedError
from mignet.units import human_bytes
from mignet.wire.constants import (
    CONTINUE_PAGE_FLAGS,
    FLAGS_MASK,
    PAGE_RECORD_SIZE,
    PAGE_SIZE,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    RAM_SECTION_NAME,
    RAM_SECTION_VERSION,
    UNSUPPORTED_RAM_FLAGS,
    RamFlag,
    SectionType,
)
from mignet.wire.decoder_states import (
    FINAL_STATES,
    READ_AHEAD,
    RECORD_STATES,
    TOP_STATES,
    DecoderState,
    check_transition,
)
from mignet.wire.device_tail import PACKAGE_FOLLOWERS, section_end_by_scan, split_device_tail
from mignet.wire.events import (
    Command,
    Configuration,
    DeviceState,
    EndOfStream,
    Event,
    Packaged,
    PostcopyAdvise,
    PostcopyDiscard,
    PostcopyListen,
    PostcopyRecvBitmap,
    PostcopyResume,
    PostcopyRun,
    RamBlocks,
    RamEndOfSection,
    RamPage,
    RamZero,
    SectionKind,
    StreamFinished,
    StreamStart,
    VMDescription,
)
from mignet.wire.postcopy import (
    CMD_PACKAGED,
    CMD_POSTCOPY_ADVISE,
    CMD_POSTCOPY_LISTEN,
    CMD_POSTCOPY_RAM_DISCARD,
    CMD_POSTCOPY_RESUME,
    CMD_POSTCOPY_RUN,
    CMD_RECV_BITMAP,
    MAX_PACKAGE_BYTES,
    PACKAGED_ONLY,
    RECOVERY_ONLY,
    PostcopyState,
    packaged_length,
    parse_advise,
    parse_discard,
    parse_recv_bitmap,
)
from mignet.wire.postcopy import ORDER as POSTCOPY_ORDER
from mignet.wire.postcopy import next_state as next_postcopy_state
from mignet.wire.return_path import (
    CMD_OPEN_RETURN_PATH,
    CMD_PING,
    COMMAND_NAMES,
    SUPPORTED_COMMANDS,
)
from mignet.wire.vmstate import VMStateDescription


class _NeedData:
    """Sentinel: feed more bytes (``wanted`` says how many) before the next event."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
#: The sentinel's type, for annotations outside the codec (``Event | NeedData``).
NeedData = _NeedData

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_SECTION_HEAD = struct.Struct(">BIB")  # type, section id, idstr length
@dataclass
class _BlockListProgress:
    """How far a MEM_SIZE block list has been parsed (bytes after its 8-byte head)."""

    offset: int = 0
    seen: int = 0
    blocks: list[tuple[str, int]] = field(default_factory=list)
    names: set[str] = field(default_factory=set)


_KNOWN_RAM_FLAGS = int(RamFlag.ZERO | RamFlag.MEM_SIZE | RamFlag.PAGE | RamFlag.EOS | RamFlag.CONTINUE)
_TAIL_CHUNK = 1 << 16
# A VM description larger than this is not a VM description.
MAX_VMDESC_BYTES = 64 << 20
# Real QEMU's device state is ~12 KB (plus a ~100 KB description); this bounds what a peer
# can make us buffer while we wait for the description that splits it.
MAX_DEVICE_TAIL_BYTES = 256 << 20
# QEMU's ram_load: block names are at most 255 bytes (u8 length).
_KIND_BY_TYPE: dict[int, SectionKind] = {
    SectionType.SECTION_START: "start", SectionType.SECTION_PART: "part",
    SectionType.SECTION_END: "end",
}


def match_page_run(words: np.ndarray, first_offset: int) -> int:
    """How many leading record words are full pages with CONTINUE at consecutive offsets
    ``first_offset, first_offset + PAGE_SIZE, ...``.

    ``words`` holds big-endian u64 record words (dtype ``>u8``). This is the vectorised
    check behind the receiver's fast path: it lets a run of predicted page records be
    validated with one numpy comparison instead of a Python step per page.
    """
    n = len(words)
    if n == 0:
        return 0
    expected = (np.arange(n, dtype=np.uint64) * np.uint64(PAGE_SIZE)
                + np.uint64(first_offset | CONTINUE_PAGE_FLAGS))
    bad = np.flatnonzero(words.astype(np.uint64, copy=False) != expected)
    return int(bad[0]) if len(bad) else n


class StreamDecoder:
    """Turns the bytes of one migration stream into :mod:`events`.

    ``devices`` maps section names (idstr) to layouts mignet can decode; other device
    sections (real QEMU's) are kept as raw bytes, split with the stream's VM description.
    ``max_ram_bytes`` bounds what a peer may make us allocate.
    """

    def __init__(self, *, devices: Mapping[str, VMStateDescription] | None = None,
                 max_ram_bytes: int = 1 << 40) -> None:
        self.devices: Mapping[str, VMStateDescription] = devices or {}
        self.max_ram_bytes = max_ram_bytes
        self.state = DecoderState.HEADER
        self._buf = bytearray()
        self._pos = 0  # read position in _buf
        self._base = 0  # stream offset of _buf[0]
        self._need = 8  # bytes needed beyond what is buffered to make progress
        self._eof = False
        self.blocks: dict[str, int] = {}  # name -> used_length, from MEM_SIZE
        self._mem_progress: _BlockListProgress | None = None  # a block list read in part
        self._sections: dict[int, str] = {}  # section id -> idstr
        self._section_id = 0
        self._section_kind: SectionKind = "start"
        self._block: str | None = None  # CONTINUE target; persists across sections
        self._payload_left = 0
        self._tail_start = 0
        self._pending: list[Event] = []
        self._finished = False
        self.postcopy = PostcopyState.NONE
        self._package_end: int | None = None  # stream offset where a PACKAGED command ends
        self._records_only = False
        self._recovering = False
        #: Accept QEMU's RAM_SAVE_FLAG_HOOK records (an RDMA stream: they mark where the
        #: source's registration exchange happens beside the stream). Elsewhere they mean
        #: a socket is carrying an RDMA stream, which no loader can complete.
        self.rdma_hooks = False
        self.hooks = 0  # HOOK records skipped

    def resumed(self) -> StreamDecoder:
        """A decoder for the connection that replaces a lost one in postcopy recovery:
        QEMU goes on there at a section boundary, with no header, the same blocks and
        section ids, and no CONTINUE across the break."""
        if self.postcopy is not PostcopyState.RUNNING:
            raise MisuseError("only a running postcopy can resume on a new connection")
        dec = StreamDecoder(devices=self.devices, max_ram_bytes=self.max_ram_bytes)
        dec._base = self.offset  # offsets (and byte counts read from them) go on, not back
        dec.state = DecoderState.TOP
        dec.blocks = dict(self.blocks)
        dec._sections = dict(self._sections)
        dec.postcopy = self.postcopy
        dec._recovering = True
        return dec

    @classmethod
    def records(cls, blocks: Mapping[str, int]) -> StreamDecoder:
        """A decoder for a channel that carries RAM records and nothing else, up to one
        EOS: QEMU's postcopy preempt channel, which the main stream's blocks govern."""
        dec = cls()
        dec.blocks = dict(blocks)
        dec.state = DecoderState.RAM_RECORDS
        dec._records_only = True
        return dec

    # --- input -----------------------------------------------------------------------
    @property
    def offset(self) -> int:
        """Stream offset of the next unconsumed byte."""
        return self._base + self._pos

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def wanted(self) -> int:
        """Bytes to feed next: exact wherever page data could follow, so a driver that
        reads exactly this many never pulls page payload into the decoder — except after a
        ZERO record, where up to ``ZERO_READAHEAD`` bytes are asked for (zero runs then cost
        one read, not two per page; a page that ends the run has at most that much copied),
        and once device sections have begun (``DEVICE_READAHEAD``: no RAM follows them)."""
        if self.state is DecoderState.PAGE_PAYLOAD:
            return max(0, self._payload_left - self.buffered)
        if self.state is DecoderState.DEVICE_TAIL:
            return _TAIL_CHUNK
        ahead = READ_AHEAD.get(self.state)  # the table says where reading ahead is safe
        if ahead is not None:
            return max(self._need, ahead - self.buffered)
        return max(1, self._need)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof:
            raise MisuseError("receive_data() after receive_eof()")
        if self.state is DecoderState.DEVICE_TAIL:
            if len(self._buf) - self._tail_start + len(data) > MAX_DEVICE_TAIL_BYTES:
                raise self._error(
                    f"more than {MAX_DEVICE_TAIL_BYTES >> 20} MiB of device state of unknown layout")
        elif self._pos > (1 << 16) and self._pos * 2 > len(self._buf):
            del self._buf[:self._pos]
            self._base += self._pos
            self._pos = 0
        self._buf += data

    def receive_eof(self) -> None:
        """The input ended; ``next_event`` then finishes or reports truncation."""
        self._eof = True

    # --- page payload ----------------------------------------------------------------
    @property
    def payload_left(self) -> int:
        return self._payload_left if self.state is DecoderState.PAGE_PAYLOAD else 0

    def take_payload_into(self, dest: memoryview) -> int:
        """Copy buffered payload bytes (at most ``len(dest)``) into ``dest``; returns the
        count. Only payload that arrived together with a record word is ever buffered."""
        self._require(DecoderState.PAGE_PAYLOAD)
        n = min(len(dest), self._payload_left, self.buffered)
        with memoryview(self._buf) as buf:
            dest[:n] = buf[self._pos:self._pos + n]
        self._pos += n
        self._consume_payload(n)
        return n

    def payload_placed(self, n: int) -> None:
        """The caller read ``n`` payload bytes straight into guest RAM."""
        self._require(DecoderState.PAGE_PAYLOAD)
        if n > self._payload_left or self.buffered:
            raise MisuseError("payload_placed() beyond the page, or with payload buffered")
        self._base += n
        self._consume_payload(n)

    def accept_page_run(self, count: int) -> None:
        """``count`` CONTINUE'd page records (words and payloads) that the driver read,
        checked with :func:`match_page_run`, and placed itself. Only valid right after a
        page payload completed, with nothing buffered."""
        self._require(DecoderState.RAM_RECORDS)
        if self.buffered or self._block is None:
            raise MisuseError("accept_page_run() with data buffered or no current block")
        self._base += count * PAGE_RECORD_SIZE

    def _consume_payload(self, n: int) -> None:
        self._payload_left -= n
        if self._payload_left == 0:
            self._goto(DecoderState.RAM_RECORDS)
            self._need = 8

    # --- events ----------------------------------------------------------------------
    def next_event(self) -> Event | _NeedData:
        """The next event, or NEED_DATA. Raises ProtocolError on a bad stream."""
        if self._pending:
            return self._pending.pop(0)
        try:
            event = self._step()
        except ProtocolError:
            self._fail()
            raise
        if event is NEED_DATA and self._eof:
            return self._at_eof()
        return event

    def _at_eof(self) -> Event | _NeedData:
        if self.state is DecoderState.DEVICE_TAIL:
            return self._finish_tail()
        if self.state in FINAL_STATES and not self.buffered:
            if self.state is not DecoderState.DONE:
                self._goto(DecoderState.DONE)
            if self._finished:
                raise MisuseError("next_event() called after StreamFinished")
            self._finished = True
            return StreamFinished()
        where = self.state.value
        self._fail()
        raise StreamTruncatedError(
            f"stream truncated at offset {self.offset}: the source stopped sending in state "
            f"{where} ({self.buffered} stray bytes); the migration did not complete")

    def _step(self) -> Event | _NeedData:
        state = self.state
        if state in RECORD_STATES:
            return self._ram_record()
        if state is DecoderState.PAGE_PAYLOAD:
            return NEED_DATA  # the driver must place the payload
        if state in TOP_STATES:
            return self._top()
        if state is DecoderState.RAM_FOOTER:
            return self._footer_then(DecoderState.TOP, RamEndOfSection(
                self._section_id, self._section_kind))
        if state is DecoderState.HEADER:
            return self._header()
        if state is DecoderState.DEVICE_TAIL:
            if self._tail_complete():
                return self._finish_tail()
            self._need = _TAIL_CHUNK
            return NEED_DATA
        if state is DecoderState.AFTER_EOF:
            return self._vmdescription()
        if state is DecoderState.DONE:
            if self.buffered:
                raise self._error(f"{self.buffered} bytes after the end of the stream")
            return NEED_DATA
        raise MisuseError("decoder used after a ProtocolError; start a new one")

    # --- pieces ----------------------------------------------------------------------
    def _have(self, n: int) -> bool:
        if self.buffered >= n:
            return True
        self._need = n - self.buffered
        return False

    def _header(self) -> Event | _NeedData:
        if not self._have(8):
            return NEED_DATA
        magic, version = struct.unpack_from(">II", self._buf, self._pos)
        if magic != QEMU_VM_FILE_MAGIC:
            raise self._error(
                f"not a migration stream: magic {magic:#010x}, expected {QEMU_VM_FILE_MAGIC:#010x}"
                " ('QEVM'); is the peer mignet or QEMU?")
        if version != QEMU_VM_FILE_VERSION:
            raise self._error(f"unsupported stream version {version}; mignet speaks version 3")
        self._pos += 8
        self._goto(DecoderState.TOP)
        self._need = 1
        return StreamStart(version)

    def _top(self) -> Event | _NeedData:
        if self._package_end is not None:
            if self.offset >= self._package_end:
                raise self._error("PACKAGED ended without POSTCOPY_RUN")
            event = self._section()
            if self._package_end is not None and self.offset > self._package_end:
                raise self._error("a section runs past the end of its package")
            return event
        return self._section()

    def _section(self) -> Event | _NeedData:
        if not self._have(1):
            return NEED_DATA
        kind = self._buf[self._pos]
        if kind == SectionType.CONFIGURATION:
            return self._configuration()
        if kind in (SectionType.SECTION_START, SectionType.SECTION_PART, SectionType.SECTION_END):
            return self._ram_section_header(kind)
        if kind == SectionType.SECTION_FULL:
            return self._device_section()
        if kind == SectionType.EOF and self.postcopy is PostcopyState.RUNNING:
            # QEMU sends no VM description after postcopy: the stream is complete here, and
            # its source waits for SHUT before it closes.
            self._pos += 1
            self._goto(DecoderState.DONE)
            self._finished = True
            self._pending = [StreamFinished()]
            return EndOfStream()
        if kind == SectionType.EOF:
            self._pos += 1
            self._goto(DecoderState.AFTER_EOF)
            self._need = 1
            return EndOfStream()
        if kind == SectionType.COMMAND:
            return self._command()
        try:
            name = SectionType(kind).name
        except ValueError:
            raise self._error(f"unknown section type {kind:#04x}") from None
        raise self._error(f"section type {name} is not supported here")

    def _command(self) -> Event | _NeedData:
        """A QEMU_VM_COMMAND: return-path and postcopy commands are events, in the order
        :data:`mignet.wire.postcopy.TRANSITIONS` allows; COLO and the rest are refused by name."""
        if not self._have(5):
            return NEED_DATA
        cmd, length = struct.unpack_from(">HH", self._buf, self._pos + 1)
        name = COMMAND_NAMES.get(cmd)
        if name is None:
            raise self._error(f"unknown stream command {cmd}")
        if cmd not in SUPPORTED_COMMANDS:
            raise self._error(f"stream command {name}: mignet does not implement it")
        if cmd == CMD_POSTCOPY_ADVISE and length == 0:
            raise self._error("POSTCOPY_ADVISE for dirty bitmaps alone: mignet migrates no "
                              "block dirty bitmaps; turn off dirty-bitmaps on the source")
        fixed = SUPPORTED_COMMANDS[cmd]
        if fixed is not None and length != fixed:
            raise self._error(f"stream command {name} with {length} bytes of data")
        if not self._have(5 + length):
            return NEED_DATA
        data = bytes(self._buf[self._pos + 5:self._pos + 5 + length])
        if cmd in (CMD_OPEN_RETURN_PATH, CMD_PING):
            self._pos += 5 + length
            self._need = 1
            return Command(cmd, data)
        return self._postcopy_command(cmd, name, data)

    def _postcopy_command(self, cmd: int, name: str, data: bytes) -> Event | _NeedData:
        nxt = next_postcopy_state(self.postcopy, cmd)
        if nxt is None:
            raise self._error(f"stream command {name} in postcopy state {self.postcopy.value}: "
                              f"QEMU's order is {POSTCOPY_ORDER}")
        in_package = self._package_end is not None
        if cmd in PACKAGED_ONLY and not in_package:
            raise self._error(f"stream command {name} outside a PACKAGED command")
        if cmd in RECOVERY_ONLY and not self._recovering:
            raise self._error(f"stream command {name} outside a postcopy recovery")
        event: Event
        if cmd == CMD_PACKAGED:
            if in_package:
                raise self._error("PACKAGED inside a package")
            size = packaged_length(data)
            if size > MAX_PACKAGE_BYTES:
                raise self._error(f"a package of {human_bytes(size)} is not device state "
                                  f"(mignet takes up to {human_bytes(MAX_PACKAGE_BYTES)})")
            if not self._have(5 + 4 + size):  # QEMU too reads the whole package first
                return NEED_DATA
            self._package_end = self.offset + 5 + 4 + size
            event = Packaged(size)
        elif cmd == CMD_POSTCOPY_ADVISE:
            event = PostcopyAdvise(*parse_advise(data))
        elif cmd == CMD_POSTCOPY_RAM_DISCARD:
            event = self._discard(data)
        elif cmd == CMD_POSTCOPY_LISTEN:
            event = PostcopyListen()
        elif cmd == CMD_RECV_BITMAP:
            try:
                block = parse_recv_bitmap(data)
            except ValueError as exc:
                raise self._error(str(exc)) from None
            if block not in self.blocks:
                raise self._error(f"RECV_BITMAP for unknown block {block!r}")
            event = PostcopyRecvBitmap(block)
        elif cmd == CMD_POSTCOPY_RESUME:
            event = PostcopyResume()
        else:
            event = PostcopyRun()
        self._pos += 5 + len(data)
        self._need = 1
        self.postcopy = nxt
        if cmd == CMD_POSTCOPY_RUN:
            if self.offset != self._package_end:
                raise self._error("POSTCOPY_RUN is not the last command of its package")
            self._package_end = None
        return event

    def _discard(self, data: bytes) -> PostcopyDiscard:
        try:
            block, ranges = parse_discard(data)
        except ValueError as exc:
            raise self._error(str(exc)) from None
        size = self.blocks.get(block)
        if size is None:
            raise self._error(f"RAM_DISCARD for unknown block {block!r}")
        for start, length in ranges:
            if start % PAGE_SIZE or length % PAGE_SIZE or not length or start + length > size:
                raise self._error(f"RAM_DISCARD range {start:#x}+{length:#x} is not whole pages "
                                  f"inside block {block!r} of {size:#x} bytes")
        return PostcopyDiscard(block, ranges)

    def _configuration(self) -> Event | _NeedData:
        if not self._have(5):
            return NEED_DATA
        (length,) = _BE32.unpack_from(self._buf, self._pos + 1)
        if length > 255:
            raise self._error(f"machine type of {length} bytes in CONFIGURATION")
        if not self._have(5 + length + 1):  # + the next type byte, to see a subsection
            return NEED_DATA
        start = self._pos + 5
        name = self._text(start, length)
        if self._buf[start + length] == SectionType.SUBSECTION:
            raise self._error(
                "CONFIGURATION carries subsections (target page bits or capabilities) that "
                "mignet does not implement")
        self._pos = start + length
        self._need = 1
        return Configuration(name)

    def _ram_section_header(self, kind: int) -> Event | _NeedData:
        if kind == SectionType.SECTION_START:
            if not self._have(6):
                return NEED_DATA
            _, sid, idlen = _SECTION_HEAD.unpack_from(self._buf, self._pos)
            if not self._have(6 + idlen + 8):
                return NEED_DATA
            idstr = self._text(self._pos + 6, idlen)
            instance, version = struct.unpack_from(">II", self._buf, self._pos + 6 + idlen)
            if idstr != RAM_SECTION_NAME:
                raise self._error(
                    f"iterable section {idstr!r} is not supported (only 'ram'); disable the "
                    "source capability that adds it (e.g. block migration, dirty bitmaps)")
            if version != RAM_SECTION_VERSION:
                raise self._error(f"ram section version {version}, mignet loads version {RAM_SECTION_VERSION}")
            if sid in self._sections:
                raise self._error(f"section id {sid} started twice")
            self._sections[sid] = idstr
            self._pos += 6 + idlen + 8
        else:
            if not self._have(5):
                return NEED_DATA
            sid = _BE32.unpack_from(self._buf, self._pos + 1)[0]
            if sid not in self._sections:
                raise self._error(f"section id {sid} was never started")
            self._pos += 5
        self._section_id = sid
        self._section_kind = _KIND_BY_TYPE[kind]
        self._goto(DecoderState.RAM_RECORDS)
        self._need = 8
        return self._ram_record()

    def _ram_record(self) -> Event | _NeedData:
        if not self._have(8):
            return NEED_DATA
        (word,) = _BE64.unpack_from(self._buf, self._pos)
        flags = word & FLAGS_MASK
        offset = word & ~FLAGS_MASK
        if flags == CONTINUE_PAGE_FLAGS:  # the common case first
            block = self._block
            if block is None:
                raise self._error("CONTINUE with no previous RAM block")
            if offset + PAGE_SIZE > self.blocks[block]:
                raise self._error(
                    f"page offset {offset:#x} outside block {block!r} of {self.blocks[block]:#x} bytes")
            self._pos += 8
            self._payload_left = PAGE_SIZE
            self._goto(DecoderState.PAGE_PAYLOAD)
            return RamPage(block, offset)
        if flags == RamFlag.HOOK and self.rdma_hooks:
            if offset:
                raise self._error(f"RDMA hook record with extra bits {word:#x}")
            # Nothing follows in the stream: the registration exchange runs on the RDMA
            # transport's own control messages, and the pages arrive by RDMA WRITE.
            self._pos += 8
            self.hooks += 1
            return self._ram_record()
        if flags & ~_KNOWN_RAM_FLAGS:
            for flag, meaning in UNSUPPORTED_RAM_FLAGS.items():
                if flags & flag:
                    raise self._error(f"RAM record with {meaning}")
            raise self._error(f"unknown RAM record flags {flags:#x}")
        if flags & RamFlag.MEM_SIZE and not self._records_only:
            return self._mem_size(offset, flags)
        if flags & RamFlag.EOS:
            if flags != RamFlag.EOS or offset:
                raise self._error(f"EOS record with extra bits {word:#x}")
            self._pos += 8
            if self._records_only:  # the channel's end: no footer, nothing after
                self._goto(DecoderState.DONE)
                self._finished = True
                self._pending = [StreamFinished()]
                return RamEndOfSection(self._section_id, "part")
            self._goto(DecoderState.RAM_FOOTER)
            self._need = 5
            return self._footer_then(DecoderState.TOP, RamEndOfSection(
                self._section_id, self._section_kind))
        kind = flags & (RamFlag.ZERO | RamFlag.PAGE)
        if kind not in (RamFlag.ZERO, RamFlag.PAGE) or flags & RamFlag.MEM_SIZE:
            raise self._error(f"RAM record flags {flags:#x} name no page type")
        head = 8
        if flags & RamFlag.CONTINUE:
            block = self._block
            if block is None:
                raise self._error("CONTINUE with no previous RAM block")
        else:
            if not self._have(9):
                return NEED_DATA
            idlen = self._buf[self._pos + 8]
            if not self._have(9 + idlen):
                return NEED_DATA
            block = self._text(self._pos + 9, idlen)
            if block not in self.blocks:
                raise self._error(f"RAM record for unknown block {block!r}")
            head = 9 + idlen
        if offset + PAGE_SIZE > self.blocks[block]:
            raise self._error(
                f"page offset {offset:#x} outside block {block!r} of {self.blocks[block]:#x} bytes")
        if kind == RamFlag.ZERO:
            if not self._have(head + 1):
                return NEED_DATA
            fill = self._buf[self._pos + head]
            self._pos += head + 1
            self._block = block
            self._need = 8
            if self.state is not DecoderState.ZERO_RECORDS:
                self._goto(DecoderState.ZERO_RECORDS)
            return RamZero(block, offset, fill)
        self._pos += head
        self._block = block
        self._payload_left = PAGE_SIZE
        self._goto(DecoderState.PAGE_PAYLOAD)
        return RamPage(block, offset)

    def _mem_size(self, total: int, flags: int) -> Event | _NeedData:
        if flags != RamFlag.MEM_SIZE:
            raise self._error(f"MEM_SIZE record with extra flags {flags:#x}")
        if self._section_kind != "start" or self.blocks:
            raise self._error("MEM_SIZE outside the RAM section's start, or sent twice")
        if total > self.max_ram_bytes:
            raise self._error(
                f"source announces {human_bytes(total)} of RAM, more than the "
                f"{human_bytes(self.max_ram_bytes)} this destination accepts (raise --max-ram)")
        # The block list arrives in pieces: resume where the last piece ended, so a long
        # list costs one pass (re-parsing from its start on every read was quadratic).
        progress = self._mem_progress
        if progress is None:
            progress = self._mem_progress = _BlockListProgress()
        pos = self._pos + 8 + progress.offset
        blocks, names = progress.blocks, progress.names
        while progress.seen < total:
            if not self._have(pos - self._pos + 1):
                return NEED_DATA
            idlen = self._buf[pos]
            if not self._have(pos - self._pos + 1 + idlen + 8):
                return NEED_DATA
            name = self._text(pos + 1, idlen)
            (size,) = _BE64.unpack_from(self._buf, pos + 1 + idlen)
            if not name:
                raise self._error("RAM block with an empty name")
            if name in names:
                raise self._error(f"RAM block {name!r} announced twice")
            if size % PAGE_SIZE:
                raise self._error(f"RAM block {name!r} of {size} bytes is not a whole number of pages")
            if size == 0 or progress.seen + size > total:
                raise self._error(
                    f"RAM block {name!r} of {size} bytes does not fit MEM_SIZE total {total}")
            blocks.append((name, size))
            names.add(name)
            progress.seen += size
            pos += 1 + idlen + 8
            progress.offset = pos - self._pos - 8
        self._mem_progress = None
        self._pos = pos
        self.blocks = dict(blocks)
        self._need = 8
        return RamBlocks(total, tuple(blocks))

    def _footer_then(self, nxt: DecoderState, event: Event) -> Event | _NeedData:
        if not self._have(5):
            return NEED_DATA
        marker = self._buf[self._pos]
        (sid,) = _BE32.unpack_from(self._buf, self._pos + 1)
        if marker != SectionType.SECTION_FOOTER or sid != self._section_id:
            raise self._error(
                f"bad section footer: {marker:#04x}/{sid}, expected 0x7e/{self._section_id}")
        self._pos += 5
        self._goto(nxt)
        self._need = 1
        return event

    def _device_section(self) -> Event | _NeedData:
        if not self._have(6):
            return NEED_DATA
        _, sid, idlen = _SECTION_HEAD.unpack_from(self._buf, self._pos)
        if not self._have(6 + idlen + 8):
            return NEED_DATA
        idstr = self._text(self._pos + 6, idlen)
        instance, version = struct.unpack_from(">II", self._buf, self._pos + 6 + idlen)
        desc = self.devices.get(idstr)
        after = DecoderState.DEVICES if self._package_end is None else DecoderState.TOP
        if desc is None and self._package_end is not None:
            # In a package (postcopy): no VM description comes, but the package is all
            # here, so the section ends at its footer before the next section or command.
            head = self._pos + 6 + idlen + 8
            end = self._package_end - self._base
            body_end = section_end_by_scan(self._buf, head, end, sid, PACKAGE_FOLLOWERS)
            if body_end is None:
                raise self._error(f"cannot find the end of device section {idstr!r} (id {sid}) "
                                  "in its package")
            raw = bytes(self._buf[head:body_end])
            self._pos = body_end
            self._section_id = sid
            return self._footer_then(after, DeviceState(sid, idstr, instance, version, raw))
        if desc is None:
            # Real QEMU's devices: no length on the wire. Keep everything from here to the
            # end and split it with the VM description once the input ends.
            self._tail_start = self._pos
            self._goto(DecoderState.DEVICE_TAIL)
            return self._step()  # the whole tail may be buffered already
        desc.check_version(version)
        body = 6 + idlen + 8
        size = desc.wire_size(version)
        if not self._have(body + size + 5):
            return NEED_DATA
        raw = bytes(self._buf[self._pos + body:self._pos + body + size])
        fields = desc.decode(raw, version)
        self._pos += body + size
        self._section_id = sid
        return self._footer_then(after, DeviceState(sid, idstr, instance, version, raw, fields))

    def _vmdescription(self) -> Event | _NeedData:
        if not self._have(1):
            return NEED_DATA
        kind = self._buf[self._pos]
        if kind != SectionType.VMDESCRIPTION:
            raise self._error(f"expected VMDESCRIPTION (0x06) after EOF, got {kind:#04x}")
        if not self._have(5):
            return NEED_DATA
        (length,) = _BE32.unpack_from(self._buf, self._pos + 1)
        if length > MAX_VMDESC_BYTES:
            raise self._error(f"VM description of {length} bytes is implausibly large")
        if not self._have(5 + length):
            return NEED_DATA
        text = bytes(self._buf[self._pos + 5:self._pos + 5 + length])
        try:
            description: dict[str, Any] = json.loads(text)
        except ValueError as exc:
            raise self._error(f"VM description is not valid JSON: {exc}") from None
        except RecursionError:
            raise self._error("VM description is nested too deeply to be a real one") from None
        if not isinstance(description, dict):
            raise self._error(f"VM description is a JSON {type(description).__name__}, not an object")
        self._pos += 5 + length
        self._goto(DecoderState.DONE)
        self._need = 0
        return VMDescription(description)

    def _tail_complete(self) -> bool:
        """Whether the buffered tail already ends with EOF and QEMU's VM description
        (``{"page_size": ...}``, the last thing a precopy stream carries). Then the stream
        is complete even though the input has not ended: a QEMU source with a return path
        keeps the connection open until the destination says SHUT."""
        buf = self._buf
        if not buf.endswith(b"}"):
            return False
        at = buf.rfind(b'{"page_size"', self._tail_start)
        if at < self._tail_start + 6:
            return False
        if buf[at - 6] != SectionType.EOF or buf[at - 5] != SectionType.VMDESCRIPTION:
            return False
        (length,) = _BE32.unpack_from(buf, at - 4)
        return at + length == len(buf)

    def _finish_tail(self) -> Event | _NeedData:
        tail = bytes(self._buf[self._tail_start:])
        base = self._base + self._tail_start
        self._pos = len(self._buf)
        sections, description = split_device_tail(tail, base)
        self._goto(DecoderState.DONE)
        events: list[Event] = [
            DeviceState(s.section_id, s.idstr, s.instance_id, s.version_id, s.raw) for s in sections]
        events.append(EndOfStream())
        if description is not None:
            events.append(VMDescription(description))
        events.append(StreamFinished())
        self._finished = True
        self._pending = events[1:]
        return events[0]

    # --- helpers ---------------------------------------------------------------------
    def _text(self, start: int, length: int) -> str:
        raw = bytes(self._buf[start:start + length])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._error(f"name {raw!r} is not valid UTF-8") from None

    def _goto(self, new: DecoderState) -> None:
        check_transition(self.state, new)
        self.state = new

    def _fail(self) -> None:
        """Into ERROR (through the table like every change), once."""
        if self.state is not DecoderState.ERROR:
            self._goto(DecoderState.ERROR)

    def _require(self, state: DecoderState) -> None:
        if self.state is not state:
            raise MisuseError(f"decoder is in state {self.state.value}, not {state.value}")

    def _error(self, message: str) -> ProtocolError:
        self._fail()
        return ProtocolError(message, offset=self.offset)
