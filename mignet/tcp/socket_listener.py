"""Listening and connecting for ``tcp:`` and ``unix:`` addresses.

Errors the user can act on (port in use, nothing listening, bad host) become a
``SetupError`` whose one line says what to do.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import tempfile

from mignet.channel import IOCondition
from mignet.errors import ClosedChannelError, SetupError, TimedOut
from mignet.tcp.socket_channel import SocketChannel
from mignet.uri import Address


class SocketListener:
    """A listening socket that hands out :class:`SocketChannel` s."""

    def __init__(self, sock: socket.socket, address: Address) -> None:
        self.sock = sock
        self.address = address  # with the real port when 0 was asked for
        self._closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self, timeout: float | None = None) -> SocketChannel:
        """Wait for one connection; ``TimeoutError`` when none came in time."""
        if self._closed:
            raise ClosedChannelError(f"listener {self.address} is closed")
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except TimeoutError as exc:
            raise TimedOut(f"no connection on {self.address} within {timeout} s") from exc
        except OSError as exc:
            if self._closed:
                raise ClosedChannelError(f"listener {self.address} was closed") from exc
            raise
        return SocketChannel(conn)

    def poll_fds(self, cond: IOCondition = IOCondition.IN) -> list[tuple[int, int]]:
        return [(self.sock.fileno(), int(IOCondition.IN))]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept()
        except OSError:
            pass
        self.sock.close()
        if self.address.scheme == "unix":
            try:
                os.unlink(self.address.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> SocketListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def listen_socket(address: Address, backlog: int = 16) -> SocketListener:
    """Bind and listen on a tcp or unix address."""
    if address.scheme == "unix":
        sock = bind_unix(address.path)
        sock.listen(backlog)
        return SocketListener(sock, address)
    infos = _resolve(address, passive=True)
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise SetupError(
                f"port {address.port} on {address.host} is already in use: choose another "
                "port or stop the program that holds it"
            ) from exc
        raise SetupError(f"cannot listen on {address}: {exc.strerror}") from exc
    sock.listen(backlog)
    real = Address(address.scheme, address.host, sock.getsockname()[1])
    return SocketListener(sock, real)


def bind_unix(path: str, mode: int | None = None) -> socket.socket:
    """A UNIX stream socket bound at ``path`` (a stale socket file there is replaced).

    With ``mode``, the socket has that mode from the moment it appears at ``path``: it is
    bound in a private 0700 directory beside ``path``, chmod-ed, then hard-linked into place
    (which, unlike a rename, never replaces an existing file) — no window where others could
    connect, and no process-wide umask change."""
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)  # a stale socket from an earlier run
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if mode is None:
            sock.bind(path)
        else:
            private = tempfile.mkdtemp(prefix=".m", dir=os.path.dirname(os.path.abspath(path)))
            staged = os.path.join(private, "s")
            try:
                sock.bind(staged)
                os.chmod(staged, mode)
                os.link(staged, path)
            finally:
                try:
                    os.unlink(staged)
                except FileNotFoundError:
                    pass
                os.rmdir(private)
    except OSError as exc:
        sock.close()
        raise SetupError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from exc
    return sock


def connect_socket(address: Address, timeout: float | None = 30.0) -> SocketChannel:
    """Connect to a tcp or unix address."""
    if address.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = address.path
    else:
        family, _, _, _, target = _resolve(address, passive=False)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(target)  # type: ignore[arg-type]
    except (ConnectionRefusedError, FileNotFoundError) as exc:
        sock.close()
        raise SetupError(
            f"nothing is listening on {address}: start the destination "
            "(mignet recv --listen ...) first"
        ) from exc
    except TimeoutError as exc:
        sock.close()
        raise TimedOut(f"{address}: no answer within {timeout} s") from exc
    except OSError as exc:
        sock.close()
        raise SetupError(f"cannot connect to {address}: {exc}") from exc
    sock.settimeout(None)
    return SocketChannel(sock)


def _resolve(address: Address, passive: bool) -> list[tuple]:
    try:
        return socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE if passive else 0,
        )
    except socket.gaierror as exc:
        raise SetupError(f"cannot resolve host {address.host!r} in {address}: {exc.strerror}") from exc
