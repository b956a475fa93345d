"""Timeouts one way on every transport: a :class:`TimedOut` (a MignetError and a builtin
TimeoutError) from accept and connect, over real TCP and UNIX sockets."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from mignet.errors import MignetError, TimedOut
from mignet.transport import connect, listen


@pytest.mark.parametrize("uri", ["tcp:127.0.0.1:0", "unix:{tmp}/l.sock"])
def test_accept_with_no_peer_times_out_as_timed_out(uri: str, tmp_path: Path) -> None:
    listener = listen(uri.format(tmp=tmp_path))
    try:
        t0 = time.monotonic()
        with pytest.raises(TimedOut, match="no connection on .* within 0.3 s") as info:
            listener.accept(timeout=0.3)
        assert time.monotonic() - t0 >= 0.25
        assert isinstance(info.value, MignetError) and isinstance(info.value, TimeoutError)
    finally:
        listener.close()


def test_connect_to_a_full_backlog_times_out_as_timed_out() -> None:
    """A listener that never accepts, with its backlog filled: the kernel leaves further
    SYNs unanswered, so connect waits until its own deadline."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):  # fill the accept queue (backlog 0 admits one or two)
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        time.sleep(0.2)
        try:
            channel = connect(f"tcp:127.0.0.1:{port}", timeout=0.5)
        except TimedOut as exc:
            assert "no answer within 0.5 s" in str(exc)
        else:  # a kernel that still completed the handshake: nothing to assert on
            channel.close()
            pytest.skip("this kernel accepted past the backlog; no connect timeout to see")
    finally:
        for s in fillers:
            s.close()
        srv.close()
