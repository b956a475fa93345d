"""What a person reads in a terminal is whole at 80 columns: the progress display and the
tables of ``mignet demo`` (a live migration) and of ``send``/``recv``, run in a real
pseudo-terminal so rich draws its live bar as it does for a user."""

from __future__ import annotations

import os
import re
import select
import subprocess
import threading
import time

import pytest

from tests.support.cli import start_recv

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Terminal:
    """``cmd`` running with a pty as its terminal, read in a thread as it draws (a reader that
    only starts at the end would let a full pty block the program)."""

    def __init__(self, cmd: list[str], env: dict[str, str], columns: int = 80) -> None:
        master, slave = os.openpty()
        env = dict(env, COLUMNS=str(columns), LINES="40", TERM="xterm-256color")
        self.proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.master = master
        self.out = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(self.master, 1 << 16)
                except OSError:  # EIO: the terminal's other end closed
                    return
                if not chunk:
                    return
                self.out += chunk
            elif self.proc.poll() is not None:
                return

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """The first match of ``pattern`` in what the program drew so far (escapes removed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, ANSI.sub("", self.out.decode(errors="replace")))
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} not drawn within {timeout} s: {self.out[-2000:]!r}")

    def lines(self, timeout: float = 120) -> list[str]:
        """Once the program has exited (successfully): the screen lines it drew."""
        self._reader.join(timeout)
        os.close(self.master)
        self.proc.wait(10)
        assert self.proc.returncode == 0, self.out.decode(errors="replace")[-2000:]
        text = ANSI.sub("", self.out.decode(errors="replace"))
        return [line for chunk in text.split("\r\n") for line in chunk.split("\r") if line.strip()]


def in_terminal(cmd: list[str], env: dict[str, str], columns: int = 80, timeout: float = 120) -> list[str]:
    """Run ``cmd`` with a pty as its terminal; the screen lines it drew, escapes removed."""
    return Terminal(cmd, env, columns).lines(timeout)


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


def _channel_rows(lines: list[str], n: int) -> dict[int, str]:
    """The last row drawn for each multifd channel (the final figures), by channel id."""
    rows: dict[int, str] = {}
    for line in lines:
        found = re.match(r"\s+channel (\d+)\s", line)
        if found:
            rows[int(found.group(1))] = line
    assert sorted(rows) == list(range(n)), lines
    return rows


def _mib(figure: str) -> float:
    number, unit = figure.split()
    return float(number) * {"KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0}[unit]


def test_send_and_recv_show_every_multifd_channel_at_80_columns(mignet_cmd: list[str],
                                                                subprocess_env: dict[str, str]) -> None:
    """``send --channels 4`` into ``recv``, both in a terminal: under the total, one row per
    channel with its bytes and rate, on both ends, whole at 80 columns; each end's channel
    bytes add up to the guest (random: every page goes on a channel)."""
    recv = Terminal([*mignet_cmd, "recv", "--listen", "tcp:127.0.0.1:0"], subprocess_env)
    uri = recv.wait_for(r"listening on (tcp:\S+:\d+)").group(1)
    sent = in_terminal([*mignet_cmd, "send", uri, "--size", "64M", "--channels", "4",
                        "--max-bandwidth", "64MiB/s"], subprocess_env)
    received = recv.lines()
    for lines, total in ((sent, "sending "), (received, "receiving ")):
        assert any(line.startswith(total) for line in lines), lines
        rows = _channel_rows(lines, 4)
        figures = [re.search(r"channel \d+\s+(\d+\.\d (?:KiB|MiB))\s+(\d+\.\d (?:KiB|MiB))/s", row)
                   for row in rows.values()]
        assert all(figures), rows  # bytes and a rate on every channel's row
        assert sum(_mib(f.group(1)) for f in figures if f) == pytest.approx(64, abs=0.3), rows
        _check([line for line in lines if "sha256" not in line], 80)
