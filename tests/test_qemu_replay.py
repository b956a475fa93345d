"""mignet as real QEMU's *source*: a guest captured from QEMU (``recv --out DIR``) is replayed
with ``send --snapshot DIR`` into a fresh ``qemu -incoming``, which completes and runs it.

The oracle for "the whole machine moved" is the counting guest: its serial counter goes on
from the source's last tick on the replayed destination, never restarting from 1.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from mignet.guest.directory import GuestDir
from mignet.guest.ram import block_filename
from tests.support.cli import one_line_error, start_recv
from tests.support.counting_guest import (
    CountingGuest,
    assert_resumed,
    build_initramfs,
    counting_guest_skip_reason,
    parse_ticks,
)
from tests.support.qemu_peer import QemuDestination, QemuSource, qemu_skip_reason

needs_qemu = pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")


def _capture(cmd: list[str], env: dict[str, str], out: Path,
             migrate: Callable[[str], object]) -> dict[str, object]:
    """Start ``recv --out``, let ``migrate(uri)`` drive a QEMU source into it; its result."""
    recv, uri = start_recv(cmd, env, "--out", str(out))
    try:
        migrate(uri)
        stdout, stderr = recv.communicate(timeout=120)
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    assert recv.returncode == 0, stderr
    result: dict[str, object] = json.loads(stdout.strip().splitlines()[-1])
    return result


def _replay(cmd: list[str], env: dict[str, str], snapshot: Path, uri: str) -> dict[str, object]:
    send = subprocess.run([*cmd, "send", uri, "--snapshot", str(snapshot), "--json", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert send.returncode == 0, send.stderr
    result: dict[str, object] = json.loads(send.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.qemu
@needs_qemu
def test_paused_guest_replays_into_qemu_byte_identical(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                      tmp_path: Path) -> None:
    snap = tmp_path / "snap"
    with QemuSource(tmp_path, mem_mib=128, fill="random", seed=11) as src:
        _capture(mignet_cmd, subprocess_env, snap, lambda uri: src.migrate(uri))
        source = np.fromfile(src.image_path, np.uint8)
    manifest = json.loads((snap / "manifest.json").read_text())
    assert manifest["complete"] is True
    assert manifest["machine_type"].startswith("pc-i440fx")
    assert manifest["ram_section_id"] not in (None, 0)
    sections = json.loads((snap / "devices.json").read_text())["sections"]
    assert len(sections) > 20 and all(s["section_id"] is not None for s in sections)
    assert sum(s["bytes"] for s in sections) == (snap / "device-state.bin").stat().st_size

    with QemuDestination(tmp_path, mem_mib=128) as dst:
        dst.migrate_incoming("tcp:127.0.0.1:0")
        uri = dst.listen_uri()
        assert uri is not None
        # QEMU confirmed the load on the return path (on by default for a replay).
        assert _replay(mignet_cmd, subprocess_env, snap, uri)["confirmed"] is True
        info = dst.wait_migration(timeout=120)
        assert info["status"] == "completed"
        # It waits for cont, in the run state the source had: never started (-S) there.
        assert dst.status() == "prelaunch"
        received = np.fromfile(dst.image_path, np.uint8)
        assert np.array_equal(received, np.fromfile(snap / block_filename("m0"), np.uint8))
        assert np.array_equal(received, source)
        dst.qmp("cont")
        assert dst.status() == "running"


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.skipif(counting_guest_skip_reason() is not None, reason=counting_guest_skip_reason() or "")
def test_running_guest_captured_live_and_replayed_keeps_counting(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    initramfs = build_initramfs(tmp_path / "initramfs")
    snap = tmp_path / "snap"
    with CountingGuest(tmp_path, initramfs, name="src") as src:
        src.wait_ticks(3, timeout=120)
        _capture(mignet_cmd, subprocess_env, snap, lambda uri: src.migrate(uri, timeout=120))
        assert src.status() == "postmigrate"
        src_log = src.serial_text()
    last = parse_ticks(src_log)[-1]

    with CountingGuest(tmp_path, initramfs, name="dst", incoming=True, paused=True) as dst:
        uri = dst.migrate_incoming("tcp:127.0.0.1:0")
        # QEMU confirmed the load on the return path (on by default for a replay).
        assert _replay(mignet_cmd, subprocess_env, snap, uri)["confirmed"] is True
        assert dst.wait_migration(timeout=120)["status"] == "completed"
        assert dst.status() == "paused"
        dst.qmp("cont")
        dst.wait_ticks(last + 3, timeout=60)
        dst_log = dst.serial_text()
    assert_resumed(last, dst_log)


def test_incomplete_snapshot_is_refused_in_one_line(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                    tmp_path: Path) -> None:
    GuestDir(tmp_path / "partial")  # what a receive leaves until it has every byte
    r = subprocess.run([*mignet_cmd, "send", "tcp:127.0.0.1:9", "--snapshot", str(tmp_path / "partial")],
                       capture_output=True, text=True, env=subprocess_env, timeout=60)
    one_line_error(r, "incomplete snapshot")
    r = subprocess.run([*mignet_cmd, "send", "tcp:127.0.0.1:9", "--snapshot", str(tmp_path / "none")],
                       capture_output=True, text=True, env=subprocess_env, timeout=60)
    one_line_error(r, "is not a snapshot")
