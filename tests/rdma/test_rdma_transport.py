"""The RDMA channel and page placement on a real device (soft-RoCE in the guest harness).

Both ends run in this process on the one rxe device, in two threads, as QEMU's source and
destination would in two processes; the CLI tests use separate processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from mignet.channel import ShutdownHow
from mignet.errors import ConnectionLostError, MigrationCancelled
from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam
from mignet.migration.loadvm import Loader, LoadResult, start_load_thread
from mignet.migration.savevm import Sender, range_pages
from mignet.transport import connect, listen

pytestmark = pytest.mark.rdma
MiB = 1 << 20


def pair(uri: str) -> tuple[Any, Any]:
    """Connect a source channel to a destination channel over ``uri``."""
    listener = listen(uri)
    box: dict[str, object] = {}

    def accept() -> None:
        try:
            box["dst"] = listener.accept(timeout=30)
        except BaseException as exc:  # noqa: BLE001 - reported below
            box["err"] = exc
    t = threading.Thread(target=accept)
    t.start()
    src = connect(uri, timeout=30)
    t.join(30)
    listener.close()
    if "err" in box:
        raise box["err"]  # type: ignore[misc]
    return src, box["dst"]


def test_connection_carries_bytes_both_ways_and_ends_cleanly(rdma_uri: str) -> None:
    src, dst = pair(rdma_uri)
    assert src.page_placement is not None and dst.page_placement is not None
    payload = np.random.default_rng(1).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    got = bytearray(len(payload))
    reader = threading.Thread(target=dst.read_into, args=(got,))
    reader.start()
    src.write_all(payload)  # more than the whole credit window of 32 KiB messages
    reader.join(60)
    assert bytes(got) == payload
    dst.write_all(b"pong")
    assert src.read_exactly(4) == b"pong"
    src.shutdown(ShutdownHow.WRITE)
    assert dst.read_into(bytearray(1)) == 0  # clean end of stream
    src.close()
    # the peer's close is then seen as a disconnect by a waiting reader, not a hang (a
    # write may still be accepted or may already see it: either is fine, the read decides)
    try:
        dst.write_all(b"x" * 10)
    except ConnectionLostError:
        pass
    with pytest.raises(ConnectionLostError):
        dst.read_exactly(1)
    dst.close()


def migrate(uri: str, ram: GuestRam, *, pin_all: bool = False,
            second_pass: Callable[[Sender], None] | None = None) -> tuple[LoadResult, Sender]:
    """Run a Loader thread against a Sender over RDMA; returns (result, sender)."""
    src, dst = pair(uri)
    loader = Loader(dst, devices=DeviceSet.empty())
    thread = start_load_thread(loader)
    sender = Sender(src, ram, DeviceSet.example(3), rdma_pin_all=pin_all)
    if second_pass is None:
        sender.run()
    else:
        sender.start()
        for block in ram:
            sender.send_pages(block, range_pages(block))
        sender.close_section()
        second_pass(sender)
        sender.finish()
    result = thread.join(120)
    # the destination registered as the source asked (QEMU's rdma-pin-all)
    assert dst.placement.pin_all == pin_all
    chunks = len(dst.placement._dst_chunks)
    assert chunks == 0 if pin_all else chunks > 0
    src.close()
    dst.close()
    return result, sender


@pytest.mark.parametrize("pin_all", [True, False], ids=["pin-all", "chunks"])
def test_pages_land_in_numpy_ram_bit_exact_zero_pages_skipped(rdma_uri: str, pin_all: bool) -> None:
    ram = GuestRam.generate(32 * MiB, "mixed", seed=4)
    block = ram["pc.ram"]
    zero = int(block.zero_mask().sum())
    assert zero > 0
    result, sender = migrate(rdma_uri, ram, pin_all=pin_all)
    assert result.ram.digest() == ram.digest()
    assert np.array_equal(result.ram["pc.ram"].data, block.data)
    placement: Any = sender.placement
    # zero pages were neither written nor sent: only data pages crossed, in coalesced writes
    assert placement.bytes_written == (block.pages - zero) * 4096
    assert placement.writes < (block.pages - zero) // 4
    assert result.stats.zero_pages == 0  # no ZERO records in a first pass
    assert sender.stats.transferred < ram.total  # stream bytes + written pages, no zeros
    assert result.devices.state_equal(DeviceSet.example(3))
    # progress: the destination counted what the source reported as landed
    assert result.stats.placed_bytes == placement.bytes_written
    assert result.stats.ram_done == placement.bytes_written


def test_second_pass_clears_page_that_became_zero(rdma_uri: str) -> None:
    ram = GuestRam.generate(16 * MiB, "random", seed=9)
    block = ram["pc.ram"]
    zeroed = [5, 6, 700, 4095]

    def second(sender: Sender) -> None:
        block.page_words(0)[zeroed] = 0  # these became zero since the first pass
        block.data[4096 * 10:4096 * 12] = 0x5A  # and these changed
        sender.first_pass = False
        for first in (0, 512, 3584):  # dirty batches, as a live round would send them
            sender.send_pages(block, [(first, 512)])
        sender.close_section()
    result, _ = migrate(rdma_uri, ram, second_pass=second)
    got = result.ram["pc.ram"]
    assert not got.page_words(0)[zeroed].any()
    assert result.stats.zero_pages >= len(zeroed)
    assert got.digest() == block.digest()


def test_cancel_source_and_destination(rdma_uri: str) -> None:
    ram = GuestRam.generate(64 * MiB, "random", seed=2)
    src, dst = pair(rdma_uri)
    loader = Loader(dst, devices=DeviceSet.empty())
    thread = start_load_thread(loader)
    sender = Sender(src, ram, DeviceSet.empty(), max_bandwidth=8 * MiB)
    box: dict[str, BaseException] = {}

    def run() -> None:
        try:
            sender.run()
        except BaseException as exc:  # noqa: BLE001
            box["err"] = exc
    t = threading.Thread(target=run)
    t.start()
    time.sleep(1.5)
    t0 = time.monotonic()
    sender.cancel()
    t.join(20)
    assert not t.is_alive()
    assert isinstance(box.get("err"), MigrationCancelled), box
    with pytest.raises(ConnectionLostError):  # the destination sees the source go
        thread.join(20)
    assert time.monotonic() - t0 < 10
    src.close()
    dst.close()

    # cancelling an incoming migration that waits for data wakes it at once
    src, dst = pair(rdma_uri.rsplit(":", 1)[0] + f":{int(rdma_uri.rsplit(':', 1)[1]) + 1}")
    loader = Loader(dst, devices=DeviceSet.empty())
    thread = start_load_thread(loader)
    time.sleep(0.5)
    loader.cancel()
    with pytest.raises(MigrationCancelled):
        thread.join(10)
    src.close()
    dst.close()


def test_destination_memlock_below_guest_ram_fails_with_the_fix(rdma_uri: str) -> None:
    """The destination checks RLIMIT_MEMLOCK before pinning the RAM the stream announces
    (in either registration mode); the source then fails instead of hanging."""
    import resource

    from mignet.errors import SetupError

    src, dst = pair(rdma_uri)
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    resource.setrlimit(resource.RLIMIT_MEMLOCK, (8 * MiB, hard))
    try:
        thread = start_load_thread(Loader(dst, devices=DeviceSet.empty()))
        sender = Sender(src, GuestRam.generate(32 * MiB, "random", seed=1), DeviceSet.empty())
        box: dict[str, BaseException | None] = {}
        t = threading.Thread(target=lambda: box.setdefault("err", _raises(sender.run)))
        t.start()
        with pytest.raises(SetupError, match=r"^RLIMIT_MEMLOCK is 8388608: raise it with ulimit -l unlimited"):
            thread.join(60)
        dst.close()
        t.join(30)
        assert not t.is_alive()
        # The source fails too, and says why: the connection went, or (sharing this
        # process's limit) its own registration, which overlaps the wait for the block list.
        err = box.get("err")
        assert isinstance(err, ConnectionLostError) or (
            isinstance(err, SetupError) and str(err).startswith("RLIMIT_MEMLOCK is 8388608")), box
    finally:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard))
        src.close()


def _raises(fn: Callable[[], object]) -> BaseException | None:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001
        return exc
    return None
