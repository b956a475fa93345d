"""What every verbs channel shares, whichever protocol it speaks (mignet's own, QEMU's):
its wake pipe, how a lost connection is marked, and the exit-time registry.

Why a registry: pyverbs objects freed in arbitrary order at interpreter exit can crash (a
CMID before its QP: "double free"), e.g. when an error ends the CLI without closing its
channel; so whatever is still open is closed, in order, at exit.
"""

from __future__ import annotations

import atexit
import os
import weakref
from typing import Any

from mignet.channel import Channel

#: Channels not yet closed (both protocols).
OPEN: weakref.WeakSet[Channel] = weakref.WeakSet()


@atexit.register
def _close_open_channels() -> None:
    for chan in list(OPEN):
        try:
            chan.close()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


class VerbsEndpoint(Channel):
    """A Channel over one RC queue pair. Subclasses set ``conn`` (the connection), ``_e``
    (pyverbs.enums), ``_lost`` (why the connection is gone, or None) and the wake pipe
    ``_wake_r``/``_wake_w``, whose read end is one of the fds ``poll_fds`` returns."""

    conn: Any
    _e: Any
    _lost: str | None
    _wake_r: int
    _wake_w: int

    def _mark_lost(self, why: str) -> None:
        if self._lost is None:
            self._lost = why
            self._qp_to_error()
            self._wake()

    def _qp_to_error(self) -> None:
        """rdma_cm does not move our own QP to ERROR: do it, so posted work is flushed."""
        from pyverbs.qp import QPAttr

        attr = QPAttr()
        attr.qp_state = self._e.IBV_QPS_ERR
        try:
            self.conn.qp.modify(attr, self._e.IBV_QP_STATE)
        except Exception:  # noqa: BLE001 - already in error / destroyed
            pass

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:
            pass

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 64):
                pass
        except OSError:
            pass
