"""QemuRdmaChannel: the destination side of QEMU's own RDMA migration protocol.

Why a channel of its own rather than a mode of :class:`~mignet.rdma.channel.RdmaChannel`:
the two protocols share nothing above the queue pair. QEMU's (``qemu_control``) moves one
message per READY, drops a receive completion it was not waiting for, and registers RAM
through requests that interleave with the stream. So this side follows QEMU's destination
(migration/rdma.c) message for message:

* after the connection is established, and after each message it has taken in, it SENDs
  one READY (QEMU's source sends nothing without one). Answers (RAM_BLOCKS_RESULT,
  REGISTER_RESULT, UNREGISTER_FINISHED) always go out before the next READY, because the
  source posted the receive for the answer before the one for READY.
* unlike QEMU's destination, READY does not wait for the loader to ask for bytes: up to
  ``RECV_SLOTS - 1`` QEMU_FILE messages are buffered ahead of it, so the source's round
  trips overlap the loader's work. Control messages are handled in arrival order by the
  progress engine, whichever thread drives it; only RAM_BLOCKS_REQUEST waits until the
  loader has read the block list from the stream (``register_destination_ram``).
* pages arrive by RDMA WRITE into the RAM registered here (whole blocks with
  ``rdma-pin-all``, else 1 MiB chunks on REGISTER_REQUEST); a COMPRESS message fills a
  range that is all one byte value (zero pages of a chunk never registered).

QEMU sends no end-of-stream message: its disconnect after the last QEMU_FILE is the end, so
a read after it returns end of stream, and a source that vanished mid-stream shows up as a
truncated stream.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from mignet.channel import Buffer, MemoryRegion, ShutdownHow, WritableBuffer
from mignet.errors import (
    ConnectionLostError,
    MignetError,
    MisuseError,
    PeerFailedError,
    ProtocolError,
    SetupError,
)
from mignet.rdma import connection, verbs
from mignet.rdma.qemu_control import (
    CHUNK_SHIFT,
    COMPRESS,
    DEST_BLOCK,
    HEADER,
    MAX_MESSAGE,
    REGISTER,
    REGISTER_RESULT,
    Caps,
    Control,
    commands,
    control_name,
    message,
    parse_header,
)
from mignet.rdma.qemu_endpoint import QemuRdmaEndpoint

RECV_SLOTS = 4  # one for the message READY asks for, the rest hold QEMU_FILE data
SEND_SLOTS = 4
CHUNK = 1 << CHUNK_SHIFT


class QemuRdmaChannel(QemuRdmaEndpoint):
    """An accepted connection from QEMU's RDMA migration source (see module docstring)."""

    recv_slots = RECV_SLOTS
    send_slots = SEND_SLOTS
    send_size = 64 << 10  # READY and answers; a block list of 2,000 blocks fits

    def __init__(self, conn: connection.Conn, name: str, caps: Caps) -> None:
        super().__init__(conn, name, caps)
        self._inbox: collections.deque[tuple[int, int]] = collections.deque()  # (slot, bytes)
        self._rx: collections.deque[list[int]] = collections.deque()  # [slot, pos, end]
        self._ready_out = False  # a READY is out and its message has not arrived
        self._eof = False  # the source disconnected: after what arrived, the stream ends
        self._shut_rd = False
        self.placement = QemuPlacement(self)
        self.page_placement = self.placement

    def started(self) -> None:
        """The connection is established: the first READY lets QEMU send its stream."""
        with self._io:
            self._pump()

    # --- the progress engine ---------------------------------------------------------
    def _peer_gone(self, event: str) -> None:
        self._eof = True
        super()._peer_gone(event)

    def _completed(self, kind: int, slot: int, ok: bool, wc: Any) -> None:
        if not ok:  # flushed after a disconnect, or the link broke
            self._mark_lost(f"{self.name}: receive failed ({verbs.wc_status_name(wc.status)})")
            return
        self._ready_out = False
        self.messages += 1
        self._inbox.append((slot, int(wc.byte_len)))

    def _ready(self) -> bool:
        return bool(self._rx) or self._shut_rd or super()._ready()

    def _pump(self) -> None:
        """Handle received messages in order, then send READY if the source may send."""
        if self._failure is not None:
            return
        try:
            while self._inbox:
                slot, nbytes = self._inbox[0]
                if not self._handle(slot, nbytes):
                    return  # waits for the block list, or for a free send slot
                self._inbox.popleft()
            held = len(self._rx)
            if (not self._ready_out and self._lost is None and not self._shut_rd
                    and held < RECV_SLOTS and self._free_send):
                self._send(message(Control.READY))
                self._ready_out = True
        except MignetError as exc:
            self._failure = exc
            self._mark_lost(str(exc))

    def _handle(self, slot: int, nbytes: int) -> bool:
        """One message; False to retry it later (nothing consumed)."""
        base = slot * MAX_MESSAGE
        kind, repeat, length = parse_header(self._recv_mv[base:base + nbytes], nbytes)
        payload = self._recv_mv[base + HEADER.size:base + HEADER.size + length]
        if kind == Control.QEMU_FILE:
            self.stream_messages += 1
            if length:
                self._rx.append([slot, base + HEADER.size, base + HEADER.size + length])
            else:
                self._repost(slot)
            return True
        if kind == Control.ERROR:
            raise PeerFailedError("QEMU (the source) ended the migration with an RDMA ERROR "
                                  "message: its log says why")
        if kind in (Control.RAM_BLOCKS_REQUEST, Control.REGISTER_REQUEST,
                    Control.UNREGISTER_REQUEST):
            if self._lost is not None:
                return True  # nobody to answer
            if not self._free_send:
                return False
            answer = self.placement.answer(Control(kind), payload, repeat)
            if answer is None:
                return False  # the loader has not read the block list yet
            self._send(answer)
        elif kind == Control.COMPRESS:
            self.placement.compress(payload)
        elif kind != Control.REGISTER_FINISHED:
            raise ProtocolError(f"unexpected QEMU RDMA control message {control_name(kind)} "
                                "at the destination")
        self._repost(slot)
        return True



    # --- Channel primitives ----------------------------------------------------------
    def _end_or_none(self) -> int | None:
        """Nothing buffered: end of stream after QEMU's disconnect, else would block."""
        self._raise_if_failed()
        if self._eof:
            return 0
        if self._inbox:
            return None  # a request waits for the loader (the block list): keep reading
        if self._lost is not None:
            raise ConnectionLostError(self._lost)
        return None

    def _readv(self, bufs: Sequence[WritableBuffer]) -> int | None:
        if self._shut_rd:
            return 0
        with self._io:
            if not self._rx:
                self._progress()
            if not self._rx:
                return self._end_or_none()
            done = 0
            for buf in bufs:
                view = memoryview(buf).cast("B")
                pos = 0
                while pos < len(view) and self._rx:
                    head = self._rx[0]
                    take = min(len(view) - pos, head[2] - head[1])
                    view[pos:pos + take] = self._recv_mv[head[1]:head[1] + take]
                    pos += take
                    head[1] += take
                    if head[1] == head[2]:
                        self._rx.popleft()
                        self._repost(head[0])
                done += pos
                if not self._rx:
                    break
            self._pump()
            return done

    def _peek(self, size: int) -> bytes | None:
        with self._io:
            if not self._rx:
                self._progress()
            if not self._rx:
                end = self._end_or_none()
                return None if end is None else b""
            out = bytearray()
            for _, pos, end_ in self._rx:
                out += self._recv_mv[pos:min(end_, pos + size - len(out))]
                if len(out) >= size:
                    break
            return bytes(out)

    def _writev(self, bufs: Sequence[Buffer]) -> int | None:
        raise SetupError(f"{self.name}: QEMU's RDMA protocol carries no return path to the "
                         "source here: turn off the return-path and postcopy-ram capabilities")

    def _shutdown(self, how: ShutdownHow) -> None:
        with self._io:
            if how in (ShutdownHow.READ, ShutdownHow.BOTH):
                self._shut_rd = True
            if how is ShutdownHow.BOTH:
                self.cancelled = True
                self._disconnect()  # QEMU sees DISCONNECTED and fails
                self._mark_lost(f"{self.name}: shut down locally")
        self._wake()

class QemuPlacement:
    """The destination RAM as QEMU's RDMA source sees it (``RemotePagePlacement``).

    Block offsets: QEMU addresses destination RAM by ram_addr_t offsets the destination
    chooses (its own layout); here the blocks are laid end to end in stream order, which is
    also the source's order (the stream's block list is written from the same list)."""

    protocol = "qemu"

    def __init__(self, channel: QemuRdmaChannel) -> None:
        self.channel = channel
        self.pin_all = channel.caps.pin_all
        self.on_placed: Callable[[int], None] | None = None  # QEMU never reports progress
        self._blocks: list[tuple[MemoryRegion, int]] | None = None  # (block, ram_addr offset)
        self._whole: list[Any] = []  # pin-all: one MR per block
        self._chunks: dict[tuple[int, int], Any] = {}  # (block, first chunk) -> MR
        self._mrs: list[tuple[Any, int]] = []
        self.registrations = 0
        self.registered_bytes = 0
        self.compressed_bytes = 0

    # --- the loader's side -----------------------------------------------------------
    def register_destination_ram(self, blocks: Iterable[MemoryRegion], shared: Any = None) -> None:
        """The stream's block list: lay the blocks out, register them all if pin-all, and
        answer a RAM_BLOCKS_REQUEST that was waiting for them."""
        if shared is not None:
            raise MisuseError("QEMU's RDMA protocol has no multifd channels to share RAM with")
        e = self.channel._e
        blocks = list(blocks)
        # Chunks stay registered to the end, so chunk mode pins it all as well: refuse now.
        verbs.check_memlock(verbs.pinned_bytes() + sum(b.size for b in blocks))
        laid, offset = [], 0
        for block in blocks:
            laid.append((block, offset))
            offset += block.size
        with self.channel._io:
            if self.pin_all:
                for block in blocks:
                    self._whole.append(self._register(block.data.ctypes.data, block.size,
                                                      e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE))
            self._blocks = laid
            self.channel._pump()

    # --- requests from QEMU --------------------------------------------------------
    def answer(self, kind: Control, payload: memoryview, repeat: int) -> bytes | None:
        """The answer to a request, or None while the block list is unknown."""
        if self._blocks is None:
            if kind is Control.RAM_BLOCKS_REQUEST:
                return None
            raise ProtocolError(f"QEMU sent {kind.name} before its RAM block list")
        if kind is Control.RAM_BLOCKS_REQUEST:
            out = b"".join(DEST_BLOCK.pack(block.data.ctypes.data, offset, block.size,
                                           self._whole[i].rkey if self.pin_all else 0, 0)
                           for i, (block, offset) in enumerate(self._blocks))
            return message(Control.RAM_BLOCKS_RESULT, out)
        if kind is Control.REGISTER_REQUEST:
            results = [self._register_chunks(*cmd) for cmd in
                       commands(REGISTER, payload, repeat, "REGISTER_REQUEST")]
            return message(Control.REGISTER_RESULT, b"".join(results), repeat)
        for key, index, _, _ in commands(REGISTER, payload, repeat, "UNREGISTER_REQUEST"):
            mr = self._chunks.pop((self._block(index)[2], key), None)
            if mr is not None:
                self._release(mr)
        return message(Control.UNREGISTER_FINISHED, b"", repeat)

    def _block(self, index: int) -> tuple[MemoryRegion, int, int]:
        assert self._blocks is not None
        if index >= len(self._blocks):
            raise ProtocolError(f"QEMU named RAM block {index}; there are {len(self._blocks)}")
        block, offset = self._blocks[index]
        return block, offset, index

    def _register_chunks(self, addr: int, index: int, _pad: int, more: int) -> bytes:
        """REGISTER_REQUEST: the chunk holding ``addr`` and ``more`` after it, one MR."""
        block, offset, index = self._block(index)
        base = block.data.ctypes.data
        if self.pin_all:
            return REGISTER_RESULT.pack(self._whole[index].rkey, 0, base)
        if addr < offset or addr - offset >= block.size:
            raise ProtocolError(f"QEMU asked to register {addr:#x}, outside RAM block "
                                f"{block.name!r}")
        chunk = (addr - offset) >> CHUNK_SHIFT
        mr = self._chunks.get((index, chunk))
        if mr is None:
            start = chunk * CHUNK
            end = min((chunk + more + 1) * CHUNK, block.size)
            e = self.channel._e
            verbs.check_memlock(verbs.pinned_bytes() + end - start)
            mr = self._register(base + start, end - start,
                                e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE)
            self._chunks[(index, chunk)] = mr
        return REGISTER_RESULT.pack(mr.rkey, 0, base)

    def compress(self, payload: memoryview) -> None:
        """COMPRESS: ``length`` bytes at ``offset`` all equal ``value`` (QEMU sends it for
        an all-zero range of a chunk it has not registered: nothing is written by RDMA)."""
        if self._blocks is None:
            raise ProtocolError("QEMU sent COMPRESS before its RAM block list")
        ((value, index, addr, length),) = commands(COMPRESS, payload, 1, "COMPRESS")
        block, offset, _ = self._block(index)
        start = addr - offset
        if addr < offset or start + length > block.size or value > 0xFF:
            raise ProtocolError(f"QEMU's COMPRESS of {length} bytes at {addr:#x} lies outside "
                                f"RAM block {block.name!r}")
        area = block.data[start:start + length]
        if value or area.any():  # fresh RAM is zero already: leave its pages untouched
            area[:] = value
        self.compressed_bytes += length

    # --- source-side methods of RemotePagePlacement --------------------------------
    def announce(self, pin_all: bool | None = None) -> None:
        raise MisuseError("QemuRdmaChannel is QEMU's destination (QemuRdmaSource: its source)")

    def write_pages(self, block: MemoryRegion, offsets: Any, zero: Any = None,
                    after: int | None = None) -> int:
        raise MisuseError("QemuRdmaChannel is QEMU's destination (QemuRdmaSource: its source)")

    def stream_position(self) -> int:
        raise MisuseError("QemuRdmaChannel is QEMU's destination (QemuRdmaSource: its source)")

    def begin_round(self) -> None:
        raise MisuseError("QemuRdmaChannel is QEMU's destination (QemuRdmaSource: its source)")

    def end_round(self, blocks: Sequence[MemoryRegion] | None = None) -> None:
        raise MisuseError("QemuRdmaChannel is QEMU's destination (QemuRdmaSource: its source)")

    def fence(self) -> None:
        raise MisuseError("QemuRdmaChannel is QEMU's destination (QemuRdmaSource: its source)")

    def describe(self) -> dict[str, Any]:
        return {"protocol": "qemu", "pin_all": self.pin_all, "registrations": self.registrations,
                "registered_bytes": self.registered_bytes,
                "compressed_bytes": self.compressed_bytes,
                "control_messages": self.channel.messages,
                "stream_messages": self.channel.stream_messages}

    # --- bookkeeping -----------------------------------------------------------------
    def _register(self, address: int, length: int, access: int) -> Any:
        mr = verbs.register(self.channel.conn.pd, address, length, access)
        self._mrs.append((mr, length))
        self.registrations += 1
        self.registered_bytes += length
        return mr

    def _release(self, mr: Any) -> None:
        for i, (m, n) in enumerate(self._mrs):
            if m is mr:
                del self._mrs[i]
                verbs.unpinned(n)
                mr.close()
                return

    def release(self) -> list[Any]:
        """The MRs to close with the connection (their pinned bytes are accounted here)."""
        verbs.unpinned(sum(n for _, n in self._mrs))
        mrs = [mr for mr, _ in self._mrs]
        self._mrs.clear()
        return mrs
