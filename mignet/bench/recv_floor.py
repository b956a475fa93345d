"""Where a receiver's time goes: the format's own floor for zero-copy placement.

QEMU's stream puts an 8-byte record word before every 4 KiB page, so placing pages straight
into guest RAM needs a vectored read with two buffers per page. This script measures, side
by side, one pre-encoded mignet stream of a random guest received by:

* ``raw``    — one ``recv_into`` loop into fresh memory (no framing: the ceiling);
* ``rawiov`` — a bare ``recvmsg_into`` loop with [8-byte word, 4 KiB page] buffer pairs
  into fresh memory, no parsing at all (the floor any zero-copy receiver of this format pays);
* ``mignet`` — mignet's Loader.

Each receiver is a fresh process; the sender replays the stream file with one ``sendall``.
Usage: python -m mignet.bench.recv_floor [--size 2G] [--repeat 3]
"""

from __future__ import annotations

import argparse
import mmap
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from mignet.bench.tcp import warm_free_memory
from mignet.guest.devices import DeviceSet
from mignet.guest.ram import GuestRam
from mignet.migration.savevm import Sender
from mignet.tcp import SocketChannel
from mignet.units import parse_size

ROOT = Path(__file__).resolve().parents[2]  # the checkout, for the receiver processes

RECEIVERS = {
    "raw": """
from mignet.guest.ram import allocate_guest_memory
buf = allocate_guest_memory(SIZE); mv = memoryview(buf); got = 0
while True:
    k = c.recv_into(mv[got:])
    if not k: break
    got += k
""",
    "rawiov": """
from mignet.guest.ram import allocate_guest_memory
buf = allocate_guest_memory(SIZE); mv = memoryview(buf); words = memoryview(bytearray(8 * 512))
page = 0; partial = 0
while True:
    iov = []
    for i in range(511):
        o = (page + i) * 4096 % (SIZE - 4096)
        iov += [words[i * 8:i * 8 + 8], mv[o:o + 4096]]
    k = c.recvmsg_into(iov)[0]
    if not k: break
    page += k // 4104  # timing only: where the bytes land does not matter here
""",
    "mignet": """
from mignet.migration.loadvm import Loader
from mignet.tcp import SocketChannel
Loader(SocketChannel(c)).run()
""",
}


def encode(size: int, path: Path) -> None:
    ram = GuestRam.generate(size, "random", seed=1)
    a, b = socket.socketpair()
    with open(path, "wb") as f:
        def sink() -> None:
            buf = bytearray(8 << 20)
            view = memoryview(buf)
            while n := b.recv_into(buf):
                f.write(view[:n])
        t = threading.Thread(target=sink)
        t.start()
        Sender(SocketChannel(a), ram, DeviceSet.empty()).run()
        a.close()
        t.join()


def run(kind: str, stream: Path, size: int) -> float:
    warm_free_memory(size + (256 << 20))
    code = ("import socket, sys, time\nls = socket.create_server(('127.0.0.1', 0))\n"
            "print(ls.getsockname()[1], flush=True)\nc, _ = ls.accept()\nt0 = time.perf_counter()\n"
            + RECEIVERS[kind].replace("SIZE", str(size + (64 << 20)))
            + "\nprint(time.perf_counter() - t0, flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    with open(stream, "rb") as f, socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    seconds = float(proc.stdout.readline())
    proc.wait()
    return size / seconds / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="2G")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        stream = Path(tmp) / "stream"
        encode(size, stream)
        results: dict[str, list[float]] = {k: [] for k in RECEIVERS}
        for _ in range(args.repeat):
            for kind in RECEIVERS:
                results[kind].append(run(kind, stream, size))
                print(f"{kind:7s} {results[kind][-1]:.2f} GB/s", flush=True)
    raw = statistics.median(results["raw"])
    for kind, values in results.items():
        med = statistics.median(values)
        print(f"median {kind:7s} {med:.2f} GB/s  ({med / raw:.2f} x raw)  runs {[round(v, 2) for v in values]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
