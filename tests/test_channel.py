"""Channels over real sockets: read/write semantics, wait_cond in threads and coroutines."""

from __future__ import annotations

import asyncio
import platform
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mignet.channel import IOCondition, ShutdownHow
from mignet.errors import ClosedChannelError, ConnectionLostError, SetupError
from mignet.runtime.coroutine import run_coroutine
from mignet.tcp import connect_socket, listen_socket
from mignet.uri import parse_uri
from tests.support.streams import channel_pair


def test_read_write_vectored() -> None:
    a, b = channel_pair()
    with a, b:
        assert a.writev_all([b"hello ", memoryview(b"vectored "), bytearray(b"world")]) == 20
        x, y = bytearray(6), bytearray(14)
        assert b.readv_into([x, y]) == 20
        assert bytes(x + y) == b"hello vectored world"


def test_peek_does_not_consume() -> None:
    a, b = channel_pair()
    with a, b:
        a.write_all(b"abcdef")
        assert b.peek(3) == b"abc"
        assert b.read_exactly(6) == b"abcdef"


def test_clean_eof_returns_zero_but_mid_read_close_is_an_error() -> None:
    a, b = channel_pair()
    a.close()
    assert b.read_into(bytearray(4)) == 0
    b.close()
    a, b = channel_pair()
    a.write_all(b"ab")
    a.close()
    with pytest.raises(ConnectionLostError, match="after 2 of 4 bytes"):
        b.read_into(bytearray(4))
    b.close()


def test_use_after_close_is_local_misuse() -> None:
    a, b = channel_pair()
    a.close()
    with pytest.raises(ClosedChannelError):
        a.write_all(b"x")
    with pytest.raises(ClosedChannelError):
        a.read_into(bytearray(1))
    b.close()


# x86_64 syscall numbers a thread blocked on a socket sits in (read, poll, readv, recvfrom,
# recvmsg, ppoll); a thread waiting for the GIL sits in futex (202) instead.
_SOCKET_WAITS = {0, 7, 19, 45, 47, 271}


def blocked_in_io(tid: int) -> bool:
    """Whether thread ``tid`` of this process is asleep in the kernel on I/O (not on a lock)."""
    task = Path(f"/proc/self/task/{tid}")
    try:
        state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False  # gone
    if state != "S":
        return False
    try:
        nr = (task / "syscall").read_text().split()[0]
        if nr.isdigit() and platform.machine() == "x86_64":
            return int(nr) in _SOCKET_WAITS
    except OSError:
        pass
    wchan = (task / "wchan").read_text().strip()
    if wchan in ("", "0"):
        pytest.skip("this kernel shows neither syscall nor wchan of a thread")
    return "futex" not in wchan


def wait_until_blocked(tid: int, done: threading.Event, limit: float = 30.0) -> None:
    """Wait (generously: the machine may be loaded) until thread ``tid`` sleeps in I/O."""
    deadline = time.monotonic() + limit
    while not blocked_in_io(tid):
        assert not done.is_set(), "the call returned instead of blocking"
        assert time.monotonic() < deadline, "the thread never blocked in the kernel"
        time.sleep(0.001)  # polling a condition, not timing anything


class Blocker(threading.Thread):
    """Runs ``call`` in a thread, announcing its native id just before the call."""

    def __init__(self, call: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.call = call
        self.started_call = threading.Event()
        self.returned = threading.Event()
        self.result: list[object] = []
        self.tid = 0

    def run(self) -> None:
        self.tid = threading.get_native_id()
        self.started_call.set()
        try:
            self.result.append(self.call())
        finally:
            self.returned.set()

    def wait_blocked(self) -> None:
        assert self.started_call.wait(30)
        wait_until_blocked(self.tid, self.returned)


def test_shutdown_wakes_a_blocked_reader() -> None:
    a, b = channel_pair()
    reader = Blocker(lambda: b.read_into(bytearray(10)))
    reader.start()
    reader.wait_blocked()  # asleep in the kernel inside the read, with nothing to read
    assert not reader.returned.is_set() and reader.result == []
    b.shutdown(ShutdownHow.BOTH)
    assert reader.returned.wait(30), "shutdown did not wake the reader"
    assert reader.result == [0]
    a.close()
    b.close()


def test_wait_cond_in_a_thread_blocks_in_poll() -> None:
    a, b = channel_pair()
    with a, b:
        t0 = time.monotonic()
        assert b.wait_cond(IOCondition.IN, timeout=0.2) is False
        assert time.monotonic() - t0 >= 0.18  # a lower bound: load only makes it longer
        assert a.wait_cond(IOCondition.OUT, timeout=1) is True
        waiter = Blocker(lambda: b.wait_cond(IOCondition.IN, timeout=60))
        waiter.start()
        waiter.wait_blocked()
        assert waiter.result == []
        a.write_all(b"x")
        assert waiter.returned.wait(30)
        assert waiter.result == [True]


def test_wait_cond_in_a_coroutine_yields_to_the_loop() -> None:
    """While the coroutine waits for data, other tasks on the same loop keep running."""
    a, b = channel_pair()
    b.set_blocking(False)
    ticks: list[float] = []

    def reader() -> bytes:
        return b.read_exactly(5)  # blocks only this coroutine, via wait_cond

    async def ticker() -> None:
        for _ in range(5):
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)
        a.write_all(b"hello")

    async def main() -> bytes:
        data, _ = await asyncio.gather(run_coroutine(reader), ticker())
        return data

    assert asyncio.run(main()) == b"hello"
    assert len(ticks) == 5  # the loop ran the ticker while the reader was waiting
    a.close()
    b.close()


def test_nonblocking_read_in_a_thread_waits_with_poll() -> None:
    a, b = channel_pair()
    b.set_blocking(False)
    reader = Blocker(lambda: b.read_exactly(4))
    reader.start()
    reader.wait_blocked()  # in poll, not spinning on EAGAIN
    a.write_all(b"late")
    assert reader.returned.wait(30)
    assert reader.result == [b"late"]
    a.close()
    b.close()


def test_tcp_listen_connect_and_port_in_use() -> None:
    with listen_socket(parse_uri("tcp:127.0.0.1:0")) as lst:
        assert lst.address.port != 0
        c = connect_socket(lst.address)
        s = lst.accept(timeout=5)
        with c, s:
            c.write_all(b"ping")
            assert s.read_exactly(4) == b"ping"
        with pytest.raises(SetupError, match="already in use"):
            listen_socket(lst.address)


def test_connect_refused_names_the_fix() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(SetupError, match="nothing is listening"):
        connect_socket(parse_uri(f"tcp:127.0.0.1:{port}"), timeout=5)


def test_unix_socket(tmp_path: Path) -> None:
    uri = parse_uri(f"unix:{tmp_path / 'm.sock'}")
    with listen_socket(uri) as lst:
        c = connect_socket(uri)
        s = lst.accept(timeout=5)
        with c, s:
            s.write_all(b"over unix")
            assert c.read_exactly(9) == b"over unix"
    assert not (tmp_path / "m.sock").exists()
