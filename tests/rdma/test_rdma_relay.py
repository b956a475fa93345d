"""``mignet relay`` with an rdma: link between two relays (issue 12), in the soft-RoCE guest.

mignet send -> relay (tcp in, rdma out) -> relay (rdma in, tcp out) -> mignet recv, and the
same path between two real, paused QEMU 7.2 (TCG, 32 MiB): the destination's RAM image
equals the source's byte for byte. The QEMU test prints one timing of the relayed path and
of QEMU -> QEMU over tcp in the same guest (``-s`` shows it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pytest

from mignet.guest.ram import GuestRam
from tests.support.cli import send_into, start_recv
from tests.support.qemu_peer import QemuDestination, QemuSource, qemu_skip_reason
from tests.test_relay import _unused_port, assert_relays_carried_qemu, finish

pytestmark = pytest.mark.rdma


class Relays:
    """relay (tcp in, rdma out) -> ``link`` -> relay (rdma in, tcp out) -> ``to``, both
    started at once (the rdma: address is known beforehand, and the first relay connects
    only once its input began), so that their start-up (seconds under TCG) overlaps."""

    def __init__(self, cmd: list[str], env: dict[str, str], to: str, link: str) -> None:
        def start(listen: str, dest: str) -> subprocess.Popen[str]:
            return subprocess.Popen([*cmd, "relay", "--listen", listen, "--to", dest, "--json"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                    start_new_session=True)
        self.second = start(link, to)
        self.first = start("tcp:127.0.0.1:0", link)
        self._uri: str | None = None

    def uri(self) -> str:
        """Once both listen: where the source connects (the first relay)."""
        if self._uri is None:
            for proc in (self.second, self.first):
                assert proc.stdout is not None
                line = proc.stdout.readline()
                assert line, proc.communicate(timeout=30)[1]
                info = json.loads(line)
                assert info["event"] == "listening", info
            self._uri = str(info["uri"])
        return self._uri

    def stop(self) -> None:
        for proc in (self.first, self.second):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)


@contextmanager
def relays_over_rdma(cmd: list[str], env: dict[str, str], to: str, link: str) -> Iterator[Relays]:
    relays = Relays(cmd, env, to, link)
    try:
        yield relays
    finally:
        relays.stop()


def test_send_through_relays_over_rdma_into_recv_digest_matches(
        mignet_cmd: list[str], subprocess_env: dict[str, str], rdma_uri: str) -> None:
    recv_uri = f"tcp:127.0.0.1:{_unused_port()}"  # known beforehand: all three start at once
    with relays_over_rdma(mignet_cmd, subprocess_env, recv_uri, rdma_uri) as relays:
        recv, _ = start_recv(mignet_cmd, subprocess_env, uri=recv_uri)
        sent, got = send_into(mignet_cmd, subprocess_env, recv, relays.uri(),
                              "--size", "32M", "--fill", "mixed", "--seed", "6", timeout=180, recv_timeout=180)
        done = [finish(relays.first, timeout=180)[-1], finish(relays.second, timeout=180)[-1]]
    assert got["ram_digest"] == sent["ram_digest"] == GuestRam.generate(32 << 20, "mixed", seed=6).digest("xxh3")
    for c in done:
        assert c["bytes_in"] == c["bytes_out"] == sent["transferred"] == got["stats"]["stream_bytes"]
        assert c["pages"] == got["stats"]["normal_pages"] and c["zero_pages"] == got["stats"]["zero_pages"]
        assert c["device_sections"] == 4


MEM_MIB = 32


@pytest.mark.qemu
@pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")
def test_paused_qemu_through_relays_over_rdma_into_qemu_byte_identical(
        mignet_cmd: list[str], subprocess_env: dict[str, str], rdma_uri: str, shm_dir: Path) -> None:
    tcg = ["-accel", "tcg"]  # after the helper's "-accel kvm -accel tcg": no /dev/kvm in the guest
    with ExitStack() as stack:
        dst = stack.enter_context(QemuDestination(shm_dir / "relay", mem_mib=MEM_MIB, extra_args=tcg))
        dst.migrate_incoming("tcp:127.0.0.1:0")
        dst_uri = dst.listen_uri()
        assert dst_uri is not None
        relays = stack.enter_context(relays_over_rdma(mignet_cmd, subprocess_env, dst_uri, rdma_uri))
        # while the relays start: QEMU -> QEMU over tcp, the reference for the printed timing
        with QemuDestination(shm_dir / "direct", mem_mib=MEM_MIB, extra_args=tcg) as ddst, \
                QemuSource(shm_dir / "direct", mem_mib=MEM_MIB, fill="random", seed=12, extra_args=tcg) as dsrc:
            ddst.migrate_incoming("tcp:127.0.0.1:0")
            ddst_uri = ddst.listen_uri()
            assert ddst_uri is not None
            uri = relays.uri()  # both relays idle now: the timing has the CPUs to itself
            t0 = time.monotonic()
            dsrc.migrate(ddst_uri)
            ddst.wait_migration(timeout=120, poll=0.005)
            direct_s = time.monotonic() - t0
            assert np.array_equal(np.fromfile(ddst.image_path, np.uint8), np.fromfile(dsrc.image_path, np.uint8))

        with QemuSource(shm_dir / "relay", mem_mib=MEM_MIB, fill="random", seed=11, extra_args=tcg) as src:
            t0 = time.monotonic()
            src.migrate(uri)
            info = dst.wait_migration(timeout=120, poll=0.005)
            relay_s = time.monotonic() - t0
            source = np.fromfile(src.image_path, np.uint8)
        done = [finish(relays.first, timeout=120)[-1], finish(relays.second, timeout=120)[-1]]
        assert info["status"] == "completed"
        assert dst.status() == "prelaunch"  # as the source was: never started (-S)
        assert np.array_equal(np.fromfile(dst.image_path, np.uint8), source)
    assert_relays_carried_qemu(done)
    print(f"\nrelay-over-rdma timing ({MEM_MIB} MiB paused QEMU, TCG guest, one run): "
          f"QEMU -> QEMU tcp {direct_s:.2f} s; QEMU -> relay -> rdma -> relay -> QEMU {relay_s:.2f} s; "
          f"ratio {relay_s / direct_s:.2f}")
