"""What a person reads in a terminal is whole at 80 columns: the progress display and the
tables of ``mignet demo`` (a live migration) and of ``send``/``recv``, run in a real
pseudo-terminal so rich draws its live bar as it does for a user."""

from __future__ import annotations

import os
import re
import select
import subprocess
import time

import pytest

from tests.support.cli import start_recv

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def in_terminal(cmd: list[str], env: dict[str, str], columns: int = 80, timeout: float = 120) -> list[str]:
    """Run ``cmd`` with a pty as its terminal; the screen lines it drew, escapes removed."""
    master, slave = os.openpty()
    env = dict(env, COLUMNS=str(columns), LINES="40", TERM="xterm-256color")
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the terminal's other end closed
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    proc.wait(10)
    assert proc.returncode == 0, out.decode(errors="replace")[-2000:]
    text = ANSI.sub("", out.decode(errors="replace"))
    return [line for chunk in text.split("\r\n") for line in chunk.split("\r") if line.strip()]


def _check(lines: list[str], columns: int) -> None:
    too_wide = [line for line in lines if len(line) > columns]
    assert not too_wide, too_wide
    cut = [line for line in lines if re.search(r"\S…", line)]  # rich's mark for a cut cell
    assert not cut, cut


@pytest.mark.parametrize("columns", [80, 120])
def test_demo_reads_whole_at_80_and_120_columns(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                columns: int) -> None:
    lines = in_terminal([*mignet_cmd, "demo", "--size", "32M"], subprocess_env, columns)
    bars = [line for line in lines if line.startswith("live migration ")]
    assert bars, lines  # (a rate shows once rich has two samples: a fast demo may end first)
    assert not any(" MB/s" in line for line in lines)  # one unit system: IEC
    assert any(line.startswith("completed after ") for line in lines), lines
    _check([line for line in lines if "sha256" not in line], columns)


def test_send_and_recv_read_whole_at_80_columns(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    recv, uri = start_recv(mignet_cmd, subprocess_env)
    lines = in_terminal([*mignet_cmd, "send", uri, "--size", "48M", "--max-bandwidth", "64MiB/s"],
                        subprocess_env)
    recv.communicate(timeout=60)
    assert any(line.startswith("sending ") and "MiB/s" in line for line in lines), lines
    _check([line for line in lines if "sha256" not in line], 80)


def test_bench_live_tables_read_whole_at_80_columns(mignet_cmd: list[str], subprocess_env: dict[str, str]) -> None:
    """One small table per run, one row per figure (a column per figure was cut to
    'vCPU wri… aut… co…' even at 120 columns)."""
    lines = in_terminal([*mignet_cmd, "bench", "live", "--size", "16M", "--rates", "0,16M",
                         "--track-size", "16M", "--max-bandwidth", "64MiB/s", "--give-up", "5"],
                        subprocess_env, timeout=300)
    assert sum("RAM identical" in line and "yes" in line for line in lines) == 2, lines
    _check(lines, 80)


def test_a_small_transfer_reports_its_rate_in_iec_units(mignet_cmd: list[str],
                                                        subprocess_env: dict[str, str]) -> None:
    """A 64 KiB guest once showed '0.00 GB/s': rates are IEC, labelled with what they count."""
    recv, uri = start_recv(mignet_cmd, subprocess_env)
    lines = in_terminal([*mignet_cmd, "send", uri, "--size", "64K", "--no-devices"], subprocess_env)
    recv.communicate(timeout=60)
    row = next(line for line in lines if "throughput of stream bytes" in line)
    assert re.search(r"\d+\.\d (KiB|MiB|GiB)/s", row) and "GB/s" not in row, row
