"""Real QEMU 7.2 migrating over ``rdma:`` into ``mignet recv``: QEMU's own RDMA protocol
(migration/rdma.c), which the listener tells from mignet's by the connection's private data.

The guest is paused (``-S``) with its RAM in a file on the guest's /dev/shm, so the
received RAM must equal that file byte for byte; once with ``rdma-pin-all`` (the whole RAM
registered up front) and once without (1 MiB chunks registered as QEMU asks)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from mignet.cli import exits
from mignet.guest.ram import block_filename
from tests.support.cli import one_line, start_recv
from tests.support.qemu_peer import QemuDestination, QemuMigrationError, QemuSource, qemu_skip_reason

pytestmark = [pytest.mark.rdma, pytest.mark.qemu,
              pytest.mark.skipif(qemu_skip_reason() is not None, reason=qemu_skip_reason() or "")]

MEM_MIB = 32
TCG = ["-accel", "tcg"]  # after the helper's "-accel kvm -accel tcg": no /dev/kvm in the guest


@pytest.mark.parametrize("pin_all", [False, True], ids=["chunks", "pin-all"])
def test_real_qemu_into_recv_over_rdma_byte_identical(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                      rdma_uri: str, shm_dir: Path, pin_all: bool) -> None:
    out = shm_dir / "received"
    recv, _ = start_recv(mignet_cmd, subprocess_env, "--out", str(out), uri=rdma_uri)
    with QemuSource(shm_dir / "src", mem_mib=MEM_MIB, fill="random", seed=21, extra_args=TCG) as src:
        t0 = time.monotonic()
        info = src.migrate(rdma_uri, timeout=180, capabilities={"rdma_pin_all": pin_all})
        stdout, stderr = recv.communicate(timeout=120)
        seconds = time.monotonic() - t0
        assert recv.returncode == 0, stderr
        source = np.fromfile(src.image_path, np.uint8)
    assert info["status"] == "completed"
    assert np.array_equal(np.fromfile(out / block_filename("m0"), np.uint8), source)
    done = json.loads(stdout.strip().splitlines()[-1])
    rdma = done["stats"]["rdma"]
    assert rdma["protocol"] == "qemu" and rdma["pin_all"] is pin_all
    assert rdma["stream_messages"] > 0
    # pages came by RDMA WRITE, never in the stream
    assert done["stats"]["normal_pages"] == 0
    if pin_all:
        assert done["stats"]["setup_seconds"] > 0
    else:  # every chunk QEMU wrote was registered on its request (zero ranges: COMPRESS)
        assert rdma["registered_bytes"] + rdma["compressed_bytes"] >= MEM_MIB << 20
    print(f"\nQEMU -> mignet recv over rdma ({MEM_MIB} MiB, {'pin-all' if pin_all else 'chunks'}): "
          f"{seconds:.2f} s, QEMU total-time {info['total-time']} ms, "
          f"{info['ram']['mbps']:.0f} Mbit/s; {json.dumps(rdma)}")


def test_qemu_to_qemu_over_rdma_reference(rdma_uri: str, shm_dir: Path) -> None:
    """The same migration into QEMU itself (``-incoming rdma:``), the figure to compare."""
    uri = rdma_uri
    with QemuDestination(shm_dir / "dst", mem_mib=MEM_MIB, extra_args=TCG) as dst, \
            QemuSource(shm_dir / "src", mem_mib=MEM_MIB, fill="random", seed=22, extra_args=TCG) as src:
        dst.migrate_incoming(uri)
        time.sleep(1)  # QEMU listens on rdma_cm asynchronously; nothing to poll for
        t0 = time.monotonic()
        info = src.migrate(uri, timeout=180)
        dst.wait_migration(timeout=120, poll=0.01)
        seconds = time.monotonic() - t0
        assert np.array_equal(np.fromfile(dst.image_path, np.uint8), np.fromfile(src.image_path, np.uint8))
    print(f"\nQEMU -> QEMU over rdma ({MEM_MIB} MiB, chunks): {seconds:.2f} s, QEMU total-time "
          f"{info['total-time']} ms, {info['ram']['mbps']:.0f} Mbit/s")


def test_recv_refusing_qemu_fails_both_sides_in_one_line(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                        rdma_uri: str, shm_dir: Path) -> None:
    """--max-ram below the guest's RAM: recv says so in one line, and QEMU's migration fails
    (mignet disconnects; QEMU waits for the answer to its RAM block request) rather than hangs."""
    recv, _ = start_recv(mignet_cmd, subprocess_env, "--max-ram", "16M", uri=rdma_uri)
    with QemuSource(shm_dir / "src", mem_mib=MEM_MIB, fill="random", seed=23, extra_args=TCG) as src:
        t0 = time.monotonic()
        with pytest.raises(QemuMigrationError) as failed:
            src.migrate(rdma_uri, timeout=120)
        assert time.monotonic() - t0 < 60
        assert failed.value.info.get("status") == "failed"
    _, stderr = recv.communicate(timeout=60)
    assert recv.returncode == exits.PEER
    one_line(stderr, "--max-ram")
