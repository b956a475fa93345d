"""rdma_cm connection setup: one RC queue pair between source and destination.

Why async rdma_cm with our own PD/CQ/QP (as rdma-core's own tests do) rather than pyverbs'
synchronous CMID helpers: those pick their own CQ and cannot carry work-request ids, and we
need one CQ with a completion channel whose fd we poll together with the cm fd.

Ownership quirks of pyverbs 44: a child CMID made from a CONNECT_REQUEST shares the
listener's event channel, context and PD wrappers, and ``CMID.close()`` on it nulls them. So
each accepted id gets wrappers of its own (over the same librdmacm context and PD: keys
registered on one connection are valid on all of them) and is moved to an event channel of
its own (``verbs.migrate_id``). The listener then stays the listener's: it can accept more
connections (multifd's channels) and is closed by its owner; each connection tears down its
own objects in dependency order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mignet.errors import ConnectionLostError, SetupError, TimedOut
from mignet.rdma.verbs import (
    CmEvents,
    check_device,
    cm_event_name,
    create_with_fd,
    load_pyverbs,
    migrate_id,
    request_id,
)
from mignet.uri import Address

#: Connection-level events after which the peer is gone.
GONE_EVENTS = ("RDMA_CM_EVENT_DISCONNECTED", "RDMA_CM_EVENT_DEVICE_REMOVAL",
               "RDMA_CM_EVENT_TIMEWAIT_EXIT", "RDMA_CM_EVENT_ADDR_CHANGE")


@dataclass
class Conn:
    """Every verbs object of one connected side, plus the two fds a waiter polls."""

    cm: CmEvents
    cmid: Any
    listener: Any | None
    pd: Any
    comp: Any
    comp_fd: int
    cq: Any
    qp: Any
    send_depth: int
    recv_depth: int
    #: Active side: the private data of the peer's accept (QEMU answers its capabilities).
    accepted_private: bytes = b""

    @property
    def cm_fd(self) -> int:
        return self.cm.fd

    def close(self, mrs: list[Any]) -> None:
        """Destroy in dependency order (QP and MRs before the CMIDs that own the PD)."""
        for obj in [self.qp, *mrs, self.cq, self.comp, self.cmid, self.listener, self.cm]:
            if obj is None:
                continue
            try:
                obj.close()
            except Exception:  # noqa: BLE001 - teardown is best effort, the peer may be gone
                pass


def _make_queues(cmid: Any, pd: Any, send_depth: int, recv_depth: int) -> tuple[Any, int, Any, Any]:
    """A completion channel (and its fd), one CQ for sends, writes and receives, an RC QP."""
    import pyverbs.enums as e
    from pyverbs.cq import CQ, CompChannel
    from pyverbs.qp import QP, QPCap, QPInitAttr

    comp, comp_fd = create_with_fd(lambda: CompChannel(cmid.context),
                                   "anon_inode:[infinibandevent]")
    cq = CQ(cmid.context, send_depth + recv_depth + 8, None, comp, 0)
    cap = QPCap(max_send_wr=send_depth, max_recv_wr=recv_depth, max_send_sge=1, max_recv_sge=1)
    qp = QP(pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap, sq_sig_all=0))
    return comp, comp_fd, cq, qp


def _modify(cmid: Any, qp: Any, *states: int) -> None:
    for state in states:
        attr, mask = cmid.init_qp_attr(state)
        qp.modify(attr, mask)


@dataclass
class AcceptPlan:
    """How to accept one connection request, chosen from its private data."""

    send_depth: int
    recv_depth: int
    prepare: Callable[[Conn], None]  # post receives (before the peer may send)
    reply: bytes = b""  # private data of our accept (QEMU reads its capabilities there)


#: rdma_cm's room for private data on an RC connect request (RDMA_PS_TCP) and accept.
CONNECT_PRIVATE_MAX = 56
ACCEPT_PRIVATE_MAX = 196


def _conn_param(qp_num: int, private: bytes, accept: bool) -> Any:
    from pyverbs.cmid import ConnParam

    room = ACCEPT_PRIVATE_MAX if accept else CONNECT_PRIVATE_MAX
    if len(private) > room:
        raise SetupError(f"rdma_cm private data of {len(private)} bytes (at most {room})")
    param = ConnParam(qp_num=qp_num, data_len=max(len(private), 1))
    if private:
        param.set_private_data(private)
    return param


class PassiveEndpoint:
    """A bound, listening rdma_cm id (the ``mignet recv --listen rdma:…`` side)."""

    def __init__(self, address: Address) -> None:
        if address.port == 0:
            raise SetupError(f"{address}: RDMA listeners need an explicit port (rdma:HOST:PORT)")
        check_device()
        import pyverbs.cm_enums as ce
        from pyverbs.cmid import CMID, AddrInfo
        from pyverbs.pyverbs_error import PyverbsError

        self.address = address
        self.cm = CmEvents()
        self.cmid: Any = None
        try:
            self.cmid = CMID(creator=self.cm.chan, port_space=ce.RDMA_PS_TCP)
            # A concrete address binds the id to its device (pyverbs then sets context/pd).
            self.cmid.bind_addr(AddrInfo(src=address.host, src_service=str(address.port),
                                         port_space=ce.RDMA_PS_TCP, flags=ce.RAI_PASSIVE))
            self.cmid.listen()
        except PyverbsError as exc:
            self.close()
            raise SetupError(f"cannot listen on {address}: {exc.args[0] if exc.args else exc} "
                             f"(is {address.host} the address of an RDMA netdev, and the port "
                             "free?)") from None

    def accept(self, timeout: float | None, plan: Callable[[bytes], AcceptPlan]) -> Conn:
        """Take one CONNECT_REQUEST, bring our QP to RTS, ``prepare`` (post receives), accept.

        ``plan`` sees the request's private data first: the peer's protocol is told by it
        (QEMU sends its RDMA capabilities there, mignet its own tag), and it decides the
        queue depths, the receives to post and the private data of our answer."""
        import pyverbs.cm_enums as ce
        import pyverbs.enums as e
        from pyverbs.cmid import CMID
        from pyverbs.device import Context
        from pyverbs.pd import PD

        if self.cmid is None:
            raise ConnectionLostError(f"{self.address}: the listener is closed")
        try:
            ev = self.cm.get(timeout)
        except TimeoutError:
            raise TimedOut(f"no connection on {self.address} within {timeout} s") from None
        if int(ev.event_type) != ce.RDMA_CM_EVENT_CONNECT_REQUEST:
            kind = int(ev.event_type)
            ev.ack_cm_event()
            raise ConnectionLostError(f"{self.address}: expected a connection request, got "
                                      f"{cm_event_name(kind)}")
        private = bytes(ev.private_data)
        child = CMID(creator=ev, listen_id=self.cmid)
        Context(cmid=child)  # wrappers of its own: its close nulls only these, never the
        PD(child)            # listener's
        own: CmEvents | None = None
        try:
            try:
                cm_id = request_id(ev)
            finally:
                ev.ack_cm_event()  # before migrating: librdmacm waits for its events' acks
            own = CmEvents()
            migrate_id(cm_id, own)
            chosen = plan(private)
        except BaseException:
            try:
                child.reject()
            except Exception:  # noqa: BLE001 - the peer sees a rejection or a timeout
                pass
            child.close()
            if own is not None:
                own.close()
            raise
        pd = child.pd
        comp, comp_fd, cq, qp = _make_queues(child, pd, chosen.send_depth, chosen.recv_depth)
        assert own is not None
        conn = Conn(own, child, None, pd, comp, comp_fd, cq, qp, chosen.send_depth,
                    chosen.recv_depth)
        try:
            _modify(child, qp, e.IBV_QPS_INIT, e.IBV_QPS_RTR, e.IBV_QPS_RTS)
            chosen.prepare(conn)  # receives must be posted before the peer may send
            child.accept(_conn_param(qp.qp_num, chosen.reply, accept=True))
            own.expect(ce.RDMA_CM_EVENT_ESTABLISHED, 30.0, f"accepting on {self.address}")
        except BaseException:
            conn.close([])
            raise
        return conn

    def fileno(self) -> int:
        """Readable when a connection request waits (a multifd receiver polls it)."""
        return self.cm.fd

    def close(self) -> None:
        """Stop listening; connections accepted from it live on (each owns its objects)."""
        if self.cmid is not None:
            self.cmid.close()
            self.cmid = None
            self.cm.close()


def connect(address: Address, timeout: float | None, send_depth: int, recv_depth: int,
            prepare: Callable[[Conn], None], private: bytes = b"") -> Conn:
    """Active side: resolve address and route, QP to INIT, connect (offering ``private``
    as the request's private data), RTR/RTS, establish."""
    load_pyverbs()
    check_device()
    import pyverbs.cm_enums as ce
    import pyverbs.enums as e
    from pyverbs.cmid import CMID, AddrInfo
    from pyverbs.pyverbs_error import PyverbsError

    step = min(timeout or 30.0, 30.0)
    cm = CmEvents()
    cmid = CMID(creator=cm.chan, port_space=ce.RDMA_PS_TCP)
    conn: Conn | None = None
    try:
        try:
            cmid.resolve_addr(AddrInfo(dst=address.host, dst_service=str(address.port),
                                       port_space=ce.RDMA_PS_TCP), int(step * 1000))
        except PyverbsError as exc:
            raise SetupError(f"cannot resolve {address}: {exc.args[0] if exc.args else exc}") from None
        _expect_setup(cm, ce.RDMA_CM_EVENT_ADDR_RESOLVED, step, address,
                      f"no RDMA device serves {address.host}: check the address "
                      "(10.9.0.1 in the soft-RoCE guest) or run tools/rxe/setup.sh / load rdma_rxe")
        cmid.resolve_route(int(step * 1000))
        _expect_setup(cm, ce.RDMA_CM_EVENT_ROUTE_RESOLVED, step, address,
                      f"no RDMA route to {address.host}")
        pd = cmid.pd
        comp, comp_fd, cq, qp = _make_queues(cmid, pd, send_depth, recv_depth)
        conn = Conn(cm, cmid, None, pd, comp, comp_fd, cq, qp, send_depth, recv_depth)
        _modify(cmid, qp, e.IBV_QPS_INIT)
        prepare(conn)
        cmid.connect(_conn_param(qp.qp_num, private, accept=False))
        conn.accepted_private = _expect_setup(
            cm, ce.RDMA_CM_EVENT_CONNECT_RESPONSE, step, address,
            f"nothing is listening on {address} (start `mignet recv --listen {address}` "
            "first)")
        _modify(cmid, qp, e.IBV_QPS_RTR, e.IBV_QPS_RTS)
        cmid.establish()  # the RTU: the passive side now sees ESTABLISHED
    except BaseException:
        if conn is not None:
            conn.close([])
        else:
            cmid.close()
            cm.close()
        raise
    return conn


def _expect_setup(cm: CmEvents, want: int, timeout: float, address: Address, failure: str) -> bytes:
    """Wait for the event ``want``; its private data (empty where it carries none)."""
    try:
        ev = cm.get(timeout)
    except TimeoutError:
        raise TimedOut(f"{address}: no answer within {timeout:.0f} s ({failure})") from None
    kind = int(ev.event_type)
    private = bytes(ev.private_data or b"") if kind == want else b""
    ev.ack_cm_event()
    if kind != want:
        raise SetupError(f"{failure} ({cm_event_name(kind)})")
    return private
