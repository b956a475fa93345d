"""A TCP forwarder between two real peers that a test can cut: the network failing under
a migration, without killing either end."""

from __future__ import annotations

import socket
import struct
import threading


class CuttableProxy:
    """Listens on 127.0.0.1; each connection is forwarded to ``target`` (host, port) until
    :meth:`cut` resets both sides of every connection (RST, as a failed link reads)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self._srv.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            with self._lock:
                self._socks += [a, b]
            for src, dst in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        """Reset every forwarded connection; the listener stays (nothing reconnects here)."""
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RD)  # wakes this side's pump; sends nothing
                s.close()  # linger 0: RST to the peer
            except OSError:
                pass

    def close(self) -> None:
        self._srv.close()
        self.cut()
