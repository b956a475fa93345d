"""A Channel over a connected stream socket (TCP or UNIX): pure I/O, no protocol."""

from __future__ import annotations

import errno
import fcntl
import select
import socket
import struct
import termios
from collections.abc import Sequence

from mignet.channel import Buffer, Channel, IOCondition, ShutdownHow, WritableBuffer
from mignet.errors import ClosedChannelError, ConnectionLostError

_SHUT = {ShutdownHow.READ: socket.SHUT_RD, ShutdownHow.WRITE: socket.SHUT_WR,
         ShutdownHow.BOTH: socket.SHUT_RDWR}
# Linux caps one vectored call at IOV_MAX buffers; longer lists are sent in slices.
IOV_MAX = 1024


#: How long a bulk read waits for its low-water mark before it takes what has arrived.
BULK_PATIENCE_MS = 50
#: The kernel's send/receive timeout is a slice of the idle limit, not the limit itself: the
#: kernel times a whole call, so a read waiting for the low-water mark (or a send that moved
#: part of its buffer) that got some bytes and then met a stalled peer returned only when
#: the whole limit passed, and as progress: the next call waited a whole limit again (2-3x
#: the limit, found by tests/test_phase_faults.py). Each call now returns within the slice;
#: Channel._wait_progress holds the real limit, counted from the last bytes moved.
IDLE_SLICE = 0.25


class SocketChannel(Channel):
    """QIOChannelSocket: vectored reads go straight into the caller's buffers
    (``recvmsg_into``), so pages can land directly in guest RAM."""

    def __init__(self, sock: socket.socket, name: str | None = None) -> None:
        super().__init__(name or _describe(sock))
        self.sock = sock
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _dead_peer_detection(sock)
        sock.setblocking(True)
        self._low_water = 1
        self._ready = select.poll()
        self._ready.register(sock.fileno(), select.POLLIN)

    def fileno(self) -> int:
        return self.sock.fileno()

    def hint_bulk_reads(self, low_water: int) -> None:
        """SO_RCVLOWAT: a blocking read of N bytes waits for min(N, low_water) bytes, so the
        loader's predicted-run reads come back full instead of with whatever trickled in
        (each read of [word, page] pairs has a fixed kernel and Python cost). Measured with
        2 MiB, `mignet bench tcp` 2 GiB: 0.57x -> 0.98-1.01x the raw loop. It also gates
        poll() readiness, so only blocking readers ask, and only around bulk reads."""
        low_water = max(1, low_water)
        if low_water == self._low_water:
            return
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, low_water)
            self._low_water = low_water
        except OSError:
            pass  # only a hint

    def poll_fds(self, cond: IOCondition) -> list[tuple[int, int]]:
        return [(self.sock.fileno(), int(cond))]

    def _readv(self, bufs: Sequence[WritableBuffer]) -> int | None:
        if self._low_water > 1 and self._blocking and not self._ready.poll(BULK_PATIENCE_MS):
            # The low-water mark would hold this read until that many bytes came, but a
            # peer may have paused for good (QEMU waits on its return path for our SHUT
            # before it sends or closes anything more): this one read takes what is there,
            # and the mark stays for the next.
            bulk = self._low_water
            self.hint_bulk_reads(1)
            try:
                return self._readv(bufs)
            finally:
                self.hint_bulk_reads(bulk)
        try:
            if len(bufs) == 1:
                return self.sock.recv_into(bufs[0])
            return self.sock.recvmsg_into(bufs[:IOV_MAX])[0]
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise self._lost(exc) from exc

    def _writev(self, bufs: Sequence[Buffer]) -> int | None:
        try:
            if len(bufs) == 1:
                return self.sock.send(bufs[0])
            return self.sock.sendmsg(bufs[:IOV_MAX])
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise self._lost(exc) from exc

    def _peek(self, size: int) -> bytes | None:
        try:
            return self.sock.recv(size, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise self._lost(exc) from exc

    def _lost(self, exc: OSError) -> ConnectionLostError | ClosedChannelError:
        if self._closed:  # closed by another thread while this one was in a system call
            return ClosedChannelError(f"channel {self.name} was closed during I/O")
        if exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT):
            return ConnectionLostError(f"{self.name}: connection lost ({exc.strerror})")
        return ConnectionLostError(f"{self.name}: socket error: {exc}")

    def unsent_bytes(self) -> int | None:
        """SIOCOUTQ (TIOCOUTQ on Linux): what the send queue still holds."""
        try:
            return struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        except (OSError, ValueError):
            return None

    def _set_blocking(self, blocking: bool) -> None:
        self.sock.setblocking(blocking)

    def _set_idle_timeout(self, read: float | None, write: float | None) -> None:
        """SO_RCVTIMEO/SO_SNDTIMEO, at most IDLE_SLICE: a blocking call returns (EAGAIN,
        None here, or what it moved) within the slice, and the base class turns the limit
        passing without progress into TimedOut. Not Python's settimeout, which would make
        the socket non-blocking underneath."""
        for opt, value in ((socket.SO_RCVTIMEO, read), (socket.SO_SNDTIMEO, write)):
            secs = 0.0 if value is None else max(min(value, IDLE_SLICE), 0.001)
            self.sock.setsockopt(socket.SOL_SOCKET, opt,
                                 struct.pack("ll", int(secs), int((secs % 1) * 1_000_000)))

    def _shutdown(self, how: ShutdownHow) -> None:
        try:
            self.sock.shutdown(_SHUT[how])
        except OSError:
            pass  # already disconnected: shutting down is then a no-op

    def _close(self) -> None:
        self.sock.close()


#: A peer host that vanishes (power loss, cable, a firewall dropping the flow) sends no
#: reset: keepalive probes find it idle after KEEPALIVE_IDLE + KEEPALIVE_COUNT * interval
#: seconds, and TCP_USER_TIMEOUT fails a write that stays unacknowledged that long.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 3
USER_TIMEOUT_MS = 60_000


def _dead_peer_detection(sock: socket.socket) -> None:
    opts = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT),
            (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)]
    for level, opt, value in opts:
        try:
            sock.setsockopt(level, opt, value)
        except OSError:
            pass  # a kernel without the option: the idle timeouts still bound a stall


def _describe(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "socket"
    if sock.family == socket.AF_UNIX:
        return f"unix:{peer or sock.getsockname()}"
    return f"tcp:{peer[0]}:{peer[1]}"
