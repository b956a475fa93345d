"""A multifd channel that dies mid-stream fails the whole migration cleanly on both sides,
promptly: real ``mignet send --channels 2`` and ``mignet recv`` processes, with a real TCP
proxy between them that resets one channel's connection (both halves) once it has carried
a few MiB. Each side must end within 2 s of the cut, non-zero, with one line (the sender
names the channel), and the receiver must not claim a complete guest."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.cli import one_line, start_recv
from tests.support.processes import track
from tests.support.proxy import CuttableProxy

CUT_AFTER = 4 << 20  # bytes a channel forwards before it is reset
PROMPT = 2.0  # seconds from the cut to each side's exit (the bound)


@pytest.mark.parametrize("victim", [1, 2], ids=["channel-0", "channel-1"])
def test_a_channel_reset_mid_stream_fails_both_sides_within_2s(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path, victim: int) -> None:
    out = tmp_path / "received"
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(out))
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    proxy = CuttableProxy((host, int(port)), reset=victim, reset_after=CUT_AFTER)
    try:
        send = track(subprocess.Popen(
            [*mignet_cmd, "send", proxy.uri, "--size", "256M", "--channels", "2",
             "--max-bandwidth", "64MiB/s", "--json", "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env))
        ended: dict[str, float] = {}

        def wait(name: str, proc: subprocess.Popen[str]) -> None:
            proc.wait(timeout=60)
            ended[name] = time.monotonic()
        waiters = [threading.Thread(target=wait, args=(n, p)) for n, p in (("send", send), ("recv", recv))]
        for w in waiters:
            w.start()
        for w in waiters:
            w.join(70)
        assert proxy.cut_at is not None, "the channel was never cut"
        s_out, s_err = send.communicate(timeout=5)
        r_out, r_err = recv.communicate(timeout=5)
        assert send.returncode != 0 and recv.returncode != 0, (s_err, r_err)
        one_line(s_err, "multifd channel")
        line = one_line(r_err, "")
        # the receiver names the channel when it saw the reset, else that the source stopped
        assert "multifd channel" in line or "did not complete" in line, line
        for name in ("send", "recv"):
            took = ended[name] - proxy.cut_at
            print(f"{name} ended {took:.2f} s after the cut")
            assert took < PROMPT, f"{name} ended {took:.2f} s after the cut"
        assert "completed" not in s_out and "completed" not in r_out
        manifest = out / "manifest.json"
        if manifest.exists():
            assert json.loads(manifest.read_text()).get("complete") is False
    finally:
        proxy.close()
