"""``mignet bench channels``: multifd with N channels against a raw N-connection loop.

Why its own benchmark: multifd exists to use more than one core, so wall-clock time on a
2-core machine says little about a 16-core one; CPU seconds per GiB moved (sender and
receiver together) does. Each run is two real processes on loopback, for both kinds:

* mignet: ``mignet send tcp:… --image FILE --channels N`` (N = 1: no multifd) into
  ``mignet recv`` (anonymous memory), both the real CLI;
* raw: N threads each ``sendall`` one slice of the same mapped image into N threads each
  ``recv_into`` their slice of a fresh numpy array — no framing, no zero-page check;
* qemu: QEMU 7.2 → QEMU 7.2 with capability ``multifd`` and N channels (N = 1: none), a
  paused guest whose RAM is the same image, the destination's RAM preallocated, driven over
  QMP (:mod:`mignet.bench.qemu_pair`); when ``qemu-system-x86_64`` is missing these runs are
  skipped with the reason printed.

The image is a random file in /dev/shm, so neither sender spends time making data. Figures
per run: the receiver's time from its first connection to holding every byte (what the
user waits for), and user+system CPU of both processes from ``wait4`` (their whole lives,
start-up included, the same for both kinds; each side's user and system CPU apart in the
JSON, since the receiver's first touch of memory the host took back is system time that
swings by seconds and would hide the kinds' own cost). For QEMU: from ``migrate`` to the destination's
``completed``, and both processes' CPU over that window (/proc; their whole-life CPU, start-up
and preallocation included, is in the JSON and the summary). Before each run the machine's free memory is
warmed as in ``bench tcp`` (freshly freed memory faults in at a fraction of the speed on
this VM, which swung single runs 3x). Kinds and N alternate in each repetition;
medians are reported, and a failed run is reported as failed, never counted.

Run: ``mignet bench channels --size 1G --channels 1,2,4 --repeat 3``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mignet.bench.qemu_pair import qemu_skip_reason, run_qemu_pair
from mignet.bench.receiver import last_json, make_image, start_peer
from mignet.bench.tcp import warm_free_memory
from mignet.guest.ram import allocate_guest_memory
from mignet.units import human_bytes

GiB = 1 << 30


@dataclass
class Run:
    kind: str  # "mignet", "raw" or "qemu"
    channels: int
    seconds: float | None  # None: the run failed
    cpu: float  # user + system seconds, both processes
    nbytes: int
    error: str = ""
    detail: dict[str, Any] = field(default_factory=dict)  # qemu: its own; else CPU by side

    @property
    def mib_s(self) -> float:
        return self.nbytes / self.seconds / (1 << 20) if self.seconds else 0.0

    @property
    def cpu_per_gib(self) -> float:
        return self.cpu / (self.nbytes / GiB)


@dataclass
class Results:
    size: int
    runs: list[Run] = field(default_factory=list)

    def ok(self, kind: str, n: int) -> list[Run]:
        return [r for r in self.runs if r.kind == kind and r.channels == n and r.seconds]

    def failed(self, kind: str, n: int) -> int:
        return sum(1 for r in self.runs if r.kind == kind and r.channels == n and not r.seconds)


# --- the raw peers (run as ``python -m mignet.bench.channels raw-recv|raw-send``) -------------
def _slices(size: int, n: int) -> list[tuple[int, int]]:
    step = -(-size // n // 4096) * 4096
    return [(i, min(i + step, size)) for i in range(0, size, step)]


def _raw_recv(size: int, n: int) -> int:
    server = socket.create_server(("127.0.0.1", 0), backlog=n)
    print(json.dumps({"event": "listening", "port": server.getsockname()[1]}), flush=True)
    conns = [server.accept()[0] for _ in range(n)]
    t0 = time.monotonic()
    ram = allocate_guest_memory(size)
    got = [0] * n
    slices = _slices(size, n)

    def pump(i: int) -> None:
        conn = conns[i]
        idx = int.from_bytes(conn.recv(4, socket.MSG_WAITALL), "big")  # which slice
        lo, hi = slices[idx]
        view = ram.data[lo:hi]
        while got[i] < hi - lo:
            k = conn.recv_into(view[got[i]:])
            if k == 0:
                return
            got[i] += k
    threads = [threading.Thread(target=pump, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - t0
    if sum(got) != size:
        print(json.dumps({"event": "failed", "error": f"received {sum(got)} of {size} bytes"}), flush=True)
        return 1
    print(json.dumps({"event": "completed", "seconds": seconds}), flush=True)
    return 0


def _raw_send(port: int, image: str, n: int) -> int:
    data = np.memmap(image, np.uint8, "r")
    slices = _slices(data.size, n)
    conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(len(slices))]

    def pump(i: int) -> None:
        lo, hi = slices[i]
        conns[i].sendall(i.to_bytes(4, "big"))
        conns[i].sendall(data.data[lo:hi])
        conns[i].close()
    threads = [threading.Thread(target=pump, args=(i,)) for i in range(len(slices))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0


# --- one run -----------------------------------------------------------------------------
def _wait(proc: subprocess.Popen[str], timeout: float) -> tuple[int, float, float]:
    """(exit status, user CPU seconds, system CPU seconds) of a child, from wait4."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime, usage.ru_stime
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return -9, usage.ru_utime, usage.ru_stime
        time.sleep(0.01)


def qemu_once(n: int, image: Path, size: int, timeout: float = 300) -> Run:
    """QEMU → QEMU with ``n`` multifd channels; a run in which QEMU sent less than the
    image (random: no zero pages) is failed, whatever QEMU's status says."""
    q = run_qemu_pair(image, size, n, timeout)
    detail = {"total_time_ms": q.total_time_ms, "downtime_ms": q.downtime_ms,
              "transferred": q.transferred, "cpu_life": q.cpu_life}
    if q.seconds is not None and (q.transferred or 0) < size:
        return Run("qemu", n, None, q.cpu, size, f"QEMU sent {q.transferred} of {size} bytes", detail)
    return Run("qemu", n, q.seconds, q.cpu, size, q.error, detail)


def run_once(kind: str, n: int, image: Path, size: int, timeout: float = 300) -> Run:
    if kind == "qemu":
        return qemu_once(n, image, size, timeout)
    py = sys.executable
    if kind == "raw":
        recv = start_peer([py, "-m", "mignet.bench.channels", "raw-recv", "--size", str(size), "--channels", str(n)])
    else:
        recv = start_peer([py, "-m", "mignet", "recv", "--listen", "tcp:127.0.0.1:0", "--json", "--quiet"])
    assert recv.stdout is not None
    first = json.loads(recv.stdout.readline() or "{}")
    if "port" in first:
        port = int(first["port"])
    elif "uri" in first:
        port = int(str(first["uri"]).rsplit(":", 1)[1])
    else:
        recv.kill()
        _, err = recv.communicate()
        return Run(kind, n, None, 0.0, size, f"receiver did not start: {err.strip()[-200:]}")
    if kind == "raw":
        send = start_peer([py, "-m", "mignet.bench.channels", "raw-send", "--port", str(port),
                       "--image", str(image), "--channels", str(n)])
    else:
        send = start_peer([py, "-m", "mignet", "send", f"tcp:127.0.0.1:{port}", "--image", str(image),
                       "--no-devices", "--quiet", *(["--channels", str(n)] if n > 1 else [])])
    s_rc, s_user, s_sys = _wait(send, timeout)
    if s_rc != 0 and recv.poll() is None:
        recv.kill()  # no source is coming: do not wait out the timeout
    r_rc, r_user, r_sys = _wait(recv, timeout)
    s_cpu, r_cpu = s_user + s_sys, r_user + r_sys
    # Each side's user and system CPU apart: on this VM the receiver's first touch of memory
    # the host took back shows up as its system time, whichever kind it hits.
    split = {"send_user": s_user, "send_sys": s_sys, "recv_user": r_user, "recv_sys": r_sys}
    r_out = recv.stdout.read()
    r_err = recv.stderr.read() if recv.stderr else ""
    s_err = send.stderr.read() if send.stderr else ""
    done = last_json(r_out)
    if s_rc != 0 or r_rc != 0 or done.get("event") != "completed":
        why = (s_err or r_err).strip().splitlines()
        return Run(kind, n, None, s_cpu + r_cpu, size, why[-1] if why else f"exit {s_rc}/{r_rc}", split)
    seconds = float(done["seconds"]) if kind == "raw" else float(done["stats"]["seconds"])
    return Run(kind, n, seconds, s_cpu + r_cpu, size, detail=split)



def kinds() -> tuple[str, ...]:
    """The kinds this machine can run: QEMU only where it is installed."""
    return ("mignet", "raw") if qemu_skip_reason() else ("mignet", "raw", "qemu")


def run(size: int, channels: list[int], repeat: int, say: Any = print,
        which: tuple[str, ...] = ("mignet", "raw")) -> Results:
    results = Results(size)
    image = make_image(size)
    try:
        for rep in range(repeat):
            for n in channels:
                for kind in (which if rep % 2 == 0 else which[::-1]):
                    warm_free_memory(size)  # as bench tcp: the host's refill of freed memory
                    r = run_once(kind, n, image, size)
                    results.runs.append(r)
                    figure = f"{r.mib_s:7.0f} MiB/s" if r.seconds else f"FAILED: {r.error}"[:60]
                    say(f"  {rep + 1}/{repeat} {kind:6} N={n}: {figure}, CPU {r.cpu_per_gib:.2f} s/GiB")
    finally:
        image.unlink()
    return results


def summary(results: Results, channels: list[int]) -> list[str]:
    """One line per N: medians, the ratio, CPU per GiB (fits 80 columns)."""
    lines = ["N  mignet MiB/s  raw MiB/s  ratio  CPU s/GiB mignet / raw  failed"]
    for n in channels:
        m, r = results.ok("mignet", n), results.ok("raw", n)
        mm = statistics.median(x.mib_s for x in m) if m else None
        rm = statistics.median(x.mib_s for x in r) if r else None
        ratio = f"{mm / rm:5.2f}" if mm and rm else "  n/a"
        mc = f"{statistics.median(x.cpu_per_gib for x in m):.2f}" if m else "n/a"
        rc = f"{statistics.median(x.cpu_per_gib for x in r):.2f}" if r else "n/a"
        fails = f"{results.failed('mignet', n)}/{results.failed('raw', n)}"
        lines.append(f"{n:<2} {mm or 0:12.0f} {rm or 0:10.0f} {ratio}  {mc:>10} / {rc:<10} {fails:>6}")
    if any(r.kind == "qemu" for r in results.runs):
        lines += qemu_summary(results, channels)
    return lines


def qemu_summary(results: Results, channels: list[int]) -> list[str]:
    """mignet against QEMU 7.2 → QEMU 7.2 per N: QEMU's medians, the ratio of the medians
    (> 1: mignet faster), QEMU's CPU per GiB over the migration and over whole lives."""
    lines = ["N  qemu MiB/s  mignet/qemu  faster  CPU s/GiB qemu: run / life  failed"]
    for n in channels:
        m, q = results.ok("mignet", n), results.ok("qemu", n)
        mm = statistics.median(x.mib_s for x in m) if m else None
        qm = statistics.median(x.mib_s for x in q) if q else None
        ratio = f"{mm / qm:5.2f}" if mm and qm else "n/a"
        faster = ("mignet" if mm > qm else "qemu") if mm and qm else "n/a"
        qc = f"{statistics.median(x.cpu_per_gib for x in q):.2f}" if q else "n/a"
        ql = f"{statistics.median(x.detail['cpu_life'] / (x.nbytes / GiB) for x in q):.2f}" if q else "n/a"
        fails = results.failed("qemu", n)
        lines.append(f"{n:<2} {qm or 0:10.0f} {ratio:>12}  {faster:<6}  {qc:>14} / {ql:<10} {fails:>6}")
    return lines


def bench_channels(size: int, channels: list[int], repeat: int) -> dict[str, Any]:
    """Run the benchmark, print each run and the summary; return every run (for JSON)."""
    which = kinds()
    print(f"bench channels: {human_bytes(size)} image, N = {','.join(map(str, channels))}, "
          f"{repeat} x {'/'.join(which)}: {len(which) * len(channels) * repeat} runs", flush=True)
    if "qemu" not in which:
        print(f"bench channels: no QEMU → QEMU runs: {qemu_skip_reason()}", flush=True)
    results = run(size, channels, repeat, say=lambda line: print(line, flush=True), which=which)
    for line in summary(results, channels):
        print(line)
    return {"size": size, "channels": channels,
            "runs": [r.__dict__ | {"mib_s": r.mib_s, "cpu_per_gib": r.cpu_per_gib} for r in results.runs]}


def main(argv: list[str] | None = None) -> int:
    """The raw peers, started as ``python -m mignet.bench.channels raw-recv|raw-send``."""
    ap = argparse.ArgumentParser(prog="python -m mignet.bench.channels")
    sub = ap.add_subparsers(dest="what", required=True)
    rr = sub.add_parser("raw-recv")
    rr.add_argument("--size", type=int, required=True)
    rr.add_argument("--channels", type=int, required=True)
    rs = sub.add_parser("raw-send")
    rs.add_argument("--port", type=int, required=True)
    rs.add_argument("--image", required=True)
    rs.add_argument("--channels", type=int, required=True)
    args = ap.parse_args(argv)
    if args.what == "raw-recv":
        return _raw_recv(args.size, args.channels)
    return _raw_send(args.port, args.image, args.channels)


if __name__ == "__main__":
    sys.exit(main())
