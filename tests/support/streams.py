"""Helpers to build streams and connected channel pairs for tests (real sockets)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import numpy as np

from mignet.errors import ConnectionLostError
from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam
from mignet.tcp import SocketChannel
from mignet.units import PAGE_SIZE
from mignet.wire import StreamEncoder


def channel_pair() -> tuple[SocketChannel, SocketChannel]:
    a, b = socket.socketpair()
    return SocketChannel(a, "a"), SocketChannel(b, "b")


def encode_stream(ram: GuestRam, devices: DeviceSet | None = None,
                  order: Iterable[tuple[str, int]] | None = None) -> bytes:
    """A complete stream of ``ram`` (all pages in ``order`` of (block, page index), default
    sequential), zero pages as ZERO records, then ``devices``, EOF and a description."""
    enc = StreamEncoder()
    out = [enc.header(), enc.configuration("test"), enc.ram_start(ram.layout()), enc.ram_section(False)]
    pages = order if order is not None else [(b.name, i) for b in ram for i in range(b.pages)]
    for name, idx in pages:
        block = ram[name]
        off = np.array([idx * PAGE_SIZE], dtype=np.uint64)
        if block.zero_mask(idx, 1)[0]:
            out.append(enc.zero_records(name, off))
        else:
            out += [bytes(x) for x in enc.page_records(name, block.data, off)]
    out.append(enc.ram_section_close())
    out += [enc.ram_section(True), enc.ram_section_close()]
    description: dict[str, object] = {"page_size": PAGE_SIZE, "devices": []}
    for dev in (devices.devices if devices else []):
        out.append(enc.device_section(dev.idstr, dev.instance_id, dev.vmsd.version_id,
                                      dev.vmsd.encode(dev.values)))
        description["devices"].append(dev.vmsd.describe(dev.idstr, dev.instance_id))  # type: ignore[attr-defined]
    out += [enc.eof(), enc.vmdescription(description)]
    return b"".join(bytes(x) for x in out)


def feed_in_chunks(channel: SocketChannel, data: bytes, sizes: list[int],
                   delay: float = 0.0) -> threading.Thread:
    """Write ``data`` from a thread in chunks of the given sizes (cycled), then close —
    this makes the receiver see every kind of partial read."""
    def run() -> None:
        pos = 0
        i = 0
        try:
            while pos < len(data):
                n = sizes[i % len(sizes)]
                channel.write_all(data[pos:pos + n])
                pos += n
                i += 1
                if delay:
                    time.sleep(delay)
        except ConnectionLostError:
            pass  # the receiver rejected the stream and closed: that is what some tests want
        finally:
            channel.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def reset_close(sock: socket.socket) -> None:
    """Close with a reset (SO_LINGER on, 0 s), as a crashed peer or a dying link would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@contextmanager
def resetting_peer(read: int = 100) -> Iterator[str]:
    """A ``tcp:`` URI whose one server reads ``read`` bytes of the first connection and then
    resets it: a destination that vanishes after the stream has begun."""
    server = socket.create_server(("127.0.0.1", 0))

    def rude() -> None:
        conn, _ = server.accept()
        conn.recv(read, socket.MSG_WAITALL)
        reset_close(conn)
    t = threading.Thread(target=rude, daemon=True)
    t.start()
    try:
        yield f"tcp:127.0.0.1:{server.getsockname()[1]}"
    finally:
        t.join(5)
        server.close()

