"""A receiver in its own process, spoken to through its JSON lines (``recv --json``).

The demo and the benchmarks all run their destination this way — a fresh process with fresh
memory, like a real destination host — and read the same two lines: ``listening`` (with the
URI to connect to) and ``completed`` (digest, statistics).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from mignet.errors import MignetError, SetupError


def recv_command(max_ram: int | None = None, listen: str = "tcp:127.0.0.1:0") -> list[str]:
    """``mignet recv`` (by default on an ephemeral loopback port), quiet, speaking JSON."""
    cmd = [sys.executable, "-m", "mignet", "recv", "--listen", listen, "--json", "--quiet"]
    return cmd if max_ram is None else [*cmd, "--max-ram", str(max_ram)]


def start_receiver(cmd: list[str]) -> tuple[subprocess.Popen[str], str]:
    """Start ``cmd`` and wait for its ``listening`` line; returns the process and its URI."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline() or "{}")
    if first.get("event") != "listening":
        proc.kill()
        proc.wait()
        raise SetupError(f"the receiver process did not start; run `{' '.join(cmd[2:])}` to see why")
    return proc, first["uri"]


def receiver_result(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    """The receiver's ``completed`` line, once it has exited successfully."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if proc.wait(timeout) != 0 or not line:
        raise MignetError("the receiver failed; see its message above")
    return json.loads(line)
