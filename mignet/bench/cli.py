"""``mignet bench cli``: the user's path, files on both ends, against a raw pair.

Why: ``bench tcp`` measures the loader into anonymous memory from the first byte to the last,
but a user runs ``mignet send --image FILE`` into ``mignet recv --out DIR`` and waits for
both processes, digests included. This benchmark measures exactly that, process start to
exit on both ends, on loopback, from one random image in /dev/shm into a fresh folder in
/dev/shm, for three kinds alternating in every repetition:

* raw: ``sendall`` of the mapped image into ``recv_into`` a mapped new file, two processes
  (this module, ``raw-send`` / ``raw-recv``), no framing, no check;
* cli: the real ``mignet send --image FILE --json`` → ``mignet recv --out DIR --json``,
  with the default digest (the digests of both ends must match, or the run fails);
* cli-none: the same with ``--digest none`` on both ends.

Before each run the machine's free memory is warmed as in ``bench tcp``. Figures: wall
time from starting the receiver to both having exited, the receiver's peak
anonymous memory (RssAnon sampled every 20 ms: its RAM is the file's page cache, not its
own) and peak RSS (VmHWM, page cache included); medians of the runs that succeeded.

Run: ``mignet bench cli --size 2G --repeat 3``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mignet.bench.receiver import last_json, make_image, start_peer

KINDS = ("raw", "cli", "cli-none")
MiB = 1 << 20


@dataclass
class Run:
    kind: str
    seconds: float | None  # None: the run failed
    anon_peak: int  # bytes, the receiver's peak RssAnon (sampled)
    rss_peak: int  # bytes, the receiver's VmHWM (its file's page cache included)
    error: str = ""


@dataclass
class Results:
    size: int
    runs: list[Run] = field(default_factory=list)

    def ok(self, kind: str) -> list[Run]:
        return [r for r in self.runs if r.kind == kind and r.seconds]

    def median(self, kind: str) -> float | None:
        ok = self.ok(kind)
        return statistics.median(r.seconds for r in ok if r.seconds) if ok else None


# --- the raw peers (``python -m mignet.bench.cli raw-recv|raw-send``) -------------------
def _raw_recv(size: int, out: str) -> int:
    """Listen, take ``size`` bytes into a new mapped file ``out``, nothing more."""
    server = socket.create_server(("127.0.0.1", 0))
    print(json.dumps({"event": "listening", "port": server.getsockname()[1]}), flush=True)
    conn = server.accept()[0]
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, size)
    mem = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fd)
    view = memoryview(mem)
    got = 0
    while got < size:
        n = conn.recv_into(view[got:])
        if n == 0:
            break
        got += n
    view.release()
    mem.close()
    if got != size:
        print(json.dumps({"event": "failed", "error": f"received {got} of {size} bytes"}), flush=True)
        return 1
    print(json.dumps({"event": "completed"}), flush=True)
    return 0


def _raw_send(port: int, image: str) -> int:
    with open(image, "rb") as f:
        mem = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(mem)
    mem.close()
    return 0


# --- one run -----------------------------------------------------------------------------
def _memory(pid: int, peak: list[int]) -> None:
    """Fold a process's RssAnon and VmHWM (peak RSS, page cache included; unlike wait4's
    ru_maxrss not inherited from this process across fork) into ``peak``, in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]) * 1024)
                elif line.startswith("VmHWM:"):
                    peak[1] = max(peak[1], int(line.split()[1]) * 1024)
    except OSError:
        pass  # it has exited


def _wait(proc: subprocess.Popen[str], timeout: float) -> int:
    """A child's exit status, waited for at most ``timeout`` seconds (then killed)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -9




def _commands(kind: str, image: Path, out: Path, size: int) -> tuple[list[str], list[str]]:
    """(receiver, sender) command lines; the sender's ends with the port to fill in."""
    py = sys.executable
    if kind == "raw":
        return ([py, "-m", "mignet.bench.cli", "raw-recv", "--size", str(size), "--out", str(out / "pc.ram")],
                [py, "-m", "mignet.bench.cli", "raw-send", "--image", str(image), "--port"])
    digest = ["--digest", "none"] if kind == "cli-none" else []
    return ([py, "-m", "mignet", "recv", "--listen", "tcp:127.0.0.1:0", "--out", str(out), "--json",
             "--quiet", *digest],
            [py, "-m", "mignet", "send", "--image", str(image), "--json", "--quiet", *digest, "tcp:127.0.0.1:"])


def run_once(kind: str, image: Path, size: int, timeout: float = 300) -> Run:
    from mignet.bench.tcp import warm_free_memory

    warm_free_memory(size + (256 << 20))  # both kinds alike: see bench tcp
    out = Path(tempfile.mkdtemp(prefix="mignet-bench-out-", dir="/dev/shm"))
    try:
        recv_cmd, send_cmd = _commands(kind, image, out, size)
        t0 = time.monotonic()
        recv = start_peer(recv_cmd)
        assert recv.stdout is not None
        first = json.loads(recv.stdout.readline() or "{}")
        port = first.get("port") or str(first.get("uri", ":")).rsplit(":", 1)[1]
        if not port:
            recv.kill()
            _, err = recv.communicate()
            return Run(kind, None, 0, 0, f"receiver did not start: {err.strip()[-200:]}")
        if kind == "raw":
            send = start_peer([*send_cmd, str(port)])
        else:
            send = start_peer([*send_cmd[:-1], send_cmd[-1] + str(port)])
        peak = [0, 0]
        sampler_done = threading.Event()

        def sample() -> None:  # the receiver's memory every 20 ms until it exits
            while not sampler_done.wait(0.02):
                _memory(recv.pid, peak)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            s_out, s_err = send.communicate(timeout=timeout)  # read as it comes: no stall
            if send.returncode != 0 and recv.poll() is None:
                recv.kill()  # no source is coming: do not wait out the timeout
            r_out, r_err = recv.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in (send, recv):
                p.kill()
                p.wait()
            sampler_done.set()
            return Run(kind, None, peak[0], peak[1], f"no result after {timeout:.0f} s")
        seconds = time.monotonic() - t0
        s_rc, r_rc = _wait(send, 1), _wait(recv, 1)
        sampler_done.set()
        sampler.join()
        done, sent = last_json(r_out), last_json(s_out)
        if s_rc != 0 or r_rc != 0 or done.get("event") != "completed":
            why = (s_err or r_err).strip().splitlines()
            return Run(kind, None, peak[0], peak[1], why[-1] if why else f"exit {s_rc}/{r_rc}")
        if kind != "raw" and sent.get("ram_digest") != done.get("ram_digest"):
            return Run(kind, None, peak[0], peak[1], f"digests differ: sent {sent.get('ram_digest')}, "
                                                     f"received {done.get('ram_digest')}")
        return Run(kind, seconds, peak[0], peak[1])
    finally:
        shutil.rmtree(out, ignore_errors=True)



def run(size: int, repeat: int, say: Any = print) -> Results:
    results = Results(size)
    image = make_image(size)
    try:
        for rep in range(repeat):
            order = KINDS if rep % 2 == 0 else tuple(reversed(KINDS))
            for kind in order:
                r = run_once(kind, image, size)
                results.runs.append(r)
                figure = f"{r.seconds:6.2f} s" if r.seconds else f"FAILED: {r.error}"[:50]
                say(f"  {rep + 1}/{repeat} {kind:8} {figure}, receiver anon peak "
                    f"{r.anon_peak / MiB:.0f} MiB, RSS {r.rss_peak / MiB:.0f} MiB")
    finally:
        image.unlink()
    return results


def summary(results: Results) -> list[str]:
    """One line per kind: median seconds, raw / kind, memory (fits 80 columns)."""
    raw = results.median("raw")
    lines = ["kind      median s  x raw  anon peak MiB  RSS MiB  runs ok/failed"]
    for kind in KINDS:
        med, ok = results.median(kind), results.ok(kind)
        failed = sum(1 for r in results.runs if r.kind == kind and not r.seconds)
        ratio = f"{raw / med:5.2f}" if med and raw else "  n/a"
        anon = statistics.median(r.anon_peak for r in ok) / MiB if ok else 0
        rss = statistics.median(r.rss_peak for r in ok) / MiB if ok else 0
        lines.append(f"{kind:9} {med or 0:8.2f}  {ratio}  {anon:13.0f}  {rss:7.0f}  "
                     f"{len(ok)}/{failed}")
    lines.append("x raw: raw median / kind median (1.00 = as fast as the raw pair)")
    return lines


def bench_cli(size: int, repeat: int) -> dict[str, Any]:
    """Run the benchmark, print each run and the summary; return every run (for JSON)."""
    print(f"bench cli: a {size // MiB} MiB image in /dev/shm into /dev/shm, start to exit;\n"
          f"kinds {', '.join(KINDS)} alternating, {repeat} repetition(s): {len(KINDS) * repeat} runs",
          flush=True)
    results = run(size, repeat, say=lambda line: print(line, flush=True))
    for line in summary(results):
        print(line)
    raw = results.median("raw")
    return {"size": size, "repeat": repeat,
            "medians": {k: results.median(k) for k in KINDS},
            "ratios": {k: (raw / m if raw and m else None) for k in KINDS for m in [results.median(k)]},
            "runs": [r.__dict__ for r in results.runs]}


def main(argv: list[str] | None = None) -> int:
    """The raw peers, started as ``python -m mignet.bench.cli raw-recv|raw-send``."""
    ap = argparse.ArgumentParser(prog="python -m mignet.bench.cli")
    sub = ap.add_subparsers(dest="what", required=True)
    rr = sub.add_parser("raw-recv")
    rr.add_argument("--size", type=int, required=True)
    rr.add_argument("--out", required=True)
    rs = sub.add_parser("raw-send")
    rs.add_argument("--image", required=True)
    rs.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    if args.what == "raw-recv":
        return _raw_recv(args.size, args.out)
    return _raw_send(args.port, args.image)


if __name__ == "__main__":
    sys.exit(main())
