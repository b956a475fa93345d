"""Multifd (QEMU 7.2's ``multifd`` capability), receive side: the sans-I/O codec of the
channels' init record and packet header, a scripted multifd source over real sockets, and
real QEMU 7.2 with 2 and 4 channels into ``mignet recv``."""

from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mignet.errors import ConnectionLostError, ProtocolError
from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam, RamBlock, block_filename
from mignet.migration.loadvm import Loader
from mignet.migration.multifd import MultifdReceiver
from mignet.tcp import listen_socket
from mignet.uri import parse_uri
from mignet.wire import PAGE_SIZE
from mignet.wire.multifd import (
    FLAG_SYNC,
    HEADER_SIZE,
    INIT_SIZE,
    PACKET_LEN,
    PACKET_PAGES,
    ChannelInit,
    build_init,
    build_packet,
    check_offsets,
    parse_init,
    parse_packet,
)
from tests.support.cli import start_recv
from tests.support.qemu_peer import QemuSource, qemu_skip_reason

UUID = uuid.UUID("12345678-1234-5678-1234-567812345678").bytes


# --- the codec ---------------------------------------------------------------------------
def test_sizes_match_qemu_7_2() -> None:
    assert (INIT_SIZE, HEADER_SIZE, PACKET_PAGES, PACKET_LEN) == (64, 320, 128, 1344)


def test_init_round_trip_and_layout() -> None:
    raw = build_init(UUID, 3)
    assert len(raw) == 64 and raw[:8] == bytes.fromhex("1122334400000001") and raw[24] == 3
    assert raw[8:24] == UUID and raw[25:] == bytes(39)
    init = parse_init(raw)
    assert init == ChannelInit(UUID, 3)
    assert init.uuid_text == "12345678-1234-5678-1234-567812345678"


@pytest.mark.parametrize(("raw", "message"), [
    (b"GET / HTTP/1.1\r\n" + bytes(48), "not a QEMU multifd channel"),
    (struct.pack(">II", 0x11223344, 2) + bytes(56), "version 2, expected 1"),
    (build_init(UUID, 0)[:63], "64 bytes, got 63"),
])
def test_init_errors(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_init(raw)


def test_packet_round_trip_and_layout() -> None:
    raw = build_packet(block="m0", offsets=[0, 4096, 12288], flags=FLAG_SYNC, packet_num=9)
    assert len(raw) == 1344
    magic, version, flags, alloc, normal, nxt, num = struct.unpack_from(">IIIIIIQ", raw)
    assert (magic, version, flags, alloc, normal, nxt, num) == (0x11223344, 1, 1, 128, 3, 3 * 4096, 9)
    assert raw[32:64] == bytes(32) and raw[64:66] == b"m0" and raw[66:320] == bytes(254)
    assert struct.unpack_from(">3Q", raw, 320) == (0, 4096, 12288)
    pkt = parse_packet(raw)
    assert pkt.sync and pkt.block == "m0" and pkt.packet_num == 9 and pkt.payload_size == 3 * 4096
    assert pkt.offsets.tolist() == [0, 4096, 12288]
    sync = parse_packet(build_packet(flags=FLAG_SYNC))  # QEMU's SYNC: no pages, any name
    assert sync.sync and sync.normal_pages == 0 and sync.block == ""


def _patched(raw: bytes, offset: int, fmt: str, value: int) -> bytes:
    buf = bytearray(raw)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


GOOD = build_packet(block="m0", offsets=[0, 4096])


@pytest.mark.parametrize(("raw", "message"), [
    (_patched(GOOD, 0, ">I", 0x5145564D), "packet magic 0x5145564d, expected 0x11223344"),
    (_patched(GOOD, 4, ">I", 7), "packet version 7"),
    (_patched(GOOD, 8, ">I", 1 << 1), "compressed with zlib.*multifd-compression to none"),
    (_patched(GOOD, 8, ">I", 2 << 1), "compressed with zstd"),
    (_patched(GOOD, 12, ">I", 129), "129 page slots, at most 128"),
    (_patched(GOOD, 16, ">I", 129), "129 pages but has 128 slots"),
    (build_packet(block="", offsets=[0]), "names no RAM block"),
    (build_packet(block="m0")[:-1], "1344 bytes, got 1343"),
])
def test_packet_errors(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        parse_packet(raw)


@pytest.mark.parametrize(("offsets", "message"), [
    ([0, 4097], "0x1001 .* is not page-aligned"),
    ([0, 1 << 20], "0x100000 .* lies outside the block"),
    ([1 << 63], "lies outside the block"),
])
def test_offsets_checked_against_the_block(offsets: list[int], message: str) -> None:
    pkt = parse_packet(build_packet(block="m0", offsets=offsets))
    with pytest.raises(ProtocolError, match=message):
        check_offsets(pkt, 1 << 20)
    check_offsets(parse_packet(build_packet(block="m0", offsets=[0, (1 << 20) - 4096])), 1 << 20)


# --- a scripted multifd source over real sockets -----------------------------------------
@pytest.fixture
def receiver() -> Iterator[tuple[MultifdReceiver, str, list[str]]]:
    listener = listen_socket(parse_uri("tcp:127.0.0.1:0"))
    refused: list[str] = []
    # Margins for a loaded machine: a channel connected before the first sync must be
    # classified before it, or it is refused as late (and its next send breaks the pipe).
    rx = MultifdReceiver(listener, on_refused=refused.append, settle_timeout=10.0, classify_timeout=10.0)
    yield rx, str(listener.address), refused
    rx.close()


def _load(rx: MultifdReceiver) -> tuple[threading.Thread, dict[str, object]]:
    box: dict[str, object] = {}

    def body() -> None:
        try:
            ch = rx.accept_main(timeout=10)
            loader = Loader(ch, devices=DeviceSet.empty())
            rx.attach(loader)
            try:
                box["result"] = loader.run()
            except Exception:
                rx.raise_error()
                raise
            rx.finish(box["result"].stats)  # type: ignore[attr-defined]
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            box["error"] = exc
    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, box


def _raw_main(ram: GuestRam, zero_pages: list[int], rounds: int) -> list[bytes]:
    """A main stream as 7.2 writes it with multifd: header + setup (with its EOS), then
    ``rounds`` RAM sections holding only ZERO records and EOS, then EOF."""
    name = next(iter(ram)).name.encode()
    size = next(iter(ram)).size
    head = struct.pack(">IIBI", 0x5145564D, 3, 0x07, 13) + b"pc-i440fx-7.2"
    setup = (struct.pack(">BI", 0x01, 2) + bytes([3]) + b"ram" + struct.pack(">II", 0, 4)
             + struct.pack(">Q", size | 0x04) + bytes([len(name)]) + name + struct.pack(">Q", size)
             + struct.pack(">Q", 0x10) + struct.pack(">BI", 0x7E, 2))
    parts = [head + setup]
    for r in range(rounds):
        kind = 0x03 if r == rounds - 1 else 0x02
        body = b""
        for j, off in enumerate(zero_pages if r == rounds - 1 else []):
            body += struct.pack(">Q", off | 0x02 | (0x20 if j else 0))
            body += (b"" if j else bytes([len(name)]) + name) + b"\0"
        parts.append(struct.pack(">BI", kind, 2) + body + struct.pack(">Q", 0x10)
                     + struct.pack(">BI", 0x7E, 2))
    parts[-1] += b"\x00"  # EOF
    return parts


def _send_packets(s: socket.socket, ram: GuestRam, offs: list[int], num: int, sync: bool = False) -> None:
    block = next(iter(ram))
    payload = b"".join(block.data[o:o + PAGE_SIZE].tobytes() for o in offs)
    s.sendall(build_packet(block=block.name, offsets=offs, packet_num=num,
                           flags=FLAG_SYNC if sync else 0) + payload)


def _sync(s: socket.socket, num: int) -> None:
    s.sendall(build_packet(flags=FLAG_SYNC, packet_num=num))


def _source_ram(pages: int = 256) -> GuestRam:
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, pages * PAGE_SIZE, dtype=np.uint8)
    return GuestRam([RamBlock("m0", data)])


def _connect(addr: str) -> socket.socket:
    host, port = addr.removeprefix("tcp:").rsplit(":", 1)
    return socket.create_connection((host, int(port)))


def test_scripted_source_two_channels_with_resent_pages(receiver: tuple[MultifdReceiver, str, list[str]]) -> None:
    """Channels connect (one even before the main stream), pages arrive in two rounds on
    both channels, some re-sent with new contents in round 2, then zero pages on main."""
    rx, addr, refused = receiver
    src = _source_ram()
    final = src["m0"].data.copy()
    zero = [200 * PAGE_SIZE, 201 * PAGE_SIZE]
    final[zero[0]:zero[1] + PAGE_SIZE] = 0
    c0 = _connect(addr)
    c0.sendall(build_init(UUID, 0))
    t, box = _load(rx)
    main = _connect(addr)
    c1 = _connect(addr)
    c1.sendall(build_init(UUID, 1))
    parts = _raw_main(src, zero, rounds=2)
    main.sendall(parts[0][:40])  # header and a bit: blocks not yet announced
    # round 0 (setup): SYNC only; the packets may come before the block list
    _sync(c0, 0)
    _sync(c1, 1)
    main.sendall(parts[0][40:])
    # round 1: stale versions of pages 10..19 on c1, the rest split between channels
    stale = _source_ram()
    stale["m0"].data[:] = 0xAB
    _send_packets(c0, src, [o * PAGE_SIZE for o in range(0, 10)], 2)
    c1.sendall(build_packet(block="m0", offsets=[o * PAGE_SIZE for o in range(10, 20)], packet_num=3)
               + bytes([0xAB]) * (10 * PAGE_SIZE))
    _send_packets(c0, src, [o * PAGE_SIZE for o in range(20, 148)], 4)
    _send_packets(c1, src, [o * PAGE_SIZE for o in [150, 149, 148, 199, 160]], 5, sync=True)  # pages and SYNC
    _sync(c0, 6)
    main.sendall(parts[1])
    # round 2: the real pages 10..19 (re-sent), the rest, then main's zero pages
    _send_packets(c0, src, [o * PAGE_SIZE for o in range(10, 20)], 7)
    _send_packets(c1, src, [o * PAGE_SIZE for o in range(150, 256) if o not in (160, 199, 200, 201)], 8)
    _sync(c0, 9)
    _sync(c1, 10)
    # stray connections in the middle: refused, the migration goes on
    stray_http = _connect(addr)
    stray_http.sendall(b"GET / HTTP/1.1\r\n\r\n")
    stray_uuid = _connect(addr)
    stray_uuid.sendall(build_init(bytes(16), 2))
    deadline = time.monotonic() + 10
    while len(refused) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    main.sendall(parts[2])
    c0.close()
    c1.close()
    main.close()
    t.join(20)
    assert "error" not in box, box.get("error")
    ram = box["result"].ram  # type: ignore[attr-defined]
    assert np.array_equal(ram["m0"].data, final)
    assert box["result"].stats.normal_pages == 10 + 10 + 128 + 5 + 10 + 102  # type: ignore[attr-defined]
    stray_http.close()
    stray_uuid.close()
    assert any("neither a migration stream nor a multifd channel" in r for r in refused), refused
    assert any("arrived after the first RAM sync" in r or "UUID 00000000" in r for r in refused), refused
    assert rx.describe()["channels"] == 2 and rx.describe()["syncs"] == 3


def _setup_two(addr: str, src: GuestRam, rx: MultifdReceiver) -> tuple[socket.socket, list[socket.socket],
                                                                   list[bytes], threading.Thread, dict[str, object]]:
    t, box = _load(rx)
    main = _connect(addr)
    chans = [_connect(addr) for _ in range(2)]
    return main, chans, _raw_main(src, [], rounds=1), t, box


@pytest.mark.parametrize(("bad", "message"), [
    ("block", "multifd channel 1: packet 5 names RAM block 'nope', which the main stream did not announce"),
    ("offset", "multifd channel 1: packet 5 page offset 0x100000 in RAM block 'm0' .* lies outside"),
    ("magic", "multifd channel 1: packet magic 0x00000000"),
    ("truncated", "multifd channel 1: .*closed"),
])
def test_a_bad_channel_fails_the_whole_load(receiver: tuple[MultifdReceiver, str, list[str]],
                                            bad: str, message: str) -> None:
    rx, addr, _ = receiver
    src = _source_ram()
    main, chans, parts, t, box = _setup_two(addr, src, rx)
    for i, c in enumerate(chans):
        c.sendall(build_init(UUID, i))
        _sync(c, i)
    main.sendall(parts[0])
    if bad == "block":
        chans[1].sendall(build_packet(block="nope", offsets=[0], packet_num=5) + bytes(PAGE_SIZE))
    elif bad == "offset":
        chans[1].sendall(build_packet(block="m0", offsets=[1 << 20], packet_num=5) + bytes(PAGE_SIZE))
    elif bad == "magic":
        chans[1].sendall(bytes(PACKET_LEN))
    else:
        chans[1].sendall(build_packet(block="m0", offsets=[0, 4096], packet_num=5) + bytes(100))
        chans[1].shutdown(socket.SHUT_WR)
    t.join(20)
    assert not t.is_alive()
    err = box.get("error")
    assert isinstance(err, ProtocolError | ConnectionLostError), err
    assert re.search(message, str(err)), str(err)
    for s in [main, *chans]:
        s.close()


def test_duplicate_channel_id_is_refused(receiver: tuple[MultifdReceiver, str, list[str]]) -> None:
    rx, addr, refused = receiver
    src = _source_ram(8)
    main, chans, parts, t, box = _setup_two(addr, src, rx)
    chans[0].sendall(build_init(UUID, 0))
    deadline = time.monotonic() + 5
    while rx.channel_count < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    chans[1].sendall(build_init(UUID, 0))  # a second channel 0: refused, not fatal
    while not refused and time.monotonic() < deadline:
        time.sleep(0.01)
    assert refused and "multifd channel id 0 is already connected" in refused[0]
    _sync(chans[0], 0)
    main.sendall(parts[0])
    _send_packets(chans[0], src, [o * PAGE_SIZE for o in range(8)], 1)
    _sync(chans[0], 2)
    main.sendall(parts[1])
    main.shutdown(socket.SHUT_WR)
    t.join(20)
    assert "error" not in box, box.get("error")
    assert np.array_equal(box["result"].ram["m0"].data, src["m0"].data)  # type: ignore[attr-defined]
    for s in [main, *chans]:
        s.close()


def test_the_migration_stream_is_main_even_when_junk_connects_right_after_it() -> None:
    """Connections are classified in parallel: a stranger that connects just after the real
    source (and speaks junk) must not win the race to be taken as the main stream, and the
    source then be refused as "a second migration stream" (seen in about 1 run in 7 of the
    scripted-source test). Junk is the main stream only when no earlier connection is
    still being classified."""
    for _ in range(30):
        listener = listen_socket(parse_uri("tcp:127.0.0.1:0"))
        refused: list[str] = []
        rx = MultifdReceiver(listener, on_refused=refused.append, classify_timeout=10.0)
        try:
            main = _connect(str(listener.address))
            junk = _connect(str(listener.address))
            main.sendall(b"QEVM\x00\x00\x00\x03")
            junk.sendall(b"GET / HTTP/1.1\r\n\r\n")
            ch = rx.accept_main(timeout=10)
            assert ch.peek(4) == b"QEVM", refused
            deadline = time.monotonic() + 10
            while not refused and time.monotonic() < deadline:
                time.sleep(0.005)
            assert len(refused) == 1 and "neither a migration stream" in refused[0], refused
            main.close()
            junk.close()
        finally:
            rx.close()


def test_plain_stream_unaffected_and_first_junk_connection_is_the_error(
        receiver: tuple[MultifdReceiver, str, list[str]]) -> None:
    rx, addr, _ = receiver
    t, box = _load(rx)
    with _connect(addr) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        t.join(20)
    assert "not a migration stream" in str(box.get("error")), box


# --- real QEMU 7.2 ------------------------------------------------------------------------
qemu = pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")


def _qemu_multifd_into_recv(mignet_cmd: list[str], env: dict[str, str], tmp_path: Path, channels: int,
                            stray: bool = False) -> tuple[dict[str, object], list[dict[str, object]]]:
    out = tmp_path / "received"
    recv, uri = start_recv(mignet_cmd, env, "--out", str(out))
    with QemuSource(tmp_path, mem_mib=256, fill="random", seed=11) as src:
        strays: list[socket.socket] = []
        if stray:
            # before QEMU connects nothing is refused yet; these come while it migrates
            src.set_capabilities(multifd=True)
            src.set_parameters(multifd_channels=channels, max_bandwidth=64 << 20)
            src.qmp("migrate", {"uri": uri})
            time.sleep(0.5)
            s1 = _connect(uri)
            s1.sendall(b"GET / HTTP/1.1\r\n\r\n")
            s2 = _connect(uri)
            s2.sendall(build_init(bytes(range(16)), 0))
            strays = [s1, s2]
            src.set_parameters(max_bandwidth=1 << 40)
            info = src.wait_migration(timeout=180)
        else:
            info = src.migrate(uri, capabilities={"multifd": True},
                               parameters={"multifd_channels": channels}, timeout=180)
        assert info["status"] == "completed"
        stdout, stderr = recv.communicate(timeout=120)
        for s in strays:
            s.close()
        assert recv.returncode == 0, stderr
        source = np.fromfile(src.image_path, np.uint8)
    received = np.fromfile(out / block_filename("m0"), np.uint8)
    assert received.size == 256 << 20
    assert np.array_equal(received, source)
    events = [json.loads(line) for line in stdout.strip().splitlines()]
    return events[-1], events


@pytest.mark.qemu
@qemu
@pytest.mark.parametrize("channels", [2, 4])
def test_real_qemu_multifd_lands_byte_identical(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                tmp_path: Path, channels: int) -> None:
    done, _ = _qemu_multifd_into_recv(mignet_cmd, subprocess_env, tmp_path, channels)
    stats = done["stats"]
    assert isinstance(stats, dict)
    assert stats["multifd"]["channels"] == channels
    assert stats["normal_pages"] >= (256 << 20) // PAGE_SIZE  # random RAM: every page is data
    assert stats["device_sections"] > 20


@pytest.mark.qemu
@qemu
def test_real_qemu_multifd_survives_stray_connections(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                      tmp_path: Path) -> None:
    done, events = _qemu_multifd_into_recv(mignet_cmd, subprocess_env, tmp_path, 2, stray=True)
    refused = [e["reason"] for e in events if e.get("event") == "refused"]
    assert len(refused) == 2, events
    assert any("neither a migration stream nor a multifd channel" in str(r) for r in refused)
    assert any("UUID 00010203-0405-0607-0809-0a0b0c0d0e0f" in str(r) or "after the first RAM sync" in str(r)
               for r in refused)
    assert done["stats"]["multifd"]["channels"] == 2  # type: ignore[index]



def test_sync_happens_at_the_eos_record_before_its_footer(receiver: tuple[MultifdReceiver, str, list[str]]) -> None:
    """QEMU 7.2 flushes a section's footer only after the next round's SYNCs, so the
    barrier must open at the EOS record itself (as multifd_recv_sync_main does)."""
    rx, addr, _ = receiver
    src = _source_ram(8)
    main, chans, parts, t, box = _setup_two(addr, src, rx)
    for i, c in enumerate(chans):
        c.sendall(build_init(UUID, i))
        _sync(c, i)
    main.sendall(parts[0][:-5])  # everything up to the setup's EOS, not its footer
    deadline = time.monotonic() + 10
    while rx.describe()["syncs"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rx.describe()["syncs"] == 1
    _send_packets(chans[1], src, [o * PAGE_SIZE for o in range(8)], 2)
    for i, c in enumerate(chans):
        _sync(c, 3 + i)
    main.sendall(parts[0][-5:] + parts[1])
    main.shutdown(socket.SHUT_WR)
    t.join(20)
    assert "error" not in box, box.get("error")
    assert np.array_equal(box["result"].ram["m0"].data, src["m0"].data)  # type: ignore[attr-defined]
    for s in [main, *chans]:
        s.close()
