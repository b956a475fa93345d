"""The ``rdma:`` transport: rdma_cm + RC verbs through Debian's pyverbs.

Nothing here imports pyverbs at package import time, so ``import mignet.rdma`` (and the CLI
plugin) works on hosts without RDMA; the first ``listen_rdma``/``connect_rdma`` imports it and
turns a missing device, module or memlock limit into a one-line ``SetupError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mignet.rdma.channel import RdmaChannel, RdmaListener
    from mignet.rdma.qemu_source import QemuRdmaSource
    from mignet.uri import Address

#: The protocols a source may speak: mignet's own (to mignet), QEMU's (to qemu -incoming).
PROTOCOLS = ("mignet", "qemu")


def listen_rdma(address: Address) -> RdmaListener:
    """Listen for one incoming RDMA migration on ``address`` (an ``rdma:HOST:PORT``)."""
    from mignet.rdma.channel import RdmaListener

    return RdmaListener.open(address)


def connect_rdma(address: Address, timeout: float | None = 30.0, protocol: str = "mignet",
                 pin_all: bool = False) -> RdmaChannel | QemuRdmaSource:
    """Connect to an ``rdma:HOST:PORT`` listener; the channel places pages by RDMA WRITE.

    ``protocol``: "mignet" (mignet's own, to ``mignet recv``), or "qemu" (QEMU 7.2's, to
    ``qemu -incoming rdma:``, which negotiates ``pin_all`` when connecting; mignet's
    protocol announces it in the stream's first message instead)."""
    if protocol == "qemu":
        from mignet.rdma.qemu_source import QemuRdmaSource

        return QemuRdmaSource.connect(address, timeout, pin_all)
    from mignet.rdma.channel import RdmaChannel

    return RdmaChannel.connect(address, timeout)


__all__ = ["PROTOCOLS", "listen_rdma", "connect_rdma"]
