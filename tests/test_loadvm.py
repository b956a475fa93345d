"""The threaded loader over real sockets: placement, the prediction fast path's recovery,
layout checks and the big-lock rules."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mignet.errors import ConnectionLostError, MigrationCancelled, ProtocolError
from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam, RamBlock
from mignet.migration.loadvm import LOAD_THREAD_NAME, Loader, start_load_thread
from mignet.migration.savevm import Sender
from mignet.runtime.bql import bql_held
from mignet.tcp import SocketChannel
from mignet.units import PAGE_SIZE
from tests.support.streams import channel_pair, encode_stream, feed_in_chunks


def load_bytes(data: bytes, chunks: list[int], **kw: object) -> tuple[Loader, object]:
    tx, rx = channel_pair()
    feeder = feed_in_chunks(tx, data, chunks)
    loader = Loader(rx, **kw)  # type: ignore[arg-type]
    result = start_load_thread(loader).join(60)
    feeder.join(5)
    rx.close()
    return loader, result


def mixed_ram(pages: int, seed: int) -> GuestRam:
    return GuestRam.generate(pages * PAGE_SIZE, "mixed", seed=seed)


@pytest.mark.parametrize("chunks", [[1 << 20], [4105, 4103, 9], [1, 7, 4096, 8200, 3], [65536, 12345]])
@pytest.mark.parametrize("fill", ["random", "mixed"])
def test_partial_reads_and_mispredictions_never_corrupt(chunks: list[int], fill: str) -> None:
    src = GuestRam.generate(300 * PAGE_SIZE, fill, seed=len(chunks))  # type: ignore[arg-type]
    devices = DeviceSet.example(2)
    loader, result = load_bytes(encode_stream(src, devices), chunks, devices=DeviceSet.empty())
    assert result.ram.digest() == src.digest()  # type: ignore[attr-defined]
    assert result.devices.state_equal(devices)  # type: ignore[attr-defined]


def test_out_of_order_pages_defeat_prediction_safely() -> None:
    """Pages sent in a shuffled order make nearly every prediction wrong; RAM stays exact."""
    src = mixed_ram(200, 5)
    order = [("pc.ram", i) for i in np.random.default_rng(1).permutation(200).tolist()]
    loader, result = load_bytes(encode_stream(src, None, order), [1 << 16])
    assert result.ram.digest() == src.digest()  # type: ignore[attr-defined]


def test_prediction_places_runs_directly() -> None:
    src = GuestRam.generate(2048 * PAGE_SIZE, "random", seed=3)
    loader, result = load_bytes(encode_stream(src), [1 << 20])
    assert result.ram.digest() == src.digest()  # type: ignore[attr-defined]
    assert loader.stats.predicted_pages > 1900


def test_into_a_given_ram_checks_the_layout(tmp_path: Path) -> None:
    src = mixed_ram(64, 1)
    dst = GuestRam([RamBlock.from_file("pc.ram", tmp_path / "img", writable=True, size=64 * PAGE_SIZE)])
    _, result = load_bytes(encode_stream(src), [10000], ram=dst)
    assert np.array_equal(np.fromfile(tmp_path / "img", np.uint8), src["pc.ram"].data)
    wrong = GuestRam([RamBlock.anonymous("pc.ram", 32 * PAGE_SIZE)])
    with pytest.raises(ProtocolError, match="is 131072 bytes here but 262144 in the stream"):
        load_bytes(encode_stream(src), [10000], ram=wrong)
    other = GuestRam([RamBlock.anonymous("other", 64 * PAGE_SIZE)])
    with pytest.raises(ProtocolError, match="which this destination lacks"):
        load_bytes(encode_stream(src), [10000], ram=other)


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.999])
def test_a_source_that_stops_mid_stream_is_a_lost_connection(cut: float) -> None:
    data = encode_stream(mixed_ram(64, 2), DeviceSet.example(1))
    with pytest.raises(ConnectionLostError, match="truncated|closed"):
        load_bytes(data[:int(len(data) * cut)], [5000])


def test_loader_runs_in_its_own_named_thread_without_the_big_lock() -> None:
    seen: dict[str, object] = {}
    tx, rx = channel_pair()
    src = mixed_ram(64, 3)
    feeder = feed_in_chunks(tx, encode_stream(src, DeviceSet.example(1)), [8192])

    class Probe(DeviceSet):
        def load(self, *args: object) -> None:
            seen.setdefault("thread", threading.current_thread().name)
            super().load(*args)  # type: ignore[arg-type]

    loader = Loader(rx, devices=Probe())
    start_load_thread(loader).join(30)
    feeder.join(5)
    rx.close()
    assert seen["thread"] == LOAD_THREAD_NAME
    # RAM loading must not hold the big lock: a loader started under it refuses to run.
    tx2, rx2 = channel_pair()
    with bql_held():
        from mignet.errors import BqlMisuseError
        with pytest.raises(BqlMisuseError):
            Loader(rx2).run()
    tx2.close()
    rx2.close()


def test_main_loop_holding_the_big_lock_delays_device_load_not_ram() -> None:
    """RAM keeps flowing while another thread holds the big lock; the device sections wait."""
    src = GuestRam.generate(512 * PAGE_SIZE, "random", seed=9)
    tx, rx = channel_pair()
    feeder = feed_in_chunks(tx, encode_stream(src, DeviceSet.example(3)), [1 << 16])
    loader = Loader(rx)
    with bql_held():
        t = start_load_thread(loader)
        for _ in range(200):
            if loader.stats.normal_pages == 512:
                break
            threading.Event().wait(0.01)
        assert loader.stats.normal_pages == 512  # RAM loaded while we held the lock
        assert loader.stats.device_sections == 0  # devices wait for the lock
    result = t.join(30)
    feeder.join(5)
    rx.close()
    assert result.stats.device_sections == 4


def test_cancel_wakes_the_loader() -> None:
    tx, rx = channel_pair()
    tx.write_all(encode_stream(mixed_ram(16, 1))[:100])
    loader = Loader(rx)
    t = start_load_thread(loader)
    threading.Event().wait(0.1)
    loader.cancel()
    with pytest.raises(MigrationCancelled):
        t.join(5)
    tx.close()
    rx.close()


def test_sender_to_loader_over_tcp_with_devices() -> None:
    from mignet.transport import connect, listen

    src = mixed_ram(1024, 4)
    devs = DeviceSet.example(4)
    lst = listen("tcp:127.0.0.1:0")
    box: dict[str, object] = {}

    def send() -> None:
        ch = connect(str(lst.address))
        box["stats"] = Sender(ch, src, devs, section_bytes=1 << 20).run()
        ch.close()
    t = threading.Thread(target=send)
    t.start()
    ch = lst.accept(10)
    result = start_load_thread(Loader(ch)).join(60)
    t.join(10)
    ch.close()
    lst.close()
    assert result.ram.digest() == src.digest()
    assert result.devices.state_equal(devs)
    assert result.stats.sections >= 2 and result.stats.zero_pages > 0


def test_device_heavy_stream_round_trips() -> None:
    src = mixed_ram(32, 6)
    devices = DeviceSet.heavy(6, seed=2)
    _, result = load_bytes(encode_stream(src, devices), [70000, 100])
    assert result.devices.state_equal(devices)  # type: ignore[attr-defined]
    assert len(result.devices.devices) == 10  # type: ignore[attr-defined]


class _WrittenElsewhere:
    """A real RemotePagePlacement in spirit: pages go into the destination's RAM directly
    (here: a numpy copy), the stream carries only ZERO records after the first pass."""

    protocol = "mignet"  # mignet's own RDMA protocol: no registration rounds

    on_placed = None

    def __init__(self, dst: GuestRam) -> None:
        self.dst = dst
        for block in dst:  # as RDMA registration does: RAM may change behind the loader's back
            block.pristine = None

    def announce(self, pin_all: bool | None = None) -> None:
        pass

    def register_destination_ram(self, ram: object) -> None:  # pragma: no cover - source side
        pass

    def write_pages(self, block: RamBlock, offsets: np.ndarray) -> int:
        dst = self.dst[block.name].data
        for off in offsets.tolist():
            dst[off:off + PAGE_SIZE] = block.data[off:off + PAGE_SIZE]
        return len(offsets) * PAGE_SIZE

    def fence(self) -> None:
        pass


def test_remote_placement_second_pass_clears_pages_that_became_zero() -> None:
    """Regression (review): the first pass must not encode unsent ZERO records, or the
    second pass's CONTINUE points at a block the stream never named."""
    a = RamBlock.anonymous("a", 8 * PAGE_SIZE)
    b = RamBlock.anonymous("b", 8 * PAGE_SIZE)
    a.data[:] = 1
    b.data[PAGE_SIZE:] = 2  # page 0 of b is zero
    src = GuestRam([a, b])
    dst = GuestRam([RamBlock.anonymous("a", 8 * PAGE_SIZE), RamBlock.anonymous("b", 8 * PAGE_SIZE)])
    tx, rx = channel_pair()
    tx.page_placement = _WrittenElsewhere(dst)  # type: ignore[assignment]
    loader = Loader(rx, ram=dst)
    thread = start_load_thread(loader)
    sender = Sender(tx, src, DeviceSet.empty())
    sender.start()
    for block in src:
        sender.send_pages(block, [(0, block.pages)])
    sender.close_section()
    sender.first_pass = False
    b.data[3 * PAGE_SIZE:4 * PAGE_SIZE] = 0  # became zero: must be cleared at the destination
    sender.send_page_list(b, np.array([3]))
    sender.close_section()
    sender.finish()
    tx.close()
    result = thread.join(30)
    rx.close()
    assert result.ram.digest() == src.digest()


class _OrderedPlacement(_WrittenElsewhere):
    """Follows real RDMA placement's ordering contract (mignet/rdma/placement.py): before a
    WRITE, wait until the destination's loader has processed every stream byte sent so
    far. "Processed" is what the RDMA channel reports too: bytes read before the loader's
    latest read call (the loader applies everything buffered before it reads again).
    ``ordered=False`` writes at once: the bug the contract prevents."""

    def __init__(self, dst: GuestRam, tx: SocketChannel, rx: SocketChannel, ordered: bool) -> None:
        super().__init__(dst)
        self.ordered = ordered
        self._sent = self._read = self._processed = 0
        read, write = rx.read_some_into, tx.writev_all

        def counting_read(bufs: Any) -> int:
            self._processed = self._read
            n = read(bufs)
            self._read += n
            return n

        def counting_write(bufs: Any) -> int:
            n = write(bufs)
            self._sent += n
            return n
        rx.read_some_into = counting_read  # type: ignore[method-assign]
        tx.writev_all = counting_write  # type: ignore[method-assign]

    def write_pages(self, block: RamBlock, offsets: np.ndarray) -> int:
        if self.ordered:
            target = self._sent  # stream bytes only: pages written here never travel in it
            deadline = time.monotonic() + 20
            while self._processed < target:
                assert time.monotonic() < deadline, "the loader never caught up"
                time.sleep(0.001)
        return super().write_pages(block, offsets)


@pytest.mark.parametrize("ordered", [True, False])
def test_zero_record_never_wipes_a_later_remote_write(ordered: bool) -> None:
    """Round 2: page 3 became zero and travels as a ZERO record in the stream; round 3:
    it holds data again and is written into the destination's RAM directly. Applied
    after that write, the old ZERO record would wipe it. With the ordering contract the
    RAM arrives intact; without it (and a loader that is late), the test sees the wipe."""
    b = RamBlock.anonymous("b", 8 * PAGE_SIZE)
    b.data[:] = 2
    src = GuestRam([b])
    dst = GuestRam([RamBlock.anonymous("b", 8 * PAGE_SIZE)])
    tx, rx = channel_pair()
    placement = _OrderedPlacement(dst, tx, rx, ordered)
    tx.page_placement = placement  # type: ignore[assignment]
    loader = Loader(rx, ram=dst)
    thread = start_load_thread(loader) if ordered else None  # unordered: the loader is late
    sender = Sender(tx, src, DeviceSet.empty())
    sender.start()
    sender.send_pages(b, [(0, b.pages)])
    sender.close_section()
    sender.first_pass = False
    b.data[3 * PAGE_SIZE:4 * PAGE_SIZE] = 0  # round 2: a ZERO record
    sender.send_page_list(b, np.array([3]))
    sender.close_section()
    b.data[3 * PAGE_SIZE:4 * PAGE_SIZE] = 7  # round 3: data again, written directly
    sender.send_page_list(b, np.array([3]))
    sender.close_section()
    sender.finish()
    tx.close()
    if thread is None:
        thread = start_load_thread(loader)
    result = thread.join(30)
    rx.close()
    page3 = result.ram["b"].data[3 * PAGE_SIZE:4 * PAGE_SIZE]
    if ordered:
        assert result.ram.digest() == src.digest()
    else:
        assert not page3.any(), "the late ZERO record should have wiped the direct write"
