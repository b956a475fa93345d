"""``mignet`` commands as separate processes in tests: a listening receiver, a sender into
it, and the one-line error that every bad input must give."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from tests.support.processes import track


def start_recv(cmd: list[str], env: dict[str, str], *extra: str, uri: str = "tcp:127.0.0.1:0",
               **popen: Any) -> tuple[subprocess.Popen[str], str]:
    """``mignet recv --listen URI --json --quiet EXTRA``, once it listens; (process, its URI).

    The receiver is tracked: it is stopped and waited for when the test ends, however it ends.
    """
    proc = track(subprocess.Popen([*cmd, "recv", "--listen", uri, "--json", "--quiet", *extra],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                  **popen))
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first, proc.communicate(timeout=30)[1]
    info = json.loads(first)
    assert info["event"] == "listening"
    return proc, info["uri"]


def send_into(cmd: list[str], env: dict[str, str], recv: subprocess.Popen[str], uri: str,
              *args: str, timeout: float = 120,
              recv_timeout: float = 120) -> tuple[dict[str, Any], dict[str, Any]]:
    """``mignet send URI ARGS --json --quiet`` into a started receiver. Both must succeed;
    returns their last JSON lines: (what the sender sent, what the receiver got)."""
    send = subprocess.run([*cmd, "send", uri, *args, "--json", "--quiet"], capture_output=True,
                          text=True, env=env, timeout=timeout)
    assert send.returncode == 0, send.stderr
    stdout, stderr = recv.communicate(timeout=recv_timeout)
    assert recv.returncode == 0, stderr
    return json.loads(send.stdout.strip().splitlines()[-1]), json.loads(stdout.strip().splitlines()[-1])


def one_line(stderr: str, pattern: str) -> str:
    """The only non-blank line of ``stderr`` (no traceback), which must contain ``pattern``."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert pattern in lines[0], lines[0]
    return lines[0]


def one_line_error(result: subprocess.CompletedProcess[str], pattern: str) -> None:
    """A failed command that said why in one line containing ``pattern``."""
    assert result.returncode != 0
    one_line(result.stderr, pattern)
