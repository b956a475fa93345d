"""CLI plugin of the live package: ``mignet bench live``. (``send --live`` and ``demo`` live
in :mod:`mignet.cli` beside the static paths they extend.)"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..ram import parse_size


def _rate(text: str) -> int:
    return parse_size(text.removesuffix("/s"))


def register(subparsers: Any, bench_subparsers: Any) -> None:
    b = bench_subparsers.add_parser(
        "live", help="live precopy over dirty rates: rounds, downtime vs limit, tracking cost")
    b.add_argument("--size", default="512M", help="guest RAM (default 512M)")
    b.add_argument("--max-bandwidth", default="256MiB/s", metavar="RATE", help="the link (default 256MiB/s)")
    b.add_argument("--rates", default="0,32M,64M,128M,256M,512M", metavar="LIST",
                   help="vCPU write rates per second, comma separated")
    b.add_argument("--downtime-limit", type=int, default=300, metavar="MS")
    b.add_argument("--give-up", type=float, default=20.0, metavar="S",
                   help="force the switchover of a run that has not converged after S seconds")
    b.add_argument("--track-size", default="2G", help="guest size for the tracking-cost figure")
    b.add_argument("--json-out", metavar="FILE", help="also write the figures as JSON")
    b.set_defaults(func=cmd_bench_live)


def cmd_bench_live(args: argparse.Namespace) -> int:
    from .bench import bench_live

    result = bench_live(parse_size(args.size), _rate(args.max_bandwidth),
                        [_rate(r) for r in args.rates.split(",")], args.downtime_limit, args.give_up,
                        parse_size(args.track_size))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0
