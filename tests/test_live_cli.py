"""``mignet send --live`` into ``mignet recv``, as separate processes over loopback TCP."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.cli import one_line_error, send_into, start_recv


def test_send_live_arrives_identical_to_frozen_source(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    proc, uri = start_recv(mignet_cmd, subprocess_env)
    sent, got = send_into(mignet_cmd, subprocess_env, proc, uri,
                          "--size", "32M", "--live", "--dirty-rate", "64MiB/s",
                          "--max-bandwidth", "64MiB/s", "--downtime-limit", "200", "--auto-converge",
                          recv_timeout=60)
    assert got["ram_digest"] == sent["ram_digest"]
    info = sent["migration"]
    assert info["status"] == "completed" and info["ram"]["dirty-sync-count"] >= 2
    assert info["x-mignet"]["downtime-measured-at"] == "source"  # no return path to the source
    assert got["stats"]["switchover_at"] is not None


def test_send_live_refuses_an_image(mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path) -> None:
    image = tmp_path / "ram.img"
    image.write_bytes(b"\0" * 8192)
    r = subprocess.run([*mignet_cmd, "send", "tcp:127.0.0.1:1", "--image", str(image), "--live"],
                       capture_output=True, text=True, env=subprocess_env, timeout=60)
    one_line_error(r, "--live migrates a running guest: give --size, or --snapshot")
