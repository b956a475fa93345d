"""Where an RDMA migration's source spends its time: run inside the soft-RoCE guest.

    mignet rxe run --mem 3G -- .venv/bin/python tools/rxe/profile_rdma.py --size 256

One ib_write_bw run for scale, then mignet RDMA migrations (chunk mode, then pin-all) to a
fresh ``mignet recv`` process, each under cProfile on the source side: the receiver's
seconds and setup seconds, and the source's functions by own time. Under rxe the in-kernel
packet work shows up as ``post_send``. Not a benchmark: ``mignet bench rdma`` is.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mignet.bench import rdma as bench  # noqa: E402 - after the sys.path line above
from mignet.guest.devices import DeviceSet  # noqa: E402
from mignet.guest.ram import GuestRam  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="guest MiB (default 256)")
    ap.add_argument("--addr", default="10.9.0.1")
    ap.add_argument("--top", type=int, default=10, help="functions to list per run")
    args = ap.parse_args()
    ram = GuestRam.generate(args.size << 20, "random", seed=13)
    devices = DeviceSet.example(13)
    t = time.monotonic()
    for block in ram:
        block.zero_mask()
    print(f"zero check of the whole guest: {time.monotonic() - t:.3f} s", flush=True)
    print(f"ib_write_bw: {bench.ib_write_bw(args.addr, 19600, ram.total):.1f} MiB/s", flush=True)
    port = 19700
    for pin in (False, True):
        port += 3
        prof = cProfile.Profile()
        prof.enable()
        mib_s, st = bench._mignet_run(f"rdma:{args.addr}:{port}", ram, devices, pin_all=pin)
        prof.disable()
        print(f"mignet RDMA {'pin-all' if pin else 'chunks'}: {mib_s:.1f} MiB/s, receiver "
              f"{st['seconds']:.2f} s of which setup {st['setup_seconds']:.2f} s", flush=True)
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
        print(out.getvalue(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
