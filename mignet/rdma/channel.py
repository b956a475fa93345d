"""RdmaChannel: the migration byte stream over SEND/RECV, plus the progress engine.

Why a byte stream at all over RDMA: the stream (headers, ZERO records, device state) stays
QEMU's format, while page payloads bypass it (``placement``: RDMA WRITE into the peer's RAM).

Design:

* a ring of registered receive buffers (``RECV_SLOTS`` x ``MSG_SIZE``) is always posted; a
  write copies the caller's bytes into a free registered send slot and SENDs it. Credits
  (returned in every header) guarantee a SEND never meets an empty receive queue (no RNR);
  one credit is kept in reserve for credit-only messages, so neither side can starve.
* one CQ for sends, receives and RDMA WRITEs. All completions and rdma_cm events are handled
  in one place, ``_progress``, which never blocks.
* waiting is the base class's ``wait_cond``: ``poll_fds`` drains what is there, arms the CQ
  (req_notify, then polls once more to close the race), and returns the completion-channel
  fd, the rdma_cm event fd and a wake pipe. A thread sleeps in ``poll()``, a coroutine
  yields; nothing spins while idle. A disconnect wakes the cm fd; ``shutdown`` (cancel)
  writes the wake pipe.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mignet.channel import Buffer, IOCondition, ShutdownHow, WritableBuffer
from mignet.errors import ConnectionLostError, MigrationCancelled, ProtocolError, TimedOut
from mignet.rdma import connection, qemu_channel, qemu_control, verbs
from mignet.rdma.control import HEADER, TAG, Msg
from mignet.rdma.endpoint import OPEN, VerbsEndpoint
from mignet.rdma.placement import WRITE_WINDOW, RdmaPlacement
from mignet.rdma.qemu_channel import QemuRdmaChannel
from mignet.uri import Address

MSG_SIZE = 32 << 10
RECV_SLOTS = 16
SEND_SLOTS = 16

_SEND, _RECV, _WRITE = 1 << 60, 2 << 60, 3 << 60
_KIND = 3 << 60



class RdmaChannel(VerbsEndpoint):
    """A connected RDMA endpoint with QIOChannel semantics (see module docstring)."""

    duplex_threads = False  # postcopy's concurrent page requests are not wired up here yet

    def __init__(self, conn: connection.Conn, name: str) -> None:
        super().__init__(name)
        import pyverbs.enums as e

        self._e = e
        self.conn = conn
        self._io = threading.RLock()  # progress engine and posting; never held while sleeping
        self._recv_arr = np.zeros(RECV_SLOTS * MSG_SIZE, dtype=np.uint8)
        self._send_arr = np.zeros(SEND_SLOTS * MSG_SIZE, dtype=np.uint8)
        self._recv_mv = self._recv_arr.data
        self._send_mv = self._send_arr.data
        self._mrs: list[Any] = []
        self._rx: collections.deque[list[int]] = collections.deque()  # [slot, pos, end]
        self._free_send = list(range(SEND_SLOTS))
        self._credits = RECV_SLOTS  # the peer posted as many receives as we did
        self._to_return = 0
        self._consumed = 0  # DATA messages fully read by our reader
        self._processed = 0  # ... and handed back to the caller before its next read
        self._processed_told = 0
        self.peer_processed = 0  # DATA messages the peer's reader has processed
        self.data_sent = 0
        self._ctrl_out: collections.deque[tuple[Msg, bytes]] = collections.deque()
        self._handlers: dict[Msg, Callable[[bytes], None]] = {}
        self.on_write_done: Callable[[bool, str], None] | None = None
        self._peer_eof = False
        self._lost: str | None = None
        self._shut_rd = self._shut_wr = False
        self.cancelled = False  # shut down locally in both directions (cancel)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.placement = RdmaPlacement(self)
        self.page_placement = self.placement
        OPEN.add(self)

    # --- construction ----------------------------------------------------------------
    def _prepare(self, conn: connection.Conn) -> None:
        """Register the message rings and post every receive (before the peer may send)."""
        access = self._e.IBV_ACCESS_LOCAL_WRITE
        verbs.check_memlock(verbs.pinned_bytes() + self._recv_arr.nbytes + self._send_arr.nbytes)
        self._recv_mr = verbs.register(conn.pd, self._recv_arr.ctypes.data, self._recv_arr.nbytes, access)
        self._mrs.append(self._recv_mr)
        self._send_mr = verbs.register(conn.pd, self._send_arr.ctypes.data, self._send_arr.nbytes, access)
        self._mrs.append(self._send_mr)
        for slot in range(RECV_SLOTS):
            self._post_recv(conn, slot)

    def abandon(self) -> None:
        """Setup failed: release what we registered; the connection code frees the rest
        (closing verbs objects twice crashes pyverbs)."""
        if self._closed:
            return
        for mr in self._mrs:
            try:
                mr.close()  # a no-op where the PD's teardown already closed it
            except Exception:  # noqa: BLE001
                pass
        self._mrs.clear()
        self._closed = True
        os.close(self._wake_r)
        os.close(self._wake_w)
        OPEN.discard(self)

    @classmethod
    def prepared(cls, conn: connection.Conn, name: str) -> RdmaChannel:
        """A channel on ``conn`` with its rings registered and receives posted."""
        chan = cls(conn, name)
        try:
            chan._prepare(conn)
        except BaseException:
            chan.abandon()
            raise
        return chan

    @classmethod
    def connect(cls, address: Address, timeout: float | None) -> RdmaChannel:
        holder: list[RdmaChannel] = []

        def prepare(conn: connection.Conn) -> None:
            holder.append(cls.prepared(conn, str(address)))
        try:
            connection.connect(address, timeout, SEND_SLOTS + WRITE_WINDOW + 2, RECV_SLOTS, prepare,
                               private=TAG)
        except BaseException:
            for chan in holder:  # prepared, but the connection failed afterwards
                chan.abandon()
            raise
        return holder[0]

    # --- posting ---------------------------------------------------------------------
    def _post_recv(self, conn: connection.Conn, slot: int) -> None:
        from pyverbs.wr import SGE, RecvWR

        sge = SGE(self._recv_mr.buf + slot * MSG_SIZE, MSG_SIZE, self._recv_mr.lkey)
        conn.qp.post_recv(RecvWR(wr_id=_RECV | slot, num_sge=1, sg=[sge]))

    def _can_send(self, reserve: int) -> bool:
        return bool(self._free_send) and self._credits > reserve

    def _send(self, kind: Msg, parts: Sequence[Buffer], limit: int | None = None) -> int:
        """Copy ``parts`` (up to ``limit`` bytes) into a send slot and SEND it; the caller
        checked ``_can_send``. Returns the payload bytes taken."""
        from pyverbs.wr import SGE, SendWR

        slot = self._free_send.pop()
        base = slot * MSG_SIZE
        room = MSG_SIZE - HEADER.size if limit is None else min(limit, MSG_SIZE - HEADER.size)
        pos = base + HEADER.size
        for part in parts:
            view = memoryview(part).cast("B")
            take = min(len(view), room - (pos - base - HEADER.size))
            if take <= 0:
                break
            self._send_mv[pos:pos + take] = view[:take]
            pos += take
        length = pos - base - HEADER.size
        HEADER.pack_into(self._send_mv, base, kind, 0, self._to_return, length, self._processed)
        self._processed_told = self._processed
        self._to_return = 0
        self._credits -= 1
        sge = SGE(self._send_mr.buf + base, HEADER.size + length, self._send_mr.lkey)
        wr = SendWR(wr_id=_SEND | slot, opcode=self._e.IBV_WR_SEND, num_sge=1, sg=[sge],
                    send_flags=self._e.IBV_SEND_SIGNALED)
        self.conn.qp.post_send(wr)
        return length

    def send_control(self, kind: Msg, payload: bytes) -> None:
        """Queue a control message (placement); it goes out as soon as a credit allows."""
        if len(payload) > MSG_SIZE - HEADER.size:
            raise ProtocolError(f"RDMA control message of {len(payload)} bytes is too large")
        with self._io:
            self._ctrl_out.append((kind, payload))
            self._flush_ctrl()

    def _flush_ctrl(self) -> None:
        if self._lost is not None:
            return
        while self._ctrl_out and self._can_send(1):
            kind, payload = self._ctrl_out.popleft()
            self._send(kind, [payload])
        # Return credits before the peer runs dry, or tell it our reader caught up.
        if self._can_send(0) and (self._to_return >= RECV_SLOTS // 2 or
                                  self._processed > self._processed_told):
            self._send(Msg.CREDIT, [])

    def post_write(self, lkey: int, laddr: int, length: int, rkey: int, raddr: int) -> None:
        """Post one signalled RDMA WRITE (placement keeps the window)."""
        from pyverbs.wr import SGE, SendWR

        self._check_usable()
        wr = SendWR(wr_id=_WRITE, opcode=self._e.IBV_WR_RDMA_WRITE, num_sge=1,
                    sg=[SGE(laddr, length, lkey)], send_flags=self._e.IBV_SEND_SIGNALED)
        wr.set_wr_rdma(rkey, raddr)
        with self._io:
            self.conn.qp.post_send(wr)

    def on_message(self, kind: Msg, handler: Callable[[bytes], None]) -> None:
        self._handlers[kind] = handler

    # --- the progress engine ---------------------------------------------------------
    def _progress(self) -> bool:
        """Handle every rdma_cm event and completion that is there; never blocks.
        Returns True if anything happened (a waiter should re-check its condition)."""
        with self._io:
            progressed = False
            conn = self.conn
            if verbs.readable(conn.comp_fd):
                try:
                    conn.comp.get_cq_event(conn.cq)
                    conn.cq.ack_events(1)
                except Exception:  # noqa: BLE001 - a spurious wake-up: nothing to consume
                    pass
            # cm events first: completions that precede a disconnect are then still seen below
            while verbs.readable(conn.cm_fd):
                try:
                    ev = conn.cm.get(0)
                except Exception:  # noqa: BLE001 - EAGAIN: another reader took it
                    break
                name = verbs.cm_event_name(int(ev.event_type))
                ev.ack_cm_event()
                progressed = True
                if name in connection.GONE_EVENTS:
                    self._mark_lost(f"{self.name}: the peer disconnected ({name})")
            while True:
                _, wcs = conn.cq.poll(32)
                if not wcs:
                    break
                progressed = True
                for wc in wcs:
                    self._complete(wc)
            self._flush_ctrl()
            return progressed

    def _complete(self, wc: Any) -> None:
        kind = wc.wr_id & _KIND
        ok = wc.status == self._e.IBV_WC_SUCCESS
        if kind == _WRITE:
            if self.on_write_done is not None:
                self.on_write_done(ok, "" if ok else verbs.wc_status_name(wc.status))
            if not ok:
                self._mark_lost(f"{self.name}: RDMA WRITE failed "
                                f"({verbs.wc_status_name(wc.status)}): the destination went away")
            return
        slot = wc.wr_id & ~_KIND
        if kind == _SEND:
            self._free_send.append(slot)
            if not ok:
                self._mark_lost(f"{self.name}: send failed ({verbs.wc_status_name(wc.status)})")
            return
        if not ok:  # flushed receives after a disconnect
            self._mark_lost(f"{self.name}: receive failed ({verbs.wc_status_name(wc.status)})")
            return
        base = slot * MSG_SIZE
        mtype, _, credits, length, processed = HEADER.unpack_from(self._recv_mv, base)
        self._credits += credits
        self.peer_processed = max(self.peer_processed, processed)
        if mtype == Msg.DATA and length:
            self._rx.append([slot, base + HEADER.size, base + HEADER.size + length])
            return
        if mtype == Msg.EOF:
            self._peer_eof = True
        elif mtype not in (Msg.DATA, Msg.CREDIT):
            handler = self._handlers.get(Msg(mtype)) if mtype in Msg._value2member_map_ else None
            if handler is None:
                self._mark_lost(f"{self.name}: unexpected RDMA control message type {mtype}")
            else:
                handler(bytes(self._recv_mv[base + HEADER.size:base + HEADER.size + length]))
        self._repost(slot)

    def _repost(self, slot: int) -> None:
        if self._lost is None:
            self._post_recv(self.conn, slot)
            self._to_return += 1



    def _check_usable(self) -> None:
        if self.cancelled:
            raise MigrationCancelled("migration cancelled")
        if self._lost is not None:
            raise ConnectionLostError(self._lost)

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float | None = None) -> None:
        """Wait (in poll(), or yielding in a coroutine) until ``ready()``; raise
        ConnectionLostError on disconnect, MigrationCancelled on cancel, TimedOut after
        ``timeout`` s, or once the peer did nothing for the write idle limit: what the source
        waits for here (registered chunks, WRITE completions, its stream being applied) is
        the destination's answer, and a stopped destination must not hold it forever."""
        deadline = None if timeout is None else time.monotonic() + timeout
        idle = self._idle_write
        since = time.monotonic()
        while True:
            if self._progress():
                since = time.monotonic()
            if ready():
                return
            self._check_usable()
            now = time.monotonic()
            left = None if deadline is None else deadline - now
            if left is not None and left <= 0:
                raise TimedOut(f"{self.name}: timed out {what}")
            if idle is not None:
                if now - since >= idle:
                    raise TimedOut(f"{self.name}: the peer answered nothing for {idle:g} s "
                                   f"({what}); giving up (a stalled peer or network: check "
                                   "the other side)")
                left = since + idle - now if left is None else min(left, since + idle - now)
            self.wait_cond(IOCondition.IN, left)

    # --- Channel primitives ----------------------------------------------------------
    def poll_fds(self, cond: IOCondition) -> list[tuple[int, int]]:
        self._drain_wake()
        with self._io:
            if not self._rx:
                self._processed = self._consumed  # our reader is idle: all it read is applied
            progressed = self._progress()
            self.conn.cq.req_notify()
            progressed = self._progress() or progressed  # a completion that beat the arming
            ready = (progressed or bool(self._rx) or self._peer_eof or self._lost is not None
                     or self._shut_rd or (cond & IOCondition.OUT and self._can_send(1)))
        if ready:
            self._wake()
        import select

        return [(self.conn.comp_fd, select.POLLIN), (self.conn.cm_fd, select.POLLIN),
                (self._wake_r, select.POLLIN)]

    def _readv(self, bufs: Sequence[WritableBuffer]) -> int | None:
        if self._shut_rd:
            return 0
        with self._io:
            self._processed = self._consumed  # the caller applied everything read before
            if not self._rx:
                self._progress()
            if not self._rx:
                if self._peer_eof:
                    return 0
                if self._lost is not None:
                    raise ConnectionLostError(self._lost)
                return None
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
                        self._consumed += 1
                        self._repost(head[0])
                done += pos
                if not self._rx:
                    break
            self._flush_ctrl()
            return done

    def _writev(self, bufs: Sequence[Buffer]) -> int | None:
        with self._io:
            self._check_usable()
            if self._shut_wr:
                raise ConnectionLostError(f"{self.name}: write after shutdown")
            # Queued control messages go first: the peer relies on their order (MODE before
            # the block list, PLACED before the device state).
            if self._ctrl_out or not self._can_send(1):
                self._progress()
                self._check_usable()
                if self._ctrl_out or not self._can_send(1):
                    return None
            n = self._send(Msg.DATA, bufs)
            self.data_sent += 1
            return n

    def _peek(self, size: int) -> bytes | None:
        with self._io:
            if not self._rx:
                self._progress()
            if not self._rx:
                if self._peer_eof or self._shut_rd:
                    return b""
                if self._lost is not None:
                    raise ConnectionLostError(self._lost)
                return None
            out = bytearray()
            for _, pos, end in self._rx:
                out += self._recv_mv[pos:min(end, pos + size - len(out))]
                if len(out) >= size:
                    break
            return bytes(out)

    def _set_blocking(self, blocking: bool) -> None:
        """Nothing to do: reads never block in verbs; ``wait_cond`` does the waiting."""

    def _shutdown(self, how: ShutdownHow) -> None:
        with self._io:
            if how in (ShutdownHow.WRITE, ShutdownHow.BOTH) and not self._shut_wr:
                self._shut_wr = True
                if how is ShutdownHow.WRITE and self._lost is None:
                    self._ctrl_out.append((Msg.EOF, b""))  # after every DATA message
                    self._flush_ctrl()
            if how in (ShutdownHow.READ, ShutdownHow.BOTH):
                self._shut_rd = True
            if how is ShutdownHow.BOTH:
                # A cancel: tell the peer (it sees DISCONNECTED) and flush our own work.
                self.cancelled = True
                try:
                    self.conn.cmid.disconnect()
                except Exception:  # noqa: BLE001 - not connected any more
                    pass
                self._mark_lost(f"{self.name}: shut down locally")
        self._wake()

    def _close(self) -> None:
        # Let queued messages (EOF) and sends in flight complete, briefly, before leaving.
        deadline = time.monotonic() + 2.0
        while (self._lost is None and (self._ctrl_out or len(self._free_send) < SEND_SLOTS)
               and time.monotonic() < deadline):
            if not self._progress():
                time.sleep(0.001)
        try:
            self.conn.cmid.disconnect()
        except Exception:  # noqa: BLE001 - already disconnected
            pass
        mrs = self._mrs + self.placement.release()
        self.conn.close(mrs)
        verbs.unpinned(self._recv_arr.nbytes + self._send_arr.nbytes)
        os.close(self._wake_r)
        os.close(self._wake_w)
        OPEN.discard(self)


class RdmaListener:
    """``listen_rdma``'s result. QEMU's RDMA incoming takes one connection; this one takes
    as many as its owner accepts (a multifd source's channels, each its own queue pair), and
    each connection lives on after the listener is closed."""

    def __init__(self, endpoint: connection.PassiveEndpoint) -> None:
        self.endpoint = endpoint
        self.address = endpoint.address

    @classmethod
    def open(cls, address: Address) -> RdmaListener:
        return cls(connection.PassiveEndpoint(address))

    def fileno(self) -> int:
        """Readable when a connection request waits."""
        return self.endpoint.fileno()

    def accept(self, timeout: float | None = None) -> RdmaChannel | QemuRdmaChannel:
        """The next connection, in the protocol its private data names: mignet's own
        (:class:`RdmaChannel`), or QEMU's (:class:`QemuRdmaChannel`, when real QEMU
        migrates here with ``migrate rdma:…``)."""
        name = str(self.address)
        holder: list[RdmaChannel | QemuRdmaChannel] = []

        def plan(private: bytes) -> connection.AcceptPlan:
            caps = qemu_control.parse_caps(private)
            if private.startswith(TAG) or caps is None:
                def prepare(conn: connection.Conn) -> None:
                    holder.append(RdmaChannel.prepared(conn, name))
                return connection.AcceptPlan(SEND_SLOTS + WRITE_WINDOW + 2, RECV_SLOTS, prepare)
            reply = qemu_control.accept_caps(caps)

            def prepare_qemu(conn: connection.Conn) -> None:
                chan = QemuRdmaChannel(conn, name, caps)
                holder.append(chan)
                chan.prepare(conn)
            return connection.AcceptPlan(qemu_channel.SEND_SLOTS, qemu_channel.RECV_SLOTS,
                                         prepare_qemu, reply)
        try:
            self.endpoint.accept(timeout, plan)
        except BaseException:
            for chan in holder:
                chan.abandon()
            raise
        chan = holder[0]
        if isinstance(chan, QemuRdmaChannel):
            chan.started()
        return chan

    def close(self) -> None:
        self.endpoint.close()
