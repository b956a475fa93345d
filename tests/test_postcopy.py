"""Postcopy into a mignet destination (issue 16): the stream's commands in QEMU's order,
RAM that faults on missing pages (userfaultfd), page requests on the return path.

The scripted source below plays QEMU's part over a real socket and sends a discarded page
only when asked, so every such page must travel fault -> REQ_PAGES -> UFFDIO_COPY; the
QEMU tests then check the same against real QEMU 7.2."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import xxhash

from mignet.errors import ConnectionLostError, ProtocolError, SetupError
from mignet.guest.ram import GuestRam, RamBlock, block_filename
from mignet.migration.loadvm import Loader, start_load_thread
from mignet.tcp import SocketChannel
from mignet.units import PAGE_SIZE
from mignet.wire import NEED_DATA, StreamDecoder, StreamEncoder
from mignet.wire.events import (
    Packaged,
    PostcopyAdvise,
    PostcopyDiscard,
    PostcopyListen,
    PostcopyRun,
)
from mignet.wire.postcopy import (
    CMD_PACKAGED,
    CMD_POSTCOPY_ADVISE,
    CMD_POSTCOPY_LISTEN,
    CMD_POSTCOPY_RAM_DISCARD,
    CMD_POSTCOPY_RUN,
    RP_REQ_PAGES,
    RP_REQ_PAGES_ID,
    advise_payload,
    discard_payload,
    parse_req_pages,
)
from mignet.wire.return_path import (
    CMD_OPEN_RETURN_PATH,
    CMD_PING,
    RP_PONG,
    RP_SHUT,
    command,
)
from tests.support.cli import one_line, start_recv
from tests.support.qemu_peer import QemuSource, qemu_skip_reason

BLOCK = "pc.ram"
PAGES = 256


def packaged(*inner: bytes) -> bytes:
    body = b"".join(inner)
    return command(CMD_PACKAGED, len(body).to_bytes(4, "big")) + body


def postcopy_head(enc: StreamEncoder, layout: list[tuple[str, int]]) -> bytes:
    return (enc.header() + command(CMD_OPEN_RETURN_PATH) + command(CMD_PING, b"\0\0\0\1")
            + command(CMD_POSTCOPY_ADVISE, advise_payload()) + enc.ram_start(layout))


def pages(enc: StreamEncoder, block: RamBlock, idx: list[int]) -> bytes:
    offs = np.array(idx, dtype=np.uint64) * PAGE_SIZE
    return b"".join(bytes(x) for x in enc.page_records(block.name, block.data, offs))


def decode_all(data: bytes) -> list[object]:
    dec = StreamDecoder()
    dec.receive_data(data)
    events: list[object] = []
    while True:
        ev = dec.next_event()
        if ev is NEED_DATA:
            if dec.payload_left:
                dec.take_payload_into(memoryview(bytearray(PAGE_SIZE)))
                continue
            return events
        events.append(ev)


# --- the wire ------------------------------------------------------------------------------
def test_postcopy_commands_decode_in_qemus_order() -> None:
    enc = StreamEncoder()
    data = (postcopy_head(enc, [(BLOCK, 64 * PAGE_SIZE)])
            + command(CMD_POSTCOPY_RAM_DISCARD, discard_payload(BLOCK, [(0, 2 * PAGE_SIZE)]))
            + packaged(command(CMD_POSTCOPY_LISTEN), command(CMD_PING, b"\0\0\0\3"),
                       command(CMD_POSTCOPY_RUN)))
    events = [e for e in decode_all(data) if type(e).__module__.endswith("events")]
    kinds = [type(e) for e in events]
    assert PostcopyAdvise(PAGE_SIZE, PAGE_SIZE) in events
    assert PostcopyDiscard(BLOCK, ((0, 2 * PAGE_SIZE),)) in events
    at = kinds.index(Packaged)
    assert kinds[at + 1] is PostcopyListen and kinds[-1] is PostcopyRun


@pytest.mark.parametrize("stream, message", [
    (lambda e: e.header() + command(CMD_POSTCOPY_RAM_DISCARD, discard_payload(BLOCK, [(0, PAGE_SIZE)])),
     "RAM_DISCARD in postcopy state none"),
    (lambda e: postcopy_head(e, [(BLOCK, 4 * PAGE_SIZE)]) + command(CMD_POSTCOPY_LISTEN),
     "outside a PACKAGED"),
    (lambda e: postcopy_head(e, [(BLOCK, 4 * PAGE_SIZE)])
     + command(CMD_POSTCOPY_RAM_DISCARD, discard_payload("nope", [(0, PAGE_SIZE)])), "unknown block"),
    (lambda e: postcopy_head(e, [(BLOCK, 4 * PAGE_SIZE)])
     + command(CMD_POSTCOPY_RAM_DISCARD, discard_payload(BLOCK, [(PAGE_SIZE, 8 * PAGE_SIZE)])),
     "not whole pages inside block"),
    (lambda e: postcopy_head(e, [(BLOCK, 4 * PAGE_SIZE)])
     + packaged(command(CMD_POSTCOPY_LISTEN), command(CMD_POSTCOPY_RUN), command(CMD_PING, b"\0\0\0\3")),
     "not the last command of its package"),
    (lambda e: postcopy_head(e, [(BLOCK, 4 * PAGE_SIZE)]) + command(CMD_PACKAGED, b"\x7f\0\0\0"),
     "is not device state"),
    (lambda e: e.header() + command(CMD_POSTCOPY_ADVISE), "dirty-bitmaps"),
    (lambda e: e.header() + command(8), "ENABLE_COLO: mignet does not implement it"),
])
def test_postcopy_commands_out_of_order_or_malformed_are_refused(stream, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProtocolError, match=message):
        decode_all(stream(StreamEncoder()))


# --- a scripted source over a real socket --------------------------------------------------
class ScriptedSource:
    """QEMU's side of a postcopy: one precopy round, then ``dirty`` pages change, are
    discarded and are sent only on request (no background stream)."""

    def __init__(self, sock: socket.socket, ram: GuestRam, preempt: socket.socket | None = None) -> None:
        self.sock = sock
        self.ram = ram
        self.block = ram[BLOCK]
        self.enc = StreamEncoder()
        self.preempt = preempt  # QEMU's postcopy-preempt channel: asked-for pages go there
        self.preempt_enc = StreamEncoder()  # its own CONTINUE state, as QEMU resets it per channel
        self.rp = b""
        self.requests: list[tuple[int, int, str | None]] = []

    def precopy_then_switch(self, dirty: list[int], rng: np.random.Generator) -> None:
        enc, block = self.enc, self.block
        self.sock.sendall(postcopy_head(enc, self.ram.layout()) + enc.ram_section(False)
                          + pages(enc, block, list(range(block.pages))) + enc.ram_section_close())
        for i in dirty:  # the guest writes them after they were sent
            block.data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8)
        ranges = [(i * PAGE_SIZE, PAGE_SIZE) for i in dirty]
        self.sock.sendall(command(CMD_POSTCOPY_RAM_DISCARD, discard_payload(BLOCK, ranges))
                          + packaged(command(CMD_POSTCOPY_LISTEN), command(CMD_PING, b"\0\0\0\3"),
                                     command(CMD_POSTCOPY_RUN)))

    def message(self) -> tuple[int, bytes]:
        while True:
            if len(self.rp) >= 4:
                kind, length = struct.unpack_from(">HH", self.rp)
                if len(self.rp) >= 4 + length:
                    data, self.rp = self.rp[4:4 + length], self.rp[4 + length:]
                    return kind, data
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionLostError("the destination closed its return path")
            self.rp += chunk

    def serve(self, owed: set[int]) -> None:
        """Answer page requests until nothing is owed, then end the stream."""
        while owed:
            kind, data = self.message()
            if kind == RP_PONG:
                continue
            assert kind in (RP_REQ_PAGES, RP_REQ_PAGES_ID), kind
            offset, length, name = parse_req_pages(kind, data)
            self.requests.append((offset, length, name))
            want = [p for p in range(offset // PAGE_SIZE, (offset + length) // PAGE_SIZE) if p in owed]
            owed.difference_update(want)
            if want and self.preempt is not None:
                self.preempt.sendall(pages(self.preempt_enc, self.block, want))
            elif want:
                self.sock.sendall(self.enc.ram_section(False) + pages(self.enc, self.block, want)
                                  + self.enc.ram_section_close())
        self.sock.sendall(self.enc.ram_section(True) + self.enc.ram_section_close() + self.enc.eof())
        if self.preempt is not None:  # QEMU ends the preempt channel after the main EOF
            self.preempt.sendall(StreamEncoder.eos())


def scripted_pair(**loader_kw: object) -> tuple[socket.socket, Loader]:
    a, b = socket.socketpair()
    a.settimeout(30)
    return a, Loader(SocketChannel(b, "scripted"), postcopy=True, **loader_kw)  # type: ignore[arg-type]


def test_pages_the_guest_touches_are_asked_for_and_placed_whole() -> None:
    rng = np.random.default_rng(7)
    ram = GuestRam.generate(PAGES * PAGE_SIZE, "mixed", seed=4, name=BLOCK)
    sock, loader = scripted_pair(vcpus=2)
    load = start_load_thread(loader)
    src = ScriptedSource(sock, ram)
    dirty = sorted(rng.choice(PAGES, 40, replace=False).tolist())
    src.precopy_then_switch(dirty, rng)
    src.serve(set(dirty))
    result = load.join(30)
    kind, data = src.message()
    while kind == RP_PONG:
        kind, data = src.message()
    assert (kind, data) == (RP_SHUT, b"\0\0\0\0")
    assert np.array_equal(result.ram[BLOCK].data, ram[BLOCK].data)
    pc = result.stats.postcopy
    assert pc is not None and pc.discarded_pages == 40 and pc.pages_placed == 40
    # nothing came unasked, so every page arrived through a request the vCPUs' faults made
    # (a fault read just as its page landed may ask once more after the source stopped)
    assert pc.faults >= 1 and len(src.requests) <= pc.requests == pc.faults <= len(src.requests) + 2
    assert src.requests[0][2] == BLOCK and all(r[2] is None for r in src.requests[1:])
    assert len(pc.latencies) == pc.faults and max(pc.latencies) < 30
    assert loader.postcopy is not None and loader.postcopy.reader is not None
    assert loader.postcopy.reader.pages_read == PAGES  # every page read once, none lost


def test_asked_for_pages_come_on_the_preempt_channel() -> None:
    """postcopy-preempt: a second connection, RAM records only, up to one EOS after the
    main stream's EOF; the loader reads it in its own thread from LISTEN on."""
    rng = np.random.default_rng(8)
    ram = GuestRam.generate(PAGES * PAGE_SIZE, "random", seed=5, name=BLOCK)
    sock, loader = scripted_pair(vcpus=1)
    pa, pb = socket.socketpair()
    loader.attach_preempt(SocketChannel(pb, "preempt"))  # before LISTEN: kept until then
    load = start_load_thread(loader)
    src = ScriptedSource(sock, ram, preempt=pa)
    dirty = list(range(0, PAGES, 5))
    src.precopy_then_switch(dirty, rng)
    src.serve(set(dirty))
    result = load.join(30)
    assert np.array_equal(result.ram[BLOCK].data, ram[BLOCK].data)
    pc = result.stats.postcopy
    assert pc is not None and pc.preempt_pages == len(dirty) and pc.pages_placed == len(dirty)
    assert len(pc.request_latencies) == pc.requests >= 1


def test_the_preempt_channel_carries_records_only() -> None:
    dec = StreamDecoder.records({BLOCK: 4 * PAGE_SIZE})
    dec.receive_data((4 * PAGE_SIZE | 0x04).to_bytes(8, "big"))
    with pytest.raises(ProtocolError, match="name no page type"):
        dec.next_event()


def test_a_stream_that_ends_owing_pages_is_not_a_guest() -> None:
    rng = np.random.default_rng(1)
    ram = GuestRam.generate(64 * PAGE_SIZE, "random", seed=2, name=BLOCK)
    sock, loader = scripted_pair(vcpus=0)
    load = start_load_thread(loader)
    src = ScriptedSource(sock, ram)
    src.precopy_then_switch([3, 4, 9], rng)
    src.serve(set())  # ends at once: three pages never come
    with pytest.raises(ProtocolError, match="3 discarded pages never sent"):
        load.join(30)


def test_connection_lost_in_postcopy_wakes_the_vcpus_and_fails() -> None:
    """A vCPU waits in the kernel for a page that never comes: losing the source must end
    the load with an error and leave no thread stuck."""
    rng = np.random.default_rng(3)
    ram = GuestRam.generate(64 * PAGE_SIZE, "random", seed=2, name=BLOCK)
    sock, loader = scripted_pair(vcpus=1)
    load = start_load_thread(loader)
    src = ScriptedSource(sock, ram)
    src.precopy_then_switch(list(range(64)), rng)
    kind, _ = src.message()
    while kind == RP_PONG:
        kind, _ = src.message()
    assert kind == RP_REQ_PAGES_ID  # a vCPU is waiting for a page now
    sock.close()
    with pytest.raises(ConnectionLostError):
        load.join(30)
    reader = loader.postcopy.reader if loader.postcopy else None
    assert reader is not None
    deadline = time.monotonic() + 10
    while reader.finished is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reader.finished is not None, "a vCPU is still stuck in a page fault"


def test_a_destination_without_postcopy_refuses_the_advise() -> None:
    a, b = socket.socketpair()
    loader = Loader(SocketChannel(b, "plain"))
    load = start_load_thread(loader)
    a.sendall(postcopy_head(StreamEncoder(), [(BLOCK, 4 * PAGE_SIZE)]))
    with pytest.raises(SetupError, match="advised postcopy.*turn it on"):
        load.join(30)
    a.close()


# --- real QEMU 7.2 as the source -----------------------------------------------------------
def finish_recv(recv: subprocess.Popen[str]) -> dict[str, object]:
    stdout, stderr = recv.communicate(timeout=120)
    assert recv.returncode == 0, stderr
    done: dict[str, object] = json.loads(stdout.strip().splitlines()[-1])
    return done


@pytest.mark.qemu
@pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")
@pytest.mark.parametrize("where", ["anonymous", "dev-shm", "preempt"])
def test_qemu_postcopy_into_mignet_recv(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                        tmp_path: Path, where: str) -> None:
    shm = Path("/dev/shm") / f"mignet-test-{tmp_path.name}"
    extra = ["--postcopy", "--vcpus", "2"] + (["--out", str(shm)] if where == "dev-shm" else [])
    if where == "preempt":
        extra.append("--postcopy-preempt")
    recv, uri = start_recv(mignet_cmd, subprocess_env, *extra)
    try:
        with QemuSource(tmp_path, mem_mib=64, fill="mixed", seed=11) as src:
            # owed pages trickle at 8 MiB/s, so the vCPUs surely fault on unsent ones
            info = src.migrate_postcopy(uri, postcopy_bandwidth=8 << 20, preempt=where == "preempt")
            source = np.fromfile(src.image_path, np.uint8)
        assert info["status"] == "completed"
        done = finish_recv(recv)
        stats = done["stats"]
        assert isinstance(stats, dict)
        pc = stats["postcopy"]
        assert pc["discarded-pages"] > 0 and pc["pages-placed"] >= pc["discarded-pages"]
        assert stats["return_path"]["shut"] == 0
        ram_info = info["ram"]
        assert isinstance(ram_info, dict) and ram_info["postcopy-requests"] == pc["requests"]
        m0 = [name for name, _ in done["blocks"]].index("m0")  # type: ignore[attr-defined]
        assert done["block_digests"][m0] == xxhash.xxh3_128(source.data).hexdigest()  # type: ignore[index]
        assert len(pc["vcpu-blocktime-ms"]) == 2 and sum(pc["vcpu-blocktime-ms"]) > 0
        assert 0 <= pc["blocktime-ms"] <= min(pc["vcpu-blocktime-ms"])
        if where == "preempt" and pc["faults"]:
            assert pc["preempt-pages"] >= 1  # QEMU sent the asked-for pages on it
        if where == "dev-shm":
            assert np.array_equal(np.fromfile(shm / block_filename("m0"), np.uint8), source)
    finally:
        subprocess.run(["rm", "-rf", str(shm)], check=False)


@pytest.mark.qemu
@pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")
def test_qemu_postcopy_into_a_recv_without_it_is_refused_in_one_line(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    recv, uri = start_recv(mignet_cmd, subprocess_env)
    with QemuSource(tmp_path, mem_mib=16, fill="random", seed=1) as src:
        src.set_capabilities(postcopy_ram=True)
        src.qmp("migrate", {"uri": uri})
        _, stderr = recv.communicate(timeout=60)
        assert recv.returncode == 3
        one_line(stderr, "advised postcopy (postcopy-ram), which is off here")
        with pytest.raises(Exception, match="failed"):
            src.wait_migration(timeout=60)


@pytest.mark.qemu
@pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")
def test_postcopy_into_out_on_a_disk_file_system_is_refused_in_one_line(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout
    if fs.strip() in ("tmpfs", "hugetlbfs"):
        pytest.skip(f"{tmp_path} is on {fs.strip()}, where userfaultfd works")
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--postcopy", "--out", str(tmp_path / "out"))
    with QemuSource(tmp_path, mem_mib=16, fill="random", seed=1) as src:
        src.set_capabilities(postcopy_ram=True)
        src.qmp("migrate", {"uri": uri})
        _, stderr = recv.communicate(timeout=60)
        assert recv.returncode == 3
        one_line(stderr, "cannot fault on missing pages here")
        assert "/dev/shm" in stderr


@pytest.mark.qemu
@pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")
def test_a_lost_connection_pauses_postcopy_and_the_source_resumes_it(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    """QEMU's postcopy recovery: the link fails mid-postcopy (a proxy resets both sides);
    the destination pauses with its RAM (postcopy-paused) instead of failing; QEMU's
    ``migrate`` with ``resume`` to the destination's own address reconnects: RECV_BITMAP,
    RESUME, and the pages still owed come; the guest's RAM ends identical."""
    from tests.support.proxy import CuttableProxy
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--postcopy", "--vcpus", "1")
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    proxy = CuttableProxy((host, int(port)))
    assert recv.stdout is not None
    try:
        with QemuSource(tmp_path, mem_mib=64, fill="mixed", seed=13) as src:
            # 2 MiB/s after the switch: tens of seconds of postcopy, ample time to cut it
            src.start_postcopy(proxy.uri, postcopy_bandwidth=2 << 20)
            deadline = time.monotonic() + 60
            while src.query_migrate()["status"] != "postcopy-active":
                assert time.monotonic() < deadline, src.query_migrate()
                time.sleep(0.05)
            time.sleep(1)
            proxy.cut()
            event = json.loads(recv.stdout.readline())
            assert event["event"] == "postcopy-paused" and event["reason"], event
            while src.query_migrate()["status"] != "postcopy-paused":
                assert time.monotonic() < deadline + 60, src.query_migrate()
                time.sleep(0.05)
            assert recv.poll() is None  # paused, not failed
            src.set_parameters(max_postcopy_bandwidth=0)
            src.qmp("migrate", {"uri": uri, "resume": True})
            info = src.wait_migration(timeout=120)
            source = np.fromfile(src.image_path, np.uint8)
        events = [json.loads(line) for line in recv.communicate(timeout=120)[0].splitlines()]
        assert recv.returncode == 0
        assert [e["event"] for e in events] == ["postcopy-recover", "postcopy-active", "completed"]
        done = events[-1]
        pc = done["stats"]["postcopy"]
        assert pc["pauses"] == 1 and pc["pages-placed"] == pc["discarded-pages"] > 0
        assert info["status"] == "completed"
        m0 = [name for name, _ in done["blocks"]].index("m0")
        assert done["block_digests"][m0] == xxhash.xxh3_128(source.data).hexdigest()
    finally:
        proxy.close()


@pytest.mark.parametrize("shared", [False, True])
def test_discard_drops_exactly_the_ranges(tmp_path: Path, shared: bool) -> None:
    """RAM_DISCARD's ranges, many at once (process_madvise where the kernel has it): those
    pages read zero afterwards, in anonymous memory and in a tmpfs file; no other page
    changes."""
    import os
    pages = 64
    if shared:
        path = Path("/dev/shm") / f"mignet-discard-{os.getpid()}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, pages * PAGE_SIZE)
            block = RamBlock.mapped(BLOCK, fd, pages * PAGE_SIZE)
        finally:
            os.close(fd)
            path.unlink()
    else:
        block = RamBlock.anonymous(BLOCK, pages * PAGE_SIZE)
    block.data[:] = np.random.default_rng(0).integers(1, 256, block.size, dtype=np.uint8)
    before = block.data.copy()
    gone = [3, 4, 5, 10, 40, 63]
    block.discard(np.array([(3 * PAGE_SIZE, 3 * PAGE_SIZE), (10 * PAGE_SIZE, PAGE_SIZE),
                            (40 * PAGE_SIZE, PAGE_SIZE), (63 * PAGE_SIZE, PAGE_SIZE)]))
    words = block.page_words()
    for p in range(pages):
        page = block.data[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]
        if p in gone:
            assert not words[p].any(), p
        else:
            assert np.array_equal(page, before[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]), p


def test_blocktime_is_the_time_every_vcpu_waited_at_once() -> None:
    """QEMU's postcopy-blocktime: the guest as a whole made no progress only while all of
    its vCPUs waited; postcopy-vcpu-blocktime is each one's own waiting."""
    from mignet.migration.postcopy import PostcopyStats
    stats = PostcopyStats(vcpu_tids=[11, 12])
    stats.blocked = {11: [(0.0, 2.0), (5.0, 6.0)], 12: [(1.0, 3.0), (5.5, 5.75)], 99: [(0.0, 9.0)]}
    assert stats.vcpu_blocktime_ms() == [3000, 2250]  # thread 99 is not a vCPU
    assert stats.blocktime_ms() == 1250  # 1.0-2.0 and 5.5-5.75


def test_a_stranger_posing_as_a_resume_does_not_end_a_healthy_load(
        mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    """recv --postcopy takes a connection that starts with a stream command as a source
    resuming a paused postcopy; while nothing is paused (here a plain precopy), such a
    connection is refused and the migration goes on."""
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--postcopy")
    assert recv.stdout is not None
    send = subprocess.Popen([*mignet_cmd, "send", uri, "--size", "32M", "--max-bandwidth", "8MiB/s",
                             "--json", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=subprocess_env)
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    time.sleep(1.5)  # the source's stream is flowing
    with socket.create_connection((host, int(port))) as stranger:
        stranger.sendall(command(10, b"\x02m0"))  # RECV_BITMAP, as QEMU's resume starts
        event = json.loads(recv.stdout.readline())
    assert event["event"] == "refused" and "no postcopy here is paused" in event["reason"], event
    sent_out, sent_err = send.communicate(timeout=120)
    stdout, stderr = recv.communicate(timeout=60)
    assert send.returncode == 0 and recv.returncode == 0, sent_err + stderr
    assert json.loads(sent_out.splitlines()[-1])["ram_digest"] == json.loads(stdout.splitlines()[-1])["ram_digest"]
