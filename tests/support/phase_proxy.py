"""A real forwarding proxy that injects a fault exactly when a migration reaches a phase.

It sits between ``mignet send`` and the destination (TCP or UNIX sockets), forwards every
connection (the main stream, multifd channels, the return path) and watches the main
stream's source→destination bytes with mignet's own sans-I/O decoder
(:class:`mignet.wire.StreamDecoder`, fed the bytes; it never touches a socket). A fault
timed by bytes counted or by a sleep hits some phase by chance; this one lands on the
boundary itself, so each cell of the fault matrix tests the phase it names:

* ``setup``: the header and RAM block list went through, no page yet;
* ``ram``: ``ram_after`` bytes of pages went through (main stream or multifd channels);
* ``device``: RAM is done, the first device section is held back;
* ``switchover``: the source sent EOF (it now waits for the destination's SHUT on the
  return path); EOF is held back, and nothing comes back to the source.

At the boundary the proxy forwards nothing more and does one of:

* ``reset``: RST on every connection, both ways (a dying link);
* ``stall``: stops reading and writing, sockets left open (a hung peer or a black hole):
  each side must give up by its idle timeout;
* ``hold``: reads and drops what comes, passing on only a close (EOF as EOF, an error as a
  reset): the test then kills or interrupts one side and times the other.

:attr:`PhaseProxy.reached` is set (with :attr:`PhaseProxy.at`, a ``time.monotonic()``) when
the fault is injected.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from mignet.guest.devices import KNOWN_DEVICES
from mignet.wire import NEED_DATA, DeviceState, EndOfStream, RamBlocks, RamPage, StreamDecoder

Phase = Literal["setup", "ram", "device", "switchover"]
Fault = Literal["reset", "stall", "hold"]
PHASES: tuple[Phase, ...] = ("setup", "ram", "device", "switchover")

QEVM = b"QEVM"


def _reset(sock: socket.socket) -> None:
    """Close with RST (linger 0); on a UNIX socket a plain close, the nearest it has."""
    with contextlib.suppress(OSError):
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)  # wakes a pump blocked in recv on it
    with contextlib.suppress(OSError):
        sock.close()


class _Watch:
    """Decodes the main stream and says what of it may pass before the phase."""

    def __init__(self, phase: Phase, ram_after: int) -> None:
        self.phase, self.ram_after = phase, ram_after
        self.dec = StreamDecoder(devices=KNOWN_DEVICES)
        self.held = bytearray()  # received, not yet forwarded
        self.passed = 0  # stream offset up to which bytes were forwarded
        self.boundary = 0  # stream offset just after the last whole event
        self._scratch = memoryview(bytearray(4096))

    def feed(self, data: bytes, page_bytes: list[int]) -> tuple[bytes, bool]:
        """Feed ``data``: (the bytes now safe to forward, whether the phase is reached).

        Bytes after the last whole event are held back until a later chunk completes it,
        so a section that begins the phase is never half forwarded. ``page_bytes`` is the
        running count of page bytes across all connections (multifd channels add to it).
        """
        dec = self.dec
        dec.receive_data(data)
        self.held += data
        point: int | None = None
        while point is None:
            if dec.payload_left:
                while dec.payload_left and dec.buffered:
                    dec.take_payload_into(self._scratch[:dec.payload_left])
                if dec.payload_left:
                    break
                self.boundary = dec.offset
                page_bytes[0] += 4096
                if self.phase == "ram" and page_bytes[0] >= self.ram_after:
                    point = self.boundary
                continue
            start = self.boundary
            event = dec.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, RamPage):
                continue  # its payload is taken above; the boundary comes after it
            if isinstance(event, RamBlocks) and self.phase == "setup":
                point = dec.offset
            elif isinstance(event, DeviceState) and self.phase == "device":
                point = start
            elif isinstance(event, EndOfStream) and self.phase == "switchover":
                point = start
            self.boundary = dec.offset
        upto = self.boundary if point is None else point
        n = upto - self.passed
        assert n >= 0, "the phase began in bytes already forwarded"
        out = bytes(self.held[:n])
        del self.held[:n]
        self.passed = upto
        return out, point is not None


class PhaseProxy:
    """Forwards every connection to ``target`` (("host", port) or a UNIX path) until the
    main stream reaches ``phase``, then injects ``fault``. Listens on 127.0.0.1 or, with
    ``unix_path``, on that UNIX socket."""

    def __init__(self, target: tuple[str, int] | str, phase: Phase, fault: Fault, *,
                 unix_path: Path | None = None, ram_after: int = 4 << 20) -> None:
        self.target, self.phase, self.fault, self.ram_after = target, phase, fault, ram_after
        if unix_path is None:
            self._srv = socket.create_server(("127.0.0.1", 0))
            self.uri = f"tcp:127.0.0.1:{self._srv.getsockname()[1]}"
        else:
            self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._srv.bind(str(unix_path))
            self._srv.listen(16)
            self.uri = f"unix:{unix_path}"
        self.reached = threading.Event()
        self.at: float | None = None
        self.error: BaseException | None = None  # what went wrong in the proxy itself
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._page_bytes = [0]
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._start(self._accept)

    def _start(self, fn: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _connect(self) -> socket.socket:
        if isinstance(self.target, str):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.target)
            return s
        return socket.create_connection(self.target)

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self._srv.accept()
                b = self._connect()
            except OSError:
                return
            with self._lock:
                self._socks += [a, b]
                if self.reached.is_set():  # a channel that comes after the fault
                    _reset(a)
                    _reset(b)
                    continue
            self._start(self._pump, a, b, True)
            self._start(self._pump, b, a, False)

    def _inject(self) -> None:
        """The phase is reached: stop forwarding everywhere, and inject the fault."""
        with self._lock:
            if self.reached.is_set():
                return
            self.at = time.monotonic()
            self.reached.set()
            socks = list(self._socks)
        if self.fault == "reset":
            for s in socks:
                _reset(s)

    def _pump(self, src: socket.socket, dst: socket.socket, forward: bool) -> None:
        """Copy ``src`` to ``dst``; ``forward``: the source→destination direction, watched."""
        watch: _Watch | None = None
        head: bytes | None = b""
        try:
            while True:
                if self.reached.is_set() and self.fault == "stall":
                    self._closed.wait()
                    return
                data = src.recv(1 << 16)
                if not data:
                    if self.reached.is_set() and self.fault == "hold" and not forward:
                        # the destination is gone: the source's next write would meet a
                        # reset, were it not writing into this proxy
                        _reset(dst)
                    elif not self.reached.is_set() or self.fault == "hold":
                        with contextlib.suppress(OSError):
                            dst.shutdown(socket.SHUT_WR)
                    return
                if self.reached.is_set():
                    continue  # hold: dropped
                if not forward:
                    dst.sendall(data)
                    continue
                if head is not None:  # which connection is this? the first 4 bytes say
                    head += data
                    if len(head) < 4:
                        continue
                    data, head = head, None
                    if data.startswith(QEVM):
                        watch = _Watch(self.phase, self.ram_after)
                if watch is None:  # a multifd channel (or another stream): count its bytes
                    dst.sendall(data)
                    with self._lock:
                        self._page_bytes[0] += len(data)
                        hit = self.phase == "ram" and self._page_bytes[0] >= self.ram_after
                    if hit:
                        self._inject()
                    continue
                out, hit = watch.feed(data, self._page_bytes)
                if out:
                    dst.sendall(out)
                if hit or (self.phase == "ram" and self._page_bytes[0] >= self.ram_after):
                    self._inject()
        except OSError:
            if not self.reached.is_set() or self.fault == "hold":
                _reset(dst)  # a peer that died or reset: pass it on as a reset
        except Exception as exc:  # noqa: BLE001 - a bug in the proxy must fail the test, not hang it
            self.error = exc
            _reset(src)
            _reset(dst)

    def close(self) -> None:
        """Stop: the listener and every connection closed, the pumps ended."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._srv.shutdown(socket.SHUT_RDWR)  # wakes accept(); a close alone does not
        with contextlib.suppress(OSError):
            self._srv.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            _reset(s)
        for t in self._threads:
            t.join(5)
