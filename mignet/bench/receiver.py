"""A receiver in its own process, spoken to through its JSON lines (``recv --json``).

The demo and the benchmarks all run their destination this way — a fresh process with fresh
memory, like a real destination host — and read the same two lines: ``listening`` (with the
URI to connect to) and ``completed`` (digest, statistics).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
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


def start_peer(cmd: list[str]) -> subprocess.Popen[str]:
    """A benchmark's child process with its output captured (text)."""
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def last_json(text: str) -> dict[str, Any]:
    """The last JSON line a peer printed ({} if none): its result or its error."""
    lines = [line for line in text.splitlines() if line.startswith("{")]
    result: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    return result


def make_image(size: int, where: str = "/dev/shm") -> Path:
    """A random RAM image of ``size`` bytes (reproducible), which the caller removes."""
    import numpy as np

    fd, name = tempfile.mkstemp(prefix="mignet-bench-", suffix=".img", dir=where)
    rng = np.random.default_rng(0)
    with os.fdopen(fd, "wb") as f:
        for _ in range(0, size, 64 << 20):
            f.write(rng.bytes(min(64 << 20, size - f.tell())))
    return Path(name)

