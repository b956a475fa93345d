"""Multifd (QEMU 7.2's ``multifd`` capability), source side: ``mignet send --channels N``
into ``mignet recv`` (digests equal, the pages travelled on the channels), a channel that
fails, the refusals, and real QEMU 7.2 as the destination of a captured guest."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from mignet.errors import ConnectionLostError
from mignet.guest.ram import RamBlock, block_filename
from mignet.migration.multifd import MultifdSender
from mignet.tcp.socket_channel import SocketChannel
from mignet.wire import PAGE_SIZE
from mignet.wire.multifd import INIT_SIZE, PACKET_LEN, PACKET_PAGES, parse_init, parse_packet
from tests.support.cli import one_line_error, start_recv
from tests.support.qemu_peer import QemuDestination, QemuSource, qemu_skip_reason
from tests.support.streams import reset_close


def _send(cmd: list[str], env: dict[str, str], uri: str, *extra: str,
          timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, "send", uri, "--json", "--quiet", *extra],
                          capture_output=True, text=True, env=env, timeout=timeout)


def _last_json(text: str) -> dict[str, object]:
    result: dict[str, object] = json.loads(text.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("channels", [2, 4])
def test_send_channels_into_recv(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                 channels: int) -> None:
    recv, uri = start_recv(mignet_cmd, subprocess_env)
    send = _send(mignet_cmd, subprocess_env, uri, "--size", "48M", "--fill", "mixed",
                 "--channels", str(channels))
    stdout, stderr = recv.communicate(timeout=60)
    assert send.returncode == 0, send.stderr
    assert recv.returncode == 0, stderr
    sent, got = _last_json(send.stdout), _last_json(stdout)
    assert sent["ram_digest"] == got["ram_digest"]
    stats = got["stats"]
    assert isinstance(stats, dict)
    mf = stats["multifd"]
    assert mf["channels"] == channels and mf["refused"] == []
    pages = {int(k): v for k, v in mf["pages"].items()}
    assert sorted(pages) == list(range(channels))
    assert all(n > 0 for n in pages.values())  # every channel carried pages
    # the main stream carried only ZERO records: every data page came over a channel
    assert sum(pages.values()) == stats["normal_pages"] > 0 and stats["zero_pages"] > 0
    assert stats["stream_bytes"] < 1 << 20
    smf = sent["multifd"]
    assert isinstance(smf, dict)
    assert {int(k): v for k, v in smf["pages"].items()} == pages
    assert mf["syncs"] == smf["syncs"] >= 2  # setup and completion at least


def test_sender_packets_init_and_sync_order() -> None:
    """In-process, two socketpairs: each channel opens with its init record, packets hold
    at most 128 pages of one block with their data, SYNC packets come only from sync()."""
    pairs = [socket.socketpair() for _ in range(2)]
    ends = iter(pairs)
    sender = MultifdSender.open(lambda: SocketChannel(next(ends)[0]), 2, uuid=bytes(range(16)))
    got: dict[int, list[tuple[int, list[int], bytes]]] = {}

    def drain(cid: int, s: socket.socket) -> None:
        f = s.makefile("rb")
        init = parse_init(f.read(INIT_SIZE))
        assert init.uuid == bytes(range(16))
        got[init.channel_id] = []
        while head := f.read(PACKET_LEN):
            pkt = parse_packet(head)
            data = f.read(pkt.payload_size)
            got[init.channel_id].append((pkt.flags, pkt.offsets.tolist(), data))
    readers = [threading.Thread(target=drain, args=(i, b)) for i, (_, b) in enumerate(pairs)]
    for t in readers:
        t.start()
    block = RamBlock("pc.ram", np.random.default_rng(1).integers(0, 256, 300 * PAGE_SIZE, dtype=np.uint8))
    sender.start()
    offs = (np.arange(0, 300, 2, dtype=np.uint64) * PAGE_SIZE)  # 150 scattered pages
    queued = sender.queue_pages(block, offs[:100]) + sender.queue_pages(block, offs[100:])
    assert queued == PACKET_LEN + PACKET_PAGES * PAGE_SIZE  # one full packet; 22 pages pending
    sender.sync()
    sender.finish()
    sender.close()
    for t in readers:
        t.join(10)
    packets = [p for ch in got.values() for p in ch]
    syncs = [p for p in packets if p[0] & 1]
    assert len(syncs) == 2 and all(ch[-1][0] & 1 for ch in got.values())
    data_pkts = [p for p in packets if not p[0] & 1]
    assert sorted(len(p[1]) for p in data_pkts) == [22, 128]
    for _, offsets, data in data_pkts:
        for i, off in enumerate(offsets):
            assert data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] == block.data[off:off + PAGE_SIZE].tobytes()
    assert sender.describe()["syncs"] == 1


def test_one_queue_call_of_many_packets_keeps_each_packet_whole() -> None:
    """A call that fills several packets hands them to a channel thread together (one
    hand-off per few packets, not per packet); on the wire each is still its own packet of
    at most 128 pages with its own number, and every page arrives once with its data."""
    pairs = [socket.socketpair() for _ in range(2)]
    ends = iter(pairs)
    sender = MultifdSender.open(lambda: SocketChannel(next(ends)[0]), 2, uuid=bytes(range(16)))
    got: list[tuple[int, int, list[int], bytes]] = []
    lock = threading.Lock()

    def drain(s: socket.socket) -> None:
        f = s.makefile("rb")
        parse_init(f.read(INIT_SIZE))
        while head := f.read(PACKET_LEN):
            pkt = parse_packet(head)
            data = f.read(pkt.payload_size)
            with lock:
                got.append((pkt.flags, pkt.packet_num, pkt.offsets.tolist(), data))
    readers = [threading.Thread(target=drain, args=(b,)) for _, b in pairs]
    for t in readers:
        t.start()
    block = RamBlock("pc.ram", np.random.default_rng(2).integers(0, 256, 3000 * PAGE_SIZE, dtype=np.uint8))
    sender.start()
    pages = np.sort(np.random.default_rng(3).choice(3000, 1000, replace=False)).astype(np.uint64)
    queued = sender.queue_pages(block, pages * np.uint64(PAGE_SIZE))
    assert queued == 7 * (PACKET_LEN + PACKET_PAGES * PAGE_SIZE)  # 7 full packets, 104 pending
    sender.sync()
    sender.finish()
    sender.close()
    for t in readers:
        t.join(10)
    data_pkts = [p for p in got if not p[0] & 1]
    assert sorted(len(p[2]) for p in data_pkts) == [104] + [128] * 7
    assert sorted(p[1] for p in got) == list(range(10))  # 8 data + 2 SYNC, each numbered once
    seen = [off for p in data_pkts for off in p[2]]
    assert sorted(seen) == (pages * PAGE_SIZE).tolist()
    for _, _, offsets, data in data_pkts:
        for i, off in enumerate(offsets):
            assert data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] == block.data[off:off + PAGE_SIZE].tobytes()
    d = sender.describe()
    assert sum(d["pages"].values()) == 1000 and d["packets"] == 10


def test_a_failing_channel_fails_the_migration_in_one_line(mignet_cmd: list[str],
                                                           subprocess_env: dict[str, str]) -> None:
    """A destination that resets channel 1: send ends with one line naming the channel."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    conns: list[socket.socket] = []

    def serve() -> None:
        for _ in range(3):
            c, _ = srv.accept()
            conns.append(c)
        for c in conns[1:]:
            if c.recv(INIT_SIZE, socket.MSG_WAITALL)[24] == 1:
                reset_close(c)
        while conns[0].recv(1 << 20):
            pass
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    r = _send(mignet_cmd, subprocess_env, f"tcp:127.0.0.1:{port}", "--size", "256M", "--channels", "2",
              timeout=60)
    one_line_error(r, "multifd channel 1")
    for c in conns:
        c.close()
    srv.close()


def test_live_send_with_channels_into_recv(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    """A running guest (vCPUs writing 32 MiB/s) over a 64 MiB/s link with 2 channels: the
    dirty pages of every round go through the channels (a SYNC per round), and the
    destination ends with the source's RAM as frozen at stop-and-copy."""
    recv, uri = start_recv(mignet_cmd, subprocess_env)
    send = _send(mignet_cmd, subprocess_env, uri, "--size", "48M", "--fill", "mixed", "--live",
                 "--dirty-rate", "32MiB/s", "--max-bandwidth", "64MiB/s", "--channels", "2")
    stdout, stderr = recv.communicate(timeout=60)
    assert send.returncode == 0, send.stderr
    assert recv.returncode == 0, stderr
    sent, got = _last_json(send.stdout), _last_json(stdout)
    assert sent["ram_digest"] == got["ram_digest"]
    migration, mf = sent["migration"], sent["multifd"]
    assert isinstance(migration, dict) and isinstance(mf, dict)
    assert migration["ram"]["dirty-sync-count"] >= 2  # live rounds happened
    assert migration["ram"]["multifd-bytes"] > 0
    assert mf["channels"] == 2 and all(int(n) > 0 for n in mf["pages"].values())
    stats = got["stats"]
    assert isinstance(stats, dict)
    assert stats["multifd"]["channels"] == 2 and stats["multifd"]["syncs"] >= 2


@pytest.mark.parametrize(("extra", "message"), [
    (["--stream", "/dev/null"], "--stream file is replayed"),
    (["--size", "4M", "--channels", "0"], "--channels: takes 1 to 255, not 0"),
])
def test_refusals(mignet_cmd: list[str], subprocess_env: dict[str, str], extra: list[str], message: str) -> None:
    args = extra if "--channels" in extra else [*extra, "--channels", "2"]
    one_line_error(_send(mignet_cmd, subprocess_env, "tcp:127.0.0.1:9", *args, timeout=60), message)


def test_sender_sync_after_abort_raises() -> None:
    a, b = socket.socketpair()
    sender = MultifdSender.open(lambda: SocketChannel(a), 1)
    sender.start()
    sender.abort()
    with pytest.raises(ConnectionLostError):
        sender.sync()
    sender.close()
    b.close()


# --- real QEMU 7.2 as the destination -----------------------------------------------------
@pytest.mark.qemu
@pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")
def test_send_channels_into_real_qemu_byte_identical(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                     tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(snap))
    with QemuSource(tmp_path, mem_mib=128, fill="random", seed=5) as src:
        src.migrate(uri)
        source = np.fromfile(src.image_path, np.uint8)
    _, stderr = recv.communicate(timeout=120)
    assert recv.returncode == 0, stderr

    with QemuDestination(tmp_path, mem_mib=128) as dst:
        dst.migrate_incoming("tcp:127.0.0.1:0", capabilities={"multifd": True},
                             parameters={"multifd_channels": 2})
        qemu_uri = dst.listen_uri()
        assert qemu_uri is not None
        send = _send(mignet_cmd, subprocess_env, qemu_uri, "--snapshot", str(snap), "--channels", "2")
        assert send.returncode == 0, send.stderr
        info = dst.wait_migration(timeout=120)
        assert info["status"] == "completed", info
        mf = _last_json(send.stdout)["multifd"]
        assert isinstance(mf, dict) and all(n > 0 for n in mf["pages"].values())
        received = np.fromfile(dst.image_path, np.uint8)
        assert np.array_equal(received, np.fromfile(snap / block_filename("m0"), np.uint8))
        assert np.array_equal(received, source)
        dst.qmp("cont")
        assert dst.status() == "running"
