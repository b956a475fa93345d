"""The ``mignet bench`` subcommands."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..ram import parse_size


def add_bench_parser(sub: Any) -> Any:
    """Add ``bench``; returns its subparsers so plugins can add their benchmarks."""
    b = sub.add_parser("bench", help="benchmarks (figures side by side in one run)")
    bsub = b.add_subparsers(dest="bench", required=True)
    t = bsub.add_parser("tcp", help="mignet migration vs a raw socket loop over loopback")
    t.add_argument("--size", default="2G")
    t.add_argument("--repeat", type=int, default=3)
    t.add_argument("--json-out", metavar="FILE", help="also write the figures as JSON")
    t.set_defaults(func=cmd_bench_tcp)
    r = bsub.add_parser("recv-model", help="threaded vs coroutine loader: throughput, QMP latency, "
                                           "big-lock holds, main-loop stalls")
    r.add_argument("--size", default="2G", help="RAM of the RAM-heavy stream")
    r.add_argument("--blobs", type=int, default=1000, help="64 KiB device sections in the device-heavy stream")
    r.add_argument("--repeat", type=int, default=1)
    r.add_argument("--plots", default="docs", metavar="DIR", help="where the PNG plots go")
    r.add_argument("--listen", default="tcp:127.0.0.1:0", metavar="URI",
                   help="where destinations listen, e.g. rdma:10.9.0.1:7480 inside the soft-RoCE guest")
    r.add_argument("--json-out", metavar="FILE")
    r.set_defaults(func=cmd_bench_recv_model)
    return bsub


def cmd_bench_tcp(args: argparse.Namespace) -> int:
    from .tcp import bench_tcp

    result = bench_tcp(parse_size(args.size), args.repeat)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def cmd_bench_recv_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .recv_model import bench_recv_model

    result = bench_recv_model(args.size, args.blobs, Path(args.plots), args.repeat, args.listen)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return 0
