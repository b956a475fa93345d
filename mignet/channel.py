"""The abstract byte channel, modelled on QEMU's QIOChannel.

A transport implements four primitives — vectored read and write that may move fewer bytes
than asked (and report "would block" in non-blocking mode), shutdown, close — plus the list
of fds to wait on. Everything else (read exactly, write all, wait) is built here once, so
TCP, UNIX and RDMA channels behave the same way:

* ``read_into``/``readv_into`` fill the buffers completely. A clean end of stream *before
  the first byte* returns 0; a peer that closes in the middle raises ``ConnectionLostError``
  (QEMU's ``qio_channel_readv_all_eof``): a short read is never silently returned.
* ``wait_cond`` is ``qio_channel_wait_cond``: from a thread it blocks in ``poll()`` on the
  channel's fds; from a coroutine it yields to the event loop instead.
"""

from __future__ import annotations

import enum
import select
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from mignet.errors import ClosedChannelError, ConnectionLostError, TimedOut
from mignet.runtime.coroutine import in_coroutine, wait_fds, yield_until

Buffer = bytes | bytearray | memoryview
WritableBuffer = bytearray | memoryview


class IOCondition(enum.IntFlag):
    """Readiness to wait for; values are poll()'s so they pass straight through."""

    IN = select.POLLIN
    OUT = select.POLLOUT


class ShutdownHow(enum.Enum):
    READ = "read"
    WRITE = "write"
    BOTH = "both"


class MemoryRegion(Protocol):
    """What a transport that writes into the peer's memory needs of a RAM block: a name the
    two sides agree on, its size, and memory (a numpy array) whose address it registers.
    Guest RAM blocks satisfy it; the transport never learns what a guest is."""

    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def data(self) -> Any: ...


class RemotePagePlacement(Protocol):
    """A transport that places page data in the peer's RAM itself (RDMA WRITE), so page
    payloads never travel in the byte stream. Sockets have none."""

    #: Destination: called (in the loader's thread) with the bytes the source reports as
    #: landed so far, for progress; page data never shows up in the stream's own counters.
    on_placed: Callable[[int], None] | None
    #: The RDMA protocol spoken on the connection: "mignet" (its own) or "qemu" (QEMU's,
    #: whose pages go only inside registration rounds that the stream marks with HOOK
    #: records, and whose zero pages travel with the rest, not as ZERO records).
    protocol: str

    def announce(self, pin_all: bool | None = None) -> None:
        """Source, before the stream starts: how the destination should register its RAM
        (QEMU's ``rdma-pin-all``); ``None`` takes the transport's default."""

    def register_destination_ram(self, blocks: Iterable[MemoryRegion], shared: Any = None) -> None:
        """Destination, when the stream announces its blocks: register them for remote
        writes and tell the source where each lives. Their pages then change behind the
        loader's back. ``shared``: another connection's placement (from the same source:
        multifd's main connection) whose registrations serve this connection too."""

    def write_pages(self, block: MemoryRegion, offsets: Any, zero: Any = None,
                    after: int | None = None) -> int:
        """Source: write the pages at ``offsets`` (numpy array of byte offsets) of
        ``block`` into the destination's copy; returns bytes written. ``zero`` (QEMU's
        protocol): which of them are all zero, so a zero chunk can go as one message.
        ``after`` (mignet's protocol, multifd channels): they land only after the
        destination processed this connection's stream up to that ``stream_position``;
        None: all of it (a ZERO record there may name these pages)."""

    def stream_position(self) -> int:
        """Source: where this connection's stream is now, for ``write_pages(after=…)``."""

    def begin_round(self) -> None:
        """Source, QEMU's protocol: the stream's HOOK record went out; pages may follow."""

    def end_round(self, blocks: Sequence[MemoryRegion] | None = None) -> None:
        """Source, QEMU's protocol: every page of the round landed; at setup (``blocks``:
        the stream's block list) learn the destination's blocks. The stream goes on after."""

    def fence(self) -> None:
        """Source: return once every page written so far has landed at the destination
        (before device state is sent)."""

    def describe(self) -> dict[str, Any]:
        """What ran, for a migration's stats: the protocol (``mignet`` or ``qemu``: the
        peer chose it), the registration mode and the transport's own counters."""


class Channel(ABC):
    """A bidirectional byte stream with QIOChannel semantics."""

    #: Set by transports that write pages into the peer's RAM directly (RDMA).
    page_placement: RemotePagePlacement | None = None
    #: Whether one thread may write while another reads (postcopy's page requests go out
    #: while the loader reads): plain sockets yes; an SSL object or a verbs queue no.
    duplex_threads: bool = True

    def __init__(self, name: str) -> None:
        self.name = name
        self._blocking = True
        self._closed = False
        self._lock = threading.Lock()  # guards close/shutdown against concurrent callers
        self._idle_read: float | None = None  # s without a byte read: TimedOut (None: wait)
        self._idle_write: float | None = None  # s without a byte taken by the peer

    # --- primitives a transport provides ---------------------------------------------
    @abstractmethod
    def _readv(self, bufs: Sequence[WritableBuffer]) -> int | None:
        """Read up to the buffers' total size; 0 means end of stream, None would block."""

    @abstractmethod
    def _writev(self, bufs: Sequence[Buffer]) -> int | None:
        """Write some prefix of the buffers; None means it would block."""

    @abstractmethod
    def _peek(self, size: int) -> bytes | None:
        """Return up to ``size`` bytes without consuming them; None would block."""

    @abstractmethod
    def poll_fds(self, cond: IOCondition) -> list[tuple[int, int]]:
        """The (fd, poll mask) pairs whose readiness means ``cond`` may now be met.

        A transport may list extra fds (RDMA adds its rdma_cm event fd) so that a
        disconnect or cancel wakes a waiter.
        """

    def hint_bulk_reads(self, low_water: int) -> None:  # noqa: B027 - optional hook, no-op here
        """Until told otherwise (``hint_bulk_reads(1)``), a transport may wake a blocking
        read only once ``low_water`` bytes (or the end) are there, so each large vectored
        read moves more and costs fewer calls. Reads asking for less wait for what they
        ask. Default: no-op."""

    def unsent_bytes(self) -> int | None:
        """Bytes written but not yet taken by the peer (the send queue), or None where the
        transport cannot tell. A writer that sent everything and waits for an answer uses
        it to see that the peer is still reading. Default: None."""
        return None

    @abstractmethod
    def _set_blocking(self, blocking: bool) -> None: ...

    def _set_idle_timeout(self, read: float | None, write: float | None) -> None:  # noqa: B027
        """Make a blocking read/write give up (return None) after that long without
        progress; transports whose reads block in the kernel implement it. Default: no-op
        (reads that never block are bounded by ``wait_cond``'s timeout)."""

    @abstractmethod
    def _shutdown(self, how: ShutdownHow) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...

    # --- mode ------------------------------------------------------------------------
    @property
    def blocking(self) -> bool:
        return self._blocking

    def set_blocking(self, blocking: bool) -> None:
        """Blocking mode lets the kernel sleep in read/write; non-blocking mode returns
        at once and the ``*_all`` helpers then wait with ``wait_cond``. Coroutines need
        non-blocking mode, otherwise a read would stall the whole event loop."""
        self._check_open()
        self._set_blocking(blocking)
        self._blocking = blocking

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedChannelError(f"channel {self.name} is closed; open a new one")

    def set_idle_timeout(self, read: float | None = None, write: float | None = None) -> None:
        """A peer that stalls — sends nothing for ``read`` seconds, or takes nothing for
        ``write`` seconds — ends the wait with :class:`TimedOut` instead of hanging
        forever. Any progress restarts the clock. None (the default) waits forever: a
        side that legitimately idles (a source's return path during the whole migration)
        keeps that direction unbounded."""
        self._check_open()
        self._idle_read, self._idle_write = read, write
        self._set_idle_timeout(read, write)

    def _wait_progress(self, cond: IOCondition, since: float) -> None:
        """Wait for ``cond`` after the last progress at ``since``; TimedOut when the idle
        limit for that direction passes first."""
        limit = self._idle_read if cond is IOCondition.IN else self._idle_write
        if limit is None:
            self.wait_cond(cond)
            return
        left = since + limit - time.monotonic()
        if left > 0 and self.wait_cond(cond, left):
            return
        if time.monotonic() - since >= limit:
            what = "sent nothing" if cond is IOCondition.IN else "took nothing we sent"
            raise TimedOut(f"{self.name}: the peer {what} for {limit:g} s; giving up (a stalled "
                           "peer or network: check the other side)")

    # --- waiting ---------------------------------------------------------------------
    def wait_cond(self, cond: IOCondition, timeout: float | None = None) -> bool:
        """Wait until the channel may be ready for ``cond``; False on timeout.

        In a coroutine this yields to the event loop (other work runs meanwhile); in a
        thread it blocks in ``poll()``. Like QEMU, readiness is a hint: the caller retries
        its operation, which may still report "would block".
        """
        self._check_open()
        fds = self.poll_fds(cond)
        if in_coroutine():
            return yield_until(wait_fds(fds, timeout))
        poller = select.poll()
        for fd, mask in fds:
            poller.register(fd, mask)
        events = poller.poll(None if timeout is None else max(0.0, timeout) * 1000.0)
        return bool(events)

    # --- reads -----------------------------------------------------------------------
    def read_some_into(self, bufs: Sequence[WritableBuffer]) -> int:
        """Read at least one byte (waiting if needed) unless the stream ended (returns 0)."""
        self._check_open()
        since = time.monotonic()
        while True:
            n = self._readv(bufs)
            if n is not None:
                return n
            self._wait_progress(IOCondition.IN, since)
            self._check_open()

    def readv_into(self, bufs: Sequence[WritableBuffer]) -> int:
        """Fill every buffer. Returns the total size, or 0 if the stream ended cleanly
        before the first byte; a stream that ends part-way raises ConnectionLostError."""
        views = [memoryview(b).cast("B") for b in bufs]
        total = sum(len(v) for v in views)
        done = 0
        while done < total:
            n = self.read_some_into(views)
            if n == 0:
                if done == 0:
                    return 0
                raise ConnectionLostError(
                    f"{self.name}: peer closed the connection after {done} of {total} bytes "
                    "of a read; the migration stream is incomplete"
                )
            done += n
            views = _advance(views, n)
        return total

    def read_into(self, buf: WritableBuffer) -> int:
        """Fill ``buf`` completely (see :meth:`readv_into`)."""
        return self.readv_into([buf])

    def read_exactly(self, size: int) -> bytes:
        """Read exactly ``size`` bytes; end of stream at any point is ConnectionLostError."""
        buf = bytearray(size)
        if size and self.read_into(buf) == 0:
            raise ConnectionLostError(f"{self.name}: peer closed the connection")
        return bytes(buf)

    def peek(self, size: int) -> bytes:
        """Up to ``size`` bytes that the next read will return, waiting for at least one;
        b"" at end of stream."""
        self._check_open()
        since = time.monotonic()
        while True:
            data = self._peek(size)
            if data is not None:
                return data
            self._wait_progress(IOCondition.IN, since)

    # --- writes ----------------------------------------------------------------------
    def writev_all(self, bufs: Sequence[Buffer]) -> int:
        """Write every buffer completely, waiting as needed; returns bytes written."""
        self._check_open()
        views = [memoryview(b).cast("B") for b in bufs]
        total = sum(len(v) for v in views)
        done = 0
        since = time.monotonic()
        while done < total:
            n = self._writev(views)
            if n is None:
                self._wait_progress(IOCondition.OUT, since)
                self._check_open()
                continue
            since = time.monotonic()
            done += n
            views = _advance(views, n)
        return total

    def write_all(self, buf: Buffer) -> int:
        return self.writev_all([buf])

    # --- teardown --------------------------------------------------------------------
    def shutdown(self, how: ShutdownHow = ShutdownHow.BOTH) -> None:
        """Stop reads and/or writes; a thread blocked in a read wakes with end of stream.
        Safe to call from any thread (this is how a migration is cancelled)."""
        with self._lock:
            if not self._closed:
                self._shutdown(how)

    def close(self) -> None:
        """Release the channel; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close()

    def __enter__(self) -> Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("blocking" if self._blocking else "non-blocking")
        return f"<{type(self).__name__} {self.name} {state}>"


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes from a list of views (after a short vectored I/O)."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest
