"""Real QEMU 7.2 migrating over ``rdma:`` into ``mignet recv``: QEMU's own RDMA protocol
(migration/rdma.c), which the listener tells from mignet's by the connection's private data.

The guest is paused (``-S``) with its RAM in a file on the guest's /dev/shm, so the
received RAM must equal that file byte for byte; once with ``rdma-pin-all`` (the whole RAM
registered up front) and once without (1 MiB chunks registered as QEMU asks)."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mignet.cli import exits
from mignet.guest.ram import GuestRam, block_filename
from tests.support.cli import one_line, send_into, start_recv
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


# --- mignet as QEMU's RDMA source: send --rdma-protocol qemu into qemu -incoming rdma: ------

@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, np.ndarray]]:
    """A paused QEMU guest (random RAM) received by ``recv --out`` over TCP, once for the
    module: (the snapshot directory, the source's RAM)."""
    import os
    import sys

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="mignet-rdma-snap-", dir=base) as d:
        snap = Path(d) / "snap"
        recv, uri = start_recv([sys.executable, "-m", "mignet"], env, "--out", str(snap))
        with QemuSource(Path(d) / "src", mem_mib=MEM_MIB, fill="random", seed=24, extra_args=TCG) as src:
            src.migrate(uri, timeout=180)
            source = np.fromfile(src.image_path, np.uint8)
        _, stderr = recv.communicate(timeout=120)
        assert recv.returncode == 0, stderr
        yield snap, source


def _send_snapshot(cmd: list[str], env: dict[str, str], uri: str, snap: Path,
                   *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, "send", uri, "--snapshot", str(snap), "--rdma-protocol", "qemu",
                           "--json", "--quiet", *extra],
                          capture_output=True, text=True, env=env, timeout=180)


@pytest.mark.parametrize("pin_all", [False, True], ids=["chunks", "pin-all"])
def test_send_snapshot_into_qemu_over_rdma_byte_identical(
        mignet_cmd: list[str], subprocess_env: dict[str, str], rdma_uri: str, shm_dir: Path,
        snapshot: tuple[Path, np.ndarray], pin_all: bool) -> None:
    """``send --snapshot --rdma-protocol qemu`` into ``qemu -incoming rdma:``: QEMU takes
    mignet's HOOK rounds, registrations and RDMA WRITEs, completes, and its RAM is the
    source's byte for byte."""
    snap, source = snapshot
    with QemuDestination(shm_dir / "dst", mem_mib=MEM_MIB, extra_args=TCG) as dst:
        dst.migrate_incoming(rdma_uri)
        time.sleep(1)  # QEMU listens on rdma_cm asynchronously; nothing to poll for
        t0 = time.monotonic()
        sent = _send_snapshot(mignet_cmd, subprocess_env, rdma_uri, snap,
                              *(["--rdma-pin-all"] if pin_all else []))
        assert sent.returncode == 0, sent.stderr
        info = dst.wait_migration(timeout=120, poll=0.01)
        seconds = time.monotonic() - t0
        assert info["status"] == "completed"
        assert dst.status() == "prelaunch"  # the source never ran (-S): it waits for cont
        received = np.fromfile(dst.image_path, np.uint8)
    assert np.array_equal(received, np.fromfile(snap / block_filename("m0"), np.uint8))
    assert np.array_equal(received, source)
    done = json.loads(sent.stdout.strip().splitlines()[-1])
    rdma = done["rdma"]
    assert rdma["protocol"] == "qemu" and rdma["pin_all"] is pin_all
    assert done["confirmed"] is None  # no return path over QEMU's RDMA protocol
    # every byte of RAM went by RDMA WRITE (or COMPRESS for zero chunks), none in the stream
    assert rdma["bytes_written"] + rdma["compressed_bytes"] >= MEM_MIB << 20
    assert done["transferred"] >= MEM_MIB << 20
    if pin_all:
        assert rdma["registrations"] == 0
    else:
        assert rdma["registrations"] > 0 and rdma["registered_bytes"] >= rdma["bytes_written"] // 2
    print(f"\nmignet send -> QEMU over rdma ({MEM_MIB} MiB, {'pin-all' if pin_all else 'chunks'}): "
          f"{seconds:.2f} s, send {done['seconds']:.2f} s; {json.dumps(rdma)}")


def test_send_into_qemu_with_other_ram_fails_both_sides_in_one_line(
        mignet_cmd: list[str], subprocess_env: dict[str, str], rdma_uri: str, shm_dir: Path,
        snapshot: tuple[Path, np.ndarray]) -> None:
    """QEMU started with twice the snapshot's RAM refuses the block list on its side (and
    exits); mignet's send fails at once with one line naming the machine and RAM to use."""
    snap, _ = snapshot
    with QemuDestination(shm_dir / "dst", mem_mib=2 * MEM_MIB, extra_args=TCG) as dst:
        dst.migrate_incoming(rdma_uri)
        time.sleep(1)
        t0 = time.monotonic()
        sent = _send_snapshot(mignet_cmd, subprocess_env, rdma_uri, snap)
        seconds = time.monotonic() - t0
        # QEMU exits without disconnecting first; rdma_cm reports it 25-30 s later here (the
        # send's start-up is 10-15 s of that in the guest); --idle-timeout (60 s) bounds it.
        assert seconds < 100
        status = dst.wait_exit(60)  # QEMU ends itself after a failed incoming load
        log = dst.log_path.read_text(errors="replace")
    assert status not in (None, 0), log
    assert sent.returncode != 0
    line = one_line(sent.stderr, "-machine pc-i440fx")
    assert f"m0 {MEM_MIB}.0 MiB" in line, line
    # QEMU's own error: "Size mismatch: m0: 0x2000000 in != 0x4000000: Invalid argument"
    said = [x for x in log.splitlines() if "mismatch" in x]
    assert said, log
    print(f"\nwrong RAM: send failed after {seconds:.1f} s: {line}\nQEMU (exit {status}): {said[0]}")


def test_send_live_snapshot_into_qemu_over_rdma(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                               rdma_uri: str, shm_dir: Path,
                                               snapshot: tuple[Path, np.ndarray]) -> None:
    """``--live``: the snapshot runs here (vCPUs writing), live precopy rounds go to QEMU in
    QEMU's protocol (later rounds re-WRITE dirty pages into registered chunks), and QEMU's
    RAM equals the source's at stop-and-copy."""
    from mignet.guest.directory import open_snapshot
    from mignet.guest.ram import RamBlock

    snap, _ = snapshot
    names = [block.name for block in open_snapshot(snap).ram]
    with QemuDestination(shm_dir / "dst", mem_mib=MEM_MIB, extra_args=TCG) as dst:
        dst.migrate_incoming(rdma_uri)
        time.sleep(1)
        sent = _send_snapshot(mignet_cmd, subprocess_env, rdma_uri, snap, "--live",
                              "--dirty-rate", "4MiB/s")
        assert sent.returncode == 0, sent.stderr
        assert dst.wait_migration(timeout=120, poll=0.01)["status"] == "completed"
        received = RamBlock("m0", np.fromfile(dst.image_path, np.uint8)).digest("xxh3")
    done = json.loads(sent.stdout.strip().splitlines()[-1])
    assert done["live"] is True and done["rdma"]["protocol"] == "qemu"
    assert done["block_digests"][names.index("m0")] == received
    assert done["rdma"]["rounds"] >= 3  # setup, at least one RAM round, the end


@pytest.mark.parametrize("pin_all", [False, True], ids=["chunks", "pin-all"])
def test_send_qemu_protocol_into_recv_digest_matches(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                                     rdma_uri: str, pin_all: bool) -> None:
    """Both of mignet's QEMU-protocol ends together: a mixed guest (zero chunks go as
    COMPRESS, the rest by WRITE) arrives intact, and each end says QEMU's protocol ran."""
    recv, _ = start_recv(mignet_cmd, subprocess_env, uri=rdma_uri)
    sent, got = send_into(mignet_cmd, subprocess_env, recv, rdma_uri, "--size", "16M", "--fill",
                          "mixed", "--seed", "5", "--rdma-protocol", "qemu",
                          *(["--rdma-pin-all"] if pin_all else []), timeout=180)
    assert got["ram_digest"] == sent["ram_digest"] == GuestRam.generate(16 << 20, "mixed", seed=5).digest("xxh3")
    assert sent["rdma"]["protocol"] == got["stats"]["rdma"]["protocol"] == "qemu"
    assert sent["rdma"]["pin_all"] is got["stats"]["rdma"]["pin_all"] is pin_all
    assert got["stats"]["normal_pages"] == got["stats"]["zero_pages"] == 0  # none in the stream


# --- benchmark: the four ways over rdma:, side by side in one guest ---------------------

BENCH_PATHS = ("qemu->qemu", "qemu->mignet recv", "mignet send->qemu", "mignet send->mignet recv")


def bench_rdma_paths(mem_mib: int = MEM_MIB, repeats: int = 3) -> dict[str, Any]:
    """QEMU -> QEMU (QEMU's protocol), QEMU -> ``mignet recv`` (QEMU's protocol), ``mignet
    send --snapshot`` -> QEMU (QEMU's protocol) and ``mignet send --snapshot`` -> ``mignet
    recv`` (mignet's own): one paused random guest of ``mem_mib``, chunk registration (no
    pin-all), the paths alternating ``repeats`` times in one boot; every destination's RAM
    checked against the source's. Time: QEMU's ``total-time`` for a QEMU source, send's
    ``seconds`` (connected to done) for mignet's; wall: the migrate command or the send
    process's start to the destination's completion (process start-up included)."""
    import os
    import statistics
    import sys

    from mignet.guest.ram import RamBlock
    from tests.rdma.conftest import ADDR

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "mignet"]
    ports = iter(range(21000 + os.getpid() % 1000 * 20, 10 ** 6))
    times: dict[str, list[float]] = {p: [] for p in BENCH_PATHS}
    walls: dict[str, list[float]] = {p: [] for p in BENCH_PATHS}
    with tempfile.TemporaryDirectory(prefix="mignet-rdma-bench-", dir="/dev/shm") as d:
        work = Path(d)
        snap = work / "snap"
        recv, uri = start_recv(cmd, env, "--out", str(snap))
        with QemuSource(work / "cap", mem_mib=mem_mib, fill="random", seed=31, extra_args=TCG) as src:
            src.migrate(uri, timeout=300)
            source = np.fromfile(src.image_path, np.uint8)
        assert recv.wait(120) == 0
        want = RamBlock("m0", source).digest("xxh3")
        for _ in range(repeats):
            for path in BENCH_PATHS:
                rdma = f"rdma:{ADDR}:{next(ports)}"
                if path.endswith("qemu"):
                    with QemuDestination(work / "dst", mem_mib=mem_mib, extra_args=TCG) as dst:
                        dst.migrate_incoming(rdma)
                        time.sleep(1)
                        t0 = time.monotonic()
                        if path == "qemu->qemu":
                            with QemuSource(work / "src", mem_mib=mem_mib, fill="random", seed=31,
                                            extra_args=TCG) as src:
                                t0 = time.monotonic()
                                seconds = src.migrate(rdma, timeout=300)["total-time"] / 1000
                        else:
                            sent = _send_snapshot(cmd, env, rdma, snap)
                            assert sent.returncode == 0, sent.stderr
                            seconds = json.loads(sent.stdout.splitlines()[-1])["seconds"]
                        dst.wait_migration(timeout=300, poll=0.005)
                        wall = time.monotonic() - t0
                        assert np.array_equal(np.fromfile(dst.image_path, np.uint8), source)
                else:
                    recv, _ = start_recv(cmd, env, uri=rdma)
                    t0 = time.monotonic()
                    if path == "qemu->mignet recv":
                        with QemuSource(work / "src", mem_mib=mem_mib, fill="random", seed=31,
                                        extra_args=TCG) as src:
                            t0 = time.monotonic()
                            seconds = src.migrate(rdma, timeout=300)["total-time"] / 1000
                    else:
                        sent = subprocess.run([*cmd, "send", rdma, "--snapshot", str(snap), "--json",
                                               "--quiet"], capture_output=True, text=True, env=env,
                                              timeout=300)
                        assert sent.returncode == 0, sent.stderr
                        seconds = json.loads(sent.stdout.splitlines()[-1])["seconds"]
                    out, err = recv.communicate(timeout=300)
                    wall = time.monotonic() - t0
                    assert recv.returncode == 0, err
                    done = json.loads(out.splitlines()[-1])
                    assert done["block_digests"][[n for n, _ in done["blocks"]].index("m0")] == want
                times[path].append(round(seconds, 3))
                walls[path].append(round(wall, 2))
                print(f"{path}: {seconds:.3f} s (wall {wall:.2f} s)", flush=True)
    return {"mem_mib": mem_mib, "times": times, "walls": walls,
            "median_s": {p: statistics.median(v) for p, v in times.items()},
            "median_mib_s": {p: round(mem_mib / statistics.median(v), 1) for p, v in times.items()}}


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(json.dumps(bench_rdma_paths(*[int(a) for a in sys.argv[1:3]])))
