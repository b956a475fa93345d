"""``mignet send``/``recv`` over ``rdma:`` between processes, a killed source, and the setup
errors, each of which must be one line on stderr that names the fix."""

from __future__ import annotations

import resource
import signal
import subprocess
import time
from collections.abc import Callable

import pytest

from mignet.cli import exits
from mignet.guest.ram import GuestRam
from tests.support.cli import one_line, send_into, start_recv

pytestmark = pytest.mark.rdma


def rc_qps() -> int:
    """RC queue pairs that exist on the device now (both ends connected: 2)."""
    out = subprocess.run(["rdma", "res", "show", "qp"], capture_output=True, text=True).stdout
    return sum(1 for line in out.splitlines() if " type RC " in line and "state RTS" in line)


def test_send_recv_between_processes_digest_matches(mignet_cmd: list[str],
                                                    subprocess_env: dict[str, str],
                                                    rdma_uri: str) -> None:
    recv, _ = start_recv(mignet_cmd, subprocess_env, uri=rdma_uri)
    sent, got = send_into(mignet_cmd, subprocess_env, recv, rdma_uri, "--size", "32M",
                          "--fill", "mixed", "--seed", "8", "--rdma-pin-all", timeout=180)
    ram = GuestRam.generate(32 << 20, "mixed", seed=8)
    assert got["ram_digest"] == sent["ram_digest"]
    assert got["ram_digest"] == ram.digest("xxh3")
    assert got["stats"]["device_sections"] == 4
    # the receiver reports the page data RDMA put in its RAM (every data page, no zero page)
    data_pages = int((~ram["pc.ram"].zero_mask()).sum())
    assert got["stats"]["rdma_placed_bytes"] == data_pages * 4096
    assert got["stats"]["setup_seconds"] > 0  # --rdma-pin-all: registration is a setup phase
    # the listener chose mignet's own protocol from the connection's private data
    assert got["stats"]["rdma"]["protocol"] == "mignet" and got["stats"]["rdma"]["pin_all"] is True


def test_killed_source_gives_receiver_one_line_error(mignet_cmd: list[str],
                                                     subprocess_env: dict[str, str],
                                                     rdma_uri: str) -> None:
    recv, _ = start_recv(mignet_cmd, subprocess_env, uri=rdma_uri)
    send = subprocess.Popen([*mignet_cmd, "send", rdma_uri, "--size", "32M", "--quiet",
                             "--max-bandwidth", "2MiB/s"], env=subprocess_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while rc_qps() < 2 and time.monotonic() < deadline and send.poll() is None:
        time.sleep(0.3)
    assert send.poll() is None and rc_qps() >= 2, "the sender never connected"
    time.sleep(2)  # mid-migration: 32 MiB at 2 MiB/s takes 16 s
    send.send_signal(signal.SIGKILL)
    send.wait(10)
    t0 = time.monotonic()
    _, stderr = recv.communicate(timeout=60)
    assert recv.returncode == exits.CONNECTION_LOST
    assert time.monotonic() - t0 < 30
    one_line(stderr, "disconnected")


def _low_memlock(limit: int) -> Callable[[], None]:  # a preexec_fn
    def apply() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, hard))
    return apply


def test_memlock_too_low_one_line_error(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                        rdma_uri: str) -> None:
    """A source whose limit cannot even hold the message rings (as with `prlimit -l`)."""
    send = subprocess.run([*mignet_cmd, "send", rdma_uri, "--size", "32M"], capture_output=True,
                          text=True, env=subprocess_env, timeout=120,
                          preexec_fn=_low_memlock(256 << 10))
    assert send.returncode == exits.SETUP
    one_line(send.stderr, "RLIMIT_MEMLOCK is 262144: raise it with ulimit -l unlimited")
