"""QemuRdmaSource: the source side of QEMU's own RDMA migration protocol, so that mignet can
migrate into a real ``qemu -incoming rdma:HOST:PORT``.

It follows QEMU 7.2's source (migration/rdma.c) message for message, because QEMU's
destination accepts nothing else:

* connect with QEMU's ``RDMACapabilities`` as private data (pin-all if asked); the accept
  says which QEMU granted.
* lock-step: every message waits for a READY from the destination, which has exactly one
  receive posted for it; a message that asks for an answer (RAM_BLOCKS_REQUEST,
  REGISTER_REQUEST) waits for it too. Both arrive in order on our receive ring.
* the stream's bytes go as QEMU_FILE messages; QEMU's destination reads them only while
  it loads, and runs the registration exchange only between a ``RAM_SAVE_FLAG_HOOK`` it
  read in the stream and the REGISTER_FINISHED that ends it. Where the stream carries the
  HOOK is the sender's business (:mod:`mignet.migration.savevm`); this module only offers
  the rounds (:meth:`QemuSourcePlacement.begin_round`, ``end_round``).
* pages go by RDMA WRITE into the destination's RAM: with pin-all at the block's rkey from
  RAM_BLOCKS_RESULT; without, a chunk not yet registered is asked for (REGISTER_REQUEST for
  the chunks a batch needs, one answer) or, when its pages are all zero, sent as COMPRESS
  instead, as QEMU's source does.
* QEMU's destination reads the stream to its end and then disconnects; disconnecting first
  fails its load (it takes any disconnect before it completed as an error). So the end of a
  migration is the destination's disconnect, which :meth:`QemuRdmaSource.read` reports as
  end of stream.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mignet.channel import Buffer, IOCondition, MemoryRegion, ShutdownHow, WritableBuffer
from mignet.errors import ConnectionLostError, MisuseError, PeerFailedError, ProtocolError, TimedOut
from mignet.rdma import connection, verbs
from mignet.rdma.placement import CHUNK, WRITE_WINDOW, _runs
from mignet.rdma.qemu_control import (
    CAP_PIN_ALL,
    CAPS,
    COMPRESS,
    DEST_BLOCK,
    HEADER,
    MAX_MESSAGE,
    REGISTER,
    REGISTER_RESULT,
    VERSION,
    Caps,
    Control,
    commands,
    control_name,
    parse_caps,
    parse_header,
)
from mignet.rdma.qemu_endpoint import WRITE, QemuRdmaEndpoint
from mignet.uri import Address

#: QEMU_FILE payload per message: QEMU's source sends 32 KiB (RDMA_SEND_INCREMENT), but a
#: destination takes anything that fits its 512 KiB receive buffer; fewer lock-step round
#: trips for the device state.
STREAM_PAYLOAD = MAX_MESSAGE - HEADER.size
#: Chunk mode: chunks registered by one REGISTER_REQUEST, at most (the batch's own, and
#: the non-zero chunks after them), so a sequential pass pays one round trip per 8 MiB.
REGISTER_AHEAD = 8


class QemuRdmaSource(QemuRdmaEndpoint):
    """Connected to QEMU's RDMA destination (``-incoming rdma:``); see module docstring."""

    recv_slots = 4  # READY and an answer at most between two of our messages
    send_slots = 2
    send_size = MAX_MESSAGE

    def __init__(self, conn: connection.Conn, name: str, caps: Caps) -> None:
        super().__init__(conn, name, caps)
        self._readies = 0  # READYs received and not used yet
        self._answers: collections.deque[tuple[int, int, bytes]] = collections.deque()
        self._writes = 0  # RDMA WRITEs posted and not completed
        self._peer_closed = False
        self._shut_wr = False
        self.placement = QemuSourcePlacement(self)
        self.page_placement = self.placement

    @classmethod
    def connect(cls, address: Address, timeout: float | None, pin_all: bool) -> QemuRdmaSource:
        holder: list[QemuRdmaSource] = []
        asked = CAPS.pack(VERSION, CAP_PIN_ALL if pin_all else 0)

        def prepare(conn: connection.Conn) -> None:
            chan = cls(conn, str(address), Caps(VERSION, 0))
            holder.append(chan)
            chan.prepare(conn)
        try:
            conn = connection.connect(address, timeout, cls.send_slots + WRITE_WINDOW + 2,
                                      cls.recv_slots, prepare, private=asked)
        except BaseException:
            for chan in holder:
                chan.abandon()
            raise
        chan = holder[0]
        granted = parse_caps(conn.accepted_private)
        # QEMU 7.2's destination grants every capability it knows (pin-all is the only
        # one); where the accept's private data cannot be read, take what we asked for.
        flags = granted.flags if granted is not None else CAPS.unpack(asked)[1]
        chan.caps = Caps(VERSION, flags & (CAP_PIN_ALL if pin_all else 0))
        chan.placement.pin_all = chan.caps.pin_all
        return chan

    # --- the progress engine ---------------------------------------------------------
    def _peer_gone(self, event: str) -> None:
        self._peer_closed = True
        self._mark_lost(f"{self.name}: the QEMU destination disconnected ({event}); "
                        "its log says why")

    def _completed(self, kind: int, slot: int, ok: bool, wc: Any) -> None:
        if kind == WRITE:
            self._writes -= 1
            if not ok:
                self._mark_lost(f"{self.name}: RDMA WRITE failed "
                                f"({verbs.wc_status_name(wc.status)}): the destination went away")
            return
        if not ok:  # flushed after a disconnect, or the link broke
            self._mark_lost(f"{self.name}: receive failed ({verbs.wc_status_name(wc.status)})")
            return
        try:
            self._received(slot, int(wc.byte_len))
        except ProtocolError as exc:
            self._failure = exc
            self._mark_lost(str(exc))

    def _received(self, slot: int, nbytes: int) -> None:
        base = slot * MAX_MESSAGE
        kind, repeat, length = parse_header(self._recv_mv[base:base + nbytes], nbytes)
        payload = bytes(self._recv_mv[base + HEADER.size:base + HEADER.size + length])
        self._repost(slot)
        if kind == Control.READY:
            self._readies += 1
        elif kind == Control.ERROR:
            self._failure = PeerFailedError(
                "the QEMU destination ended the migration with an RDMA ERROR message: its "
                "log says why")
            self._mark_lost(str(self._failure))
        elif kind in (Control.RAM_BLOCKS_RESULT, Control.REGISTER_RESULT,
                      Control.UNREGISTER_FINISHED):
            self._answers.append((kind, repeat, payload))
        else:
            raise ProtocolError(f"unexpected QEMU RDMA control message {control_name(kind)} "
                                "at the source")

    def _ready(self) -> bool:
        # Not "a READY is here": it may wait unused (between rounds, or after the last
        # message to a destination that sends READY ahead), and a waiter would spin on it.
        return self._peer_closed or super()._ready()

    def _check(self) -> None:
        self._raise_if_failed()
        if self._lost is not None:
            raise ConnectionLostError(self._lost)

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        """Wait (in poll(), or yielding in a coroutine) until ``ready()``; a lost
        connection or the peer's ERROR raises, bounded by the write idle limit."""
        since = time.monotonic()
        while True:
            with self._io:
                self._progress()
                if ready():
                    return
                self._check()
            if self._idle_write is not None and time.monotonic() - since >= self._idle_write:
                raise TimedOut(f"{self.name}: the QEMU destination answered nothing for "
                               f"{self._idle_write:g} s {what}; giving up (check its log)")
            left = None if self._idle_write is None else since + self._idle_write - time.monotonic()
            self.wait_cond(IOCondition.IN, left)

    # --- the exchange ----------------------------------------------------------------
    def exchange(self, kind: Control, payload: bytes | list[Any] = b"", repeat: int = 1,
                 answer: Control | None = None) -> tuple[int, bytes]:
        """Send one message after the destination's READY (QEMU's
        ``qemu_rdma_exchange_send``); with ``answer``, wait for it: (repeat, payload)."""
        self._wait(lambda: self._readies > 0 and bool(self._free_send),
                   f"(waiting for READY to send {kind.name})")
        with self._io:
            self._readies -= 1
            parts = payload if isinstance(payload, list) else [payload]
            size = sum(len(p) for p in parts)
            self._send([HEADER.pack(size, kind, repeat, 0), *parts])
            self.messages += 1
        if answer is None:
            return 0, b""
        self._wait(lambda: bool(self._answers), f"(waiting for {answer.name})")
        with self._io:
            got, count, body = self._answers.popleft()
        if got != answer:
            raise ProtocolError(f"the QEMU destination answered {control_name(got)} to "
                                f"{kind.name} (expected {answer.name})")
        return count, body

    def post_write(self, lkey: int, laddr: int, length: int, rkey: int, raddr: int) -> None:
        """One signalled RDMA WRITE, once fewer than ``WRITE_WINDOW`` are in flight."""
        from pyverbs.wr import SGE, SendWR

        self._wait(lambda: self._writes < WRITE_WINDOW, "(waiting for RDMA WRITE completions)")
        wr = SendWR(wr_id=WRITE, opcode=self._e.IBV_WR_RDMA_WRITE, num_sge=1,
                    sg=[SGE(laddr, length, lkey)], send_flags=self._e.IBV_SEND_SIGNALED)
        wr.set_wr_rdma(rkey, raddr)
        with self._io:
            self.conn.qp.post_send(wr)
            self._writes += 1

    def drain(self) -> None:
        """Every WRITE posted so far has landed (QEMU's ``qemu_rdma_drain_cq``)."""
        self._wait(lambda: self._writes == 0, "(waiting for the last RDMA WRITEs)")

    # --- Channel primitives ----------------------------------------------------------
    def _writev(self, bufs: Sequence[Buffer]) -> int | None:
        """Stream bytes: one QEMU_FILE message per READY, up to ``STREAM_PAYLOAD``."""
        if self._shut_wr:
            raise ConnectionLostError(f"{self.name}: write after shutdown")
        parts: list[memoryview] = []
        room = STREAM_PAYLOAD
        for buf in bufs:
            view = memoryview(buf).cast("B")
            if room <= 0:
                break
            parts.append(view[:room])
            room -= len(parts[-1])
        self.exchange(Control.QEMU_FILE, list(parts))
        self.stream_messages += 1
        return STREAM_PAYLOAD - room

    def _readv(self, bufs: Sequence[WritableBuffer]) -> int | None:
        """Nothing comes back in QEMU's protocol but the destination's disconnect, after it
        loaded the stream (or failed): that is end of stream here."""
        with self._io:
            self._progress()
            self._raise_if_failed()
            if self._peer_closed or self._lost is not None:
                return 0
            return None

    def _peek(self, size: int) -> bytes | None:
        return b"" if self._readv([]) == 0 else None

    def _shutdown(self, how: ShutdownHow) -> None:
        with self._io:
            if how in (ShutdownHow.WRITE, ShutdownHow.BOTH):
                self._shut_wr = True  # QEMU's protocol has no end-of-stream message
            if how is ShutdownHow.BOTH:
                self.cancelled = True
                self._disconnect()  # QEMU sees DISCONNECTED and fails the migration
                self._mark_lost(f"{self.name}: shut down locally")
        self._wake()


class QemuSourcePlacement:
    """``RemotePagePlacement`` of a :class:`QemuRdmaSource`: pages by RDMA WRITE, in the
    registration rounds QEMU's destination expects (module docstring)."""

    protocol = "qemu"
    on_placed = None  # a source: nothing reports progress to it

    def __init__(self, channel: QemuRdmaSource) -> None:
        self.channel = channel
        self.pin_all = False
        # per block name: (index, remote addr, remote ram_addr offset, rkey if pin-all)
        self._remote: dict[str, tuple[int, int, int, int]] | None = None
        self._chunk_keys: dict[tuple[int, int], int] = {}  # (block index, chunk) -> rkey
        self._local: dict[str, Any] = {}  # block name -> MR of our own copy
        self._mrs: list[tuple[Any, int]] = []
        self._in_round = False
        self.rounds = 0
        self.registrations = 0
        self.registered_bytes = 0
        self.compressed_bytes = 0
        self.writes = 0
        self.bytes_written = 0

    # --- rounds ----------------------------------------------------------------------
    def begin_round(self) -> None:
        """The stream's HOOK went out: the destination now takes registration messages."""
        self._in_round = True

    def end_round(self, blocks: Sequence[MemoryRegion] | None = None) -> None:
        """QEMU's ``qemu_rdma_registration_stop``: every WRITE landed; at setup
        (``blocks``: the stream's block list) learn where the destination's blocks are;
        then REGISTER_FINISHED ends the round."""
        if not self._in_round:
            raise MisuseError("end_round() without begin_round()")
        self.channel.drain()
        if blocks is not None:
            self._map_blocks(blocks)
        self.channel.exchange(Control.REGISTER_FINISHED)
        self._in_round = False
        self.rounds += 1

    def _map_blocks(self, blocks: Sequence[MemoryRegion]) -> None:
        _, body = self.channel.exchange(Control.RAM_BLOCKS_REQUEST,
                                        answer=Control.RAM_BLOCKS_RESULT)
        count = len(body) // DEST_BLOCK.size
        if count != len(blocks):
            raise ProtocolError(f"the QEMU destination has {count} RAM blocks, the stream "
                                f"{len(blocks)}: start it with the source's machine and RAM")
        remote = {}
        for i, block in enumerate(blocks):
            addr, offset, length, rkey, _ = DEST_BLOCK.unpack_from(body, i * DEST_BLOCK.size)
            if length != block.size:
                raise ProtocolError(f"the QEMU destination's RAM block {i} has {length} bytes, "
                                    f"{block.name!r} {block.size}: start it with the source's RAM")
            remote[block.name] = (i, addr, offset, rkey)
            self._local_key(block)  # ours, while nothing is in flight
        self._remote = remote

    # --- pages -----------------------------------------------------------------------
    def announce(self, pin_all: bool | None = None) -> None:
        """Nothing to say: QEMU's capabilities were exchanged when connecting."""

    def stream_position(self) -> int:
        raise MisuseError("QEMU's RDMA protocol carries no multifd channels (nor does QEMU's)")

    def write_pages(self, block: MemoryRegion, offsets: Any, zero: Any = None,
                    after: int | None = None) -> int:
        """WRITE the pages at ``offsets`` (sorted byte offsets) of ``block``; ``zero`` marks
        the all-zero ones: a run of them in a chunk not registered yet goes as COMPRESS.
        Returns the bytes written or compressed. ``after`` is mignet's multifd's, and QEMU's
        protocol has no multifd."""
        if after is not None:
            raise MisuseError("QEMU's RDMA protocol carries no multifd channels (nor does QEMU's)")
        if not self._in_round or self._remote is None:
            raise MisuseError("pages go between begin_round() and end_round(), after setup")
        entry = self._remote.get(block.name)
        if entry is None:
            raise ProtocolError(f"RAM block {block.name!r} is not in the stream's block list")
        index, raddr, roffset, rkey = entry
        offs = np.asarray(offsets, dtype=np.int64)
        if len(offs) == 0:
            return 0
        runs = _runs(offs)
        zeros = _zero_runs(offs, zero, runs)
        lkey = self._local_key(block)
        base = block.data.ctypes.data
        total = 0
        for (start, length), all_zero in zip(runs, zeros, strict=True):
            chunk = start // CHUNK
            if not self.pin_all and (index, chunk) not in self._chunk_keys:
                if all_zero:
                    self.channel.exchange(Control.COMPRESS, COMPRESS.pack(
                        0, index, roffset + start, length))
                    self.compressed_bytes += length
                    total += length
                    continue
                self._register(block, index, roffset, chunk)
            key = rkey if self.pin_all else self._chunk_keys[(index, chunk)]
            self.channel.post_write(lkey, base + start, length, key, raddr + start)
            self.writes += 1
            self.bytes_written += length
            total += length
        return total

    def _register(self, block: MemoryRegion, index: int, roffset: int, chunk: int) -> None:
        """REGISTER_REQUEST for ``chunk`` and the non-zero chunks after it not registered
        yet (one MR at the destination, one rkey for all of them)."""
        nchunks = -(-block.size // CHUNK)
        last = chunk
        while (last + 1 < nchunks and last + 1 - chunk < REGISTER_AHEAD
               and (index, last + 1) not in self._chunk_keys
               and block.data[(last + 1) * CHUNK:(last + 2) * CHUNK].any()):
            last += 1
        request = REGISTER.pack(roffset + chunk * CHUNK, index, 0, last - chunk)
        count, body = self.channel.exchange(Control.REGISTER_REQUEST, request,
                                            answer=Control.REGISTER_RESULT)
        ((key, _, _host),) = commands(REGISTER_RESULT, memoryview(body), 1, "REGISTER_RESULT")
        for c in range(chunk, last + 1):
            self._chunk_keys[(index, c)] = key
        self.registrations += 1
        self.registered_bytes += min((last + 1) * CHUNK, block.size) - chunk * CHUNK

    def _local_key(self, block: MemoryRegion) -> int:
        """lkey of our own copy of ``block``, registered whole on first use (its pages are
        resident already: the chunk mode exists for the destination's sake)."""
        mr = self._local.get(block.name)
        if mr is None:
            verbs.check_memlock(verbs.pinned_bytes() + block.size)
            mr = verbs.register(self.channel.conn.pd, block.data.ctypes.data, block.size, 0)
            self._mrs.append((mr, block.size))
            self._local[block.name] = mr
        return int(mr.lkey)

    def fence(self) -> None:
        self.channel.drain()

    # --- the destination's side of RemotePagePlacement -------------------------------
    def register_destination_ram(self, blocks: Any) -> None:
        raise MisuseError("QemuRdmaSource is a migration source")

    def describe(self) -> dict[str, Any]:
        return {"protocol": "qemu", "pin_all": self.pin_all, "rounds": self.rounds,
                "registrations": self.registrations, "registered_bytes": self.registered_bytes,
                "compressed_bytes": self.compressed_bytes, "writes": self.writes,
                "bytes_written": self.bytes_written,
                "control_messages": self.channel.messages,
                "stream_messages": self.channel.stream_messages}

    def release(self) -> list[Any]:
        """The MRs to close with the connection (their pinned bytes are accounted here)."""
        verbs.unpinned(sum(n for _, n in self._mrs))
        mrs = [mr for mr, _ in self._mrs]
        self._mrs.clear()
        return mrs


def _zero_runs(offsets: np.ndarray, zero: Any, runs: list[tuple[int, int]]) -> list[bool]:
    """For each run of ``runs`` (``_runs(offsets)``: each starts at one of ``offsets``),
    whether all its pages are zero (``zero``: the mask over ``offsets``; None: none are)."""
    if zero is None or len(runs) == 0:
        return [False] * len(runs)
    mask = np.asarray(zero, dtype=bool)
    if not mask.any():
        return [False] * len(runs)
    first = np.searchsorted(offsets, np.array([s for s, _ in runs], dtype=np.int64))
    nonzero = np.add.reduceat((~mask).astype(np.int64), first)
    return [bool(n == 0) for n in nonzero]
