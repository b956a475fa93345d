"""``mignet relay``: a stream in, the same stream out, page by page as it arrives.

In process (the relay between socket pairs): the output of a mignet stream is byte for byte
its input, live rounds and all. As processes: mignet send -> relay -> relay -> mignet recv
(tcp and unix hops), real QEMU -> relay -> relay -> real QEMU (paused and byte-identical; a
running counting guest that keeps counting), and pages leave a relay while its input is
still arriving.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mignet.channel import ShutdownHow
from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam
from mignet.migration.loadvm import Loader
from mignet.migration.relay import Relay
from mignet.migration.savevm import Sender
from mignet.tcp import SocketChannel
from mignet.units import PAGE_SIZE
from mignet.wire import StreamEncoder
from mignet.wire.constants import RamFlag
from tests.support.cli import one_line_error, send_into, start_recv
from tests.support.counting_guest import (
    CountingGuest,
    assert_resumed,
    build_initramfs,
    counting_guest_skip_reason,
    parse_ticks,
)
from tests.support.qemu_peer import QemuDestination, QemuSource, qemu_skip_reason
from tests.support.streams import channel_pair

needs_qemu = pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")


# --- in process ----------------------------------------------------------------------
def _drain(channel: SocketChannel, into: bytearray) -> None:
    buf = bytearray(1 << 20)
    while n := channel.read_some_into([buf]):
        into += buf[:n]
    channel.close()  # the destination closes once it has everything


def relay_bytes(stream: bytes, batch_pages: int = 512) -> tuple[bytes, Any]:
    """Run a Relay between socket pairs: ``stream`` in, (what came out, its stats)."""
    source, inbound = channel_pair()
    outbound, sink = channel_pair()
    got = bytearray()

    def feed() -> None:
        source.write_all(stream)
        source.shutdown(ShutdownHow.WRITE)
    threads = [threading.Thread(target=feed), threading.Thread(target=_drain, args=(sink, got))]
    for t in threads:
        t.start()
    relay = Relay(inbound, lambda: outbound, batch_pages=batch_pages, close_timeout=30)
    try:
        stats = relay.run()
    finally:
        relay.close()
        inbound.close()
        for t in threads:
            t.join(30)
        source.close()
    return bytes(got), stats


def sender_stream(ram: GuestRam, section_bytes: int) -> bytes:
    """What mignet's Sender writes for ``ram`` (with its example devices)."""
    a, b = channel_pair()
    got = bytearray()
    t = threading.Thread(target=_drain, args=(b, got))
    t.start()
    Sender(a, ram, DeviceSet.example(3), section_bytes=section_bytes, machine_type="pc-i440fx-7.2",
           ram_section_id=2).run()
    t.join(30)
    a.close()
    return bytes(got)


def live_rounds_stream() -> tuple[bytes, GuestRam]:
    """Three rounds like a live precopy: all pages, then re-sent pages (some now zero, one
    block switch), then a final END round; devices, EOF, description. Returns (stream, the
    RAM it leaves)."""
    ram = GuestRam.generate(2 << 20, "mixed", seed=4)
    rom = GuestRam.generate(64 << 10, "random", seed=5, name="pc.rom")["pc.rom"]
    ram.add(rom)
    enc = StreamEncoder()
    out: list[Any] = [enc.header(), enc.configuration("pc-i440fx-7.2"), enc.ram_start(ram.layout(), 2)]

    def round_(final: bool, pages: list[tuple[str, int]]) -> None:
        out.append(enc.ram_section(final))
        for name, idx in pages:
            block = ram[name]
            off = np.array([idx * PAGE_SIZE], dtype=np.uint64)
            if block.zero_mask(idx, 1)[0]:
                out.append(enc.zero_records(name, off))
            else:
                out.extend(bytes(x) for x in enc.page_records(name, block.data, off))
        out.append(enc.ram_section_close())
    round_(False, [(b.name, i) for b in ram for i in range(b.pages)])
    pc = ram["pc.ram"]
    pc.data[5 * PAGE_SIZE:9 * PAGE_SIZE] = 0  # pages that became zero
    pc.data[100 * PAGE_SIZE:101 * PAGE_SIZE] = 7
    round_(False, [("pc.ram", i) for i in (100, 5, 6, 7, 8)] + [("pc.rom", 3), ("pc.ram", 9)])
    pc.data[200 * PAGE_SIZE:201 * PAGE_SIZE] = 9
    round_(True, [("pc.ram", 200), ("pc.ram", 100)])
    for s in DeviceSet.example(2).sections():
        out.append(enc.device_section(s.idstr, s.instance_id, s.version_id, s.data))
    out += [enc.eof(), enc.vmdescription({"page_size": PAGE_SIZE, "devices": []})]
    return b"".join(out), ram


def test_relay_output_is_its_input_byte_for_byte_sections_and_rounds() -> None:
    ram = GuestRam.generate(8 << 20, "mixed", seed=9)
    stream = sender_stream(ram, section_bytes=1 << 20)  # several PART sections
    out, stats = relay_bytes(stream)
    assert out == stream
    assert stats.ram_section_id == 2 and stats.machine_type == "pc-i440fx-7.2"
    assert stats.ram_sections >= 6 and stats.device_sections == 4  # start, parts, end
    assert stats.bytes_in == stats.bytes_out == len(stream)

    live, _ = live_rounds_stream()
    for batch in (1, 3, 512):  # batch boundaries anywhere inside a section
        out, stats = relay_bytes(live, batch_pages=batch)
        assert out == live, batch
        assert stats.ram_sections == 4


def test_relay_nonzero_fill_leaves_as_a_page() -> None:
    """A ZERO record with fill byte 0x5A (QEMU only sends 0): the page arrives filled."""
    enc = StreamEncoder()
    word = struct.pack(">Q", 3 * PAGE_SIZE | RamFlag.ZERO) + bytes([6]) + b"pc.ram" + b"\x5a"
    stream = b"".join([enc.header(), enc.ram_start([("pc.ram", 1 << 20)], 5), enc.ram_section(True),
                       word, enc.ram_section_close(), enc.eof(),
                       enc.vmdescription({"page_size": PAGE_SIZE, "devices": []})])
    out, _ = relay_bytes(stream)
    a, b = channel_pair()

    def feed() -> None:
        a.write_all(out)
        a.shutdown(ShutdownHow.WRITE)
    t = threading.Thread(target=feed)
    t.start()
    result = Loader(b).run()
    t.join(10)
    a.close()
    b.close()
    page = result.ram["pc.ram"].data[3 * PAGE_SIZE:4 * PAGE_SIZE]
    assert (page == 0x5A).all()
    assert result.stats.ram_section_id == 5 and result.stats.normal_pages == 1


# --- processes -----------------------------------------------------------------------
@contextmanager
def relay_process(cmd: list[str], env: dict[str, str], to: str,
                  listen: str = "tcp:127.0.0.1:0", extra: tuple[str, ...] = (),
                  ) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """``mignet relay --listen LISTEN --to TO --json`` once it listens: (process, its URI).
    Stopped when the block ends, however it ends."""
    proc = subprocess.Popen([*cmd, "relay", "--listen", listen, "--to", to, "--json", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first, proc.communicate(timeout=30)[1]
        info = json.loads(first)
        assert info["event"] == "listening"
        yield proc, info["uri"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> list[dict[str, Any]]:
    """Wait for a relay; it must succeed. Its JSON events, the last being 'completed'."""
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr
    events = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert events[-1]["event"] == "completed", events[-1]
    return events


def assert_relays_carried_qemu(done: list[dict[str, Any]]) -> None:
    """Both relays' summaries of one QEMU 7.2 stream: its machine type, RAM section and
    device sections seen, every byte passed on, the same pages counted by both."""
    for c in done:
        assert c["machine_type"].startswith("pc-i440fx")
        assert c["ram_section_id"] not in (None, 0)
        assert c["device_sections"] > 20
        assert c["bytes_in"] == c["bytes_out"]
    assert done[0]["pages"] == done[1]["pages"] > 0


@contextmanager
def two_relays(cmd: list[str], env: dict[str, str], to: str, link: str = "tcp:127.0.0.1:0",
               first_extra: tuple[str, ...] = (),
               ) -> Iterator[tuple[subprocess.Popen[str], subprocess.Popen[str], str]]:
    """first relay -> (``link``) -> second relay -> ``to``: (first, second, the first's URI).
    ``first_extra``: more arguments for the first relay (``--channels N``: a multifd link)."""
    with relay_process(cmd, env, to, listen=link) as (second, second_uri), \
            relay_process(cmd, env, second_uri, extra=first_extra) as (first, first_uri):
        yield first, second, first_uri


def test_send_through_two_relays_into_recv_digest_matches(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                          tmp_path: Path) -> None:
    """tcp into the first relay, unix between the relays, tcp into recv."""
    recv, recv_uri = start_recv(mignet_cmd, subprocess_env)
    try:
        with two_relays(mignet_cmd, subprocess_env, recv_uri, link=f"unix:{tmp_path / 'relay.sock'}") as (
                first, second, uri):
            sent, got = send_into(mignet_cmd, subprocess_env, recv, uri,
                                  "--size", "64M", "--fill", "mixed", "--seed", "3")
            done = [finish(first)[-1], finish(second)[-1]]
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.communicate()
    assert got["ram_digest"] == sent["ram_digest"] == GuestRam.generate(64 << 20, "mixed", seed=3).digest("xxh3")
    for c in done:
        assert c["bytes_in"] == c["bytes_out"] == sent["transferred"] == got["stats"]["stream_bytes"]
        assert c["pages"] == got["stats"]["normal_pages"] and c["zero_pages"] == got["stats"]["zero_pages"]
        assert c["device_sections"] == 4 and c["ram_section_id"] not in (None, 0)


def test_send_through_a_multifd_relay_link_into_recv_digest_matches(
        mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    """mignet send -> relay --channels 2 -> (multifd over tcp) -> relay -> recv."""
    recv, recv_uri = start_recv(mignet_cmd, subprocess_env)
    try:
        with two_relays(mignet_cmd, subprocess_env, recv_uri, first_extra=("--channels", "2")) as (
                first, second, uri):
            sent, got = send_into(mignet_cmd, subprocess_env, recv, uri,
                                  "--size", "64M", "--fill", "mixed", "--seed", "5")
            done = [finish(first)[-1], finish(second)[-1]]
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.communicate()
    assert got["ram_digest"] == sent["ram_digest"] == GuestRam.generate(64 << 20, "mixed", seed=5).digest("xxh3")
    out, into = done[0]["multifd_out"], done[1]["multifd_in"]
    assert out["channels"] == into["channels"] == 2
    # Both channels carried pages, every data page crossed the link in a channel packet,
    # and the rounds were kept (a SYNC per RAM EOS: setup, parts, end).
    assert all(n > 0 for n in out["pages"].values())
    assert sum(out["pages"].values()) == sum(into["pages"].values()) == done[0]["pages"] \
        == done[1]["pages"] == got["stats"]["normal_pages"] > 0
    assert out["syncs"] == into["syncs"] == done[0]["ram_sections"] == done[1]["ram_sections"] >= 3
    assert done[0]["zero_pages"] == done[1]["zero_pages"] == got["stats"]["zero_pages"]
    assert done[1]["bytes_out"] == got["stats"]["stream_bytes"]
    assert done[0]["bytes_out"] < done[0]["bytes_in"]  # the pages left on the channels


def test_relay_forwards_pages_while_its_input_still_arrives(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                            ) -> None:
    """A source held to 16 MiB/s for 48 MiB (about 3 s): the second relay has written pages
    to the receiver well before the first relay's input is complete."""
    recv, recv_uri = start_recv(mignet_cmd, subprocess_env)
    try:
        with two_relays(mignet_cmd, subprocess_env, recv_uri) as (first, second, uri):
            sent, got = send_into(mignet_cmd, subprocess_env, recv, uri, "--size", "48M", "--fill", "random",
                                  "--no-devices", "--max-bandwidth", "16MiB/s")
            first_events, second_events = finish(first), finish(second)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.communicate()
    assert got["ram_digest"] == sent["ram_digest"]
    input_done = first_events[-1]["input_done_at"]
    assert second_events[-1]["first_page_out_at"] < input_done - 1.0, (second_events[-1], input_done)
    # Seen from the outside too: progress events of the second relay with pages out (and
    # fewer than all of them) while the first was still reading.
    early = [e for e in second_events if e["event"] == "progress" and 0 < e["pages"] < second_events[-1]["pages"]
             and e["t"] < input_done - 0.5]
    assert early, second_events[:5]
    assert first_events[-1]["writes"] > 10  # batches, not one write at the end


def test_bad_destination_uri_is_one_line(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    r = subprocess.run([*mignet_cmd, "relay", "--listen", "tcp:127.0.0.1:0", "--to", "http://x"],
                       capture_output=True, text=True, env=subprocess_env, timeout=60)
    one_line_error(r, "tcp:HOST:PORT")


def _unused_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port: int = probe.getsockname()[1]
    probe.close()
    return port


def test_peer_that_is_not_a_migration_source_is_one_line(mignet_cmd: list[str],
                                                         subprocess_env: dict[str, str]) -> None:
    """Refused before the relay connects anywhere (nothing listens at --to)."""
    with relay_process(mignet_cmd, subprocess_env, f"tcp:127.0.0.1:{_unused_port()}") as (proc, uri):
        host, port = uri.removeprefix("tcp:").rsplit(":", 1)
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            _, stderr = proc.communicate(timeout=60)
    one_line_error(subprocess.CompletedProcess([], proc.returncode, "", stderr), "not a migration stream")


def test_unreachable_destination_is_one_line(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    with relay_process(mignet_cmd, subprocess_env, f"tcp:127.0.0.1:{_unused_port()}") as (proc, uri):
        subprocess.run([*mignet_cmd, "send", uri, "--size", "16M", "--quiet"], capture_output=True,
                       env=subprocess_env, timeout=60)
        _, stderr = proc.communicate(timeout=60)
    one_line_error(subprocess.CompletedProcess([], proc.returncode, "", stderr), "nothing is listening")


# --- real QEMU at both ends ----------------------------------------------------------
def _paused_qemu_through_two_relays(cmd: list[str], env: dict[str, str], tmp_path: Path, seed: int,
                                    first_extra: tuple[str, ...] = (), prelaunch: bool = True,
                                    then_cont: bool = False, **migrate: Any) -> list[dict[str, Any]]:
    """QEMU 7.2 (a paused 128 MiB random guest; ``migrate``: its capabilities/parameters)
    -> relay (``first_extra``) -> relay -> QEMU 7.2: completed and byte-identical, and (with
    ``prelaunch``) still not started, as the source was (-S); ``then_cont``: it then runs.
    Returns each relay's last JSON line."""
    with QemuDestination(tmp_path, mem_mib=128) as dst:
        dst.migrate_incoming("tcp:127.0.0.1:0")
        dst_uri = dst.listen_uri()
        assert dst_uri is not None
        with two_relays(cmd, env, dst_uri, first_extra=first_extra) as (first, second, uri):
            with QemuSource(tmp_path, mem_mib=128, fill="random", seed=seed) as src:
                src.migrate(uri, **migrate)
                source = np.fromfile(src.image_path, np.uint8)
            done = [finish(first)[-1], finish(second)[-1]]
        info = dst.wait_migration(timeout=120)
        assert info["status"] == "completed"
        if prelaunch:
            assert dst.status() == "prelaunch"
        assert np.array_equal(np.fromfile(dst.image_path, np.uint8), source)
        if then_cont:
            dst.qmp("cont")
            assert dst.status() == "running"
    return done


@pytest.mark.qemu
@needs_qemu
def test_paused_qemu_through_two_relays_into_qemu_byte_identical(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    done = _paused_qemu_through_two_relays(mignet_cmd, subprocess_env, tmp_path, seed=11, then_cont=True)
    assert_relays_carried_qemu(done)


@pytest.mark.qemu
@needs_qemu
def test_paused_qemu_through_a_multifd_relay_link_into_qemu_byte_identical(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    """QEMU 7.2 -> relay --channels 2 -> (multifd over tcp) -> relay -> QEMU 7.2."""
    done = _paused_qemu_through_two_relays(mignet_cmd, subprocess_env, tmp_path, seed=13,
                                           first_extra=("--channels", "2"))
    out, into = done[0]["multifd_out"], done[1]["multifd_in"]
    assert out["channels"] == into["channels"] == 2
    assert sum(out["pages"].values()) == sum(into["pages"].values()) == done[0]["pages"] > 0
    assert out["syncs"] == into["syncs"] == done[0]["ram_sections"]
    assert done[1]["device_sections"] > 20


@pytest.mark.qemu
@needs_qemu
def test_qemu_multifd_source_into_a_relay_through_a_multifd_link_byte_identical(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    """QEMU 7.2 with the multifd capability (3 channels) -> relay --channels 2 -> relay -> QEMU."""
    done = _paused_qemu_through_two_relays(mignet_cmd, subprocess_env, tmp_path, seed=17,
                                           first_extra=("--channels", "2"), prelaunch=False,
                                           capabilities={"multifd": True},
                                           parameters={"multifd_channels": 3})
    qemu_in, out, into = done[0]["multifd_in"], done[0]["multifd_out"], done[1]["multifd_in"]
    assert qemu_in["channels"] == 3 and out["channels"] == into["channels"] == 2
    assert sum(qemu_in["pages"].values()) == sum(out["pages"].values()) == sum(into["pages"].values()) > 0


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.skipif(counting_guest_skip_reason() is not None, reason=counting_guest_skip_reason() or "")
def test_running_guest_live_through_two_relays_keeps_counting(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    initramfs = build_initramfs(tmp_path / "initramfs")
    with CountingGuest(tmp_path, initramfs, name="dst", incoming=True, paused=True) as dst:
        dst_uri = dst.migrate_incoming("tcp:127.0.0.1:0")
        with two_relays(mignet_cmd, subprocess_env, dst_uri) as (first, second, uri):
            with CountingGuest(tmp_path, initramfs, name="src") as src:
                src.wait_ticks(3, timeout=120)
                src.migrate(uri, timeout=120)
                assert src.status() == "postmigrate"
                src_log = src.serial_text()
            done = [finish(first)[-1], finish(second)[-1]]
        last = parse_ticks(src_log)[-1]
        assert dst.wait_migration(timeout=120)["status"] == "completed"
        assert dst.status() == "paused"
        dst.qmp("cont")
        dst.wait_ticks(last + 3, timeout=60)
        dst_log = dst.serial_text()
    assert_resumed(last, dst_log)
    for c in done:
        assert c["ram_sections"] >= 3  # setup, live round(s), the final round: as rounds
    assert done[0]["ram_sections"] == done[1]["ram_sections"]


# --- figures: python -m tests.test_relay [MEM_MIB] [REPEAT] --------------------------
def bench_direct_vs_relay(workdir: Path, mem_mib: int = 256, repeat: int = 3) -> dict[str, Any]:
    """A paused random guest, QEMU -> QEMU direct vs QEMU -> relay -> relay -> QEMU, on
    loopback, alternating; time = from ``migrate`` to the destination's 'completed'."""
    import statistics
    import sys
    import time

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    cmd = [sys.executable, "-m", "mignet"]
    times: dict[str, list[float]] = {"direct": [], "relay": []}
    for i in range(repeat):
        for mode in ("direct", "relay") if i % 2 == 0 else ("relay", "direct"):
            run_dir = workdir / f"{mode}{i}"
            with QemuDestination(run_dir, mem_mib=mem_mib) as dst, \
                    QemuSource(run_dir, mem_mib=mem_mib, fill="random", seed=i) as src:
                dst.migrate_incoming("tcp:127.0.0.1:0")
                dst_uri = dst.listen_uri()
                assert dst_uri is not None
                if mode == "direct":
                    t0 = time.monotonic()
                    src.migrate(dst_uri)
                    dst.wait_migration(poll=0.005)
                    times[mode].append(time.monotonic() - t0)
                else:
                    with two_relays(cmd, env, dst_uri) as (first, second, uri):
                        t0 = time.monotonic()
                        src.migrate(uri)
                        dst.wait_migration(poll=0.005)
                        times[mode].append(time.monotonic() - t0)
                        finish(first)
                        finish(second)
                assert np.array_equal(np.fromfile(dst.image_path, np.uint8), np.fromfile(src.image_path, np.uint8))
    direct, relayed = statistics.median(times["direct"]), statistics.median(times["relay"])
    return {"mem_mib": mem_mib, "runs": times, "median_direct_s": round(direct, 3),
            "median_relay_s": round(relayed, 3), "ratio": round(relayed / direct, 2)}


if __name__ == "__main__":  # pragma: no cover
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="relay-bench-") as d:
        args = [int(a) for a in sys.argv[1:3]]
        print(json.dumps(bench_direct_vs_relay(Path(d), *args)))
