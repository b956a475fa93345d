"""QEMU 7.2 → QEMU 7.2 on loopback, driven over real QMP: the baseline mignet is measured
against in ``bench channels``.

Why QEMU itself: mignet claims to move a guest faster than QEMU does, so the comparison must
be QEMU as a user runs it, not a model of it. Both ends are real ``qemu-system-x86_64``
processes with a paused guest (``-S``): the source's RAM *is* the benchmark's random image
(``memory-backend-file`` on the file in /dev/shm, so no time goes into making data), the
destination's RAM is preallocated (``memory-backend-ram,prealloc=on``; without it QEMU
spends most of the time faulting in pages, see ../shared/notes/baselines.md) and waits with
``-incoming defer``. N > 1 sets capability ``multifd`` and ``multifd-channels`` N on both;
N = 1 is plain precopy on one connection. ``max-bandwidth`` is lifted (QEMU's default caps
at 128 MiB/s).

Figures: the time from the ``migrate`` command to the destination saying ``completed``
(polled every 10 ms; QEMU's own ``total-time`` and ``downtime`` from the source are kept
too), and user+system CPU of both processes over that window, from /proc/PID/stat (which
counts every thread, exited ones included). The window leaves out QEMU's start-up and the
destination's preallocation; their whole-life CPU, from ``wait4``, is kept as well.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QEMU = "qemu-system-x86_64"
UNLIMITED = 10 << 30  # max-bandwidth in bytes/s: the socket, not QEMU's limiter, sets the pace
POLL = 0.01
_TICK = os.sysconf("SC_CLK_TCK")


def qemu_skip_reason() -> str | None:
    """Why the QEMU baseline cannot run here, or None when it can."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed"
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        return "the Python package qemu.qmp is not installed"
    return None


@dataclass
class QemuRun:
    seconds: float | None  # migrate → destination completed; None: the run failed
    cpu: float  # user+system seconds of both processes over that window
    cpu_life: float  # the same over both processes' whole lives (wait4)
    total_time_ms: int | None = None  # the source's query-migrate total-time
    downtime_ms: int | None = None
    transferred: int | None = None  # the source's ram.transferred: every page went
    error: str = ""


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime: fields 14 and 15


def _command(size: int, qmp: Path, memory: str, incoming: bool) -> list[str]:
    binary = shutil.which(QEMU) or QEMU
    return [binary, "-accel", "kvm", "-accel", "tcg", "-nodefaults", "-display", "none", "-S",
            "-machine", "pc,memory-backend=m0", "-m", f"{size >> 20}M", "-object", memory,
            "-qmp", f"unix:{qmp},server=on,wait=off", *(["-incoming", "defer"] if incoming else [])]


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Wait for ``proc`` (killing its group after ``timeout``); its whole-life CPU seconds."""
    deadline = time.monotonic() + timeout
    while True:
        pid, _, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = 0
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, _, usage = os.wait4(proc.pid, 0)
            proc.returncode = -9
            return usage.ru_utime + usage.ru_stime
        time.sleep(0.01)


async def _connect(client: Any, sock: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    """QMP's socket file appears before QEMU listens on it: retry for up to 60 s (the
    destination preallocates its RAM first)."""
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()
            raise RuntimeError(f"QEMU exited ({proc.returncode}): {tail[-1] if tail else 'no message'}")
        if sock.exists():
            try:
                await client.connect(str(sock))
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
        elif time.monotonic() > deadline:
            raise RuntimeError(f"QEMU's QMP socket {sock} did not appear within 60 s")
        await asyncio.sleep(0.05)


async def _configure(client: Any, channels: int) -> None:
    if channels > 1:
        await client.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "multifd", "state": True}]})
        await client.execute("migrate-set-parameters", {"multifd-channels": channels})


async def _status(client: Any) -> dict[str, Any]:
    info: dict[str, Any] = await client.execute("query-migrate")
    return info


async def _migrate(src: Any, dst: Any, pids: tuple[int, int], channels: int,
                   timeout: float) -> QemuRun:
    await _configure(dst, channels)
    await _configure(src, channels)
    await src.execute("migrate-set-parameters", {"max-bandwidth": UNLIMITED})
    await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    address = [a for a in (await _status(dst)).get("socket-address", []) if a.get("type") == "inet"]
    if not address:
        return QemuRun(None, 0.0, 0.0, error="the destination reported no listening address")
    uri = f"tcp:{address[0]['host']}:{address[0]['port']}"
    cpu0 = sum(proc_cpu(p) for p in pids)
    t0 = time.monotonic()
    await src.execute("migrate", {"uri": uri})
    deadline = t0 + timeout
    while True:
        d = await _status(dst)
        if d.get("status") == "completed":
            seconds = time.monotonic() - t0
            break
        s = await _status(src)
        for what, info in (("destination", d), ("source", s)):
            if info.get("status") in ("failed", "cancelled"):
                why = info.get("error-desc", "no error-desc")
                return QemuRun(None, 0.0, 0.0, error=f"{what} {info['status']}: {why}")
        if time.monotonic() > deadline:
            return QemuRun(None, 0.0, 0.0, error=f"not completed after {timeout:g} s "
                                                 f"(source {s.get('status')}, destination {d.get('status')})")
        await asyncio.sleep(POLL)
    while (s := await _status(src)).get("status") not in ("completed", "failed", "cancelled"):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(POLL)
    cpu = sum(proc_cpu(p) for p in pids) - cpu0
    if s.get("status") != "completed":
        return QemuRun(None, cpu, 0.0, error=f"source {s.get('status')}: {s.get('error-desc', '')}")
    return QemuRun(seconds, cpu, 0.0, total_time_ms=s.get("total-time"), downtime_ms=s.get("downtime"),
                   transferred=s.get("ram", {}).get("transferred"))


async def _run(image: Path, size: int, channels: int, workdir: Path, timeout: float) -> QemuRun:
    from qemu.qmp import QMPClient

    procs: list[subprocess.Popen[bytes]] = []
    clients = [QMPClient("bench-src"), QMPClient("bench-dst")]
    memories = [f"memory-backend-file,id=m0,size={size},mem-path={image},share=on",
                f"memory-backend-ram,id=m0,size={size},prealloc=on"]
    result = QemuRun(None, 0.0, 0.0, error="QEMU did not start")
    try:
        for name, memory, client in zip(("src", "dst"), memories, clients, strict=True):
            sock, log = workdir / f"{name}.qmp", workdir / f"{name}.log"
            with open(log, "wb") as out:
                procs.append(subprocess.Popen(_command(size, sock, memory, incoming=name == "dst"),
                                              stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            await _connect(client, sock, procs[-1], log)
        result = await _migrate(clients[0], clients[1], (procs[0].pid, procs[1].pid), channels, timeout)
    except Exception as exc:  # a failed run is reported as failed, with QEMU's reason
        result = QemuRun(None, 0.0, 0.0, error=str(exc).strip().splitlines()[-1] if str(exc).strip()
                         else type(exc).__name__)
    finally:
        for client in clients:
            try:
                await asyncio.wait_for(client.execute("quit"), 5)
            except Exception:
                pass  # not connected, or QEMU closed the socket before answering
            try:
                await asyncio.wait_for(client.disconnect(), 5)
            except Exception:
                pass
    for proc in procs:
        result.cpu_life += await asyncio.to_thread(_reap, proc, 15)
    return result


def run_qemu_pair(image: Path, size: int, channels: int, timeout: float = 300) -> QemuRun:
    """One QEMU → QEMU migration of the paused guest whose RAM is ``image``, with
    ``channels`` multifd channels (1: none). Never raises for a failed run: it returns one
    with ``seconds`` None and QEMU's reason."""
    with tempfile.TemporaryDirectory(prefix="mignet-bench-qemu-") as workdir:
        return asyncio.run(_run(image, size, channels, Path(workdir), timeout))
