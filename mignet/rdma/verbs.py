"""pyverbs plumbing: importing it, finding the fds pyverbs 44 hides, and errors that name the fix.

Why a module of its own: everything environment-specific lives here (Debian's pyverbs 44,
soft-RoCE quirks, RLIMIT_MEMLOCK), so the channel and placement code only see working verbs
objects or a ``SetupError`` whose one line tells the user what to do.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import os
import platform
import resource
import select
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mignet.errors import ConnectionLostError, SetupError

SETUP_FIX = "run tools/rxe/setup.sh / load rdma_rxe"
GUEST_FIX = "run it inside the soft-RoCE guest: mignet rxe run -- CMD"


def load_pyverbs() -> None:
    """Import pyverbs once, turning an ImportError into the fix (Debian's python3-pyverbs)."""
    try:
        import pyverbs.cm_enums  # noqa: F401
        import pyverbs.cmid  # noqa: F401
        import pyverbs.device  # noqa: F401
    except ImportError as exc:
        raise SetupError(f"rdma: URIs need pyverbs ({exc}): {SETUP_FIX} "
                         "(it exposes Debian's python3-pyverbs to the venv)") from None


def check_device() -> list[str]:
    """The names of the RDMA devices libibverbs can open; ``SetupError`` naming the fix if none.

    Why so detailed: "no device" has three different causes on Linux, each with its own fix
    (the kernel lacks rdma_rxe entirely, the module is not loaded / no rxe link exists, or
    libibverbs has no provider for a device the kernel does have).
    """
    load_pyverbs()
    import pyverbs.device as d
    from pyverbs.pyverbs_error import PyverbsError

    try:
        names = [dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
                 for dev in d.get_device_list()]
    except PyverbsError:  # libibverbs reports "no devices" as an error when sysfs has none
        names = []
    if names:
        return names
    raise SetupError(no_device_reason())


def no_device_reason() -> str:
    """One line explaining why libibverbs sees no device, with the fix."""
    kernel = platform.release()
    listed = sorted(p.name for p in Path("/sys/class/infiniband").glob("*"))
    if listed:
        return (f"no RDMA device usable by libibverbs (the kernel has {', '.join(listed)}): "
                f"install ibverbs-providers ({SETUP_FIX}) and check IBV_CONFIG_DIR")
    if Path("/sys/module/rdma_rxe").exists():
        return ("no RDMA device: rdma_rxe is loaded but no rxe link exists: "
                "run `rdma link add rxe0 type rxe netdev IFACE` (tools/rxe/setup.sh / load rdma_rxe)")
    modules = Path("/lib/modules", kernel)
    if any(modules.glob("kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko*")):
        return (f"no RDMA device: {SETUP_FIX} (`modprobe rdma_rxe; "
                "rdma link add rxe0 type rxe netdev IFACE`)")
    return (f"no RDMA device: this kernel ({kernel}) has no rdma_rxe module to load; "
            f"{GUEST_FIX} (after tools/rxe/setup.sh)")


def memlock_limit() -> int:
    """The soft RLIMIT_MEMLOCK in bytes (-1 = unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return -1 if soft == resource.RLIM_INFINITY else int(soft)


def memlock_error(limit: int) -> SetupError:
    return SetupError(f"RLIMIT_MEMLOCK is {limit}: raise it with ulimit -l unlimited "
                      "(containers: --ulimit memlock=-1:-1)")


def check_memlock(nbytes: int) -> None:
    """Refuse up front to pin more than RLIMIT_MEMLOCK allows.

    Why checked before registering (even for root, whose CAP_IPC_LOCK would let the kernel
    pin anyway): a limit set below the guest's RAM is a configuration error we want to report
    at the start of a migration with its fix, never as a half-registered failure midway.
    """
    limit = memlock_limit()
    if limit >= 0 and nbytes > limit:
        raise memlock_error(limit)


_pinned = 0  # bytes this process has registered (for the up-front memlock check)


def pinned_bytes() -> int:
    return _pinned


def unpinned(nbytes: int) -> None:
    """Account for registrations released (their MRs closed)."""
    global _pinned
    _pinned = max(0, _pinned - nbytes)


def register(pd: Any, address: int, length: int, access: int) -> Any:
    """``ibv_reg_mr`` on memory we own (numpy); pinning failures become the memlock fix."""
    global _pinned
    from pyverbs.mr import MR
    from pyverbs.pyverbs_error import PyverbsError

    try:
        mr = MR(pd, length, access, address=address)
        _pinned += length
        return mr
    except PyverbsError as exc:
        limit = memlock_limit()
        if limit >= 0:
            raise memlock_error(limit) from None
        raise SetupError(f"registering {length} bytes of memory for RDMA failed: {exc}") from None


# --- the fds pyverbs 44 does not expose -----------------------------------------------
def _fd_targets() -> dict[int, str]:
    out: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out


def create_with_fd(create: Callable[[], Any], target: str) -> tuple[Any, int]:
    """Call ``create()`` and return (result, the one new fd linking to ``target``).

    pyverbs 44 has no ``CompChannel.fd`` / ``CMEventChannel.fd``; the new
    ``anon_inode:[infinibandevent]`` or ``/dev/infiniband/rdma_cm`` entry in /proc/self/fd is
    theirs (link targets are compared, since fd numbers get reused).
    """
    before = _fd_targets()
    obj = create()
    fresh = [fd for fd, t in _fd_targets().items() if t == target and before.get(fd) != t]
    if len(fresh) != 1:
        raise SetupError(f"cannot find the fd of a new {target} (found {fresh}); "
                         "another thread opened RDMA resources at the same time")
    fd = fresh[0]
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    return obj, fd


def readable(fd: int, timeout: float | None = 0.0) -> bool:
    """Is ``fd`` readable within ``timeout`` seconds (None: wait for ever)?"""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(None if timeout is None else timeout * 1000.0))


# --- one listener, many connections ------------------------------------------------------
def _own_pointer(obj: Any) -> int:
    """The C pointer a pyverbs object wraps where it is the object's last own field (Cython
    lays a class's own fields out after its bases'): CMEvent's event, CMEventChannel's
    channel. Callers check what they read against something known before using it."""
    size = ctypes.sizeof(ctypes.c_void_p)
    return ctypes.c_void_p.from_address(id(obj) + type(obj).__basicsize__ - size).value or 0


@functools.cache
def _rdmacm() -> Any:
    lib = ctypes.CDLL("librdmacm.so.1", use_errno=True)  # loaded already, by pyverbs
    lib.rdma_migrate_id.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.rdma_migrate_id.restype = ctypes.c_int
    return lib


def request_id(event: Any) -> int:
    """The ``rdma_cm_id`` of a CONNECT_REQUEST ``event`` (before it is acked).

    Why: pyverbs 44 neither exposes it nor wraps ``rdma_migrate_id``, and every id a listener
    creates reports its events on the listener's channel, where pyverbs cannot tell whose an
    event is. Moving each accepted id to a channel of its own (``migrate_id``) lets one
    listener accept several connections (multifd) with each seeing only its own events."""
    ptr = _own_pointer(event)
    # struct rdma_cm_event { rdma_cm_id *id; rdma_cm_id *listen_id; int event; ... }
    if not ptr or ctypes.c_int.from_address(ptr + 16).value != int(event.event_type):
        raise SetupError("this pyverbs lays out rdma_cm events differently: one RDMA listener "
                         "cannot take several connections here (use tcp: for --channels)")
    return ctypes.c_void_p.from_address(ptr).value or 0


def migrate_id(cm_id: int, events: CmEvents) -> None:
    """``rdma_migrate_id``: from now on ``cm_id`` reports its events on ``events``. Its
    events on the old channel must all be acked first (librdmacm waits for them)."""
    chan = _own_pointer(events.chan)
    if not chan or ctypes.c_int.from_address(chan).value != events.fd:  # struct { int fd; }
        raise SetupError("this pyverbs lays out rdma_cm event channels differently: one RDMA "
                         "listener cannot take several connections here (use tcp: for --channels)")
    if _rdmacm().rdma_migrate_id(cm_id, chan) != 0:
        err = ctypes.get_errno()
        raise SetupError(f"rdma_migrate_id failed: {os.strerror(err)}")
    # struct rdma_cm_id { ibv_context *verbs; rdma_event_channel *channel; ... }
    if ctypes.c_void_p.from_address(cm_id + 8).value != chan:
        raise SetupError("rdma_migrate_id did not move the connection to its own event channel")


# --- names for diagnostics ----------------------------------------------------------------
@functools.cache
def _names(module: str, prefix: str, suffix: str = "", also: str = "") -> dict[int, str]:
    """value -> name for one pyverbs enum family (names starting with ``prefix`` and ending
    with ``suffix``, plus ``also``), built once: these run per completion."""
    import importlib

    mod = importlib.import_module(module)
    out: dict[int, str] = {}
    for name in dir(mod):
        value = getattr(mod, name)
        if isinstance(value, int) and (name == also or
                                       (name.startswith(prefix) and name.endswith(suffix))):
            out.setdefault(int(value), name)
    return out


def cm_event_name(kind: int) -> str:
    return _names("pyverbs.cm_enums", "RDMA_CM_EVENT_").get(kind, str(kind))


def wc_status_name(status: int) -> str:
    return _names("pyverbs.enums", "IBV_WC_", "_ERR", "IBV_WC_SUCCESS").get(status, str(status))


class CmEvents:
    """The rdma_cm event channel and its fd: every connection-level event (established,
    rejected, disconnected) arrives here, so it is polled together with the completion fd."""

    def __init__(self) -> None:
        from pyverbs.cmid import CMEventChannel

        self.chan, self.fd = create_with_fd(CMEventChannel, "/dev/infiniband/rdma_cm")

    def get(self, timeout: float | None) -> Any:
        """The next event (not yet acked), or TimeoutError."""
        from pyverbs.cmid import CMEvent

        if not readable(self.fd, None if timeout is None else max(0.0, timeout)):
            raise TimeoutError("no rdma_cm event")
        return CMEvent(self.chan)

    def expect(self, want: int, timeout: float | None, what: str) -> None:
        """Wait for event ``want``; anything else is the peer refusing or vanishing."""
        try:
            ev = self.get(timeout)
        except TimeoutError:
            raise SetupError(f"{what}: no answer within {timeout} s") from None
        kind = int(ev.event_type)
        ev.ack_cm_event()
        if kind != want:
            raise ConnectionLostError(f"{what}: got {cm_event_name(kind)} instead of "
                                      f"{cm_event_name(want)}")

    def close(self) -> None:
        self.chan.close()
