"""Research probe: RDMA WRITE of numpy memory over rdma_cm with pyverbs 44 (soft-RoCE).

Run inside the soft-RoCE guest (see ``tools/rxe/run_in_guest.py``)::

    python tools/rxe/run_in_guest.py -- python tools/rxe/probe_verbs.py [--mode MODE]

Why this exists: it is the prototype of mignet's RDMA transport. It pins down, on the
pyverbs that Debian ships (44, the only one that imports against Debian's libibverbs),
the exact calls that work for

* rdma_cm connection setup in *async* mode with our own QP/CQ (the synchronous CMID
  helpers pick their own PD/CQ and cannot carry wr_ids, so they are unusable here);
* registering memory we own (a numpy array) and letting the peer RDMA-WRITE into it;
* a completion channel whose fd can be ``poll()``-ed together with the rdma_cm event
  channel fd, the way QEMU's RDMA migration waits (pyverbs 44 exposes neither fd, so
  both are found through ``/proc/self/fd``);
* detecting a dead peer (SIGKILL) as ``RDMA_CM_EVENT_DISCONNECTED`` on the cm fd.

Modes (the parent forks server and client as two processes on one rxe device, at
``$MIGNET_RDMA_ADDR``, default 10.9.0.1); ``all`` (default) runs the three in turn:

* ``transfer``: the server registers a zeroed array and SENDs (addr, len, rkey);
  the client RDMA-WRITEs ``--size`` bytes in ``--chunk`` pieces with ``--window`` signalled
  writes in flight, then SENDs a "finish" message carrying its digest; the server
  verifies the bytes and both report throughput.
* ``kill-client``: the client writes in a loop; the parent SIGKILLs it while the server
  sits in a blocking ``poll()`` on [completion fd, cm fd]; the server reports what woke it.
* ``kill-server``: the same with roles swapped: what does the *writer* see?

Each child prints one JSON record per line (and hands it to the parent through a
queue); the parent prints ``probe:`` summary lines and exits 0 only if all went right.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import multiprocessing as mp
import multiprocessing.queues as mp_queues
import os
import queue
import resource
import select
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

import pyverbs.cm_enums as ce
import pyverbs.enums as e
from pyverbs.cmid import CMID, AddrInfo, CMEvent, CMEventChannel, ConnParam
from pyverbs.cq import CQ, WC, CompChannel
from pyverbs.device import Context
from pyverbs.mr import MR
from pyverbs.pd import PD
from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
from pyverbs.wr import SGE, RecvWR, SendWR

#: The address of the RDMA netdev; the guest harness uses 10.9.0.1 on dum0/rxe0.
ADDR = os.environ.get("MIGNET_RDMA_ADDR", "10.9.0.1")
PORT = 7471
MiB = 1 << 20

#: Control message: kind (u32), pad (u32), addr (u64), length (u64), rkey (u32), pad,
#: digest (32 bytes). One format for both directions keeps the probe small.
CTRL = struct.Struct("<IIQQII32s")
CTRL_MEMINFO = 1
CTRL_FINISH = 2

WRID_SEND = 1 << 62
WRID_RECV = 1 << 61

WC_STATUS_NAMES: dict[int, str] = {
    int(getattr(e, n)): n for n in dir(e) if n.startswith("IBV_WC_") and n.endswith("_ERR")
} | {int(e.IBV_WC_SUCCESS): "IBV_WC_SUCCESS"}

CM_EVENT_NAMES: dict[int, str] = {
    int(getattr(ce, n)): n for n in dir(ce) if n.startswith("RDMA_CM_EVENT_")
}


Record: TypeAlias = dict[str, Any]
RecordQueue: TypeAlias = "mp_queues.Queue[Record | None]"

#: Where a forked child sends its records (set in the child before its role runs).
RECORDS: RecordQueue | None = None


def emit(**fields: Any) -> None:  # noqa: ANN401 - free-form JSON record
    """Print one record and hand it to the parent.

    ``t`` is CLOCK_MONOTONIC, which is system-wide, so the parent can subtract its own
    kill time from a child's wake-up time.
    """
    fields.setdefault("pid", os.getpid())
    fields.setdefault("t", time.monotonic())
    print("  " + json.dumps(fields), flush=True)
    if RECORDS is not None:
        RECORDS.put(fields)


# --------------------------------------------------------------------------------------
# Finding the fds pyverbs 44 does not expose
# --------------------------------------------------------------------------------------


def fd_targets() -> dict[int, str]:
    """Map every open fd of this process to its /proc/self/fd link target."""
    out: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the fd listdir itself used, already closed
            pass
    return out


def new_fd_after(create: Callable[[], Any], target: str) -> tuple[Any, int]:
    """Call ``create()`` and return (its result, the one new fd whose link is ``target``).

    Why: pyverbs 44 has no ``CompChannel.fd`` / ``CMEventChannel.fd``. The completion
    channel's fd links to ``anon_inode:[infinibandevent]`` and the rdma_cm event
    channel's fd to ``/dev/infiniband/rdma_cm``; comparing link targets (not numbers,
    which get reused) before and after creation finds exactly the fd the object owns.
    """
    before = fd_targets()
    obj = create()
    after = fd_targets()
    fresh = [fd for fd, t in after.items() if t == target and before.get(fd) != t]
    if len(fresh) != 1:
        raise RuntimeError(f"expected one new fd -> {target}, found {fresh}")
    return obj, fresh[0]


def set_nonblocking(fd: int) -> None:
    """Make ``fd`` non-blocking, so a spurious wake-up can never hang a reader."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)


# --------------------------------------------------------------------------------------
# One RC connection: CM event channel, CMID, PD, CQ + completion channel, QP
# --------------------------------------------------------------------------------------


class PeerGone(Exception):
    """The rdma_cm channel reported the peer as gone (DISCONNECTED and friends)."""


@dataclass
class CMChannel:
    """The rdma_cm event channel, its fd, and the names of the events seen so far."""

    chan: CMEventChannel
    fd: int
    events: list[str] = field(default_factory=list)

    @classmethod
    def open(cls) -> CMChannel:
        """Create the event channel and find its fd (pyverbs 44 does not expose it)."""
        chan, fd = new_fd_after(CMEventChannel, "/dev/infiniband/rdma_cm")
        set_nonblocking(fd)
        return cls(chan, fd)

    def next_event(self, timeout_s: float = 10.0) -> tuple[int, bytes]:
        """Wait on the fd, fetch one event, ack it, return (type, private data).

        ``CMEvent(chan)`` is ``rdma_get_cm_event``: it would block (or, with the fd
        non-blocking, raise EAGAIN) if called before the fd is readable.
        """
        if not select.select([self.fd], [], [], timeout_s)[0]:
            raise TimeoutError("no rdma_cm event")
        ev = CMEvent(self.chan)
        kind = int(ev.event_type)
        data = ev.private_data
        ev.ack_cm_event()
        self.events.append(CM_EVENT_NAMES.get(kind, str(kind)))
        return kind, data

    def expect(self, want: int, timeout_s: float = 10.0) -> None:
        """Wait for one event and fail unless it is ``want``."""
        kind, _ = self.next_event(timeout_s)
        if kind != want:
            raise RuntimeError(f"expected {CM_EVENT_NAMES[want]}, got "
                               f"{CM_EVENT_NAMES.get(kind, kind)}")


@dataclass
class Conn:
    """Everything one side of the connection owns, plus the two fds we poll on."""

    cm: CMChannel
    cmid: CMID  # the connected id (client: own id; server: the child id)
    listener: CMID | None
    pd: PD
    comp: CompChannel
    comp_fd: int
    cq: CQ
    qp: QP
    depth: int
    mrs: list[MR] = field(default_factory=list)
    comp_wakeups: int = 0  # completion-channel events consumed (proves the fd path ran)

    @property
    def cm_fd(self) -> int:
        """The rdma_cm event channel fd."""
        return self.cm.fd

    @property
    def events(self) -> list[str]:
        """rdma_cm events seen on this connection's channel."""
        return self.cm.events

    def next_cm_event(self, timeout_s: float = 10.0) -> tuple[int, bytes]:
        """See :meth:`CMChannel.next_event`."""
        return self.cm.next_event(timeout_s)

    # ---- completions -----------------------------------------------------------------

    def wait_completions(self, timeout_s: float = 30.0) -> list[WC]:
        """Return at least one work completion, sleeping on the completion fd if none.

        The order (poll; arm with req_notify; poll again; only then sleep) closes the race
        where a completion lands between the first poll and arming. While asleep we also
        watch the cm fd, as QEMU does, so a dead peer ends the wait instead of a timeout.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            wcs: list[WC] = self.cq.poll(self.depth)[1]
            if wcs:
                return wcs
            self.cq.req_notify()
            wcs = self.cq.poll(self.depth)[1]
            if wcs:
                return wcs
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no completion")
            p = select.poll()
            p.register(self.comp_fd, select.POLLIN)
            p.register(self.cm_fd, select.POLLIN)
            for fd, _ in p.poll(min(left, 0.1) * 1000):  # 100 ms, as QEMU's loop
                if fd == self.comp_fd:
                    self.comp.get_cq_event(self.cq)
                    self.cq.ack_events(1)
                    self.comp_wakeups += 1
                elif fd == self.cm_fd:
                    kind, _ = self.next_cm_event(0)
                    if kind in (
                        ce.RDMA_CM_EVENT_DISCONNECTED,
                        ce.RDMA_CM_EVENT_DEVICE_REMOVAL,
                        ce.RDMA_CM_EVENT_TIMEWAIT_EXIT,
                    ):
                        raise PeerGone(CM_EVENT_NAMES[kind])

    def post_recv(self, mr: MR, offset: int, length: int, wr_id: int) -> None:
        """Post one receive buffer (must precede the peer's SEND, or the peer sees RNR)."""
        sge = SGE(mr.buf + offset, length, mr.lkey)
        self.qp.post_recv(RecvWR(wr_id=wr_id, num_sge=1, sg=[sge]))

    def post_send(self, mr: MR, offset: int, length: int, wr_id: int) -> None:
        """Post one signalled SEND of ``length`` bytes at ``mr.buf + offset``."""
        sge = SGE(mr.buf + offset, length, mr.lkey)
        wr = SendWR(wr_id=wr_id, opcode=e.IBV_WR_SEND, num_sge=1, sg=[sge],
                    send_flags=e.IBV_SEND_SIGNALED)
        self.qp.post_send(wr)

    def post_write(self, mr: MR, offset: int, length: int, rkey: int, raddr: int,
                   wr_id: int) -> None:
        """Post one signalled RDMA WRITE from our MR into the peer's (raddr, rkey)."""
        sge = SGE(mr.buf + offset, length, mr.lkey)
        wr = SendWR(wr_id=wr_id, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1, sg=[sge],
                    send_flags=e.IBV_SEND_SIGNALED)
        wr.set_wr_rdma(rkey, raddr)
        self.qp.post_send(wr)

    def close(self) -> None:
        """Tear down in dependency order.

        Why explicit: ``CMID.close()`` NULLs the Context and PD objects it holds, and a
        child CMID holds the *listener's* ones, so everything built on them (QP, MRs, CQ,
        channel) must be closed first.
        """
        self.qp.close()
        for mr in self.mrs:
            mr.close()
        self.cq.close()
        self.comp.close()
        self.cmid.close()
        if self.listener is not None:
            self.listener.close()
        self.cm.chan.close()


def make_cq_qp(cmid_ctx: Context, pd: PD, depth: int) -> tuple[CompChannel, int, CQ, QP]:
    """Create completion channel (+ its fd), CQ and an RC QP on the CMID's device context."""
    comp, comp_fd = new_fd_after(lambda: CompChannel(cmid_ctx), "anon_inode:[infinibandevent]")
    set_nonblocking(comp_fd)
    cq = CQ(cmid_ctx, 2 * depth, None, comp, 0)
    cap = QPCap(max_send_wr=depth, max_recv_wr=depth, max_send_sge=1, max_recv_sge=1)
    qp = QP(pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap, sq_sig_all=0))
    return comp, comp_fd, cq, qp


def modify_qp(cmid: CMID, qp: QP, *states: int) -> None:
    """Move our QP through ``states`` using the attributes rdma_cm computes for the CMID."""
    for state in states:
        attr, mask = cmid.init_qp_attr(state)
        qp.modify(attr, mask)


def server_accept(port: int, depth: int, pre_accept: Callable[[Conn], None]) -> Conn:
    """Passive side: listen, take one CONNECT_REQUEST, bring our QP to RTS, accept."""
    cm = CMChannel.open()
    listener = CMID(creator=cm.chan, port_space=ce.RDMA_PS_TCP)
    # Bind to a concrete address: that binds the id to the rxe device, and pyverbs then
    # creates listener.context / listener.pd (a wildcard bind would leave them None).
    listener.bind_addr(AddrInfo(src=ADDR, src_service=str(port),
                                port_space=ce.RDMA_PS_TCP, flags=ce.RAI_PASSIVE))
    listener.listen()
    emit(role="server", event="listening", port=port)
    if not select.select([cm.fd], [], [], 300)[0]:
        raise TimeoutError("no CONNECT_REQUEST")
    ev = CMEvent(cm.chan)  # not via next_event: the new CMID must be made from the event
    if ev.event_type != ce.RDMA_CM_EVENT_CONNECT_REQUEST:
        raise RuntimeError(f"expected CONNECT_REQUEST, got {ev.event_str()}")
    child = CMID(creator=ev, listen_id=listener)  # takes listener's ctx / pd / channel
    ev.ack_cm_event()
    cm.events.append("RDMA_CM_EVENT_CONNECT_REQUEST")
    pd = child.pd
    comp, comp_fd, cq, qp = make_cq_qp(child.context, pd, depth)
    conn = Conn(cm, child, listener, pd, comp, comp_fd, cq, qp, depth)
    modify_qp(child, qp, e.IBV_QPS_INIT, e.IBV_QPS_RTR, e.IBV_QPS_RTS)
    pre_accept(conn)  # post receives now: the client may SEND as soon as it is connected
    child.accept(ConnParam(qp_num=qp.qp_num))
    cm.expect(ce.RDMA_CM_EVENT_ESTABLISHED)
    return conn


def client_connect(port: int, depth: int, pre_connect: Callable[[Conn], None]) -> Conn:
    """Active side: resolve addr + route, QP to INIT, connect, RTR/RTS, establish."""
    cm = CMChannel.open()
    cmid = CMID(creator=cm.chan, port_space=ce.RDMA_PS_TCP)
    ai = AddrInfo(src=ADDR, dst=ADDR, dst_service=str(port), port_space=ce.RDMA_PS_TCP)
    cmid.resolve_addr(ai, 2000)
    cm.expect(ce.RDMA_CM_EVENT_ADDR_RESOLVED)
    cmid.resolve_route(2000)  # after this pyverbs sets cmid.context and cmid.pd
    cm.expect(ce.RDMA_CM_EVENT_ROUTE_RESOLVED)
    pd = cmid.pd
    comp, comp_fd, cq, qp = make_cq_qp(cmid.context, pd, depth)
    conn = Conn(cm, cmid, None, pd, comp, comp_fd, cq, qp, depth)
    modify_qp(cmid, qp, e.IBV_QPS_INIT)
    pre_connect(conn)
    cmid.connect(ConnParam(qp_num=qp.qp_num))
    cm.expect(ce.RDMA_CM_EVENT_CONNECT_RESPONSE)
    modify_qp(cmid, qp, e.IBV_QPS_RTR, e.IBV_QPS_RTS)
    cmid.establish()  # sends the RTU; the server then sees ESTABLISHED
    return conn


# --------------------------------------------------------------------------------------
# Roles
# --------------------------------------------------------------------------------------


def pattern(nbytes: int) -> npt.NDArray[np.uint8]:
    """Deterministic non-trivial bytes (cheap under TCG, unlike a random generator)."""
    words = np.arange(nbytes // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return words.view(np.uint8)


def ctrl_mr(pd: PD) -> tuple[MR, npt.NDArray[np.uint8]]:
    """A small MR for control messages: slot 0 sends, slots 1..3 receive."""
    arr = np.zeros(4 * 64, dtype=np.uint8)
    mr = MR(pd, arr.nbytes, e.IBV_ACCESS_LOCAL_WRITE, address=arr.ctypes.data)
    return mr, arr


def run_server(args: argparse.Namespace) -> int:
    """Register the target array, publish (addr, len, rkey), wait for the writes."""
    size = args.size
    target = np.zeros(size, dtype=np.uint8)
    holder: dict[str, Any] = {}

    def pre_accept(conn: Conn) -> None:
        cmr, carr = ctrl_mr(conn.pd)
        holder["cmr"], holder["carr"] = cmr, carr
        conn.mrs.append(cmr)
        conn.post_recv(cmr, 64, 64, WRID_RECV | 1)

    conn = server_accept(args.port, args.window + 4, pre_accept)
    cmr: MR = holder["cmr"]
    carr: npt.NDArray[np.uint8] = holder["carr"]
    access = e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
    t0 = time.monotonic()
    mr = MR(conn.pd, size, access, address=target.ctypes.data)
    conn.mrs.append(mr)
    emit(role="server", event="established", cm_events=conn.events, qp_num=conn.qp.qp_num,
         mr_buf_is_array=mr.buf == target.ctypes.data, reg_s=time.monotonic() - t0,
         comp_fd=conn.comp_fd, cm_fd=conn.cm_fd)

    carr[:CTRL.size] = np.frombuffer(
        CTRL.pack(CTRL_MEMINFO, 0, mr.buf, size, mr.rkey, 0, b""), dtype=np.uint8)
    t_start = time.monotonic()
    conn.post_send(cmr, 0, CTRL.size, WRID_SEND)

    if args.mode == "kill-client":
        return server_wait_for_death(conn)

    got_finish: bytes | None = None
    sent = False
    try:
        while got_finish is None or not sent:
            for wc in conn.wait_completions(120):
                if wc.status != e.IBV_WC_SUCCESS:
                    raise RuntimeError(f"server wc status {wc.status} wr_id {wc.wr_id:#x}")
                if wc.wr_id == WRID_SEND:
                    sent = True
                elif wc.wr_id & WRID_RECV:
                    got_finish = carr[64:64 + CTRL.size].tobytes()
    except PeerGone as gone:
        emit(role="server", event="peer-gone", why=str(gone), cm_events=conn.events)
        return 1
    t_end = time.monotonic()
    kind, _, _, nbytes, _, _, digest = CTRL.unpack(got_finish)
    t_hash = time.monotonic()
    mine = hashlib.sha256(target.data).digest()
    hash_s = time.monotonic() - t_hash
    ok = kind == CTRL_FINISH and nbytes == size and mine == digest
    ok = ok and bool(np.array_equal(target[:4096], pattern(4096)))
    emit(role="server", event="done", ok=ok, bytes=size, seconds=t_end - t_start,
         mb_s=size / (t_end - t_start) / 1e6, hash_s=hash_s, cm_events=conn.events,
         comp_wakeups=conn.comp_wakeups)
    # Orderly shutdown: wait for the client's disconnect (it disconnects first).
    try:
        kind2, _ = conn.next_cm_event(30)
        emit(role="server", event="cm", name=CM_EVENT_NAMES.get(kind2, str(kind2)))
    except TimeoutError:
        emit(role="server", event="cm", name="timeout")
    conn.close()
    return 0 if ok else 1


def server_wait_for_death(conn: Conn) -> int:
    """Block in one long poll() on [comp fd, cm fd] and report what wakes it and when."""
    conn.cq.req_notify()
    # Arm, then poll: a completion already queued (our SEND, likely) never signals the fd.
    _, queued = conn.cq.poll(conn.depth)
    emit(role="server", event="queued-before-sleep",
         wcs=[{"wr_id": w.wr_id, "status": WC_STATUS_NAMES.get(w.status, w.status)}
              for w in queued])
    p = select.poll()
    p.register(conn.comp_fd, select.POLLIN)
    p.register(conn.cm_fd, select.POLLIN)
    emit(role="server", event="blocking-poll")
    woke: list[tuple[int, int]] = []
    deadline = time.monotonic() + 60
    names: list[str] = []
    wcs: list[dict[str, int]] = []
    while time.monotonic() < deadline and not names:
        woke = p.poll(60_000)
        t_wake = time.monotonic()
        for fd, _ in woke:
            if fd == conn.cm_fd:
                kind, _ = conn.next_cm_event(0)
                names.append(CM_EVENT_NAMES.get(kind, str(kind)))
            else:
                conn.comp.get_cq_event(conn.cq)
                conn.cq.ack_events(1)
                _, got = conn.cq.poll(conn.depth)
                wcs.extend({"wr_id": w.wr_id, "status": WC_STATUS_NAMES.get(w.status, w.status)}
                           for w in got)
                conn.cq.req_notify()
        emit(role="server", event="woke", t=t_wake,
             fds=["cm" if fd == conn.cm_fd else "comp" for fd, _ in woke],
             cm_events=names, wcs=wcs)
    # After DISCONNECTED our own QP is *not* moved to ERROR by rdma_cm (it is not the
    # CMID's QP): show what a posted RECV does once we move it ourselves.
    attr = QPAttr()
    attr.qp_state = e.IBV_QPS_ERR
    conn.qp.modify(attr, e.IBV_QP_STATE)
    time.sleep(0.2)
    _, got = conn.cq.poll(conn.depth)
    emit(role="server", event="after-qp-error",
         flushed=[{"wr_id": w.wr_id, "status": WC_STATUS_NAMES.get(w.status, w.status)}
                  for w in got])
    conn.close()
    return 0 if names else 1


def after_write_error(conn: Conn, rest: list[WC]) -> None:
    """After a failed WRITE: what else completes, and does rdma_cm report the peer gone?"""
    time.sleep(0.2)
    rest = rest + conn.cq.poll(conn.depth)[1]
    emit(role="client", event="rest-of-window",
         statuses=sorted({WC_STATUS_NAMES.get(w.status, str(w.status)) for w in rest}),
         count=len(rest))
    try:
        kind, _ = conn.next_cm_event(60)
        emit(role="client", event="cm-after-error", name=CM_EVENT_NAMES.get(kind, str(kind)))
    except TimeoutError:
        emit(role="client", event="cm-after-error", name="none within 60 s")


def run_client(args: argparse.Namespace) -> int:
    """RDMA-WRITE our array into the server's, ``window`` writes in flight, then FINISH."""
    size, chunk, window = args.size, args.chunk, args.window
    source = pattern(size)
    digest = hashlib.sha256(source.data).digest()  # before timing: ~1 s under TCG
    holder: dict[str, Any] = {}

    def pre_connect(conn: Conn) -> None:
        cmr, carr = ctrl_mr(conn.pd)
        holder["cmr"], holder["carr"] = cmr, carr
        conn.mrs.append(cmr)
        conn.post_recv(cmr, 64, 64, WRID_RECV | 1)

    conn = client_connect(args.port, window + 4, pre_connect)
    cmr: MR = holder["cmr"]
    carr: npt.NDArray[np.uint8] = holder["carr"]
    mr = MR(conn.pd, size, e.IBV_ACCESS_LOCAL_WRITE, address=source.ctypes.data)
    conn.mrs.append(mr)
    emit(role="client", event="established", cm_events=conn.events, qp_num=conn.qp.qp_num)

    meminfo: bytes | None = None
    while meminfo is None:
        for wc in conn.wait_completions(30):
            if wc.status != e.IBV_WC_SUCCESS:
                raise RuntimeError(f"client wc status {wc.status}")
            if wc.wr_id & WRID_RECV:
                meminfo = carr[64:64 + CTRL.size].tobytes()
    kind, _, raddr, rlen, rkey, _, _ = CTRL.unpack(meminfo)
    assert kind == CTRL_MEMINFO and rlen >= size, (kind, rlen)
    emit(role="client", event="meminfo", raddr=raddr, rlen=rlen, rkey=rkey)

    forever = args.mode == "kill-client" or args.mode == "kill-server"
    nchunks = size // chunk
    posted = done = 0
    t0 = time.monotonic()
    announced = False
    try:
        while done < nchunks or forever:
            while posted - done < window and (posted < nchunks or forever):
                off = (posted % nchunks) * chunk
                conn.post_write(mr, off, chunk, rkey, raddr + off, wr_id=posted)
                posted += 1
            wcs = conn.wait_completions(60)
            for i, wc in enumerate(wcs):
                if wc.status != e.IBV_WC_SUCCESS:
                    emit(role="client", event="wc-error", wr_id=wc.wr_id,
                         status=WC_STATUS_NAMES.get(wc.status, wc.status))
                    after_write_error(conn, wcs[i + 1:])
                    return 1
                done += 1
            if forever and not announced and done >= window:
                emit(role="client", event="writing")
                announced = True
    except PeerGone as gone:
        emit(role="client", event="peer-gone", why=str(gone), cm_events=conn.events)
        return 1
    seconds = time.monotonic() - t0
    carr[:CTRL.size] = np.frombuffer(
        CTRL.pack(CTRL_FINISH, 0, 0, size, 0, 0, digest), dtype=np.uint8)
    conn.post_send(cmr, 0, CTRL.size, WRID_SEND)
    while True:
        wcs = conn.wait_completions(30)
        if any(w.wr_id == WRID_SEND for w in wcs):
            break
    emit(role="client", event="done", bytes=size, seconds=seconds,
         mb_s=size / seconds / 1e6, writes=nchunks, chunk=chunk, window=window,
         comp_wakeups=conn.comp_wakeups)
    conn.cmid.disconnect()
    try:
        kind2, _ = conn.next_cm_event(10)
        emit(role="client", event="cm", name=CM_EVENT_NAMES.get(kind2, str(kind2)))
    except TimeoutError:
        emit(role="client", event="cm", name="timeout")
    conn.close()
    return 0


# --------------------------------------------------------------------------------------
# Parent: spawn both roles, optionally kill one, collect records
# --------------------------------------------------------------------------------------


def child(role: str, args: argparse.Namespace, records: RecordQueue) -> None:
    """Body of a forked child: run one role, then close the record stream."""
    global RECORDS
    RECORDS = records
    try:
        rc = run_server(args) if role == "server" else run_client(args)
    finally:
        records.put(None)
    sys.exit(rc)


def spawn(role: str, args: argparse.Namespace) -> tuple[mp.process.BaseProcess, RecordQueue]:
    """Fork one role. Fork, not spawn: under TCG importing numpy + pyverbs costs ~10-30 s,
    and no verbs object exists before the fork, so the children can safely inherit them."""
    ctx = mp.get_context("fork")
    q: RecordQueue = ctx.Queue()
    proc = ctx.Process(target=child, args=(role, args, q), name=role)
    proc.start()
    return proc, q


def wait_for(q: RecordQueue, event: str, timeout: float) -> Record:
    """Block until the child emits ``event`` (or fail if it exits first)."""
    deadline = time.monotonic() + timeout
    while True:
        rec = q.get(timeout=max(0.0, deadline - time.monotonic()))
        if rec is None:
            raise RuntimeError(f"child exited before {event!r}")
        if rec.get("event") == event:
            return rec


def drain(q: RecordQueue, timeout: float) -> list[Record]:
    """Collect the remaining records of a child until it ends its stream (or timeout)."""
    out: list[Record] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            rec = q.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return out
        if rec is None:
            return out
        out.append(rec)


def parent(args: argparse.Namespace) -> int:
    """Run one scenario end to end and print a summary line."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    print(f"probe: mode={args.mode} size={args.size} chunk={args.chunk} window={args.window} "
          f"RLIMIT_MEMLOCK={soft}/{hard}", flush=True)
    t0 = time.monotonic()
    server, sq = spawn("server", args)
    wait_for(sq, "listening", 60)
    client, cq_ = spawn("client", args)
    if args.mode == "transfer":
        crecs = drain(cq_, 600)
        srecs = drain(sq, 120)
        client.join(30)
        server.join(30)
        done = [r for r in srecs if r.get("event") == "done"]
        ok = client.exitcode == 0 and server.exitcode == 0 and bool(done) and bool(done[0]["ok"])
        cdone = [r for r in crecs if r.get("event") == "done"]
        print(f"probe: transfer {'OK' if ok else 'FAILED'} client_exit={client.exitcode} "
              f"server_exit={server.exitcode} wall={time.monotonic() - t0:.1f}s "
              f"client_MB/s={cdone[0]['mb_s'] if cdone else None:.1f} "
              f"server_MB/s={done[0]['mb_s'] if done else None:.1f}", flush=True)
        return 0 if ok else 1
    victim, victim_name = (client, "client") if args.mode == "kill-client" else (server, "server")
    wait_for(cq_, "writing", 300)
    time.sleep(0.5)
    t_kill = time.monotonic()
    victim.kill()  # SIGKILL: no chance to disconnect, deregister or destroy anything
    print(f"probe: SIGKILL {victim_name} at t={t_kill:.3f}", flush=True)
    survivor_q, survivor = (sq, server) if victim_name == "client" else (cq_, client)
    recs = drain(survivor_q, 90)
    survivor.join(30)
    victim.join(5)
    for rec in recs:
        if rec["t"] >= t_kill:
            print(f"probe: {rec['role']} {rec['event']} +{rec['t'] - t_kill:.3f}s after kill: "
                  f"{ {k: v for k, v in rec.items() if k not in ('role', 'event', 'pid', 't')} }",
                  flush=True)
    # The point of the scenario: the survivor learns of the death from rdma_cm.
    detected = any("RDMA_CM_EVENT_DISCONNECTED" in json.dumps(r) for r in recs)
    print(f"probe: {args.mode} {'OK' if detected else 'FAILED'}: survivor "
          f"{'saw' if detected else 'did not see'} RDMA_CM_EVENT_DISCONNECTED", flush=True)
    return 0 if detected else 1


def size_arg(text: str) -> int:
    """Parse ``64M`` / ``1M`` / ``4096`` into bytes."""
    mult = {"K": 1 << 10, "M": MiB, "G": 1 << 30}.get(text[-1:].upper(), 1)
    return int(text[:-1] if mult != 1 else text) * mult


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one scenario (server and client are forked children)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["transfer", "kill-client", "kill-server", "all"],
                    default="all", help="all: the three in turn (kill modes with 16 MiB)")
    ap.add_argument("--size", type=size_arg, default=64 * MiB)
    ap.add_argument("--chunk", type=size_arg, default=MiB)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--port", type=int, default=PORT)
    args = ap.parse_args(argv)
    if args.mode != "all":
        return parent(args)
    failed = []
    for i, mode in enumerate(["transfer", "kill-client", "kill-server"]):
        sub = argparse.Namespace(**vars(args))
        sub.mode, sub.port = mode, args.port + i
        if mode != "transfer":
            sub.size = min(args.size, 16 * MiB)
        if parent(sub) != 0:
            failed.append(mode)
    print(f"probe: all {'OK' if not failed else 'FAILED: ' + ', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
