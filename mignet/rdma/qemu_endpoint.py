"""What both ends of QEMU's RDMA protocol share: the registered message rings, posting, the
progress engine and teardown (:class:`QemuRdmaChannel` is the destination,
:class:`QemuRdmaSource` the source).

Why one base: the two roles differ only in what a received message means and when a
message may go (the destination SENDs READY, the source waits for it); the verbs work
around them, and its ordering rules (close QP and MRs before the CMIDs, move our own QP to
ERROR on a disconnect), is the same.
"""

from __future__ import annotations

import os
import select
import threading
from typing import Any

import numpy as np

from mignet.channel import IOCondition
from mignet.errors import MignetError, MigrationCancelled, ProtocolError
from mignet.rdma import connection, verbs
from mignet.rdma.endpoint import OPEN, VerbsEndpoint
from mignet.rdma.qemu_control import MAX_MESSAGE, Caps

#: wr_id kinds (the low bits are the ring slot)
SEND, RECV, WRITE = 1 << 60, 2 << 60, 3 << 60
KIND = 3 << 60


class QemuRdmaEndpoint(VerbsEndpoint):
    """One connected end of QEMU's RDMA protocol; subclasses say what messages mean."""

    duplex_threads = False
    protocol = "qemu"
    recv_slots = 4
    send_slots = 4
    send_size = 64 << 10

    def __init__(self, conn: connection.Conn, name: str, caps: Caps) -> None:
        super().__init__(name)
        import pyverbs.enums as e

        self._e = e
        self.conn = conn
        self.caps = caps
        self._io = threading.RLock()  # progress engine and posting; never held while sleeping
        self._recv_arr = np.zeros(self.recv_slots * MAX_MESSAGE, dtype=np.uint8)
        self._send_arr = np.zeros(self.send_slots * self.send_size, dtype=np.uint8)
        self._recv_mv = self._recv_arr.data
        self._send_mv = self._send_arr.data
        self._mrs: list[Any] = []
        self._free_send = list(range(self.send_slots))
        self._lost: str | None = None
        self._failure: MignetError | None = None  # a protocol error of ours or the peer's
        self.cancelled = False
        self.messages = 0  # control messages received (destination) or sent (source)
        self.stream_messages = 0  # ... of which QEMU_FILE
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.placement: Any = None  # set by the subclass
        OPEN.add(self)

    # --- construction ----------------------------------------------------------------
    def prepare(self, conn: connection.Conn) -> None:
        """Register both rings and post every receive (before the peer may send)."""
        access = self._e.IBV_ACCESS_LOCAL_WRITE
        verbs.check_memlock(verbs.pinned_bytes() + self._recv_arr.nbytes + self._send_arr.nbytes)
        self._recv_mr = verbs.register(conn.pd, self._recv_arr.ctypes.data, self._recv_arr.nbytes, access)
        self._mrs.append(self._recv_mr)
        self._send_mr = verbs.register(conn.pd, self._send_arr.ctypes.data, self._send_arr.nbytes, access)
        self._mrs.append(self._send_mr)
        for slot in range(self.recv_slots):
            self._post_recv(conn, slot)

    def abandon(self) -> None:
        """Setup failed: release what we registered (the connection frees the rest)."""
        if self._closed:
            return
        for mr in self._mrs:
            try:
                mr.close()
            except Exception:  # noqa: BLE001 - a no-op where the PD's teardown closed it
                pass
        self._mrs.clear()
        self._closed = True
        os.close(self._wake_r)
        os.close(self._wake_w)
        OPEN.discard(self)

    # --- posting ---------------------------------------------------------------------
    def _post_recv(self, conn: connection.Conn, slot: int) -> None:
        from pyverbs.wr import SGE, RecvWR

        sge = SGE(self._recv_mr.buf + slot * MAX_MESSAGE, MAX_MESSAGE, self._recv_mr.lkey)
        conn.qp.post_recv(RecvWR(wr_id=RECV | slot, num_sge=1, sg=[sge]))

    def _repost(self, slot: int) -> None:
        if self._lost is None:
            self._post_recv(self.conn, slot)

    def _send(self, data: bytes | list[Any]) -> int:
        """SEND one message (bytes, or parts copied one after another); the caller checked
        that a send slot is free. Returns its length."""
        from pyverbs.wr import SGE, SendWR

        parts = data if isinstance(data, list) else [data]
        size = sum(len(p) for p in parts)
        if size > self.send_size:
            raise ProtocolError(f"QEMU RDMA message of {size} bytes is too large")
        slot = self._free_send.pop()
        pos = base = slot * self.send_size
        for part in parts:
            self._send_mv[pos:pos + len(part)] = part
            pos += len(part)
        sge = SGE(self._send_mr.buf + base, size, self._send_mr.lkey)
        wr = SendWR(wr_id=SEND | slot, opcode=self._e.IBV_WR_SEND, num_sge=1, sg=[sge],
                    send_flags=self._e.IBV_SEND_SIGNALED)
        self.conn.qp.post_send(wr)
        return size

    # --- the progress engine ---------------------------------------------------------
    def _progress(self) -> bool:
        """Take every rdma_cm event and completion that is there, then let the subclass
        act on what arrived (``_pump``); never blocks. True if anything happened."""
        with self._io:
            progressed = False
            conn = self.conn
            if verbs.readable(conn.comp_fd):
                try:
                    conn.comp.get_cq_event(conn.cq)
                    conn.cq.ack_events(1)
                except Exception:  # noqa: BLE001 - a spurious wake-up
                    pass
            # cm events first: completions that precede a disconnect are then still seen below
            while verbs.readable(conn.cm_fd):
                try:
                    ev = conn.cm.get(0)
                except Exception:  # noqa: BLE001 - EAGAIN
                    break
                name = verbs.cm_event_name(int(ev.event_type))
                ev.ack_cm_event()
                progressed = True
                if name in connection.GONE_EVENTS:
                    self._peer_gone(name)
            while True:
                _, wcs = conn.cq.poll(32)
                if not wcs:
                    break
                progressed = True
                for wc in wcs:
                    self._complete(wc)
            self._pump()
            return progressed

    def _peer_gone(self, event: str) -> None:
        self._mark_lost(f"{self.name}: QEMU disconnected ({event})")

    def _complete(self, wc: Any) -> None:
        """One completion; SENDs are handled here, the rest by ``_completed``."""
        kind = wc.wr_id & KIND
        ok = wc.status == self._e.IBV_WC_SUCCESS
        if kind == SEND:
            self._free_send.append(wc.wr_id & ~KIND)
            if not ok:
                self._mark_lost(f"{self.name}: send to QEMU failed ({verbs.wc_status_name(wc.status)})")
            return
        self._completed(kind, wc.wr_id & ~KIND, ok, wc)

    def _completed(self, kind: int, slot: int, ok: bool, wc: Any) -> None:
        raise NotImplementedError

    def _pump(self) -> None:
        """Act on what arrived (subclasses)."""

    def _ready(self) -> bool:
        """Whether a waiter should look again (subclasses add their own reasons)."""
        return self._lost is not None

    def _raise_if_failed(self) -> None:
        if self.cancelled:
            raise MigrationCancelled("migration cancelled")
        if self._failure is not None:
            raise self._failure

    def poll_fds(self, cond: IOCondition) -> list[tuple[int, int]]:
        self._drain_wake()
        with self._io:
            progressed = self._progress()
            self.conn.cq.req_notify()
            progressed = self._progress() or progressed  # a completion that beat the arming
            ready = progressed or self._ready()
        if ready:
            self._wake()
        return [(self.conn.comp_fd, select.POLLIN), (self.conn.cm_fd, select.POLLIN),
                (self._wake_r, select.POLLIN)]

    def _set_blocking(self, blocking: bool) -> None:
        """Nothing to do: reads never block in verbs; ``wait_cond`` does the waiting."""

    def _disconnect(self) -> None:
        try:
            self.conn.cmid.disconnect()  # the peer sees DISCONNECTED
        except Exception:  # noqa: BLE001 - not connected any more
            pass

    def _close(self) -> None:
        self._disconnect()
        mrs = self._mrs + (self.placement.release() if self.placement is not None else [])
        self.conn.close(mrs)
        verbs.unpinned(self._recv_arr.nbytes + self._send_arr.nbytes)
        os.close(self._wake_r)
        os.close(self._wake_w)
        OPEN.discard(self)
