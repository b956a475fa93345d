"""Ctrl-C in a real terminal (issue 14, item 2): the progress bar stops, then the cancel
line comes, and nothing is drawn after it."""

from __future__ import annotations

import os
import pty
import select
import signal
import time

from tests.support.cli import start_recv


def _read(fd: int, seconds: float, until: bytes | None = None) -> bytes:
    """What the terminal shows within ``seconds``, or until ``until`` appears."""
    out = b""
    end = time.monotonic() + seconds
    while time.monotonic() < end and (until is None or until not in out):
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    return out


def test_ctrl_c_in_a_terminal_leaves_the_cancel_line_last(mignet_cmd: list[str],
                                                          subprocess_env: dict[str, str]) -> None:
    recv, uri = start_recv(mignet_cmd, subprocess_env)
    pid, fd = pty.fork()
    if pid == 0:  # the sender, on a terminal of 80 columns, slow enough to interrupt
        os.execvpe(mignet_cmd[0], [*mignet_cmd, "send", uri, "--size", "64M", "--max-bandwidth",
                                   "4MiB/s"], {**subprocess_env, "COLUMNS": "80", "TERM": "xterm"})
    try:
        shown = _read(fd, 60, until=b"MiB/s")  # the bar is up and moving
        assert b"MiB/s" in shown, shown
        os.kill(pid, signal.SIGINT)
        shown += _read(fd, 15)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
        recv.kill()
    assert os.WEXITSTATUS(status) == 130, shown
    text = shown.decode(errors="replace")
    at = text.rindex("cancelled by Ctrl-C")
    after = text[at:]
    assert "sending" not in after and "MiB/s" not in after, repr(after)  # no bar redrawn
    assert after.strip("\r\n\x1b[?25h").count("\n") <= 1, repr(after)  # the last line
