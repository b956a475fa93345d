"""Opening channels from migration URIs: the one place that maps a scheme to a transport."""

from __future__ import annotations

from typing import Protocol

from mignet.channel import Channel
from mignet.errors import SetupError
from mignet.uri import Address, parse_uri


class Listener(Protocol):
    address: Address

    def accept(self, timeout: float | None = None) -> Channel: ...

    def close(self) -> None: ...


def listen(uri: str) -> Listener:
    """Listen on ``uri`` (tcp:, unix: or rdma:); ``SetupError`` with the fix on failure."""
    address = parse_uri(uri)
    if address.scheme == "rdma":
        try:
            from mignet.rdma import listen_rdma
        except ImportError as exc:
            raise SetupError(f"rdma: URIs need pyverbs ({exc}); run tools/rxe/setup.sh") from exc
        return listen_rdma(address)
    from mignet.tcp import listen_socket

    return listen_socket(address)


def connect(uri: str, timeout: float | None = 30.0, rdma_protocol: str = "mignet",
            rdma_pin_all: bool = False) -> Channel:
    """Connect to ``uri``. On rdma:, ``rdma_protocol`` "qemu" speaks QEMU's own RDMA
    protocol (into ``qemu -incoming rdma:``), which settles ``rdma_pin_all`` here."""
    address = parse_uri(uri)
    if address.scheme == "rdma":
        try:
            from mignet.rdma import connect_rdma
        except ImportError as exc:
            raise SetupError(f"rdma: URIs need pyverbs ({exc}); run tools/rxe/setup.sh") from exc
        return connect_rdma(address, timeout, rdma_protocol, rdma_pin_all)
    from mignet.tcp import connect_socket

    return connect_socket(address, timeout)
