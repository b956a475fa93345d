"""Multifd over ``rdma:``: ``mignet send --channels N`` into ``mignet recv``, each channel
its own rdma_cm connection and queue pair, accepted by recv's one listener and matched to
the migration by the init record's UUID and channel id. Byte-identical guests (N = 2, 4,
and live rounds at a dirty rate), and a process killed mid-stream fails the other side
within the margin the TCP fault tests use (``tests/test_multifd_faults.py``)."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from typing import Any

import pytest

from mignet.errors import ConnectionLostError
from mignet.guest.ram import GuestRam
from mignet.uri import parse_uri
from mignet.wire.multifd import build_init
from tests.rdma.test_rdma_cli import rc_qps
from tests.support.cli import one_line, send_into, start_recv
from tests.support.processes import track

pytestmark = pytest.mark.rdma

PROMPT = 2.0  # seconds from a kill to the other side's exit (the bound)


def _multifd_checks(sent: dict[str, Any], got: dict[str, Any], channels: int) -> None:
    assert got["ram_digest"] == sent["ram_digest"]
    stats = got["stats"]
    mf = stats["multifd"]
    assert mf["channels"] == channels and mf["refused"] == []
    pages = {int(k): v for k, v in mf["pages"].items()}
    assert sorted(pages) == list(range(channels))
    assert all(n > 0 for n in pages.values())  # every channel carried pages
    assert {int(k): v for k, v in sent["multifd"]["pages"].items()} == pages
    assert mf["syncs"] == sent["multifd"]["syncs"] >= 2
    assert stats["rdma"]["protocol"] == "mignet"


@pytest.mark.parametrize(("channels", "pin_all"), [(2, False), (4, True)], ids=["2-chunks", "4-pin-all"])
def test_send_channels_over_rdma_byte_identical(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                rdma_uri: str, channels: int, pin_all: bool) -> None:
    """Chunk mode (each channel asks for the 1 MiB chunks it writes: one shared table) and
    pin-all (the main connection registers all RAM up front: every channel uses its keys)."""
    recv, _ = start_recv(mignet_cmd, subprocess_env, uri=rdma_uri)
    sent, got = send_into(mignet_cmd, subprocess_env, recv, rdma_uri, "--size", "32M",
                          "--fill", "mixed", "--seed", "5", "--channels", str(channels),
                          *(["--rdma-pin-all"] if pin_all else []), timeout=240)
    assert got["stats"]["rdma"]["pin_all"] is pin_all
    ram = GuestRam.generate(32 << 20, "mixed", seed=5)
    assert got["ram_digest"] == ram.digest("xxh3")
    _multifd_checks(sent, got, channels)
    # every data page came over a channel, none on the main stream
    data_pages = int((~ram["pc.ram"].zero_mask()).sum())
    assert sum(got["stats"]["multifd"]["pages"].values()) == data_pages
    # ... by RDMA WRITE into the receiver's RAM, each channel its own share
    written = [p["bytes_written"] for p in sent["multifd"]["placement"]]
    assert len(written) == channels and all(n > 0 for n in written)
    assert sum(written) == data_pages * 4096
    assert got["stats"]["stream_bytes"] < 1 << 20


def test_live_send_channels_over_rdma(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                      rdma_uri: str) -> None:
    """A running guest (vCPUs writing 4 MiB/s) over an 8 MiB/s budget with 2 channels: every
    round's dirty pages go through the channels, SYNCed per round; byte-identical at the end."""
    recv, _ = start_recv(mignet_cmd, subprocess_env, uri=rdma_uri)
    sent, got = send_into(mignet_cmd, subprocess_env, recv, rdma_uri, "--size", "16M",
                          "--fill", "mixed", "--live", "--dirty-rate", "4MiB/s",
                          "--max-bandwidth", "8MiB/s", "--channels", "2", timeout=240)
    _multifd_checks(sent, got, 2)
    assert sent["migration"]["ram"]["dirty-sync-count"] >= 2  # live rounds happened
    assert sent["migration"]["ram"]["multifd-bytes"] > 0


def test_stray_connection_refused_migration_goes_on(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                   rdma_uri: str) -> None:
    """A connection that claims to be a channel of another migration (another UUID) while
    one runs is refused (disconnected, named in recv's refusals); the migration completes."""
    from mignet.rdma import connect_rdma

    recv, _ = start_recv(mignet_cmd, subprocess_env, uri=rdma_uri)
    send = track(subprocess.Popen(
        [*mignet_cmd, "send", rdma_uri, "--size", "32M", "--fill", "mixed", "--channels", "2",
         "--max-bandwidth", "4MiB/s", "--json", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env))
    deadline = time.monotonic() + 120
    while rc_qps() < 6 and time.monotonic() < deadline and send.poll() is None:
        time.sleep(0.3)
    assert send.poll() is None and rc_qps() >= 6, "the channels never connected"
    time.sleep(2)  # the migration's own channels have introduced themselves (6 s of transfer)
    stray = connect_rdma(parse_uri(rdma_uri))
    stray.set_idle_timeout(read=30)
    try:
        stray.write_all(build_init(bytes(range(16)), 0))  # channel 0 of another migration
        try:
            got_bytes = stray.read_into(bytearray(1))
        except ConnectionLostError:
            got_bytes = 0
        assert got_bytes == 0  # refused: disconnected without a byte
    finally:
        stray.close()
    s_out, s_err = send.communicate(timeout=180)
    r_out, r_err = recv.communicate(timeout=60)
    assert send.returncode == 0 and recv.returncode == 0, (s_err, r_err)
    sent, got = json.loads(s_out.splitlines()[-1]), json.loads(r_out.splitlines()[-1])
    assert sent["ram_digest"] == got["ram_digest"]
    refused = got["stats"]["multifd"]["refused"]
    assert len(refused) == 1 and "multifd channel 0" in refused[0], refused
    assert got["stats"]["multifd"]["channels"] == 2


@pytest.mark.parametrize("victim", ["send", "recv"])
def test_killed_process_fails_the_other_side_promptly(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                      rdma_uri: str, victim: str) -> None:
    """SIGKILL one side mid-stream: its rdma_cm ids die with it, every queue pair of the
    other side sees the disconnect, and that side ends in one line within ``PROMPT``."""
    recv, _ = start_recv(mignet_cmd, subprocess_env, uri=rdma_uri)
    send = track(subprocess.Popen(
        [*mignet_cmd, "send", rdma_uri, "--size", "64M", "--channels", "2", "--max-bandwidth", "4MiB/s",
         "--json", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env))
    deadline = time.monotonic() + 120
    while rc_qps() < 6 and time.monotonic() < deadline and send.poll() is None:
        time.sleep(0.3)  # main + 2 channels, both ends: 6 queue pairs
    assert send.poll() is None and rc_qps() >= 6, "the channels never connected"
    time.sleep(3)  # mid-migration: 64 MiB at 4 MiB/s takes 16 s
    killed, other = (send, recv) if victim == "send" else (recv, send)
    ended: list[float] = []

    def wait() -> None:
        other.wait(60)
        ended.append(time.monotonic())
    waiter = threading.Thread(target=wait)
    waiter.start()
    cut = time.monotonic()
    killed.send_signal(signal.SIGKILL)
    waiter.join(70)
    killed.wait(10)
    out, err = other.communicate(timeout=5)
    assert other.returncode not in (0, None), err
    one_line(err, "")
    assert "completed" not in out
    took = ended[0] - cut
    print(f"{'recv' if victim == 'send' else 'send'} ended {took:.2f} s after the kill")
    assert took < PROMPT, f"the other side ended {took:.2f} s after the kill: {err.strip()}"
    assert rc_qps() == 0  # nothing left connected
    if victim == "send":
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert not any(e.get("event") == "completed" for e in events)
