"""mignet over rdma: with one connection against multifd (``--channels N``, a queue pair per
channel), side by side in one soft-RoCE guest.

Each run is a fresh ``mignet recv --listen rdma:…`` and ``mignet send`` of a random guest;
the figure is send's own ``seconds`` (connect to completion: the destination's registration
and every page landed). Runs rotate between the channel counts; medians are printed as a
markdown table (and the runs as JSON with ``--json-out``). A failed run is reported as
failed, never left out. Run it inside the guest:

    mignet rxe run --mem 3G --rwdir /tmp/out -- .venv/bin/python tools/rxe/multifd_bench.py \\
        --size 128M --channels 1 2 --repeat 3 --json-out /tmp/out/multifd-rdma.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ADDR = os.environ.get("MIGNET_RDMA_ADDR", "10.9.0.1")


def one_run(size: str, channels: int, port: int) -> float | str:
    """send's seconds, or why the run failed."""
    uri = f"rdma:{ADDR}:{port}"
    mignet = [sys.executable, "-m", "mignet"]
    recv = subprocess.Popen([*mignet, "recv", "--listen", uri, "--json", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert recv.stdout is not None
        if not recv.stdout.readline():
            return f"recv did not listen: {recv.communicate(timeout=30)[1].strip()}"
        extra = ["--channels", str(channels)] if channels > 1 else []
        send = subprocess.run([*mignet, "send", uri, "--size", size, "--fill", "random", "--json",
                               "--quiet", *extra], capture_output=True, text=True, timeout=900)
        out, err = recv.communicate(timeout=120)
        if send.returncode or recv.returncode:
            return f"failed: send {send.returncode} {send.stderr.strip()} / recv {recv.returncode} {err.strip()}"
        sent = json.loads(send.stdout.strip().splitlines()[-1])
        got = json.loads(out.strip().splitlines()[-1])
        if sent["ram_digest"] != got["ram_digest"]:
            return "failed: digests differ"
        return float(sent["seconds"])
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="128M")
    p.add_argument("--channels", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json-out")
    args = p.parse_args()
    ports = itertools.count(31000 + os.getpid() % 1000 * 10)
    runs: dict[int, list[float | str]] = {n: [] for n in args.channels}
    for r in range(args.repeat):
        order = args.channels[r % len(args.channels):] + args.channels[:r % len(args.channels)]
        for n in order:
            result = one_run(args.size, n, next(ports))
            runs[n].append(result)
            print(f"channels {n}: {result}", flush=True)
    print("\n| --channels | median s | MiB/s | runs (s) |\n| --- | --- | --- | --- |")
    size_mib = int(args.size.rstrip("M"))
    for n, rs in runs.items():
        ok = [x for x in rs if isinstance(x, float)]
        med = statistics.median(ok) if ok else None
        shown = ", ".join(f"{x:.2f}" if isinstance(x, float) else "failed" for x in rs)
        rate = f"{size_mib / med:.1f}" if med else "-"
        print(f"| {n} | {med:.2f} | {rate} | {shown} |" if med else f"| {n} | failed | - | {shown} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"size": args.size, "runs": runs}, indent=1))
    return 0 if all(isinstance(x, float) for rs in runs.values() for x in rs) else 1


if __name__ == "__main__":
    sys.exit(main())
