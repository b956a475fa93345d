"""The fault matrix over ``rdma:`` (mignet's own protocol), in the soft-RoCE guest.

The host matrix (tests/test_phase_faults.py) finds each phase with a forwarding proxy; an
RDMA connection cannot be proxied, and its pages bypass the stream. So the phase is found
from the outside here: *setup* is the destination having created its block file (the block
list arrived, RDMA registration and the first pages follow), *RAM* is two seconds into a
32 MiB guest sent at 2 MiB/s (queue pairs of both ends in RTS, the block file there). A
fault is a kill (SIGKILL), a cancel (SIGINT to ``send``, SIGTERM to ``recv``) or a stall
(SIGSTOP: the peer's idle timeout must end it). Every survivor ends non-zero with one line
within the bound, the receiver's manifest never claims completion, and no process is left.
Device state and switchover are not hit here: on this link they last milliseconds, too short
to aim a signal at from outside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mignet.cli import exits
from mignet.rdma.placement import CHUNK, READAHEAD_CHUNKS
from tests.support.cli import one_line, start_recv
from tests.support.processes import leftovers, track

pytestmark = pytest.mark.rdma

DETECT = 2.0  # the bound, from the fault to a survivor's exit
SLACK = 2.0  # process exit inside a TCG-emulated guest (several times slower than the host)
IDLE = 3.0  # --idle-timeout on both ends, the bound of a stall
RATE = 2 << 20  # --max-bandwidth: 32 MiB take 16 s
# A stopped destination's NIC still acks WRITEs into chunks it registered already: the source
# idles only once it needs the destination's CPU again (the next chunk's registration).
AHEAD = READAHEAD_CHUNKS * CHUNK / RATE

KILLS = ["kill-source", "kill-destination", "cancel-source", "cancel-destination"]
STALLS = ["stall-source", "stall-destination"]


def _params() -> list[Any]:
    return ([pytest.param("setup", c, id=f"setup-{c}") for c in KILLS]
            + [pytest.param("ram", c, id=f"ram-{c}") for c in [*KILLS, *STALLS]])


def _log(record: dict[str, object]) -> None:
    print(f"\n{json.dumps(record)}")
    path = os.environ.get("MIGNET_FAULT_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _block_file(out: Path) -> bool:
    """The destination created its RAM block's file: the block list arrived."""
    return out.is_dir() and any(p.name.endswith(".ram") for p in out.iterdir())


@pytest.mark.parametrize(("phase", "case"), _params())
def test_a_fault_over_rdma_ends_both_sides_promptly_and_claims_nothing(
        mignet_cmd: list[str], subprocess_env: dict[str, str], tmp_path: Path, shm_dir: Path,
        rdma_uri: str, phase: str, case: str) -> None:
    out = shm_dir / "out"  # tmpfs: --out refuses the guest's 9p share
    recv, uri = start_recv(mignet_cmd, subprocess_env, "--out", str(out), "--digest", "none",
                           "--idle-timeout", str(IDLE), uri=rdma_uri)
    send = track(subprocess.Popen(
        [*mignet_cmd, "send", uri, "--size", "32M", "--fill", "random", "--return-path",
         "--max-bandwidth", str(RATE), "--idle-timeout", str(IDLE), "--digest", "none", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env))
    procs = {"source": send, "destination": recv}
    ended: dict[str, float] = {}
    errors: dict[str, str] = {}

    def wait(name: str) -> None:
        _, errors[name] = procs[name].communicate(timeout=120)
        ended[name] = time.monotonic()
    waiters = [threading.Thread(target=wait, args=(n,), daemon=True) for n in procs]
    for w in waiters:
        w.start()
    deadline = time.monotonic() + 120  # interpreter start-up in the emulated guest is slow
    block_at: float | None = None
    while block_at is None or (phase == "ram" and time.monotonic() - block_at < 2.0):
        assert not ended, f"ended before the phase: {errors}"
        assert time.monotonic() < deadline, "the phase never came"
        if block_at is None and _block_file(out):
            block_at = time.monotonic()
        time.sleep(0.02)
    kind, _, victim = case.partition("-")
    sig = {"kill": signal.SIGKILL, "stall": signal.SIGSTOP,
           "cancel": signal.SIGINT if victim == "source" else signal.SIGTERM}[kind]
    procs[victim].send_signal(sig)
    t0 = time.monotonic()
    other = "destination" if victim == "source" else "source"
    try:
        if kind == "stall":  # the stalled one is killed once the other gave up
            waiters[list(procs).index(other)].join(IDLE + AHEAD + DETECT + SLACK + 30)
            procs[victim].send_signal(signal.SIGKILL)
        for w in waiters:
            w.join(120)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    took = {name: round(at - t0, 2) for name, at in ended.items()}
    _log({"transport": "rdma", "phase": phase, "case": case, "took": took,
          "rc": {n: p.returncode for n, p in procs.items()},
          "errors": {n: e.strip() for n, e in errors.items()}})
    bound = DETECT + SLACK + (IDLE if kind == "stall" else 0) + (AHEAD if case == "stall-destination" else 0)
    for name, proc in procs.items():
        if kind in ("kill", "stall") and name == victim:
            assert proc.returncode == -signal.SIGKILL
            continue
        assert proc.returncode not in (0, None), (name, errors[name])
        line = one_line(errors[name], "")
        if kind == "cancel" and name == victim:
            assert proc.returncode == exits.CANCELLED, (name, line)
        assert took[name] < bound, f"{name} ended {took[name]} s after the fault: {line}"
        if kind == "stall":  # it waited for its idle limit, not for something else; the
            # limit counts from the last message, and at RATE a 2 MiB batch goes once a second
            assert took[name] > IDLE - 2.0, f"{name} ended {took[name]} s after the stall"
            assert proc.returncode == exits.TIMEOUT, (name, line)
    manifest = out / "manifest.json"
    if manifest.exists():
        assert json.loads(manifest.read_text())["complete"] is False
    assert not leftovers(root=os.getpid(), grace=3.0)
