"""A stalled peer never hangs a migration: a source that stops sending mid-stream, or a
destination that stops reading, ends the other side with TimedOut once the idle limit
passes (real sockets, real threads; limits cut to fractions of a second). TCP sockets also
carry the kernel's dead-peer detection (keepalive, TCP_USER_TIMEOUT)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from mignet.errors import TimedOut
from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam, RamBlock
from mignet.migration.loadvm import Loader
from mignet.migration.savevm import Sender
from mignet.tcp import SocketChannel
from mignet.transport import connect, listen
from tests.support.streams import channel_pair, encode_stream

LIMIT = 0.5
SLACK = 3.0  # on a loaded 2-core machine


@pytest.fixture
def pair() -> Iterator[tuple[SocketChannel, SocketChannel]]:
    a, b = channel_pair()
    yield a, b
    a.close()
    b.close()


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "non-blocking"])
def test_a_read_with_no_data_times_out(pair: tuple[SocketChannel, SocketChannel], blocking: bool) -> None:
    a, b = pair
    b.set_blocking(blocking)
    b.set_idle_timeout(read=LIMIT)
    a.write_all(b"half")
    t0 = time.monotonic()
    with pytest.raises(TimedOut, match=r"the peer sent nothing for 0.5 s"):
        b.read_exactly(8)
    assert LIMIT * 0.9 <= time.monotonic() - t0 < LIMIT + SLACK


def test_progress_restarts_the_clock(pair: tuple[SocketChannel, SocketChannel]) -> None:
    """A slow peer is not a stalled one: bytes every 0.2 s keep a 0.5 s limit from firing."""
    a, b = pair
    b.set_idle_timeout(read=LIMIT)

    def trickle() -> None:
        for _ in range(8):
            time.sleep(0.2)
            a.write_all(b"x")
    t = threading.Thread(target=trickle)
    t.start()
    assert b.read_exactly(8) == b"x" * 8
    t.join()


def test_a_write_the_peer_never_takes_times_out(pair: tuple[SocketChannel, SocketChannel]) -> None:
    a, _ = pair
    a.set_idle_timeout(write=LIMIT)
    t0 = time.monotonic()
    with pytest.raises(TimedOut, match="took nothing we sent for 0.5 s"):
        a.write_all(bytes(64 << 20))  # far more than the socket buffers hold
    assert time.monotonic() - t0 < LIMIT + SLACK


def _ram(size: int = 8 << 20) -> GuestRam:
    block = RamBlock.anonymous("pc.ram", size)
    block.data[::4096] = 7  # every page a data page
    return GuestRam([block])


def test_a_source_that_stalls_mid_stream_ends_the_load(pair: tuple[SocketChannel, SocketChannel]) -> None:
    a, b = pair
    data = encode_stream(_ram())
    # half the stream, then silence with the connection open
    threading.Thread(target=a.write_all, args=(data[: len(data) // 2],), daemon=True).start()
    loader = Loader(b, devices=DeviceSet.empty(), idle_timeout=LIMIT)
    t0 = time.monotonic()
    with pytest.raises(TimedOut, match="sent nothing"):
        loader.run()
    assert time.monotonic() - t0 < LIMIT + SLACK


def test_a_destination_that_stops_reading_ends_the_send(pair: tuple[SocketChannel, SocketChannel]) -> None:
    a, _ = pair  # nobody reads b
    sender = Sender(a, _ram(64 << 20), DeviceSet.empty(), idle_timeout=LIMIT)
    t0 = time.monotonic()
    with pytest.raises(TimedOut, match="took nothing"):
        sender.start()
        sender.send_pages(sender.ram["pc.ram"], [(0, sender.ram["pc.ram"].pages)])
        sender.finish()
    assert time.monotonic() - t0 < LIMIT + SLACK


def test_tcp_channels_detect_a_vanished_peer_host() -> None:
    listener = listen("tcp:127.0.0.1:0")
    try:
        client = connect(str(listener.address))
        server = listener.accept(timeout=5)
        for ch in (client, server):
            assert isinstance(ch, SocketChannel)
            s = ch.sock
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 60_000
            ch.close()
    finally:
        listener.close()


def test_a_relay_whose_source_stalls_ends(pair: tuple[SocketChannel, SocketChannel]) -> None:
    """The relay reads through a wrapper of its inbound channel: the idle limit must reach
    the socket underneath (it once stayed on the wrapper, and a stalled source hung the relay)."""
    from mignet.migration.relay import Relay

    a, b = pair
    far = listen("tcp:127.0.0.1:0")

    def drain() -> None:
        # A destination that reads: without it the relay's forwarding could fill the
        # loopback buffers and block in a write, which is another fault than this test's.
        ch = far.accept(timeout=10)
        try:
            buf = bytearray(1 << 16)
            while ch.read_some_into([buf]):
                pass
        except Exception:  # noqa: BLE001 - the relay closing its side ends the drain
            pass
        finally:
            ch.close()
    threading.Thread(target=drain, daemon=True).start()
    try:
        data = encode_stream(_ram())
        threading.Thread(target=a.write_all, args=(data[: len(data) // 2],), daemon=True).start()
        relay = Relay(b, lambda: connect(str(far.address)))
        relay.loader.channel.set_idle_timeout(read=LIMIT)
        t0 = time.monotonic()
        with pytest.raises(TimedOut, match="sent nothing"):
            relay.run()
        assert time.monotonic() - t0 < LIMIT + SLACK
    finally:
        far.close()


def test_opening_channels_closes_the_open_ones_when_one_fails() -> None:
    from mignet.errors import SetupError
    from mignet.migration.multifd import MultifdSender

    opened: list[SocketChannel] = []
    peers: list[SocketChannel] = []

    def connect_one() -> SocketChannel:
        if len(opened) == 2:
            raise SetupError("connection refused")
        a, b = channel_pair()
        peers.append(b)  # open: each channel's init record is written as it connects
        opened.append(a)
        return a
    with pytest.raises(SetupError):
        MultifdSender.open(connect_one, 4)
    assert len(opened) == 2 and all(ch.closed for ch in opened)
    for b in peers:
        b.close()


def test_recv_idle_timeout_option_ends_a_stalled_source_in_one_line(
        mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    """``recv --idle-timeout 1``: a source that sends half a stream and then nothing (its
    connection open) ends the receive with the timeout status and one line."""
    from mignet.cli import exits
    from tests.support.cli import one_line, start_recv

    recv, uri = start_recv(mignet_cmd, subprocess_env, "--idle-timeout", "1")
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    data = encode_stream(_ram())
    src = socket.create_connection((host, int(port)))
    try:
        src.sendall(data[: len(data) // 2])
        t0 = time.monotonic()
        _, stderr = recv.communicate(timeout=60)
        assert recv.returncode == exits.TIMEOUT, stderr
        assert 1 <= time.monotonic() - t0 < 1 + SLACK + 2  # + process exit on a loaded machine
        one_line(stderr, "sent nothing for 1 s")
    finally:
        src.close()


STALL_LIMIT = 2.0  # long enough that "twice the limit" stands out from a loaded machine's noise


def test_a_bulk_read_that_got_part_then_stalls_times_out_after_one_limit(
        pair: tuple[SocketChannel, SocketChannel]) -> None:
    """A read waiting for the bulk low-water mark got some bytes, then the peer stalled:
    the kernel's SO_RCVTIMEO timed the whole call, so that read returned its part only when
    the limit passed, and the next read waited a whole limit again (2x the limit; found by
    the per-phase fault matrix, tests/test_phase_faults.py). It must end within one limit
    (and the kernel's slice)."""
    a, b = pair
    b.set_idle_timeout(read=STALL_LIMIT)
    b.hint_bulk_reads(2 << 20)
    a.write_all(bytes(64 << 10))
    t0 = time.monotonic()
    buf = bytearray(4 << 20)
    with pytest.raises(TimedOut, match="sent nothing"):
        while True:
            b.read_some_into([memoryview(buf)])
    assert time.monotonic() - t0 < STALL_LIMIT * 1.75


def test_a_write_that_went_in_part_then_stalls_times_out_after_one_limit(
        pair: tuple[SocketChannel, SocketChannel]) -> None:
    """The write side of the same: a send that moved part of its buffer before the peer
    stopped taking returned only when SO_SNDTIMEO passed, and counted as progress."""
    a, _ = pair
    a.set_idle_timeout(write=STALL_LIMIT)
    t0 = time.monotonic()
    with pytest.raises(TimedOut, match="took nothing"):
        a.write_all(bytes(64 << 20))
    assert time.monotonic() - t0 < STALL_LIMIT * 1.75


def test_a_source_waiting_for_shut_gives_up_after_its_idle_limit(
        pair: tuple[SocketChannel, SocketChannel]) -> None:
    """With the return path, a source that sent everything waits for the destination's SHUT.
    A destination that took every byte and then went silent (hung, or a network that drops
    its answer) held that wait for ``confirm_timeout`` (120 s), whatever the idle limit said
    (found by the fault matrix's switchover stall). It ends by the idle limit."""
    a, b = pair

    def drain() -> None:
        buf = bytearray(1 << 20)
        while b.read_some_into([memoryview(buf)]):
            pass
    threading.Thread(target=drain, daemon=True).start()
    sender = Sender(a, _ram(), DeviceSet.empty(), idle_timeout=STALL_LIMIT, return_path=True)
    sender.start()
    sender.send_pages(sender.ram["pc.ram"], [(0, sender.ram["pc.ram"].pages)])
    t0 = time.monotonic()
    with pytest.raises(TimedOut, match="SHUT"):
        sender.finish()
    assert STALL_LIMIT * 0.9 < time.monotonic() - t0 < STALL_LIMIT * 1.75
