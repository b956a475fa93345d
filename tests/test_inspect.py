"""``mignet inspect`` on stream files and recv --out directories, and ``mignet send --stream``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mignet.guest.devices import DeviceSet
from mignet.guest.directory import GuestDir
from mignet.guest.ram import GuestRam, RamBlock
from mignet.units import PAGE_SIZE
from tests.support.cli import one_line_error, send_into, start_recv
from tests.support.qemu_peer import capture_stream, qemu_skip_reason
from tests.support.streams import encode_stream

# block 'a': page kinds (1 data, 0 zero); block '/rom@etc/b': one data page, one zero page
PAGES = [1, 0, 0, 1, 0, 1]
DEVICES = ["mignet-cpu/0", "mignet-cpu/1", "mignet-serial", "mignet-timer"]


def _guest() -> GuestRam:
    rng = np.random.default_rng(3)
    a = RamBlock.anonymous("a", len(PAGES) * PAGE_SIZE)
    for i, kind in enumerate(PAGES):
        if kind:
            a.data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = rng.integers(1, 255, PAGE_SIZE, dtype=np.uint8)
    b = RamBlock.anonymous("/rom@etc/b", 2 * PAGE_SIZE)
    b.data[:PAGE_SIZE] = 7
    return GuestRam([a, b])


@pytest.fixture
def stream_file(tmp_path: Path) -> Path:
    path = tmp_path / "guest.mig"
    path.write_bytes(encode_stream(_guest(), DeviceSet.example(1)))
    return path


def _inspect(cmd: list[str], env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, "inspect", *args], capture_output=True, text=True, env=env, timeout=60)


def _inspect_json(cmd: list[str], env: dict[str, str], path: Path) -> dict[str, Any]:
    r = _inspect(cmd, env, str(path), "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    info: dict[str, Any] = json.loads(lines[0])
    return info


def test_inspect_stream_file_json(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                  stream_file: Path) -> None:
    info = _inspect_json(mignet_cmd, subprocess_env, stream_file)
    assert info["kind"] == "stream" and info["complete"] is True and info["version"] == 3
    assert info["machine_type"] == "test"
    assert info["stream_bytes"] == stream_file.stat().st_size
    assert [(b["name"], b["size"], b["pages"], b["normal_pages"], b["zero_pages"]) for b in info["blocks"]] == [
        ("a", 6 * PAGE_SIZE, 6, 3, 3), ("/rom@etc/b", 2 * PAGE_SIZE, 2, 1, 1)]
    assert (info["normal_pages"], info["zero_pages"]) == (4, 4)
    assert info["sections"] == {"ram_start": 1, "ram_part": 1, "ram_end": 1, "device_full": 4}
    assert [d["idstr"] for d in info["devices"]] == DEVICES
    timer = info["devices"][3]
    assert (timer["instance_id"], timer["version"]) == (0, 3)
    assert [(f["name"], f["size"]) for f in timer["fields"]] == [
        ("clock_ns", 8), ("enabled", 1), ("period_ns", 4), ("drift_ppm", 4)]
    assert timer["bytes"] == 17
    assert len({d["section_id"] for d in info["devices"]} | {info["ram_section_id"]}) == 5


def test_inspect_human_output_fits_80_columns(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                              stream_file: Path) -> None:
    r = _inspect(mignet_cmd, {**subprocess_env, "COLUMNS": "80"}, str(stream_file))
    assert r.returncode == 0, r.stderr
    assert "machine type" in r.stdout and "mignet-timer" in r.stdout and "clock_ns:8" in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80


def test_send_stream_replays_file_and_inspect_dir(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                  stream_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "received"
    proc, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(out))
    sent, got = send_into(mignet_cmd, subprocess_env, proc, uri, "--stream", str(stream_file))
    assert sent["transferred"] == stream_file.stat().st_size
    assert got["ram_digest"] == _guest().digest("xxh3")
    info = _inspect_json(mignet_cmd, subprocess_env, out)
    assert info["kind"] == "directory" and info["complete"] is True
    assert info["machine_type"] == "test"
    assert [(b["name"], b["size"], b["pages"]) for b in info["blocks"]] == [
        ("a", 6 * PAGE_SIZE, 6), ("/rom@etc/b", 2 * PAGE_SIZE, 2)]
    assert (info["normal_pages"], info["zero_pages"]) == (4, 4)
    assert info["stream_bytes"] == stream_file.stat().st_size
    assert [d["idstr"] for d in info["devices"]] == DEVICES
    assert [f["name"] for f in info["devices"][2]["fields"]] == ["divider", "lcr", "mcr", "fifo"]
    r = _inspect(mignet_cmd, {**subprocess_env, "COLUMNS": "80"}, str(out))
    assert r.returncode == 0 and "directory" in r.stdout, r.stderr


def test_inspect_incomplete_dir(mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    GuestDir(tmp_path / "half")  # what recv --out leaves before the stream ends
    info = _inspect_json(mignet_cmd, subprocess_env, tmp_path / "half")
    assert info["complete"] is False and info["blocks"] == [] and info["devices"] == []
    r = _inspect(mignet_cmd, subprocess_env, str(tmp_path / "half"))
    assert r.returncode == 0 and "receive did not finish" in r.stdout, r.stderr


def test_inspect_errors_are_one_line(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                     stream_file: Path, tmp_path: Path) -> None:
    data = stream_file.read_bytes()
    (tmp_path / "half.mig").write_bytes(data[:len(data) // 2])
    (tmp_path / "text.mig").write_text("hello, not a stream\n")
    (tmp_path / "empty.mig").write_bytes(b"")
    (tmp_path / "emptydir").mkdir()
    cases = [("missing.mig", "no such file"), ("half.mig", "truncated"), ("text.mig", "not a migration stream"),
             ("empty.mig", "empty"), ("emptydir", "manifest.json")]
    for name, pattern in cases:
        one_line_error(_inspect(mignet_cmd, subprocess_env, str(tmp_path / name), "--json"), pattern)
    r = subprocess.run([*mignet_cmd, "send", "tcp:127.0.0.1:1", "--stream", str(tmp_path / "missing.mig")],
                       capture_output=True, text=True, env=subprocess_env, timeout=60)
    one_line_error(r, "missing.mig")


@pytest.mark.qemu
@pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")
def test_inspect_qemu_capture(mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    mem_mib = 16
    stream = capture_stream(tmp_path, mem_mib, tmp_path / "qemu.mig", seed=4, fill="mixed", keep_image=True)
    image = np.fromfile(tmp_path / "src.img", np.uint8).reshape(-1, PAGE_SIZE)
    zero = int((~image.any(axis=1)).sum())
    info = _inspect_json(mignet_cmd, subprocess_env, stream)
    assert info["machine_type"].startswith("pc-i440fx-")
    m0 = info["blocks"][0]
    assert (m0["name"], m0["size"], m0["pages"]) == ("m0", mem_mib << 20, mem_mib * 256)
    assert (m0["normal_pages"], m0["zero_pages"]) == (mem_mib * 256 - zero, zero)
    assert info["sections"]["device_full"] == len(info["devices"]) > 10
    assert info["vmdescription"] and all(d["fields"] is not None for d in info["devices"])
