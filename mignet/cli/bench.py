"""``mignet bench``: every benchmark's subcommand. The benchmarks themselves live in
:mod:`mignet.bench`, outside the core, and are imported only when one runs."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from mignet.units import parse_rate, parse_size


def add_parser(sub: Any) -> None:
    """Add ``bench`` with its subcommands tcp, recv-model, live and rdma."""
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

    v = bsub.add_parser(
        "live", help="live precopy over dirty rates: rounds, downtime vs limit, tracking cost")
    v.add_argument("--size", default="512M", help="guest RAM (default 512M)")
    v.add_argument("--max-bandwidth", default="256MiB/s", metavar="RATE", help="the link (default 256MiB/s)")
    v.add_argument("--rates", default="0,32M,64M,128M,256M,512M", metavar="LIST",
                   help="vCPU write rates per second, comma separated")
    v.add_argument("--downtime-limit", type=int, default=300, metavar="MS")
    v.add_argument("--give-up", type=float, default=20.0, metavar="S",
                   help="force the switchover of a run that has not converged after S seconds")
    v.add_argument("--track-size", default="2G", help="guest size for the tracking-cost figure")
    v.add_argument("--json-out", metavar="FILE", help="also write the figures as JSON")
    v.set_defaults(func=cmd_bench_live)

    d = bsub.add_parser(
        "rdma", help="mignet RDMA vs ib_write_bw vs mignet TCP (run inside the soft-RoCE guest)")
    d.add_argument("--size", default="64M", help="guest RAM per migration (default 64M)")
    d.add_argument("--repeat", type=int, default=3)
    d.add_argument("--addr", default=None, help="RDMA netdev address (default $MIGNET_RDMA_ADDR "
                                                 "or 10.9.0.1)")
    d.add_argument("--json-out", metavar="FILE", help="also write the figures as JSON")
    d.set_defaults(func=cmd_bench_rdma)


def _write_json(path: str | None, result: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)


def cmd_bench_tcp(args: argparse.Namespace) -> int:
    from mignet.bench.tcp import bench_tcp

    _write_json(args.json_out, bench_tcp(parse_size(args.size), args.repeat))
    return 0


def cmd_bench_recv_model(args: argparse.Namespace) -> int:
    from mignet.bench.recv_model import bench_recv_model

    _write_json(args.json_out, bench_recv_model(args.size, args.blobs, Path(args.plots), args.repeat,
                                                args.listen))
    return 0


def cmd_bench_live(args: argparse.Namespace) -> int:
    from mignet.bench.live import bench_live

    result = bench_live(parse_size(args.size), parse_rate(args.max_bandwidth),
                        [parse_rate(r) for r in args.rates.split(",")], args.downtime_limit,
                        args.give_up, parse_size(args.track_size))
    _write_json(args.json_out, result)
    return 0


def cmd_bench_rdma(args: argparse.Namespace) -> int:
    from mignet.bench.rdma import bench_rdma

    addr = args.addr or os.environ.get("MIGNET_RDMA_ADDR", "10.9.0.1")
    _write_json(args.json_out, bench_rdma(parse_size(args.size), args.repeat, addr))
    return 0
