"""Socket transports: TCP and UNIX stream sockets."""

from __future__ import annotations

from mignet.tcp.socket_channel import SocketChannel
from mignet.tcp.socket_listener import SocketListener, connect_socket, listen_socket

__all__ = ["SocketChannel", "SocketListener", "connect_socket", "listen_socket"]
