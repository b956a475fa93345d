"""The sans-I/O codec: round trips (property-based) and precise errors for bad streams."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mignet.errors import ProtocolError
from mignet.guest.devices import KNOWN_DEVICES, DeviceSet
from mignet.guest.ram import GuestRam, RamBlock
from mignet.wire import (
    NEED_DATA,
    PAGE_SIZE,
    DeviceState,
    EndOfStream,
    RamBlocks,
    RamPage,
    RamZero,
    StreamDecoder,
    StreamEncoder,
    StreamFinished,
    VMDescription,
    match_page_run,
)
from tests.support.streams import encode_stream


def decode_all(data: bytes, chunk: int | list[int] = 1 << 20,
               rdma_hooks: bool = False) -> tuple[list[Any], dict[str, np.ndarray]]:
    """Feed ``data`` in chunks; place page payloads via the decoder's payload API."""
    dec = StreamDecoder(devices=KNOWN_DEVICES)
    dec.rdma_hooks = rdma_hooks
    sizes = chunk if isinstance(chunk, list) else [chunk]
    pos = i = 0
    events: list[object] = []
    ram: dict[str, np.ndarray] = {}
    page: RamPage | None = None
    while True:
        ev = dec.next_event()
        if ev is NEED_DATA:
            if dec.payload_left:
                assert page is not None
                dest = ram[page.block].data[page.offset + PAGE_SIZE - dec.payload_left:page.offset + PAGE_SIZE]
                if dec.buffered:
                    dec.take_payload_into(dest)
                    continue
                n = min(len(dest), len(data) - pos, sizes[i % len(sizes)])
                if n == 0:
                    dec.receive_eof()
                    continue
                dest[:n] = data[pos:pos + n]
                pos += n
                i += 1
                dec.payload_placed(n)
                continue
            if pos >= len(data):
                dec.receive_eof()
                continue
            n = sizes[i % len(sizes)]
            dec.receive_data(data[pos:pos + n])
            pos += n
            i += 1
            continue
        events.append(ev)
        if isinstance(ev, RamBlocks):
            ram = {name: np.zeros(size, np.uint8) for name, size in ev.blocks}
        elif isinstance(ev, RamPage):
            page = ev
        elif isinstance(ev, RamZero):
            ram[ev.block][ev.offset:ev.offset + PAGE_SIZE] = ev.fill
        elif isinstance(ev, StreamFinished):
            return events, ram


def two_block_ram(pages: list[int], seed: int) -> GuestRam:
    """Two blocks; ``pages`` says per page of block 'a': 0 zero, 1 random."""
    rng = np.random.default_rng(seed)
    a = RamBlock.anonymous("a", max(1, len(pages)) * PAGE_SIZE)
    for i, kind in enumerate(pages):
        if kind:
            a.data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = rng.integers(1, 255, PAGE_SIZE, dtype=np.uint8)
    b = RamBlock.anonymous("/rom@etc/b", 2 * PAGE_SIZE)
    b.data[:PAGE_SIZE] = 7
    return GuestRam([a, b])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pages=st.lists(st.integers(0, 1), min_size=1, max_size=40),
       chunks=st.lists(st.integers(1, 9000), min_size=1, max_size=6),
       seed=st.integers(0, 1000), shuffle=st.booleans())
def test_round_trip_any_pages_any_chunking(pages: list[int], chunks: list[int], seed: int, shuffle: bool) -> None:
    ram = two_block_ram(pages, seed)
    order = [(b.name, i) for b in ram for i in range(b.pages)]
    if shuffle:
        np.random.default_rng(seed).shuffle(order)  # blocks interleave: names vs CONTINUE
    devices = DeviceSet.example(seed)
    data = encode_stream(ram, devices, order)
    events, out = decode_all(data, chunks)
    for block in ram:
        assert np.array_equal(out[block.name], block.data)
    devs = [e for e in events if isinstance(e, DeviceState)]
    assert [d.idstr for d in devs] == [d.idstr for d in devices.devices]
    assert all(d.fields == dev.values for d, dev in zip(devs, devices.devices, strict=True))
    assert isinstance(events[-3], EndOfStream) and isinstance(events[-2], VMDescription)
    zeros = sum(isinstance(e, RamZero) for e in events)
    assert zeros == sum(int(b.zero_mask().sum()) for b in ram)


def test_match_page_run() -> None:
    words = (np.arange(5, dtype=np.uint64) * PAGE_SIZE + 0x1000 + 0x28).astype(">u8")
    assert match_page_run(words, 0x1000) == 5
    words[3] = 0x1000 | 0x22  # a ZERO record breaks the run
    assert match_page_run(words, 0x1000) == 3
    assert match_page_run(words[:0], 0) == 0
    assert match_page_run(words, 0x2000) == 0


# --- malformed streams -------------------------------------------------------------
def good_stream() -> bytes:
    return encode_stream(two_block_ram([1, 0, 1], 1), DeviceSet.example(1))


def patch(data: bytes, find: bytes, replace: bytes, nth: int = 0) -> bytes:
    pos = -1
    for _ in range(nth + 1):
        pos = data.index(find, pos + 1)
    return data[:pos] + replace + data[pos + len(find):]


def page_word(offset: int, flags: int) -> bytes:
    return struct.pack(">Q", offset | flags)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: b"HTTP/1.1 200 OK\r\n" + d, "not a migration stream"),
    (lambda d: patch(d, b"QEVM\x00\x00\x00\x03", b"QEVM\x00\x00\x00\x02"), "unsupported stream version 2"),
    (lambda d: d[:8] + b"\x42" + d[9:], "unknown section type 0x42"),
    (lambda d: patch(d, page_word(0, 0x08), page_word(0, 0x48)), "XBZRLE"),
    (lambda d: patch(d, page_word(0, 0x08), page_word(0, 0x808)), "unknown RAM record flags"),
    (lambda d: patch(d, page_word(0, 0x08), page_word(0x100000, 0x08)), "outside block 'a'"),
    (lambda d: patch(d, b"\x01a", b"\x01z", 1), "unknown block 'z'"),
    (lambda d: patch(d, page_word(0, 0x08), page_word(0, 0x28)), "CONTINUE with no previous RAM block"),
    (lambda d: patch(d, b"\x7e\x00\x00\x00\x01", b"\x7e\x00\x00\x00\x09", 1), "bad section footer"),
    (lambda d: d + b"junk", "after the end of the stream"),
    (lambda d: patch(d, b"mignet-serial", b"mignet-seriaL")[:-300], "without EOF after device sections"),
])
def test_malformed_streams_raise_protocol_errors(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProtocolError, match=message):
        decode_all(mutate(good_stream()))


def with_hooks(data: bytes) -> bytes:
    """``data`` with a RAM_SAVE_FLAG_HOOK record before each RAM section's EOS, as QEMU's
    RDMA source writes them (its registration exchange runs there, beside the stream)."""
    eos, hook = page_word(0, 0x10), page_word(0, 0x80)
    return data.replace(eos, hook + eos)


def test_rdma_hook_records_only_on_an_rdma_stream() -> None:
    data = good_stream()
    hooked = with_hooks(data)
    assert hooked.count(page_word(0, 0x80)) == data.count(page_word(0, 0x10)) >= 2
    with pytest.raises(ProtocolError, match="RDMA hooks in a socket stream"):
        decode_all(hooked)
    for chunk in (1 << 20, 1, [3, 5, 8]):  # a hook split across reads, too
        events, ram = decode_all(hooked, chunk, rdma_hooks=True)
        plain_events, plain_ram = decode_all(data, chunk)
        assert events == plain_events
        assert all(np.array_equal(ram[k], plain_ram[k]) for k in plain_ram)
    with pytest.raises(ProtocolError, match="hook record with extra bits"):
        decode_all(data.replace(page_word(0, 0x10), page_word(0x1000, 0x80) + page_word(0, 0x10)),
                   rdma_hooks=True)


def test_mem_size_must_agree_with_the_block_list() -> None:
    data = good_stream()
    total = 5 * PAGE_SIZE
    bad = patch(data, struct.pack(">Q", total | 0x04), struct.pack(">Q", (total + PAGE_SIZE) | 0x04))
    with pytest.raises(ProtocolError):
        decode_all(bad)
    small = patch(data, struct.pack(">Q", total | 0x04), struct.pack(">Q", (total - PAGE_SIZE) | 0x04))
    with pytest.raises(ProtocolError, match="does not fit MEM_SIZE"):
        decode_all(small)


def test_max_ram_bound() -> None:
    dec = StreamDecoder(max_ram_bytes=PAGE_SIZE)
    dec.receive_data(good_stream())
    with pytest.raises(ProtocolError, match="raise --max-ram"):
        while dec.next_event() is not NEED_DATA:
            pass


def test_device_version_outside_range() -> None:
    data = patch(good_stream(), b"mignet-timer\x00\x00\x00\x00\x00\x00\x00\x03",
                 b"mignet-timer\x00\x00\x00\x00\x00\x00\x00\x01")
    with pytest.raises(ProtocolError, match="versions 2..3"):
        decode_all(data)


def test_older_device_version_loads() -> None:
    """A version-1 mignet-cpu (before xcr0 existed) still loads."""
    from mignet.guest.devices import CPU

    enc = StreamEncoder()
    values = DeviceSet.example(0).devices[0].values
    body = CPU.encode(values, version_id=1)
    data = (enc.header() + enc.ram_start([("a", PAGE_SIZE)]) + enc.ram_section(True)
            + enc.zero_records("a", np.array([0], np.uint64)) + enc.ram_section_close()
            + enc.device_section("mignet-cpu/0", 0, 1, body) + enc.eof())
    events, _ = decode_all(data)
    dev = next(e for e in events if isinstance(e, DeviceState))
    assert dev.fields is not None
    assert "xcr0" not in dev.fields and dev.fields["rip"] == values["rip"]


def test_unknown_device_is_kept_raw_and_split_with_the_description() -> None:
    """Like real QEMU's devices: no layout known, bytes kept exactly, split by VMDESCRIPTION."""
    data = good_stream()
    renamed = patch(data, b"mignet-serial", b"mignet-seriaL")
    renamed = patch(renamed, b'"name": "mignet-serial"', b'"name": "mignet-seriaL"')
    events, _ = decode_all(renamed, [7, 100, 3])
    devs = [e for e in events if isinstance(e, DeviceState)]
    serial = next(d for d in devs if d.idstr == "mignet-seriaL")
    assert serial.fields is None and len(serial.raw) == 2 + 1 + 1 + 16
    assert [d.idstr for d in devs][-1] == "mignet-timer" and devs[-1].fields is None
    # Without the description, the footer scan still finds every section end.
    no_desc = renamed[:renamed.rindex(b"\x00\x06") + 1]
    events2, _ = decode_all(no_desc)
    assert [d.raw for d in events2 if isinstance(d, DeviceState)] == [d.raw for d in devs]


def test_unknown_device_tail_after_a_long_buffered_prefix() -> None:
    """Regression: the decoder trims its buffer as it goes; the tail of unknown device
    sections must still be split from the right offset (found in review)."""
    ram = GuestRam([RamBlock.anonymous("a", 4096 * PAGE_SIZE)])  # all zero: 4096 ZERO records
    ram["a"].data[:PAGE_SIZE] = 1
    data = encode_stream(ram, DeviceSet.example(2))
    renamed = patch(data, b"mignet-serial", b"mignet-seriaL")
    renamed = patch(renamed, b'"name": "mignet-serial"', b'"name": "mignet-seriaL"')
    for chunk in ([1 << 16], [4096, 9, 70000]):
        events, out = decode_all(renamed, chunk)
        assert [e.idstr for e in events if isinstance(e, DeviceState)][-2] == "mignet-seriaL"
        assert np.array_equal(out["a"], ram["a"].data)


def test_block_sizes_must_be_whole_pages() -> None:
    a, b = PAGE_SIZE + 1, 2 * PAGE_SIZE - 1  # the total is whole pages, the blocks are not
    data = (b"QEVM\x00\x00\x00\x03" + b"\x01" + struct.pack(">I", 0) + b"\x03ram" + struct.pack(">II", 0, 4)
            + struct.pack(">Q", (a + b) | 0x04) + b"\x01a" + struct.pack(">Q", a) + b"\x01b" + struct.pack(">Q", b))
    with pytest.raises(ProtocolError, match="not a whole number of pages"):
        decode_all(data)


def test_truncation_is_a_lost_connection_not_a_bad_stream() -> None:
    from mignet.errors import ConnectionLostError, StreamTruncatedError

    with pytest.raises(StreamTruncatedError) as info:
        decode_all(good_stream()[:-300])
    assert isinstance(info.value, ConnectionLostError) and not isinstance(info.value, ProtocolError)
