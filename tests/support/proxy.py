"""A TCP forwarder between two real peers that a test can break: the network failing under
a migration (every connection cut, or one reset after so many bytes), or one connection
that the far end never answers — without killing either end."""

from __future__ import annotations

import socket
import threading
import time

from tests.support.streams import reset_close


class CuttableProxy:
    """Listens on 127.0.0.1; each connection is forwarded to ``target`` (host, port), both
    ways, an end of input passed on as a half-close. Connections are numbered in the order
    they come (0: a migration's main stream, 1: its first multifd channel, ...):

    * ``stall``: that connection is accepted and never forwarded nor answered (a
      destination stalled in its TLS handshake, as its client sees it);
    * ``reset`` and ``reset_after``: that connection is reset both ways (RST, as a dying
      link or peer) once it has forwarded ``reset_after`` bytes from its client;
      :attr:`cut_at` says when;
    * :meth:`cut` resets every forwarded connection at once.
    """

    def __init__(self, target: tuple[str, int], *, stall: int | None = None,
                 reset: int | None = None, reset_after: int = 0) -> None:
        self.target = target
        self.stall, self.reset, self.reset_after = stall, reset, reset_after
        self.cut_at: float | None = None
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        # appended by the accept thread, cut and closed by the test's thread
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._cutting = False  # a cut's wake-up is no end of input to pass on
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def _accept(self) -> None:
        n = 0
        while True:
            try:
                a, _ = self._srv.accept()
            except OSError:
                return
            with self._lock:
                self._socks.append(a)
            if n != self.stall:
                try:
                    b = socket.create_connection(self.target)
                except OSError:
                    a.close()
                    n += 1
                    continue
                with self._lock:
                    self._socks.append(b)
                threading.Thread(target=self._pump, args=(a, b, n == self.reset), daemon=True).start()
                threading.Thread(target=self._pump, args=(b, a, False), daemon=True).start()
            n += 1

    def _pump(self, src: socket.socket, dst: socket.socket, reset: bool) -> None:
        moved = 0
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                moved += len(data)
                if reset and moved >= self.reset_after:
                    for s in (src, dst):
                        reset_close(s)
                    self.cut_at = time.monotonic()
                    return
            if not self._cutting:
                dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self) -> None:
        """Reset every connection; the listener stays (nothing reconnects here)."""
        with self._lock:
            self._cutting = True
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RD)  # wakes this side's pump; sends nothing
            except OSError:
                pass  # already reset
            try:
                reset_close(s)  # linger 0: RST to the peer
            except OSError:
                pass

    def close(self) -> None:
        self._srv.close()
        self.cut()
