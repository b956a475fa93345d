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
    return bsub


def cmd_bench_tcp(args: argparse.Namespace) -> int:
    from .tcp import bench_tcp

    result = bench_tcp(parse_size(args.size), args.repeat)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return 0
