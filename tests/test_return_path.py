"""QEMU's return path with a mignet destination: real QEMU 7.2 with the ``return-path``
capability sends OPEN_RETURN_PATH and PING commands and completes only once the
destination confirms with SHUT. Without it a source cannot tell a destination that loaded
the guest from one that died at the last byte."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mignet.guest.ram import block_filename
from mignet.wire import NEED_DATA, StreamDecoder
from mignet.wire.events import Command
from mignet.wire.return_path import RP_PONG, RP_SHUT, command, parse_rp_messages, rp_message
from tests.support.cli import one_line_error, send_into, start_recv
from tests.support.qemu_peer import QemuSource, qemu_skip_reason


def test_return_path_messages_round_trip() -> None:
    data = rp_message(RP_PONG, (7).to_bytes(4, "big")) + rp_message(RP_SHUT, b"\0\0\0\0")
    msgs, rest = parse_rp_messages(data + b"\x00\x01")
    assert msgs == [(RP_PONG, 7), (RP_SHUT, 0)] and rest == b"\x00\x01"


def test_commands_decode_as_events() -> None:
    dec = StreamDecoder()
    dec.receive_data(b"QEVM\0\0\0\x03" + command(1) + command(2, (5).to_bytes(4, "big")))
    events = [dec.next_event() for _ in range(3)]
    assert events[1:] == [Command(1, b""), Command(2, b"\0\0\0\x05")]


@pytest.mark.qemu
@pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")
def test_qemu_source_with_return_path_completes_into_mignet(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(out))
    try:
        with QemuSource(tmp_path, mem_mib=64, fill="random", seed=5) as src:
            info = src.migrate(uri, capabilities={"return_path": True}, timeout=60)
            assert info["status"] == "completed"
            source = np.fromfile(src.image_path, np.uint8)
        stdout, stderr = recv.communicate(timeout=60)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    assert recv.returncode == 0, stderr
    done = json.loads(stdout.strip().splitlines()[-1])
    assert done["stats"]["return_path"] == {"opened": True, "pings": 1, "shut": 0}
    assert np.array_equal(np.fromfile(out / block_filename("m0"), np.uint8), source)


def test_a_tail_of_unknown_devices_completes_without_waiting_for_the_peer_to_close() -> None:
    """Regression: QEMU's devices have no length on the wire, so their sections are split
    once the VM description is in; a source with a return path keeps the connection open
    until SHUT, so the decoder must see the end without an end of input."""
    from mignet.guest.devices import KNOWN_DEVICES, DeviceSet
    from mignet.guest.ram import GuestRam, RamBlock
    from mignet.wire.events import DeviceState, VMDescription
    from tests.support.streams import encode_stream
    from tests.test_stream_codec import patch

    data = encode_stream(GuestRam([RamBlock.anonymous("a", 4 * 4096)]), DeviceSet.example(1))
    data = patch(data, b"mignet-serial", b"mignet-seriaL")
    data = patch(data, b'"name": "mignet-serial"', b'"name": "mignet-seriaL"')
    dec = StreamDecoder(devices=KNOWN_DEVICES)
    events: list[object] = []
    pos = 0
    while not events or not isinstance(events[-1], VMDescription):
        ev = dec.next_event()
        if ev is NEED_DATA:
            if dec.payload_left:  # page data: this test only needs the device tail
                if dec.buffered:
                    dec.take_payload_into(memoryview(bytearray(dec.payload_left)))
                    continue
                n = min(dec.payload_left, len(data) - pos)
                pos += n
                dec.payload_placed(n)
                continue
            assert pos < len(data), "the decoder waits for more than the stream holds"
            n = min(dec.wanted(), len(data) - pos)
            dec.receive_data(data[pos:pos + n])
            pos += n
            continue
        events.append(ev)
    assert pos == len(data)
    assert any(isinstance(e, DeviceState) and e.idstr == "mignet-seriaL" for e in events)


def test_mignet_to_mignet_with_return_path_is_confirmed(mignet_cmd: list[str],
                                                        subprocess_env: dict[str, str]) -> None:
    recv, uri = start_recv(mignet_cmd, subprocess_env)
    sent, got = send_into(mignet_cmd, subprocess_env, recv, uri, "--size", "8M", "--return-path")
    assert sent["confirmed"] is True and sent["ram_digest"] == got["ram_digest"]
    assert got["stats"]["return_path"] == {"opened": True, "pings": 1, "shut": 0}


def test_without_return_path_completion_is_not_claimed_as_confirmed(
        mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    recv, uri = start_recv(mignet_cmd, subprocess_env)
    sent, _ = send_into(mignet_cmd, subprocess_env, recv, uri, "--size", "8M")
    assert sent["confirmed"] is None


def test_a_peer_that_never_confirms_is_not_completed(mignet_cmd: list[str],
                                                     subprocess_env: dict[str, str]) -> None:
    """Issue 13's case: a stream sent into something that reads it all and says nothing
    (here a socket that drains and closes) must not end as completed."""
    import socket
    import subprocess
    import threading
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def drain() -> None:
        conn, _ = srv.accept()
        while conn.recv(1 << 16):
            pass
        conn.close()
    t = threading.Thread(target=drain, daemon=True)
    t.start()
    r = subprocess.run([*mignet_cmd, "send", f"tcp:127.0.0.1:{srv.getsockname()[1]}", "--size", "1M",
                        "--return-path", "--quiet"], capture_output=True, text=True, env=subprocess_env, timeout=60)
    srv.close()
    one_line_error(r, "without confirming the load")


@pytest.mark.qemu
@pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")
def test_qemu_that_cannot_load_a_replay_is_reported(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                    tmp_path: Path) -> None:
    """A snapshot of a 64 MiB guest into a QEMU started with 128 MiB: QEMU refuses the RAM
    layout; mignet must say the destination did not load it, not 'completed'."""
    from tests.support.qemu_peer import QemuDestination
    snap = tmp_path / "snap"
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(snap))
    with QemuSource(tmp_path, mem_mib=64, fill="random", seed=2) as src:
        src.migrate(uri, timeout=60)
    recv.communicate(timeout=60)
    with QemuDestination(tmp_path, mem_mib=128) as dst:
        dst.migrate_incoming("tcp:127.0.0.1:0")
        dest_uri = dst.listen_uri()
        assert dest_uri is not None
        r = subprocess.run([*mignet_cmd, "send", dest_uri, "--snapshot", str(snap), "--quiet"],
                           capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len([x for x in r.stderr.splitlines() if x.strip()]) == 1, r.stderr
    # QEMU refuses at the block list (a reset mid-stream) or after the load (SHUT 1 / no
    # SHUT): either way one line, never "completed".
    assert any(s in r.stderr for s in ("could not load", "without confirming", "connection lost")), r.stderr
    # ... and names the likely problem: the machine and RAM QEMU must be started with.
    assert "-machine pc-i440fx" in r.stderr and "m0 64.0 MiB" in r.stderr, r.stderr
